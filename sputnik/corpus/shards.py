"""Token shards on disk: written one unit at a time, read window by window.

A shard directory (`sputnik data tokenize --out_dir D`):

    D/manifest.json            what was tokenized how: sources, tokenizer fingerprint, dtype, split
    D/shards/00042.train.bin   unit 42's training documents: raw tokens (uint16 when the vocabulary
                               fits, else uint32), each document followed by <|endoftext|>
    D/shards/00042.train.idx   its document boundaries: int64 end offsets (.npy), ends[-1] = tokens
    D/shards/00042.heldout.*   the same for its held-out documents
    D/shards/00042.json        written last: token and document counts and sha256 of each file

A unit's files are written under temporary names and renamed before its .json is: a unit with a
.json is complete, one without is redone from the start (a killed run resumes unit by unit, and
no reader ever sees half a shard). Documents go to train or held-out by a hash of their text
(sputnik.data.split_documents' rule), so a duplicate never lands on both sides.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path

import numpy as np

from sputnik.common import atomic_write_json

SPLITS = ("train", "heldout")
FORMAT = 1


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, normalizer, specials)."""
    return hashlib.sha256(tokenizer.backend.to_str().encode("utf-8")).hexdigest()


def held_out(text: str, eval_fraction: float) -> bool:
    """The split_documents rule: the first 8 bytes of sha256(text) as a fraction below eval_fraction."""
    h = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < eval_fraction


def shard_path(out_dir: Path, index: int, split: str, ext: str) -> Path:
    return Path(out_dir) / "shards" / f"{index:05d}.{split}.{ext}"


def marker_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / "shards" / f"{index:05d}.json"


# ---------------------------------------------------------------------------------------------
# Writing
class _SplitWriter:
    """One split of one unit: tokens appended to a temp file, the document ends kept in memory
    (8 bytes a document), the sha256 of the bytes written."""

    def __init__(self, out_dir: Path, index: int, split: str, dtype):
        self.bin, self.idx = shard_path(out_dir, index, split, "bin"), shard_path(out_dir, index, split, "idx")
        self.tmp_bin = self.bin.with_name(f".{self.bin.name}.{os.getpid()}.tmp")
        self.tmp_idx = self.idx.with_name(f".{self.idx.name}.{os.getpid()}.tmp")
        self.file, self.dtype = open(self.tmp_bin, "wb"), dtype
        self.sha, self.tokens, self.ends, self.max_id = hashlib.sha256(), 0, [], -1

    def add(self, docs: list[list[int]]) -> None:
        """Append documents (id lists, each already closed by <|endoftext|>) in one write."""
        if not docs:
            return
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=self.dtype, count=int(lengths.sum()))
        self.max_id = max(self.max_id, int(tokens.max()))
        data = tokens.tobytes()
        self.file.write(data)
        self.sha.update(data)
        self.ends.extend((self.tokens + np.cumsum(lengths)).tolist())
        self.tokens += int(lengths.sum())

    def close(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        with open(self.tmp_idx, "wb") as f:
            np.save(f, np.asarray(self.ends, dtype=np.int64))
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.tmp_bin, self.bin)
        os.replace(self.tmp_idx, self.idx)
        return {"tokens": self.tokens, "documents": len(self.ends), "max_id": self.max_id, "sha256": self.sha.hexdigest()}

    def abort(self) -> None:
        self.file.close()
        for p in (self.tmp_bin, self.tmp_idx):
            p.unlink(missing_ok=True)


