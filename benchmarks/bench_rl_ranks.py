"""RL on a CPU: one process with T threads vs `torchrun --nproc_per_node N` with T/N threads per rank.

    .venv/bin/python benchmarks/bench_rl_ranks.py --init runs/speedrun/sft/model [--threads 2] [--ranks 2]
        [--steps 21] [--repeats 2] [--out ranks.json]

The same `sputnik rl` command (the speedrun's RL preset: 64 prompts x 8 samples, 120 new tokens,
DAPO, lr 1e-4) runs both ways, alternating, `--repeats` times each. Per-step times come from each
run's metrics.jsonl (rank 0's; the rollout time is the slowest rank's), step 1 dropped as warm-up.
The two runs sample different streams (each rank has its own seed), so the number of sequences kept
by dynamic sampling differs a little: the update is also reported per kept sequence.

Why this can pay on a CPU: a decode step of a small model is mostly Python and dispatch, which one
process runs on one core whatever its thread count; N processes run N of them at once.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
PROMPTS, GROUP = 64, 8  # the speedrun's RL preset


def rl_args(init: str, out: Path, steps: int, threads: int) -> list[str]:
    return ["rl", "--init", init, "--tasks", "addition,subtraction", "--steps", str(steps), "--prompts_per_step", str(PROMPTS),
            "--group_size", str(GROUP), "--max_new_tokens", "120", "--eval_every", "0", "--eval_examples", "100",
            "--checkpoint_every", "1000", "--optim.lr", "1e-4", "--num_threads", str(threads),
            "--out_dir", str(out / "rl"), "--project_dir", str(out)]


def summarise(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 1 and "time_rollout" in r]
    kept = sum(r["kept_sequences"] for r in steps)
    tokens = sum(r["length_mean"] * PROMPTS * GROUP for r in steps)
    return dict(steps=len(steps), step_s=sum(r["time_rollout"] + r["time_reward"] + r["time_update"] for r in steps) / len(steps),
                rollout_s=statistics.median(r["time_rollout"] for r in steps),
                update_s=statistics.median(r["time_update"] for r in steps),
                generated_tok_s=tokens / sum(r["time_rollout"] for r in steps),
                update_ms_per_kept_seq=1000 * sum(r["time_update"] for r in steps) / max(kept, 1),
                heldout=[r["heldout_accuracy"] for r in rows if "heldout_accuracy" in r])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", required=True, help="SFT model directory (e.g. runs/speedrun/sft/model)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads in all, split over the ranks")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=21)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.threads % a.ranks:
        raise SystemExit(f"--threads {a.threads} must split evenly over --ranks {a.ranks}")
    env_ranks = {**os.environ, "OMP_NUM_THREADS": str(a.threads // a.ranks)}  # torchrun would set 1
    results: dict[str, list[dict]] = {"one_process": [], "ranks": []}
    with tempfile.TemporaryDirectory(prefix="bench_rl_ranks_") as tmp:
        for rep in range(a.repeats):
            order = ["one_process", "ranks"] if rep % 2 == 0 else ["ranks", "one_process"]
            for kind in order:
                out = Path(tmp) / f"{kind}{rep}"
                if kind == "one_process":
                    cmd = [str(BIN / "sputnik"), *rl_args(a.init, out, a.steps, a.threads)]
                else:
                    cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(a.ranks), "--master_port",
                           str(29400 + os.getpid() % 500), "-m", "sputnik",
                           *rl_args(a.init, out, a.steps, a.threads // a.ranks)]
                subprocess.run(cmd, check=True, env=env_ranks if kind == "ranks" else None, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                results[kind].append(summarise(out))
                r = results[kind][-1]
                print(f"{kind:12s} step {r['step_s']:.3f} s  rollout {r['rollout_s']:.3f}  update {r['update_s']:.3f}  "
                      f"gen {r['generated_tok_s']:,.0f} tok/s  update {r['update_ms_per_kept_seq']:.2f} ms/kept seq  "
                      f"held-out {r['heldout']}")
    ratio = [o["step_s"] / r["step_s"] for o, r in zip(results["one_process"], results["ranks"])]
    gen = [r["generated_tok_s"] / o["generated_tok_s"] for o, r in zip(results["one_process"], results["ranks"])]
    print(f"{a.ranks} ranks x {a.threads // a.ranks} thread(s) vs 1 process x {a.threads}: step "
          + " / ".join(f"{x:.2f}x" for x in ratio) + " faster; rollouts " + " / ".join(f"{x:.2f}x" for x in gen))
    if a.out:
        Path(a.out).write_text(json.dumps(dict(args=vars(a), results=results, step_speedup=ratio, rollout_speedup=gen), indent=1))


if __name__ == "__main__":
    main()
