"""Streamed corpora: `sputnik data tokenize` against the tokenizers library's own encode_batch on the
same text, its peak memory, and pretraining memory at two corpus sizes.

    .venv/bin/python benchmarks/bench_corpus.py [--gb 1.0] [--workers 2] [--dir /tmp/sputnik_bench_corpus]
        [--tokenizer DIR] [--vocab 4096] [--pretrain_steps 20] [--out bench_corpus.json]

Corpus: English-like text generated here (a 5,000-word lexicon of syllable words drawn with Zipf
frequencies, sentences of 5-25 words with punctuation and numbers, documents of 200-3,000 words)
written as JSONL files of 128 MB, plus a 10 MB corpus of the same kind; generated once, reused.
Tokenizer: --tokenizer, else a byte-level BPE of --vocab tokens fitted by `sputnik tokenizer train
--corpus` on a 32 MB sample of the corpus.

Rows (each in its own process; sides alternate when --repeats > 1):
  encode_batch   the tokenizers library on the same documents, read from the same files, in batches
                 of 4 MB with --workers Rayon threads: its rate counts encode_batch calls only;
                 reading is timed apart. encode_batch_fast (no character offsets, what our pipeline
                 calls) on the same batches, alternating which goes first: the floor for ours
  ours           `sputnik data tokenize --workers W` end to end (read, encode, write shards + index)
                 from a fresh output directory; peak RSS = the largest sum over its process tree
                 (sampled every 0.2 s)
  pretrain RSS   `sputnik pretrain --data` for --pretrain_steps steps of a small model on the 10 MB
                 and on the full corpus's shards: peak RSS of each process (ru_maxrss)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SPUTNIK = [sys.executable, "-m", "sputnik"]
FILE_BYTES = 128 << 20


# ---------------------------------------------------------------------------------------------
# The corpus
def generate(directory: Path, total_bytes: int, seed: int) -> Path:
    """JSONL files of English-like documents summing to total_bytes of text; skipped when present."""
    done = directory / "DONE.json"
    if done.is_file() and json.loads(done.read_text()) == {"bytes": total_bytes, "seed": seed}:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    syllables = ["ka", "to", "re", "in", "an", "er", "the", "on", "es", "st", "ou", "al", "ing", "ed", "ly", "ment",
                 "pro", "con", "de", "ver", "sa", "mi", "lo", "tu", "ne", "pa", "ri", "go", "ba", "fi"]
    lexicon = np.array(["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(5000)], dtype=object)
    p = 1.0 / np.arange(1, 5001) ** 1.07
    p /= p.sum()
    written, index = 0, 0
    while written < total_bytes:
        path, size = directory / f"part-{index:04d}.jsonl", 0
        with open(path, "w", encoding="utf-8") as f:
            while size < FILE_BYTES and written + size < total_bytes:
                words = lexicon[rng.choice(5000, rng.integers(200, 3000), p=p)]
                cuts = np.cumsum(rng.integers(5, 26, len(words) // 5 + 1))
                sentences = [" ".join(words[a:b]) for a, b in zip(np.r_[0, cuts], cuts) if a < len(words)]
                text = ". ".join(s[:1].upper() + s[1:] for s in sentences) + f". {rng.integers(0, 10**6)}."
                f.write(json.dumps({"text": text}) + "\n")
                size += len(text)
        written += size
        index += 1
    done.write_text(json.dumps({"bytes": total_bytes, "seed": seed}))
    return directory


# ---------------------------------------------------------------------------------------------
# Measurement helpers
def tree_rss_mb(pid: int) -> float:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd; wall seconds, the peak RSS summed over its process tree (sampled), its own ru_maxrss."""
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    peak, stop = [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"wall_s": wall, "peak_tree_rss_mb": peak[0], "maxrss_mb": usage.ru_maxrss / 1024, "output": out}


# ---------------------------------------------------------------------------------------------
# The library baseline (runs in its own process)
def baseline(args) -> None:
    from sputnik.corpus.sources import list_units, read_unit
    from sputnik.tokenizer import Tokenizer

    backend = Tokenizer.load(args.tokenizer).backend
    calls = {"encode_batch": backend.encode_batch, "encode_batch_fast": backend.encode_batch_fast}
    seconds = dict.fromkeys(calls, 0.0)
    read_s, tokens, num_bytes, n = 0.0, 0, 0, 0
    for unit in list_units([args.corpus]):
        batches = read_unit(unit)
        while True:
            t = time.perf_counter()
            batch = next(batches, None)
            read_s += time.perf_counter() - t
            if batch is None:
                break
            order = list(calls) if n % 2 == 0 else list(calls)[::-1]  # alternate: neither always runs first
            for name in order:
                t = time.perf_counter()
                encodings = calls[name](batch, add_special_tokens=False)
                seconds[name] += time.perf_counter() - t
            n += 1
            tokens += sum(len(e) for e in encodings)
            num_bytes += sum(len(d.encode()) for d in batch)
    print(json.dumps({"encode_s": seconds["encode_batch"], "encode_fast_s": seconds["encode_batch_fast"],
                      "read_s": read_s, "tokens": tokens, "bytes": num_bytes}))


# ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="corpus size in GB of text")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/sputnik_bench_corpus")
    ap.add_argument("--tokenizer", default="", help="tokenizer directory ('' = fit one on a sample of the corpus)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--pretrain_steps", type=int, default=20)
    ap.add_argument("--out", default="")
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline:
        return baseline(args)

    root = Path(args.dir)
    t = time.perf_counter()
    big = generate(root / "corpus", int(args.gb * 1e9), seed=0)
    small = generate(root / "corpus_10mb", 10_000_000, seed=1)
    print(f"corpus: {args.gb} GB in {big} ({time.perf_counter() - t:.0f} s to generate or find)", flush=True)
    tok = args.tokenizer
    if not tok:
        tok = str(root / f"tok{args.vocab}")
        if not (Path(tok) / "tokenizer.json").is_file():
            run_measured(SPUTNIK + ["tokenizer", "train", "--out_dir", tok, "--vocab_size", str(args.vocab), "--tasks", "",
                                    "--corpus", str(big), "--corpus_sample_mb", "32", "--project_dir", str(root)])
    threads = {"RAYON_NUM_THREADS": str(args.workers), "TOKENIZERS_PARALLELISM": "true"}
    results: dict = {"gb": args.gb, "workers": args.workers, "tokenizer": tok}

    lib = run_measured([sys.executable, __file__, "--baseline", "--tokenizer", tok, "--corpus", str(big)], threads)
    lib.update(json.loads(lib.pop("output").strip().splitlines()[-1]))
    results["encode_batch"] = lib
    print(f"encode_batch ({args.workers} threads): {lib['tokens'] / lib['encode_s'] / 1e6:.2f}M tokens/s "
          f"({lib['bytes'] / lib['encode_s'] / 1e6:.1f} MB/s); encode_batch_fast {lib['tokens'] / lib['encode_fast_s'] / 1e6:.2f}M "
          f"tokens/s; reading {lib['read_s']:.0f} s apart", flush=True)

    shards = root / "shards"
    subprocess.run(["rm", "-rf", str(shards), str(root / "shards_10mb")], check=True)
    # the same thread budget as the baseline: one worker runs in-process on the tokenizer's own
    # (Rayon) threads, W workers one thread each
    ours = run_measured(SPUTNIK + ["data", "tokenize", "--sources", str(big), "--tokenizer", tok, "--out_dir", str(shards),
                                   "--workers", str(args.workers), "--project_dir", str(root)], threads)
    ours.pop("output")
    from sputnik.corpus.tokenize import summarize

    manifest = json.loads((shards / "manifest.json").read_text())
    totals = summarize(shards, manifest["units"])
    ours["tokens"] = totals["train_tokens"] + totals["heldout_tokens"]
    ours["bytes"] = totals["bytes"]
    results["ours"] = ours
    rate = lambda r, s: r["tokens"] / r[s] / 1e6  # noqa: E731
    results["ratio_vs_encode_batch"] = rate(ours, "wall_s") / rate(lib, "encode_s")
    results["ratio_vs_encode_batch_fast"] = rate(ours, "wall_s") / rate(lib, "encode_fast_s")
    assert ours["tokens"] == lib["tokens"] + totals["documents"], "token counts differ (one <|endoftext|> per document)"
    print(f"ours ({args.workers} workers): {rate(ours, 'wall_s'):.2f}M tokens/s end to end "
          f"({ours['bytes'] / ours['wall_s'] / 1e6:.1f} MB/s), {results['ratio_vs_encode_batch']:.2f}x encode_batch, "
          f"{results['ratio_vs_encode_batch_fast']:.2f}x encode_batch_fast; "
          f"peak RSS {ours['peak_tree_rss_mb']:.0f} MB (process tree)", flush=True)

    # pretraining memory at two corpus sizes: the same small model, the same steps
    run_measured(SPUTNIK + ["data", "tokenize", "--sources", str(small), "--tokenizer", tok, "--out_dir",
                            str(root / "shards_10mb"), "--workers", str(args.workers), "--project_dir", str(root)])
    pre = {}
    for name, data in (("10MB", root / "shards_10mb"), (f"{args.gb}GB", shards)):
        out = root / f"pretrain_{name}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        r = run_measured(SPUTNIK + ["pretrain", "--out_dir", str(out), "--tokenizer", tok, "--data", str(data),
                                    "--steps", str(args.pretrain_steps), "--eval_every", str(args.pretrain_steps),
                                    "--progress", "false", "--num_threads", str(args.workers),
                                    "--project_dir", str(root), "--model.hidden_size", "128",
                                    "--model.num_hidden_layers", "2"])
        r.pop("output")
        pre[name] = r
        print(f"pretrain --data {name}: peak RSS {r['maxrss_mb']:.0f} MB, {r['wall_s']:.0f} s", flush=True)
    results["pretrain"] = pre
    sizes = [r["maxrss_mb"] for r in pre.values()]
    results["pretrain_rss_ratio"] = sizes[1] / sizes[0]
    print(f"pretrain RSS {args.gb} GB / 10 MB corpus: {results['pretrain_rss_ratio']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
