"""`sputnik rl` under torchrun (2 gloo processes, replicated weights, summed gradients):

- one update with the rows split over two ranks (evenly, unevenly, or all on one rank as dynamic
  sampling can leave it; every aggregation; μ = 2 with β > 0) gives the weights a single process gets
  from all rows, on both ranks bit for bit;
- the stage end to end: each rank samples half the prompts, the metrics count all of them,
  checkpoints hold both ranks' RNG states, a killed run resumes, a bad split is a clear error.

Tolerance: weights agree to 1e-6 after one SGD step of lr 0.1 (measured ~1e-9): fp32 on CPU, the
only difference being the order in which the two ranks' gradient halves are added.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sputnik.common import DeviceChoice
from sputnik.config import build
from sputnik.model import build_model
from sputnik.model.config import tiny
from sputnik.train.optim import OptimConfig
from sputnik.rl.update import update as rl_update
from sputnik.stages import rl
from test_rl_stage import MICRO, make_policy, weak_policy_dir  # noqa: F401 (a fixture)
from test_rl_update import _rollout

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"
# (variant, rows on rank 0 of 6, μ inner updates, β): the split, every aggregation, a rank with no rows,
# the clipped second inner step, the KL to a reference
CASES = [("dapo", 3, 1, 0.0), ("grpo", 3, 1, 0.0), ("dr_grpo", 3, 1, 0.0), ("dapo", 6, 1, 0.0), ("grpo", 4, 2, 0.1)]
ADV = [1.0, -0.5, 0.3, -1.2, 0.8, -0.4]

# Runs under torchrun: each rank takes its rows of the test batch, one update, saves its weights.
WORKER = """
import os, sys, torch
from safetensors.torch import save_file
from sputnik import distributed as dist_lib
sys.path.insert(0, {tests!r})
from test_rl_distributed import CASES, one_update

info = dist_lib.init_distributed(torch.device("cpu"))
for i, (variant, split, mu, beta) in enumerate(CASES):
    rows = list(range(split)) if info.rank == 0 else list(range(split, 6))
    save_file(one_update(variant, rows, mu, beta), f"{{out}}/case{{i}}_rank{{info.rank}}.safetensors")
dist_lib.teardown()
os._exit(0)  # as python -m sputnik does under torchrun: gloo's teardown can abort at interpreter exit
"""


def one_update(variant: str, rows: list[int], mu: int = 1, beta: float = 0.0) -> dict[str, torch.Tensor]:
    """Weights after one GRPO update (μ inner steps, β·KL to the initial weights) on `rows` of the
    test batch, from the seeded micro model. Plain
    SGD: the weights move by lr x gradient, so a wrong normalisation (a factor of 2 between ranks and
    the single process) shows; Adam's first step would hide it (it divides the gradient's scale out)."""
    from sputnik import distributed as dist_lib

    torch.manual_seed(0)
    model = build_model(tiny(**MICRO))
    ref = None
    if beta > 0:  # the frozen reference: the same initial weights
        torch.manual_seed(0)
        ref = build_model(tiny(**MICRO)).eval().requires_grad_(False)
    cfg = rl.Config(init="<test>", variant=variant, micro_batch=2, max_new_tokens=9, inner_updates=mu, beta=beta,
                    optim=OptimConfig(lr=0.1, grad_clip=0.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = _rollout().select(torch.tensor(rows, dtype=torch.long)) if rows else None
    adv_B = torch.tensor(ADV)[rows] if rows else torch.zeros(0)
    dc = DeviceChoice(torch.device("cpu"), torch.float32, "test")
    info = dist_lib.init_distributed(torch.device("cpu"))
    rl_update(model, ref, optimizer, batch, adv_B, cfg, dc, vocab_limit=300, info=info)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _port(offset: int) -> str:
    return str(29700 + (os.getpid() + offset) % 1000)


def test_update_split_over_two_ranks_equals_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(f"out = {str(tmp_path)!r}\n" + WORKER.format(tests=str(Path(__file__).parent)))
    res = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_port", _port(0), str(script)],
                         env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    torch.manual_seed(0)
    initial = build_model(tiny(**MICRO)).state_dict()
    for i, (variant, split, mu, beta) in enumerate(CASES):
        single = one_update(variant, list(range(6)), mu, beta)
        r0 = load_file(tmp_path / f"case{i}_rank0.safetensors")
        r1 = load_file(tmp_path / f"case{i}_rank1.safetensors")
        assert r0.keys() == single.keys()
        for k, v in single.items():
            assert torch.equal(r0[k], r1[k]), (variant, split, k)  # replicas stay bitwise equal
            torch.testing.assert_close(r0[k], v, atol=1e-6, rtol=1e-5, msg=f"{variant} {split} {k}")
        # the step moved the weights (an update that did nothing would pass the comparisons above)
        assert sum(not torch.equal(single[k], initial[k]) for k in single) > len(single) // 2


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return make_policy(tmp_path_factory.mktemp("policy"))


def _rl_args(policy, out, **over):
    opts = {**dict(init=str(policy), out_dir=str(out), project_dir=str(out.parent), tasks="addition", steps=2,
                   prompts_per_step=4, group_size=2, max_new_tokens=8, eval_every=0, eval_examples=5,
                   checkpoint_every=1, num_threads=1, dynamic_sampling="false"), **over}
    return [a for k, v in opts.items() for a in (f"--{k}", str(v))]


def _torchrun_rl(policy, out, port_offset, **over):
    args = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", _port(port_offset), "-m", "sputnik", "rl",
            *_rl_args(policy, out, **over)]
    return subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=240)


def _first_step_by_hand(policy, **knobs) -> dict:
    """Step 1 as the two ranks take it, in this process: rank r samples prompts 2r and 2r+1 of the
    step's 4 with its own seed from the initial policy; the 8 completions scored. What the metrics
    of step 1 must count, every rank's samples included."""
    from sputnik.inference.engine import Engine
    from sputnik.inference.sampling import SamplingParams
    from sputnik.rl.prompts import render, rollout_seed, sample_prompts
    from sputnik.rl.rewards import score
    from sputnik.tasks import parse_tasks
    from sputnik.train.loading import load_model, load_tokenizer
    from sputnik.train.session import process

    cfg = build(rl.Config, dict(init=str(policy), num_threads=1, prompts_per_step=4, group_size=2, **knobs))
    with process(cfg):  # the run's threads and kernels: the same sampling arithmetic
        tok = load_tokenizer("", str(policy))
        engine = Engine(load_model(str(policy)).train(), tok)
        tasks = parse_tasks(cfg.tasks)
        examples = sample_prompts(tasks, 0, 4, cfg.seed)
        flat_ex, comps = [], []
        for rank in (0, 1):
            mine = examples[2 * rank: 2 * rank + 2]
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                    stop_token_ids=(tok.eot_id,), seed=rollout_seed(cfg.seed, 0, rank))
            groups = engine.generate([render(tok, ex.prompt, cfg.recipe) for ex in mine], params, num_samples=2)
            comps += [c for g in groups for c in g]
            flat_ex += [ex for ex in mine for _ in range(2)]
        rewards, verdicts = score(cfg, {t.name: t for t in tasks}, flat_ex, comps, None)
    n = len(comps)
    return dict(reward_mean=sum(rewards) / n, accuracy=sum(v.correct for v in verdicts) / n,
                format_rate=sum(v.well_formatted for v in verdicts) / n,
                length_mean=sum(len(c.token_ids) for c in comps) / n,
                truncated_frac=sum(c.finish_reason == "length" for c in comps) / n, sample=comps[0].text[:300])


