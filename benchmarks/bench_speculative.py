"""Speculative decoding with a draft model vs plain decoding, batch 1, on a trained pair of one tokenizer.

    .venv/bin/python benchmarks/bench_speculative.py --target runs/speedrun/rl/model \\
        --draft runs/speedrun/distill/student_sft/model [--num-draft 1,2,4] [--prompts 16] [--threads 2]

Prompts: held-out problems of the target's tasks in its chat format (default addition), generation
to the end-of-turn token (at most --max-new-tokens). For each prompt, plain decoding (a kept Engine,
eager, batch 1) and draft_speculative_generate alternate; greedy and temperature 1. Reported: tokens/s
of each, the speed-up, the draft acceptance rate and tokens per target forward. Greedy outputs must
be identical (asserted).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from sputnik.common import atomic_write_text
from sputnik.inference.engine import Engine
from sputnik.inference.sampling import SamplingParams
from sputnik.inference.speculative import draft_speculative_generate
from sputnik.tasks import get_task
from sputnik.train.loading import load_model, load_tokenizer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True, help="the model directory to decode")
    ap.add_argument("--draft", required=True, help="a smaller model directory of the same tokenizer")
    ap.add_argument("--task", default="addition", help="task whose held-out prompts are used")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per setting")
    ap.add_argument("--num-draft", default="1,2,4", help="comma list of draft lengths K")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="longest completion")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--out", default="bench_speculative.json", help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    target, draft = load_model(args.target).eval(), load_model(args.draft).eval()
    tok = load_tokenizer("", args.target)
    prompts = [tok.render_prompt(ex.prompt) for ex in get_task(args.task).generate(args.prompts, split="test", seed=0)]
    engine = Engine(target, tok)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    res = {"target": args.target, "draft": args.draft, "target_params": n(target), "draft_params": n(draft),
           "settings": {}}
    for temp in (0.0, 1.0):
        for k in [int(x) for x in args.num_draft.split(",")]:
            plain_t = spec_t = plain_n = spec_n = drafted = accepted = forwards = 0
            for i, prompt in enumerate(prompts):
                params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=temp, seed=i,
                                        stop_token_ids=tok.stop_ids)
                t0 = time.perf_counter()
                plain = engine.generate([prompt], params)[0][0]
                plain_t += time.perf_counter() - t0
                t0 = time.perf_counter()
                spec, st = draft_speculative_generate(target, draft, prompt, params, num_draft=k)
                spec_t += time.perf_counter() - t0
                if temp == 0:
                    assert spec.token_ids == plain.token_ids, "greedy speculative decoding must equal greedy decoding"
                plain_n, spec_n = plain_n + len(plain.token_ids), spec_n + len(spec.token_ids)
                drafted, accepted, forwards = drafted + st.drafted, accepted + st.accepted, forwards + st.target_forwards
            row = {"plain_tok_s": plain_n / plain_t, "spec_tok_s": spec_n / spec_t,
                   "speedup": (spec_n / spec_t) / (plain_n / plain_t), "acceptance": accepted / max(drafted, 1),
                   "tokens_per_target_forward": spec_n / max(forwards + len(prompts), 1), "mean_len": spec_n / len(prompts)}
            res["settings"][f"T={temp:g},K={k}"] = row
            print(f"T={temp:g} K={k}: plain {row['plain_tok_s']:.0f} tok/s, speculative {row['spec_tok_s']:.0f} tok/s "
                  f"= {row['speedup']:.2f}x; acceptance {row['acceptance']:.2f}, "
                  f"{row['tokens_per_target_forward']:.2f} tokens a target forward", flush=True)
    atomic_write_text(args.out, json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
