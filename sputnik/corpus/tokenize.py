"""`sputnik data tokenize`: a corpus of any size -> token shards, in parallel, resumable.

    sputnik data tokenize --sources corpus/,more.jsonl,web.parquet --tokenizer runs/speedrun/tokenizer \\
        --out_dir runs/corpus --workers 2
    sputnik pretrain --data runs/corpus ...          # reads the shards window by window

The sources are cut into units (sources.py), each unit tokenized by one worker process into one
shard (shards.py). Units are listed in a fixed order and a unit's shard depends only on its
documents and the tokenizer, so the output is the same whatever the number of workers, and a
killed run continues where it stopped (finished units are skipped; an unfinished one is redone).
Each worker holds one batch of one unit's documents at a time: memory is bounded by the unit
batch size, not the corpus. Every run is recorded in the project's cost ledger.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from sputnik.common import atomic_write_json, print0
from sputnik.config import knob, save_config
from sputnik.corpus import shards as S
from sputnik.corpus.sources import Unit, list_units
from sputnik.tokenizer import Tokenizer


@dataclass
class Config:
    sources: list[str] = knob(default_factory=list, help="corpus sources: directories of *.txt, .txt, .jsonl(.gz), .parquet "
                                                          "files, directories saved by datasets' save_to_disk (comma separated)")
    tokenizer: str = knob("", "tokenizer directory (ours from `sputnik tokenizer train`, or a Hugging Face tokenizer)")
    out_dir: str = knob("runs/corpus", "shard directory: manifest.json and shards/")
    text_field: str = knob("text", "the text field of JSONL records, parquet and dataset columns")
    eval_fraction: float = knob(0.01, "share of documents held out (by a hash of their text)", min=0.0, max=0.5)
    workers: int = knob(0, "worker processes (0 = one per CPU core)", min=0)
    unit_mb: int = knob(64, "MB of text per unit (one shard per unit and split)", min=1)
    project_dir: str = knob("", "directory of the cost ledger ('' = the parent of out_dir)")

    def __post_init__(self):
        if not self.sources:
            raise ValueError("sources: give at least one corpus source (--sources PATH[,PATH...])")
        if not self.tokenizer:
            raise ValueError("tokenizer: give the tokenizer directory (--tokenizer DIR)")


def manifest_for(cfg: Config, tokenizer, units: list[Unit]) -> dict:
    """What makes two tokenizations of a corpus the same: sources and their sizes, the unit cut,
    the tokenizer's definition (not its path), the split."""
    sources = [str(Path(p).resolve()) for p in cfg.sources]
    return {"format": S.FORMAT, "sources": sources, "source_bytes": [_size(Path(p)) for p in sources],
            "text_field": cfg.text_field, "unit_bytes": cfg.unit_mb << 20, "units": len(units),
            "eval_fraction": cfg.eval_fraction, "dtype": S.token_dtype(tokenizer.vocab_size).__name__,
            "tokenizer": {"sha256": S.tokenizer_fingerprint(tokenizer), "vocab_size": tokenizer.vocab_size,
                          "eot_id": tokenizer.eot_id}}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _worker_init() -> None:
    # one process per core: the tokenizer's own thread pool would oversubscribe the cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"


def run(cfg: Config, parents=()) -> dict:
    """Tokenize every unfinished unit; returns the totals (tokens, documents, bytes per split)."""
    from sputnik.accounting.ledger import record_run

    out = Path(cfg.out_dir)
    tokenizer = Tokenizer.load_any(cfg.tokenizer)
    units = list_units(cfg.sources, cfg.unit_mb << 20, cfg.text_field)
    manifest = manifest_for(cfg, tokenizer, units)
    if (out / "manifest.json").is_file():
        old = S.read_manifest(out)
        old.pop("tokenizer_path", None)
        if old != manifest:
            diff = sorted(k for k in manifest if old.get(k) != manifest[k])
            raise ValueError(f"{out} holds shards of another tokenization (differs in {', '.join(diff)}): "
                             "choose another --out_dir or delete it")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "manifest.json", {**manifest, "tokenizer_path": cfg.tokenizer})
    save_config(cfg, out / "stage_config.json")
    pending = [i for i in range(len(units)) if S.read_marker(out, i) is None]
    workers = min(cfg.workers or os.cpu_count() or 1, max(1, len(pending)))
    print0(f"data tokenize: {len(units)} units from {len(cfg.sources)} source(s), {len(units) - len(pending)} done, "
           f"{len(pending)} to do on {workers} worker(s) -> {out}")
    t0 = time.time()
    with record_run(cfg.project_dir or out.resolve().parent, "data tokenize", cfg, parents=parents) as led:
        args = (str(out),)
        tail = (cfg.tokenizer, cfg.text_field, cfg.eval_fraction)
        if workers == 1:  # in this process, with the tokenizer's own threads
            for n, i in enumerate(pending, 1):
                _report(S.tokenize_unit(*args, i, units[i], *tail), n, len(pending), t0)
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
                futures = {pool.submit(S.tokenize_unit, *args, i, units[i], *tail): i for i in pending}
                done_count = 0
                while futures:
                    done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                    for f in done:
                        futures.pop(f)
                        if f.exception() is not None:  # the first failure stops the run; finished units stay
                            for g in futures:
                                g.cancel()
                            raise f.exception()
                        done_count += 1
                        _report(f.result(), done_count, len(pending), t0)
        totals = summarize(out, len(units))
        totals["wall_s"] = time.time() - t0
        led.metrics.update({k: v for k, v in totals.items() if isinstance(v, (int, float))})
        led.artifacts.append(str(out))
    print0(f"data tokenize: {totals['train_tokens']:,} train + {totals['heldout_tokens']:,} held-out tokens, "
           f"{totals['documents']:,} documents, {totals['bytes'] / max(totals['wall_s'], 1e-9) / 1e6:.1f} MB/s -> {out}")
    return {**totals, "out_dir": str(out), "run_ids": [led.run_id]}


def _report(marker: dict, n: int, total: int, t0: float) -> None:
    tokens = marker["train"]["tokens"] + marker["heldout"]["tokens"]
    print0(f"  unit {marker['unit']} ({n}/{total}, {time.time() - t0:.0f}s): {tokens:,} tokens  [{marker['source']}]")


def summarize(out: Path, num_units: int) -> dict:
    totals = {"units": num_units, "bytes": 0, "documents": 0, "train_tokens": 0, "heldout_tokens": 0}
    for i in range(num_units):
        m = S.read_marker(out, i)
        totals["bytes"] += m["bytes"]
        for split in S.SPLITS:
            totals[f"{split}_tokens"] += m[split]["tokens"]
            totals["documents"] += m[split]["documents"]
    return totals
