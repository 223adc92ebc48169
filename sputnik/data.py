"""Documents -> token batches: packed pretraining windows and padded SFT batches.

Both loaders are explicit iterators over a deterministic order (a permutation seeded by
(seed, epoch)), cut into *global* batches of batch_size x world_size items; rank r takes rows
[r*B, (r+1)*B) of every global batch. Hence 2 ranks x batch B see, together, exactly the batches
1 rank x batch 2B sees, and every rank runs the same number of steps (the epoch's remainder that
does not fill a global batch is dropped; the permutation changes each epoch, so different items
are dropped). `state_dict()` is (epoch, cursor = items consumed this epoch, seed, ...): a loader
restored from it yields exactly the batches that were still to come.

Loaders are infinite unless num_epochs is set: take batches with next(loader) in a step loop.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from sputnik.common import print0

IGNORE_INDEX = -100  # targets with this value carry no loss (torch cross_entropy's ignore_index)


# ---------------------------------------------------------------------------------------------
# Resumable order shared by both loaders
class EpochSampler:
    """Yields, per step, the global batch of item indices: perm_epoch[cursor : cursor + B*W]."""

    def __init__(self, num_items: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0, num_epochs: int | None = None):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size={batch_size}, rank={rank}, world_size={world_size}: need "
                             "batch_size >= 1 and 0 <= rank < world_size")
        if seed < 0:
            raise ValueError(f"seed={seed}: must be >= 0")
        self.num_items, self.batch_size, self.rank, self.world_size = num_items, batch_size, rank, world_size
        self.global_batch = batch_size * world_size
        if num_items < self.global_batch:
            raise ValueError(f"only {num_items} items, fewer than one global batch "
                             f"(batch_size {batch_size} x world_size {world_size})")
        self.shuffle, self.seed, self.num_epochs = shuffle, seed, num_epochs
        self.epoch, self.cursor = 0, 0
        self._perm_epoch, self._perm = None, None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.global_batch

    def _order(self) -> np.ndarray:
        if self._perm_epoch != (self.epoch, self.seed, self.shuffle):  # cache one epoch's order
            n = self.num_items
            # SeedSequence([seed, epoch]) gives independent streams without seed arithmetic
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm_epoch = (self.epoch, self.seed, self.shuffle)
        return self._perm

    def next_global(self) -> np.ndarray:
        """Indices of the next global batch [B*W]; StopIteration after num_epochs."""
        if self.cursor + self.global_batch > self.num_items:  # remainder dropped: next epoch
            self.epoch, self.cursor = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        idx = self._order()[self.cursor:self.cursor + self.global_batch]
        self.cursor += self.global_batch
        return idx

    def rank_slice(self, global_idx: np.ndarray) -> np.ndarray:
        return global_idx[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "shuffle": self.shuffle, "num_items": self.num_items}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position. The global batch may differ from the saving run's (the cursor
        counts items, not steps), but the data must be the same."""
        if state["num_items"] != self.num_items:
            raise ValueError(f"loader state is for {state['num_items']} items but this dataset has "
                             f"{self.num_items}: the data changed since the checkpoint")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])


class _Loader:
    """Iterator plumbing: subclasses implement _batch(global_indices)."""

    sampler: EpochSampler

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(self.sampler.next_global())

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Pretraining: documents -> one token stream -> packed windows
def read_text_files(paths: Iterable[str | Path]) -> list[str]:
    """One document per file (UTF-8). A missing or undecodable file raises ValueError naming it."""
    docs = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"text file {path} does not exist")
        try:
            docs.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"text file {path} is not UTF-8: {e}") from None
    return docs


def tokenize_documents(docs: Sequence[str], tokenizer) -> torch.Tensor:
    """[N] int32 stream: doc_1 <eot> doc_2 <eot> ... Each document is *followed* by eot, so the
    model learns to end documents and the token after every eot is a document start (eot doubles
    as BOS). Empty documents are skipped."""
    docs = [d for d in docs if d]
    stream = []
    for ids in tokenizer.encode_batch(docs):
        stream.extend(ids)
        stream.append(tokenizer.eot_id)
    return torch.tensor(stream, dtype=torch.int32)  # int32 halves memory; batches are int64