def test_rl_stage_under_torchrun_runs_checkpoints_and_resumes(weak_policy_dir, tmp_path):
    """The weak policy (writes the format about a third of the time) on 1-digit additions: the
    samples of a step differ, so its metrics show whether they count both ranks' samples."""
    out = tmp_path / "rl"
    knobs = dict(tasks="addition:max_digits=1", max_new_tokens=32)
    res = _torchrun_rl(weak_policy_dir, out, 1, **knobs)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ranks 2" in res.stderr
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2]  # rank 0 alone writes
    for r in recs[1:]:
        assert r["kept_sequences"] == 8 and "loss" in r  # both ranks' 2 prompts x 2 samples
        assert r["reward_mean"] == pytest.approx(r["accuracy"] + 0.1 * r["format_rate"])
    want = _first_step_by_hand(weak_policy_dir, tasks=["addition:max_digits=1"], max_new_tokens=32)
    assert 0.0 < want["format_rate"] < 1.0 and want["truncated_frac"] < 1.0  # the samples differ
    got = recs[1]
    assert {k: got[k] for k in want} == pytest.approx(want)
    ck = out / "checkpoints"
    state = json.loads((ck / "ckpt-000002" / "state.json").read_text())
    assert state["world_size"] == 2
    assert (out / "model" / "config.json").is_file()
    # as if killed after step 1: resume runs step 2 only, on two ranks again
    shutil.rmtree(ck / "ckpt-000002")
    (ck / "latest").write_text("ckpt-000001\n")
    res = _torchrun_rl(weak_policy_dir, out, 2, resume="auto", **knobs)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming at step 1" in res.stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    # whole groups per rank: 3 prompts cannot be split over 2 ranks
    res = _torchrun_rl(weak_policy_dir, tmp_path / "bad", 3, prompts_per_step=3)
    assert res.returncode != 0 and "multiple of the number of ranks" in res.stderr


def test_bench_rl_ranks_reads_the_metrics_rl_writes(policy_dir, tmp_path):
    """benchmarks/bench_rl_ranks.py summarises what `sputnik rl` writes (keys kept in step)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_rl_ranks", ROOT / "benchmarks" / "bench_rl_ranks.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rl.run(build(rl.Config, dict(init=str(policy_dir), out_dir=str(tmp_path / "rl"), project_dir=str(tmp_path),
                                 tasks=["addition"], steps=3, prompts_per_step=2, group_size=2,
                                 max_new_tokens=8, eval_every=0, eval_examples=4, num_threads=1,
                                 dynamic_sampling=False)))
    s = bench.summarise(tmp_path)
    assert s["steps"] == 2 and s["step_s"] > 0 and s["generated_tok_s"] > 0 and len(s["heldout"]) == 2
