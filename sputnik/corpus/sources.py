"""Corpus sources -> documents, streamed in units of bounded size.

A source is a path:

    DIR             every .txt, .jsonl(.gz) and .parquet file in it (recursively, in path order),
                    each as below
    FILE.txt        one document
    FILE.jsonl      one document per line: the record's `text_field` (JSON Lines; .jsonl.gz too)
    FILE.parquet    one document per row: the column `text_field` (pyarrow)
    DIR saved by `datasets` (`Dataset.save_to_disk`: dataset_info.json + *.arrow): one per row

A *unit* is a piece of one source read by one worker into one shard: a group of text files, a
byte range of a JSONL file (cut at line starts), a row range of a parquet row group or of a saved
dataset. Units are listed once, in a fixed order that depends only on the sources and
`unit_bytes`, so the shards a corpus gives never depend on how many workers wrote them. A worker
holds one unit's documents a batch at a time, never the source: memory stays bounded whatever the
corpus size.
"""
from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BATCH_BYTES = 4 << 20  # documents handed to the tokenizer at once


@dataclass(frozen=True)
class Unit:
    kind: str              # "txt" | "jsonl" | "parquet" | "arrow"
    path: str              # the file (txt: the first file of the group)
    start: int = 0         # jsonl: byte offset; parquet/arrow: first row
    stop: int = 0          # jsonl: byte offset (exclusive); parquet/arrow: row after the last
    files: tuple = ()      # txt: the files of the group
    group: int = 0         # parquet: row group

    def describe(self) -> str:
        if self.kind == "txt":
            return f"{len(self.files)} text file(s) from {self.files[0]}"
        what = "bytes" if self.kind == "jsonl" else "rows"
        return f"{self.path} {what} {self.start}..{self.stop}"


def _need_pyarrow(path) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ValueError(f"{path}: reading parquet and `datasets` directories needs pyarrow "
                         "(pip install 'sputnik[data]')") from None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def list_units(sources: list[str], unit_bytes: int = 64 << 20, text_field: str = "text") -> list[Unit]:
    """Every unit of every source, in source order. Raises ValueError naming a missing, empty or
    unsupported source."""
    units: list[Unit] = []
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise ValueError(f"corpus source {path} does not exist")
        if _is_saved_dataset(path):
            units += _arrow_units(path, unit_bytes, text_field)
        elif path.is_dir():
            files = sorted(p for p in path.glob("**/*") if p.is_file() and _kind(p))
            if not files:
                raise ValueError(f"corpus directory {path} holds no .txt, .jsonl or .parquet files "
                                 "(nor is it a directory saved by datasets' save_to_disk)")
            texts = [f for f in files if _kind(f) == "txt"]  # small files: grouped into units
            units += _txt_units(texts, unit_bytes) if texts else []
            for f in files:
                units += _file_units(f, unit_bytes, text_field) if _kind(f) != "txt" else []
        elif _kind(path):
            units += _txt_units([path], unit_bytes) if _kind(path) == "txt" else _file_units(path, unit_bytes, text_field)
        else:
            raise ValueError(f"corpus source {path}: unsupported (give .txt, .jsonl(.gz), .parquet files, directories "
                             "of them, or a directory written by datasets' save_to_disk)")
    return units


def _kind(path: Path) -> str | None:
    if path.suffix == ".txt":
        return "txt"
    if path.name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        return "jsonl"
    return "parquet" if path.suffix == ".parquet" else None


def _file_units(path: Path, unit_bytes: int, text_field: str) -> list[Unit]:
    return _jsonl_units(path, unit_bytes) if _kind(path) == "jsonl" else _parquet_units(path, unit_bytes, text_field)


def _txt_units(files: list[Path], unit_bytes: int) -> list[Unit]:
    units, group, size = [], [], 0
    for f in files:
        group.append(str(f))
        size += f.stat().st_size
        if size >= unit_bytes:
            units.append(Unit("txt", group[0], files=tuple(group)))
            group, size = [], 0
    if group:
        units.append(Unit("txt", group[0], files=tuple(group)))
    return units


def _jsonl_units(path: Path, unit_bytes: int) -> list[Unit]:
    if path.name.endswith(".gz"):  # a gzip stream cannot be entered mid-way: one unit
        return [Unit("jsonl", str(path), 0, -1)]
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"corpus source {path} is empty")
    # Cut points land on line starts, found by reading at most one line after each nominal offset.
    cuts = [0]
    with path.open("rb") as f:
        while cuts[-1] + unit_bytes < size:
            f.seek(cuts[-1] + unit_bytes)
            f.readline()
            if f.tell() >= size:
                break
            cuts.append(f.tell())
    cuts.append(size)
    return [Unit("jsonl", str(path), a, b) for a, b in zip(cuts, cuts[1:])]


