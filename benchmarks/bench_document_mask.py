"""Cost of document-masked attention (`pretrain --document_mask`): one training step (forward with the
loss, backward) of the speedrun's model on packed windows of several documents, with and without the
mask, A/B interleaved in one process.

Unmasked, CPU training on short windows takes MLA's blocked causal matmuls (model/layers.py); masked,
the same blocked matmuls within documents, skipping the key blocks before each block's documents
(model/documents.py); "document-masked, SDPA" is the masked path a GPU takes (SDPA with a boolean
[B, 1, T, T] mask over the full causal square), for comparison. Documents: random tokens ending in the
end-of-text token, lengths uniform in [16, 96] (the speedrun's task documents are ~20-150 tokens).

    python benchmarks/bench_document_mask.py --threads 2
    python benchmarks/bench_document_mask.py --threads 2 --seq_lens 128,512 --repeats 7 --out bench.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sputnik import pipeline  # noqa: E402
from sputnik.config import build  # noqa: E402
from sputnik.model import build_model  # noqa: E402
from sputnik.model.config import ModelConfig  # noqa: E402
from sputnik.model.documents import document_ids  # noqa: E402

EOT = 1


def _blocked():
    from sputnik.model import documents

    return documents.blocked_attention_applies


BLOCKED = _blocked()


def windows(batch: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        row = []
        while len(row) < seq_len + 1:
            n = int(torch.randint(16, 97, (1,), generator=g))
            row += torch.randint(2, vocab, (n - 1,), generator=g).tolist() + [EOT]
        rows.append(row[: seq_len + 1])
    return torch.tensor(rows)


def step_seconds(model, x_BT, y_BT, documents_BT, sdpa: bool = False) -> float:
    from sputnik.model import documents

    documents.blocked_attention_applies = (lambda q: False) if sdpa else BLOCKED
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    model(x_BT, y_BT, documents_BT=documents_BT).loss.backward()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq_lens", default="128,512")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per repeat")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = pipeline.stage_settings(build(pipeline.SpeedrunConfig, {}))["pretrain"]["model"]
    torch.manual_seed(0)
    rows = []
    for T in (int(t) for t in args.seq_lens.split(",")):
        model = build_model(build(ModelConfig, dict(settings, max_position_embeddings=max(T, 128)))).train()
        w = windows(args.batch, T, model.config.vocab_size, seed=T)
        x, y = w[:, :-1], w[:, 1:]
        docs = document_ids(x, EOT)
        variants = (("causal (unmasked)", None, False), ("document-masked", docs, False),
                    ("document-masked, SDPA", docs, True))
        times = {name: [] for name, _, _ in variants}
        for variant, d, sdpa in variants:  # warm-up
            step_seconds(model, x, y, d, sdpa)
        for _ in range(args.repeats):
            for variant, d, sdpa in variants:
                times[variant].append(statistics.mean(step_seconds(model, x, y, d, sdpa) for _ in range(args.steps)))
        base = statistics.median(times["causal (unmasked)"])
        for variant, ts in times.items():
            med = statistics.median(ts)
            rows.append(dict(seq_len=T, variant=variant, ms=1000 * med, lo=1000 * min(ts), hi=1000 * max(ts),
                             ratio=med / base, documents_per_window=float(docs[:, -1].float().mean() + 1)))
    print(f"| window | variant | ms / step (median [range]) | vs unmasked |  (batch {args.batch}, {args.threads} threads)")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['seq_len']} ({r['documents_per_window']:.1f} docs) | {r['variant']} | {r['ms']:.1f} "
              f"[{r['lo']:.1f}, {r['hi']:.1f}] | {r['ratio']:.2f}x |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