def split_documents(docs: Sequence[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held_out) by a hash of each document's text: stable under reordering and appending,
    and duplicates always land on the same side (no train/eval leak). With >= 2 documents both
    sides are non-empty (the extreme-hash document is moved if needed)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction}: must be in [0, 1)")
    keyed = sorted((int.from_bytes(hashlib.sha256(d.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2**64, i)
                   for i, d in enumerate(docs))
    num_held = sum(u < eval_fraction for u, _ in keyed)
    if len(docs) >= 2 and eval_fraction > 0:
        num_held = min(max(num_held, 1), len(docs) - 1)
    held = {i for _, i in keyed[:num_held]}
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def train_eval_tokens(docs: Sequence[str], tokenizer, eval_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Separate train and held-out token streams. Split by document (split_documents) when there
    are >= 2 documents; a single document (one big text file) is cut at the token level instead:
    the last eval_fraction of its stream is held out."""
    if len(docs) >= 2 or eval_fraction == 0:
        train_docs, eval_docs = split_documents(docs, eval_fraction)
        return tokenize_documents(train_docs, tokenizer), tokenize_documents(eval_docs, tokenizer)
    stream = tokenize_documents(docs, tokenizer)
    cut = len(stream) - max(1, round(eval_fraction * len(stream)))
    return stream[:cut], stream[cut:]


class PackedDataset(_Loader):
    """Window i of the stream is tokens[i*T : i*T + T + 1] (consecutive windows share one token, so
    every token but the first is a target exactly once per epoch). Yields
    (inputs [B, T], targets [B, T]) int64 = (w[:, :-1], w[:, 1:]) for windows w [B, T+1].
    `tokens`: an in-memory stream (tensor or list), or token shards on disk (sputnik.corpus.shards.
    TokenShards), from which only the batch's windows are read."""

    def __init__(self, tokens, batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0, num_epochs: int | None = None, name: str = "pretraining data"):
        self.tokens = tokens if hasattr(tokens, "read") else torch.as_tensor(tokens).reshape(-1)
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len}: must be >= 1")
        if len(self.tokens) == 0:
            raise ValueError(f"dataset {name} is empty")
        self.seq_len = seq_len
        self.num_windows = (len(self.tokens) - 1) // seq_len
        try:
            self.sampler = EpochSampler(self.num_windows, batch_size, rank=rank, world_size=world_size,
                                        shuffle=shuffle, seed=seed, num_epochs=num_epochs)
        except ValueError as e:
            raise ValueError(f"dataset {name} ({len(self.tokens)} tokens, seq_len {seq_len}): {e}") from None

    def _batch(self, global_idx):
        starts = torch.as_tensor(self.sampler.rank_slice(global_idx)) * self.seq_len  # [B]
        if isinstance(self.tokens, torch.Tensor):
            w = self.tokens[starts[:, None] + torch.arange(self.seq_len + 1)].long()  # [B, T+1]
        else:
            w = torch.from_numpy(np.stack([self.tokens.read(s, s + self.seq_len + 1) for s in starts.tolist()]))
        return w[:, :-1], w[:, 1:]


# ---------------------------------------------------------------------------------------------
# SFT: (prompt, completion) pairs -> right-padded batches with loss-masked targets
def right_padding_mask(input_ids_BT: torch.Tensor, pad_id: int, targets_BT: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, T]: each row's positions up to its last real token, for a right-padded batch. Not
    `ids != pad_id`: a tokenizer whose pad token is its end-of-turn token (Llama 3 without a pad
    token: pad = eos = <|eot_id|>) has that token inside conversations, and those positions are real.
    A position is real up to the last one whose input is not the pad id or whose target is scored."""
    real_BT = input_ids_BT != pad_id
    if targets_BT is not None:
        real_BT = real_BT | (targets_BT != IGNORE_INDEX)
    T = input_ids_BT.shape[1]
    t_T = torch.arange(1, T + 1, device=input_ids_BT.device)
    end_B = (real_BT * t_T).amax(dim=1)  # one past the last real position (0 for an empty row)
    return t_T[None, :] <= end_B[:, None]


class SFTBatches(_Loader):
    """Yields (input_ids [B, T], targets [B, T]) int64. For a rendered chat ids[0..L) with loss
    mask m: inputs = ids[:-1], targets[t] = ids[t+1] if m[t+1] else -100; rows are right-padded
    (inputs with pad_id, targets with -100) to the longest row of the *global* batch, so all ranks
    get equal shapes and 2 ranks x B concatenate to exactly 1 rank x 2B. Right padding is safe
    under causal attention: real tokens never attend to the pads after them.

    Sequences with more than max_len inputs (L - 1 > max_len) are DROPPED and counted in
    num_dropped, not truncated: a truncated reasoning trace loses its answer and closing eot and
    would teach the model to ramble without ever stopping."""

    def __init__(self, pairs: Iterable[tuple[str, str]], tokenizer, batch_size: int, max_len: int, *,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0,
                 num_epochs: int | None = None, name: str = "sft data"):
        if max_len < 1:
            raise ValueError(f"max_len={max_len}: must be >= 1")
        self.pad_id = tokenizer.pad_id
        self.rows: list[tuple[list[int], list[int]]] = []
        self.num_dropped = 0
        for prompt, completion in pairs:
            ids, mask = tokenizer.render_chat(prompt, completion)
            if len(ids) - 1 > max_len:
                self.num_dropped += 1
                continue
            targets = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
            self.rows.append((ids[:-1], targets))
        if not self.rows:
            why = f" after dropping {self.num_dropped} sequences longer than max_len={max_len}" if self.num_dropped else ""
            raise ValueError(f"dataset {name} is empty{why}")
        if self.num_dropped:
            print0(f"{name}: dropped {self.num_dropped} of {self.num_dropped + len(self.rows)} sequences "
                   f"longer than max_len={max_len}")
        try:
            self.sampler = EpochSampler(len(self.rows), batch_size, rank=rank, world_size=world_size,
                                        shuffle=shuffle, seed=seed, num_epochs=num_epochs)
        except ValueError as e:
            raise ValueError(f"dataset {name}: {e}") from None

    def _batch(self, global_idx):
        T = max(len(self.rows[i][0]) for i in global_idx)  # global max: equal shapes on all ranks
        mine = self.sampler.rank_slice(global_idx)
        inputs = torch.full((len(mine), T), self.pad_id, dtype=torch.long)
        targets = torch.full((len(mine), T), IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(mine):
            x, y = self.rows[i]
            inputs[row, :len(x)] = torch.tensor(x)
            targets[row, :len(y)] = torch.tensor(y)
        return inputs, targets


def sft_batches(pairs: Iterable[tuple[str, str]], tokenizer, batch_size: int, max_len: int, **kwargs) -> SFTBatches:
    """SFTBatches(pairs, tokenizer, batch_size, max_len, rank=, world_size=, shuffle=, seed=, num_epochs=, name=)."""
    return SFTBatches(pairs, tokenizer, batch_size, max_len, **kwargs)


# ---------------------------------------------------------------------------------------------
# JSONL SFT data
def _pair_from_record(rec) -> tuple[str, str]:
    """One JSON record -> (prompt, completion); ValueError with the reason if it fits no format."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if (not isinstance(msgs, list) or len(msgs) != 2 or not all(isinstance(m, dict) for m in msgs)
                or [m.get("role") for m in msgs] != ["user", "assistant"]):
            raise ValueError("'messages' must be [{role: user, ...}, {role: assistant, ...}] (single turn)")
        prompt, completion = msgs[0].get("content"), msgs[1].get("content")
    elif "completion" in rec:
        prompt, completion = rec.get("prompt"), rec["completion"]
    elif "solution" in rec and "answer" in rec:
        prompt, completion = rec.get("prompt"), _reasoning_completion(rec)
    else:
        raise ValueError("expected keys prompt+completion, prompt+answer+solution or messages; "
                         f"got {sorted(rec)}")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError("prompt and completion must be strings")
    return prompt, completion


def _reasoning_completion(rec: dict) -> str:
    # The reasoning format has one owner: sputnik.tasks.format_completion (docs/CONTRACTS.md).
    from sputnik.tasks import Example, format_completion

    prompt, answer, solution = rec.get("prompt"), rec["answer"], rec["solution"]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not all(isinstance(v, str) for v in (prompt, answer, solution)):
        raise ValueError("prompt and solution must be strings, answer a string or number")
    return format_completion(Example(task="jsonl", prompt=prompt, answer=answer, solution=solution, meta={}))


def read_sft_jsonl(path: str | Path, *, skip_bad_lines: bool = False) -> tuple[list[tuple[str, str]], int]:
    """(pairs, num_skipped) from a JSONL file of {"prompt", "completion"}, {"prompt", "answer",
    "solution"} or {"messages": [user, assistant]} records. Blank lines are ignored. A malformed
    line raises ValueError "FILE:LINE: reason", or with skip_bad_lines=True is skipped, counted and
    reported once. No usable record at all raises ValueError "dataset FILE is empty"."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset {path} does not exist")
    pairs, skipped, first_bad = [], 0, None
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
                if not line:
                    continue
                pairs.append(_pair_from_record(json.loads(line)))
            except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
                if not skip_bad_lines:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
                skipped += 1
                first_bad = first_bad or f"line {lineno}: {e}"
    if skipped:
        print0(f"{path}: skipped {skipped} malformed lines (first: {first_bad})")
    if not pairs:
        raise ValueError(f"dataset {path} is empty" + (f" ({skipped} malformed lines skipped)" if skipped else ""))
    return pairs, skipped


# ---------------------------------------------------------------------------------------------
def check_vocab(tokenizer, model_vocab_size: int) -> None:
    """Every id the tokenizer can produce must index the model's embedding table."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's vocab_size "
                         f"{model_vocab_size}: ids >= {model_vocab_size} would index past the embedding "
                         "table; retrain the tokenizer smaller or build the model with a larger vocab_size")