def write_unit(out_dir: Path, index: int, batches, tokenizer, eval_fraction: float, describe: str = "") -> dict:
    """Tokenize the unit's document batches into its train and held-out shards, then its marker.
    Returns the marker's content. Empty documents are skipped."""
    out_dir = Path(out_dir)
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    dtype, eot = token_dtype(tokenizer.vocab_size), tokenizer.eot_id
    writers = {s: _SplitWriter(out_dir, index, s, dtype) for s in SPLITS}
    num_bytes = 0
    try:
        for docs in batches:
            docs = [d for d in docs if d]
            split = {s: [] for s in SPLITS}
            for text, ids in zip(docs, tokenizer.encode_batch(docs)):
                ids.append(eot)
                split["heldout" if eval_fraction and held_out(text, eval_fraction) else "train"].append(ids)
                num_bytes += len(text.encode("utf-8", "surrogatepass"))
            for s, ids in split.items():
                writers[s].add(ids)
        result = {s: w.close() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    marker = {"unit": index, "source": describe, "bytes": num_bytes, **result}
    atomic_write_json(marker_path(out_dir, index), marker)
    return marker


_TOKENIZERS: dict = {}  # a worker process's tokenizer, loaded on its first unit


def tokenize_unit(out_dir: str, index: int, unit, tokenizer_path: str, text_field: str, eval_fraction: float) -> dict:
    """A worker's task: read one unit of a source and write its shards (imports no torch)."""
    from sputnik.corpus.sources import read_unit
    from sputnik.tokenizer import Tokenizer

    if tokenizer_path not in _TOKENIZERS:
        _TOKENIZERS[tokenizer_path] = Tokenizer.load_any(tokenizer_path)
    return write_unit(Path(out_dir), index, read_unit(unit, text_field), _TOKENIZERS[tokenizer_path], eval_fraction,
                      unit.describe())


def read_marker(out_dir: Path, index: int) -> dict | None:
    path = marker_path(out_dir, index)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable shard record ({e}); delete it to redo unit {index}") from None


# ---------------------------------------------------------------------------------------------
# Reading
class TokenShards:
    """One split of a shard directory as a single token stream (the shards concatenated in unit
    order): `read(a, b)` copies tokens [a, b) out, across shard boundaries, by positioned reads
    (pread). Not a memory map: random windows through a map fault in the kernel's readahead around
    each one (~0.4 MB a window here) and the mapped pages count as the process's memory, so RSS grew
    with the corpus (+120 MB after 40 batches of a 1 GB corpus); pread leaves those pages in the
    page cache, the kernel's to evict.

    Opening checks that every unit is complete, every file has the size its record says and every
    recorded largest id fits the vocabulary; `read` checks the ids it returns (a corrupt byte is
    caught when read, without touching the whole corpus at open). Each failure names the file."""

    def __init__(self, directory: str | Path, split: str = "train", vocab_size: int | None = None):
        self.files: list[int] = []  # open descriptors, one per shard with tokens
        try:
            self._open_all(directory, split, vocab_size)
        except BaseException:
            self.close()
            raise

    def _open_all(self, directory, split: str, vocab_size: int | None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: one of {SPLITS}")
        self.dir, self.split = Path(directory), split
        self.manifest = read_manifest(self.dir)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.vocab_size = vocab_size
        self.paths, self.doc_ends, starts = [], [], [0]
        for index in range(self.manifest["units"]):
            marker = read_marker(self.dir, index)
            if marker is None:
                raise ValueError(f"{self.dir}: unit {index} of {self.manifest['units']} was never finished "
                                 "(run the same `sputnik data tokenize` again to complete it)")
            info = marker[split]
            if info["tokens"] == 0:
                continue
            path = shard_path(self.dir, index, split, "bin")
            if vocab_size is not None and info["max_id"] >= vocab_size:
                raise ValueError(f"{path}: token id {info['max_id']} >= the tokenizer's vocabulary ({vocab_size}): "
                                 "the shards come from another tokenizer")
            self.files.append(self._open(path, info["tokens"]))
            self.paths.append(path)
            self.doc_ends.append(self._ends(shard_path(self.dir, index, split, "idx"), info) + starts[-1])
            starts.append(starts[-1] + info["tokens"])
        self.starts = np.asarray(starts, dtype=np.int64)  # stream offset of each shard, then the total
        if not self.files:
            raise ValueError(f"{self.dir}: the {split} split holds no tokens"
                             + (" (tokenize with --eval_fraction > 0 for a held-out split)" if split == "heldout" else ""))

    def _open(self, path: Path, expected: int) -> int:
        size = path.stat().st_size if path.is_file() else -1
        if size != expected * self.dtype.itemsize:
            what = "is missing" if size < 0 else f"has {size} bytes, expected {expected * self.dtype.itemsize}"
            raise ValueError(f"{path} {what} ({expected} {self.dtype.name} tokens): truncated or corrupt shard; "
                             "delete it and its .json and run `sputnik data tokenize` again")
        return os.open(path, os.O_RDONLY)

    def close(self) -> None:
        for fd in self.files:
            os.close(fd)
        self.files = []

    def __del__(self):
        self.close()

    @staticmethod
    def _ends(path: Path, info: dict) -> np.ndarray:
        try:
            ends = np.load(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable document index ({e})") from None
        if ends.ndim != 1 or len(ends) != info["documents"] or (len(ends) and int(ends[-1]) != info["tokens"]):
            raise ValueError(f"{path}: document index does not match its shard ({len(ends)} documents, "
                             f"expected {info['documents']})")
        return ends.astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def num_documents(self) -> int:
        return sum(len(e) for e in self.doc_ends)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the concatenated stream as int64."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"tokens [{start}, {stop}) outside the stream [0, {len(self)})")
        out = np.empty(stop - start, dtype=np.int64)
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            begin, end = int(self.starts[shard]), int(self.starts[shard + 1])
            take = min(stop, end) - pos
            piece = out[pos - start:pos - start + take]
            size = self.dtype.itemsize
            data = os.pread(self.files[shard], take * size, (pos - begin) * size)
            if len(data) != take * size:
                raise ValueError(f"{self.paths[shard]}: short read at token {pos - begin} (the file shrank while open?)")
            piece[:] = np.frombuffer(data, dtype=self.dtype)
            if self.vocab_size is not None and take and int(piece.max()) >= self.vocab_size:
                raise ValueError(f"{self.paths[shard]}: token id {int(piece.max())} >= the vocabulary ({self.vocab_size}) "
                                 f"near token {pos - begin}: corrupt shard; delete it and its .json and tokenize again")
            pos += take
            shard += 1
        return out

    def document(self, i: int) -> np.ndarray:
        """Document i's tokens (its closing <|endoftext|> included)."""
        ends = np.concatenate(self.doc_ends)
        return self.read(int(ends[i - 1]) if i else 0, int(ends[i]))


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{directory} is not a shard directory (no manifest.json): write one with `sputnik data tokenize`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: shard format {manifest.get('format')!r}, this version reads {FORMAT}")
    return manifest