def _parquet_units(path: Path, unit_bytes: int, text_field: str) -> list[Unit]:
    _need_pyarrow(path)
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises ArrowInvalid on a file that is not parquet
        raise ValueError(f"corpus source {path} is not a readable parquet file: {e}") from None
    if text_field not in meta.schema.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {meta.schema.names}); set --text_field")
    # One unit per row group: a row group is read as a stream of record batches, and entering one
    # mid-way would decompress the rows before the entry point anyway.
    return [Unit("parquet", str(path), 0, meta.row_group(g).num_rows, group=g) for g in range(meta.num_row_groups)]


def _arrow_units(path: Path, unit_bytes: int, text_field: str) -> list[Unit]:
    _need_pyarrow(path)
    files = _arrow_files(path)
    units = []
    for f in files:
        table = _open_arrow(f)
        if text_field not in table.column_names:
            raise ValueError(f"{f}: no column {text_field!r} (columns: {table.column_names}); set --text_field")
        rows, size = table.num_rows, max(1, table.nbytes)
        step = max(1, int(rows * unit_bytes / size))
        units += [Unit("arrow", str(f), a, min(a + step, rows)) for a in range(0, rows, step)]
    return units


def _arrow_files(path: Path) -> list[Path]:
    """The data files of a `save_to_disk` directory, in the order its state.json lists them."""
    try:
        state = json.loads((path / "state.json").read_text())
        files = [path / d["filename"] for d in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}/state.json: not a `datasets` save_to_disk directory ({e})") from None
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{path}: data file {missing[0]} listed in state.json is missing")
    return files


def _open_arrow(file: Path):
    """A saved dataset's .arrow file (the Arrow IPC stream format) as a memory-mapped table."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(file)) as source:
            return pa.ipc.open_stream(source).read_all()
    except Exception as e:
        raise ValueError(f"{file}: not a readable Arrow stream ({e})") from None


# ---------------------------------------------------------------------------------------------
def read_unit(unit: Unit, text_field: str = "text") -> Iterator[list[str]]:
    """The unit's documents in batches of about BATCH_BYTES of text. Empty documents are kept here
    (the shard writer skips them); a malformed record raises ValueError naming file and line/row."""
    if unit.kind == "txt":
        yield from _batched(_read_txt(f) for f in unit.files)
    elif unit.kind == "jsonl":
        yield from _batched(_read_jsonl(unit, text_field))
    else:
        yield from _read_columnar(unit, text_field)


def _read_txt(file: str) -> str:
    try:
        return Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {file} is not UTF-8: {e}") from None
    except OSError as e:
        raise ValueError(f"text file {file}: {e}") from None


def _read_jsonl(unit: Unit, text_field: str) -> Iterator[str]:
    gz = unit.stop == -1
    with (gzip.open(unit.path, "rb") if gz else open(unit.path, "rb")) as f:
        if not gz:
            f.seek(unit.start)
        line_no = None if unit.start else 0  # a unit past the first knows its byte offset, not its line number
        pos = unit.start
        for raw in f:
            if not gz and pos >= unit.stop:
                break
            where = f"{unit.path}:{line_no + 1}" if line_no is not None else f"{unit.path} (byte {pos})"
            pos += len(raw)
            if line_no is not None:
                line_no += 1
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{where}: not a JSON line ({e})") from None
            text = rec.get(text_field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{where}: expected a JSON object with a string field {text_field!r}")
            yield text


def _read_columnar(unit: Unit, text_field: str) -> Iterator[list[str]]:
    if unit.kind == "parquet":
        import pyarrow.parquet as pq

        chunks = (b.column(0) for b in pq.ParquetFile(unit.path).iter_batches(
            batch_size=1024, row_groups=[unit.group], columns=[text_field]))
    else:
        rows = _open_arrow(Path(unit.path)).column(text_field).slice(unit.start, unit.stop - unit.start)
        chunks = (rows.slice(offset, 1024) for offset in range(0, len(rows), 1024))
    yield from _batched(_column_texts(chunks, unit, text_field))


def _column_texts(chunks, unit: Unit, text_field: str) -> Iterator[str]:
    """The column's strings, nulls skipped; a non-text value raises naming its row."""
    row = unit.start
    for chunk in chunks:
        for text in chunk.to_pylist():
            row += 1
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(f"{unit.path} row {row - 1}: column {text_field!r} is not text")
            yield text


def _batched(docs) -> Iterator[list[str]]:
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def sample_documents(sources: list[str], max_bytes: int, text_field: str = "text") -> Iterator[str]:
    """About max_bytes of documents spread over the whole corpus: an equal share from the start of
    every unit, one unit open at a time (the tokenizer's training sample of a corpus too large to
    read whole)."""
    units = list_units(sources, text_field=text_field)
    share = max(1, max_bytes // len(units))
    for unit in units:
        taken = 0
        reader = read_unit(unit, text_field)
        for batch in reader:
            for d in batch:
                yield d
                taken += len(d)
                if taken >= share:
                    break
            if taken >= share:
                break
        reader.close()
