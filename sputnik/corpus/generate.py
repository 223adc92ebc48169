"""`sputnik data generate`: a diverse pretraining corpus of any size, made here, with no downloads.

    sputnik data generate --out_dir runs/diverse --mb 1000            # @diverse: ~60 procedural sources
    sputnik data tokenize --sources runs/diverse --tokenizer DIR --out_dir runs/diverse_shards

Digit arithmetic alone gives a mixture of experts nothing to specialise on: the MoE-vs-dense
question needs text with many kinds of content. This generator mixes many procedural sources
(`--tasks`, default the `@diverse` preset: the built-in tasks with worked traces, and dozens of
reasoning-gym datasets, question and answer) into JSONL files of documents, each document a run
of `examples_per_doc` worked problems of one source, the sources taken in turn.

Only training-split problems are written (tasks' hash split), so every task's held-out problems
stay unseen: downstream accuracy measured on them is clean. Files are independent (file i is
seeded by (seed, i)), written in parallel, each under a temporary name and renamed when complete:
the output depends only on the config, and a killed run continues with the files it lacks.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

from sputnik.common import atomic_write_json, print0
from sputnik.config import knob, save_config



@dataclass
class Config:
    out_dir: str = knob("runs/diverse_corpus", "directory of the JSONL files (part-NNNNN.jsonl) and generate.json")
    mb: int = knob(100, "MB of text to write", min=1)
    tasks: list[str] = knob(default_factory=lambda: ["@diverse"],
                            help="the sources: task specs or @presets (`sputnik tasks list`; rg:NAME for reasoning-gym)")
    examples_per_doc: int = knob(8, "worked problems per document (all of one source)", min=1)
    file_mb: int = knob(64, "MB of text per JSONL file", min=1)
    seed: int = knob(0, "seed of the problem generators", min=0)
    workers: int = knob(0, "worker processes (0 = one per CPU core)", min=0)
    project_dir: str = knob("", "directory of the cost ledger ('' = the parent of out_dir)")


def file_seed(seed: int, index: int, task: int, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed}|{index}|{task}|{chunk}".encode(), digest_size=6).digest()
    return int.from_bytes(digest, "big")


def write_file(cfg: dict, index: int, target_bytes: int) -> dict:
    """File `index`: documents until target_bytes of text; written to a temp name, then renamed."""
    from sputnik.tasks import example_text, parse_task

    specs = cfg["tasks"]  # presets already expanded
    tasks = [parse_task(s) for s in specs]
    rng = random.Random(file_seed(cfg["seed"], index, -1, -1))
    buffers: list[list[str]] = [[] for _ in tasks]
    chunks = [0] * len(tasks)
    path = Path(cfg["out_dir"]) / f"part-{index:05d}.jsonl"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    written, docs = 0, 0
    order: list[int] = []
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            while written < target_bytes:
                if not order:  # the sources in a fresh random order each round: no periodic pattern
                    order = list(range(len(tasks)))
                    rng.shuffle(order)
                t = order.pop()
                while len(buffers[t]) < cfg["examples_per_doc"]:
                    with contextlib.redirect_stdout(io.StringIO()):  # some gym generators print progress dots
                        fresh = tasks[t].generate(4 * cfg["examples_per_doc"], split="train",
                                                  seed=file_seed(cfg["seed"], index, t, chunks[t]))
                    buffers[t] += [example_text(ex) for ex in fresh]
                    chunks[t] += 1
                text = "\n\n".join(buffers[t][:cfg["examples_per_doc"]])
                del buffers[t][:cfg["examples_per_doc"]]
                f.write(json.dumps({"text": text, "source": specs[t]}, ensure_ascii=False) + "\n")
                written += len(text.encode("utf-8"))
                docs += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"file": path.name, "bytes": written, "documents": docs}


@contextlib.contextmanager
def _hash_seed(value: str):
    """PYTHONHASHSEED=value in the environment the pool's spawned workers start with."""
    old = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["PYTHONHASHSEED"]
        else:
            os.environ["PYTHONHASHSEED"] = old


def run(cfg: Config, parents=()) -> dict:
    from sputnik.accounting.ledger import record_run
    from sputnik.tasks import expand_presets, parse_tasks

    out = Path(cfg.out_dir)
    specs = expand_presets(cfg.tasks)
    parse_tasks(specs)  # a bad spec fails here, named, before any worker starts
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "workers", "project_dir")}
    settings["tasks"] = specs
    record = out / "generate.json"
    if record.is_file():
        old = json.loads(record.read_text())
        if old != settings:
            diff = sorted(k for k in settings if old.get(k) != settings[k])
            raise ValueError(f"{out} holds a corpus generated with other settings ({', '.join(diff)}): "
                             "choose another --out_dir or delete it")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, settings)
    save_config(cfg, out / "stage_config.json")
    total, per_file = cfg.mb * 1_000_000, cfg.file_mb * 1_000_000
    sizes = [min(per_file, total - a) for a in range(0, total, per_file)]
    pending = [i for i in range(len(sizes)) if not (out / f"part-{i:05d}.jsonl").is_file()]
    workers = min(cfg.workers or os.cpu_count() or 1, max(1, len(pending)))
    print0(f"data generate: {len(sizes)} files of {len(specs)} sources, {len(sizes) - len(pending)} done, "
           f"{len(pending)} to do on {workers} worker(s) -> {out}")
    job = dict(settings, out_dir=str(out))
    t0 = time.time()
    with record_run(cfg.project_dir or out.resolve().parent, "data generate", cfg, parents=parents) as led:
        # Always in spawned workers with a fixed str-hash seed: some reasoning-gym generators iterate
        # sets, whose order follows the process's hash salt (common.fixed_hash_seed), so files written
        # in this process or under another salt would differ from run to run and with the worker count.
        with _hash_seed("0"), ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(write_file, job, i, sizes[i]) for i in pending}
            while futures:
                done, futures = wait(futures, return_when=FIRST_EXCEPTION)
                for f in done:
                    if f.exception() is not None:  # finished files stay; the rest is redone next time
                        for g in futures:
                            g.cancel()
                        raise f.exception()
                    _report(f.result(), t0)
        files = sorted(out.glob("part-*.jsonl"))
        result = {"files": len(files), "bytes": sum(p.stat().st_size for p in files), "sources": len(specs),
                  "wall_s": time.time() - t0}
        led.metrics.update(result)
        led.artifacts.append(str(out))
    print0(f"data generate: {result['files']} files, {result['bytes'] / 1e6:.0f} MB on disk -> {out}")
    return {**result, "out_dir": str(out), "run_ids": [led.run_id]}


def _report(info: dict, t0: float) -> None:
    print0(f"  {info['file']}: {info['documents']:,} documents, {info['bytes'] / 1e6:.1f} MB ({time.time() - t0:.0f}s)")
