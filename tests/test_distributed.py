"""Distribution invariances (sputnik/distributed.py with the pretrain loop):

- 2 gloo processes (torchrun, DDP or FSDP2) x batch 2  ==  1 process x batch 4, step by step;
- gradient accumulation 8 micro-batches x 1  ==  1 micro-batch x 8.

Tolerance: losses agree to rel 1e-5 (measured: ~1e-7). Everything is fp32 on CPU and the data order
is identical, so the only differences are summation order: the all-reduce adds two per-rank
gradients where the single process reduces over the batch inside one matmul, and the loss is
accumulated per micro-batch. Those round-offs (~1e-7 relative per op) pass through a few Adam
steps, whose normalisation does not amplify them at these gradient sizes.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sputnik import distributed as dist_lib
from sputnik.config import build
from sputnik.stages import pretrain

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"
RTOL = 1e-5
TINY_MOE = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=16,
                n_routed_experts=4, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=8)
COMMON = dict(seq_len=32, steps=6, eval_every=3, eval_batches=2, checkpoint_every=6, log_every=1, num_threads=1,
              progress=False, tasks=[], optim={"lr": 3e-3, "warmup_steps": 2})


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from sputnik.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("dist")
    rng = random.Random(0)
    docs = [" ".join(f"{a} plus {b} is {a + b}." for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(8)))
            for _ in range(120)]
    (root / "texts").mkdir()
    for i, d in enumerate(docs):
        (root / "texts" / f"{i:03d}.txt").write_text(d)
    train_tokenizer(docs, 300).save(root / "tok")
    return root


def cfg(ws, out, **over):
    return build(pretrain.Config, {**COMMON, "out_dir": str(out), "tokenizer": str(ws / "tok"),
                                   "texts": [str(ws / "texts")], "model": TINY_MOE, **over})


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def trajectory(out):
    """{(kind, step): value} of the train losses and eval losses."""
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {("eval" if "eval_loss" in r else "train", r["step"]): r.get("eval_loss", r.get("loss")) for r in rows}


def assert_close_trajectories(a, b):
    assert a.keys() == b.keys() and len(a) == 9  # 6 train steps + evals at 0, 3, 6
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=RTOL), key


def torchrun(ws, out, parallel):
    args = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
            "-m", "sputnik", "pretrain", "--out_dir", str(out), "--tokenizer", str(ws / "tok"),
            "--texts", str(ws / "texts"), "--tasks=", "--batch_size", "2", "--parallel", parallel]
    for k, v in COMMON.items():
        if k not in ("tasks", "optim"):
            args += [f"--{k}", str(v)]
    args += ["--optim.lr", "3e-3", "--optim.warmup_steps", "2"]
    args += [a for k, v in TINY_MOE.items() for a in (f"--model.{k}", str(v))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def single(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    pretrain.run(cfg(ws, out, batch_size=4))
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(ws, single, tmp_path, parallel):
    """Slower (~15-25 s each): real torchrun with 2 CPU processes."""
    out = tmp_path / parallel
    torchrun(ws, out, parallel)
    assert_close_trajectories(trajectory(out), trajectory(single))
    # rank 0 alone wrote: one metrics line per event, one checkpoint, one exported model
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 9
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("ckpt")] == ["ckpt-000006"]
    # the counters are global (both ranks' tokens), as the single process counts them, and rank 0 alone
    # records the run in the ledger
    counts = lambda d: {r["step"]: (r["tokens"], r["loss_tokens"]) for r in metrics(d) if "loss" in r}  # noqa: E731
    assert counts(out) == counts(single) and counts(out)[6][0] == 6 * 4 * 32
    ledger = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert [(r["event"], r["command"] if r["event"] == "started" else r["tokens"]) for r in ledger] == [
        ("started", "pretrain"), ("finished", 6 * 4 * 32)]
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model" / "model.safetensors")), load_file(str(single / "model" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_grad_accumulation_8x1_equals_1x8(ws, tmp_path):
    pretrain.run(cfg(ws, tmp_path / "a", batch_size=1, grad_accum=8, eval_batches=8))  # same 8 held-out windows
    pretrain.run(cfg(ws, tmp_path / "b", batch_size=8, grad_accum=1, eval_batches=1))
    assert_close_trajectories(trajectory(tmp_path / "a"), trajectory(tmp_path / "b"))


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = dist_lib.init_distributed(torch.device("cpu"))
    assert not info.enabled and info.is_rank0
    m = torch.nn.Linear(2, 2)
    assert dist_lib.wrap_model(m, "ddp", info, torch.device("cpu")) is m
    assert dist_lib.all_reduce_sum([1.5, 2], info, torch.device("cpu")) == [1.5, 2.0]


def test_partial_torchrun_env_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        dist_lib.init_distributed(torch.device("cpu"))


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """A user's checkpoint (Qwen2 layout: GQA, q/k/v biases, tied head) of the tokenizer's vocabulary."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen2") / "model"
    AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True)).save_pretrained(path)
    return path


@pytest.mark.parametrize("parallel, lora", [("fsdp", 0), ("ddp", 4)], ids=["fsdp-full", "ddp-lora"])
def test_users_checkpoint_under_torchrun_matches_one_process(ws, qwen2_dir, tmp_path, parallel, lora):
    """Slower (~15-25 s each): a Qwen2-layout --init on our own model, 2 gloo ranks == 1 process,
    fully fine-tuned under FSDP2 and with LoRA adapters under DDP."""
    extra = {"init": str(qwen2_dir), "model": {}, "lora": {"rank": lora, "alpha": 8.0}}
    pretrain.run(build(pretrain.Config, {**COMMON, "out_dir": str(tmp_path / "single"), "tokenizer": str(ws / "tok"),
                                         "texts": [str(ws / "texts")], "batch_size": 4, **extra}))
    out = tmp_path / parallel
    args = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(29600 + os.getpid() % 1000),
            "-m", "sputnik", "pretrain", "--out_dir", str(out), "--tokenizer", str(ws / "tok"),
            "--texts", str(ws / "texts"), "--tasks=", "--batch_size", "2", "--parallel", parallel,
            "--init", str(qwen2_dir), "--lora.rank", str(lora), "--lora.alpha", "8"]
    for k, v in COMMON.items():
        if k not in ("tasks", "optim"):
            args += [f"--{k}", str(v)]
    args += ["--optim.lr", "3e-3", "--optim.warmup_steps", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_close_trajectories(trajectory(out), trajectory(tmp_path / "single"))
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "model").config.model_type == "qwen2"
    assert (out / "adapter" / "adapter_config.json").exists() == bool(lora)
