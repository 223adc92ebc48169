"""LoRA (sputnik/train/lora.py): starts as the base; merged decode equals the unmerged forward; only
adapter parameters change; the merged weight refreshes after an update; the PEFT adapter loads in
peft onto the transformers base and reproduces our logits; the merged export loads in transformers;
SFT with --lora.rank end to end, resumed after a real SIGKILL bit for bit."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config

from sputnik.config import LoRAConfig, build
from sputnik.inference.engine import Engine
from sputnik.inference.sampling import SamplingParams
from sputnik.model.hf_llama import load_hf_llama
from sputnik.train.lora import (apply_lora, load_peft_adapter, lora_modules, merged_copy,
                                save_peft_adapter)
from test_stages import sigkill_after_checkpoint

ROOT = Path(__file__).resolve().parent.parent
V = 300


def qwen2_dir(path, vocab=V, layers=2):
    torch.manual_seed(0)
    hc = Qwen2Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256, initializer_range=0.1,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hc._attn_implementation = "eager"
    AutoModelForCausalLM.from_config(hc).save_pretrained(path)
    return path


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
    return model


@pytest.fixture
def base(tmp_path):
    return qwen2_dir(tmp_path / "base")


def test_starts_as_the_base_and_freezes_it(base):
    plain, model = load_hf_llama(base).eval(), load_hf_llama(base).eval()
    adapted = apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    assert len(adapted) == 2 * 7 and "model.layers.0.self_attn.q_proj" in adapted and "lm_head" not in adapted
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{p}" for n in adapted for p in "AB"}
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)  # B = 0: exactly the base
    # state-dict keys of the base are unchanged (checkpoints and exports keep the HF names)
    assert set(plain.state_dict()) <= set(model.state_dict())


def test_merged_decode_equals_unmerged_forward(base):
    model = load_hf_llama(base)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    randomize_adapters(model)
    ids = torch.randint(0, V, (2, 12))
    targets = torch.randint(0, V, (2, 12))
    loss_grad = model(ids, targets).loss  # autograd on: base + s·(x Aᵀ) Bᵀ
    with torch.no_grad():
        loss_merged = model(ids, targets).loss  # autograd off: the merged weight
        merged_logits = model(ids).logits
    assert abs(loss_grad.item() - loss_merged.item()) < 1e-5
    with torch.enable_grad():
        unmerged_logits = model(ids).logits.detach()
    assert (merged_logits - unmerged_logits).abs().max() < 1e-4
    assert merged_logits.std() > 0.1
    # the engine (KV-cache decode through the merged weights) generates what merged_copy generates
    params = SamplingParams(max_new_tokens=8, temperature=0)
    prompts = [[5, 6, 7, 8], [9, 10]]
    ours = [o[0].token_ids for o in Engine(model.eval()).generate(prompts, params)]
    folded = [o[0].token_ids for o in Engine(merged_copy(model).eval()).generate(prompts, params)]
    assert ours == folded


def test_only_adapters_change_and_the_merged_weight_refreshes(base):
    model = load_hf_llama(base)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    from sputnik.train.optim import _bump_versions

    opt.register_step_post_hook(_bump_versions)
    ids = torch.randint(0, V, (2, 12))
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        model(ids)
    stale = q.merged_weight().clone()
    model(ids, ids).loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert any(k.endswith("lora_B") for k in changed)  # B moved off zero
    fresh = q.merged_weight()
    assert not torch.equal(fresh, stale)
    torch.testing.assert_close(fresh, q.weight + q.scaling * q.lora_B @ q.lora_A)


def test_peft_adapter_loads_in_peft_and_matches(base, tmp_path):
    peft = pytest.importorskip("peft")
    model = load_hf_llama(base).eval()
    cfg = LoRAConfig(rank=4, alpha=16.0, targets=["q_proj", "v_proj", "down_proj"])
    apply_lora(model, cfg)
    randomize_adapters(model)
    save_peft_adapter(model, cfg, tmp_path / "adapter", base_model=str(base))
    hf = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, V, (2, 14))
    with torch.no_grad():
        ours = model(ids).logits
        assert (peft_model(ids).logits - ours).abs().max() <= 1e-4
        # the merged export is a plain transformers checkpoint with the same logits
        from sputnik.model.hf_llama import save_hf_llama

        save_hf_llama(merged_copy(model), tmp_path / "merged")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
        assert (merged(ids).logits - ours).abs().max() <= 1e-4
    # and our loader reads the adapter back onto a fresh base
    again = load_hf_llama(base).eval()
    load_peft_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"] and config["r"] == 4


def test_bad_lora_configs_are_clear_errors(base):
    from sputnik.model import build_model
    from sputnik.model.config import tiny

    with pytest.raises(ValueError, match="no linear layer of the model matches"):
        apply_lora(load_hf_llama(base), LoRAConfig(rank=4, targets=["qkv"]))
    with pytest.raises(ValueError, match="dense families"):
        apply_lora(build_model(tiny(vocab_size=64)), LoRAConfig(rank=4))
    with pytest.raises(ValueError, match="lora.targets is empty"):
        LoRAConfig(rank=4, targets=[])


def test_bf16_base_keeps_fp32_adapters(base):
    model = load_hf_llama(base)
    apply_lora(model, LoRAConfig(rank=4, base_dtype="bfloat16"))
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.dtype == torch.float32
    ids = torch.randint(0, V, (1, 6))
    model(ids, ids).loss.backward()
    assert q.lora_A.grad.abs().sum() == 0 < q.lora_B.grad.abs().sum()  # B = 0 at the start: only B moves first


# ---------------------------------------------------------------------------------------------
# The stage, end to end
@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """A Qwen2-layout checkpoint with a locally trained tokenizer saved beside it (a user's model dir)."""
    from sputnik.tasks import corpus_text
    from sputnik.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("user")
    rng = random.Random(0)
    docs = [f"{a} plus {b} is {a + b}." for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(200))]
    qwen2_dir(root / "qwen2")
    train_tokenizer(docs + corpus_text(["addition"], 300, seed=1), V).save(root / "qwen2")
    return root / "qwen2"


def sft_args(out, init, steps=6):
    return (f"--out_dir {out} --init {init} --tasks addition --num_examples 64 --eval_examples 4 --max_new_tokens 12 "
            f"--batch_size 4 --steps {steps} --eval_every 0 --eval_batches 1 --checkpoint_every 2 --log_every 1 "
            f"--num_threads 1 --progress false --lora.rank 4 --lora.alpha 8 --optim.lr 1e-2").split()


def test_sft_with_lora_end_to_end(user_model, tmp_path):
    from sputnik.stages import sft

    cfg = build(sft.Config, dict(out_dir=str(tmp_path / "sft"), init=str(user_model), tasks=["addition"],
                                 num_examples=64, eval_examples=4, max_new_tokens=12, batch_size=4, steps=6,
                                 eval_every=0, eval_batches=1, checkpoint_every=3, num_threads=1, progress=False,
                                 lora={"rank": 4, "alpha": 8.0}, optim={"lr": 1e-2}))
    sft.run(cfg)
    out = tmp_path / "sft"
    base = load_file(str(user_model / "model.safetensors"))
    ckpt = load_file(str(out / "checkpoints" / "ckpt-000006" / "model.safetensors"))
    for k, v in base.items():  # the frozen base rides in the checkpoint untouched
        assert torch.equal(ckpt[k], v), k
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in ckpt.items())
    # <out>/model: the merged model in the base's own layout, loadable by transformers and by --init
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert merged.config.model_type == "qwen2" and (out / "model" / "tokenizer.json").exists()
    peft = pytest.importorskip("peft")
    with_adapter = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(user_model),
                                                  out / "adapter").eval()
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        assert (with_adapter(ids).logits - merged(ids).logits).abs().max() <= 1e-4
    # the optimizer held only the adapters
    opt = torch.load(out / "checkpoints" / "ckpt-000006" / "optimizer.pt")
    n_adapters = sum(1 for k in ckpt if ".lora_" in k)
    assert len(opt["state"]) == n_adapters


def test_lora_sft_sigkill_then_resume_is_bit_exact(user_model, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    steps = 30
    ref = subprocess.run([sys.executable, "-m", "sputnik", "sft", *sft_args(tmp_path / "ref", user_model, steps)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sputnik", "sft", *sft_args(out, user_model, steps)]
    sigkill_after_checkpoint(cmd, env, out / "checkpoints", "ckpt-000010", timeout=200)
    res = subprocess.run(cmd + ["--resume", "latest"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    last = f"ckpt-{steps:06d}"
    a = load_file(str(tmp_path / "ref" / "checkpoints" / last / "model.safetensors"))
    b = load_file(str(out / "checkpoints" / last / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(out / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_ledger_flops_of_a_lora_step(base):
    """Frozen weights need no weight gradient: 4·N matmul FLOPs a token, the adapters 6·N_adapters."""
    from sputnik.model.accounting import flops_per_token as closed_form
    from sputnik.train.loading import flops_per_token

    model = load_hf_llama(base)
    full = closed_form(model.config, 64, training=True)
    assert flops_per_token(model, 64) == full["total"]
    apply_lora(model, LoRAConfig(rank=4))
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert adapters == 2 * 4 * (64 + 64 + 2 * (64 + 32) + 64 + 64 + 2 * (64 + 96) + 96 + 64)
    assert flops_per_token(model, 64) == pytest.approx(full["matmul"] * 4 / 6 + full["attention"] + 6 * adapters)


def test_rl_and_logit_distillation_with_lora(user_model, tmp_path, monkeypatch):
    """GRPO and logit-level KD train adapters only: rollouts decode through the merged weights, the update
    moves A and B, the frozen base stays bit-identical, and both export the merged model and the adapter."""
    from sputnik.stages import distill, rl
    from sputnik.tasks.arithmetic import Addition
    from sputnik.tasks.base import Verdict

    # a random-init policy is never right: a verifier on the text's parity gives every group a spread
    monkeypatch.setattr(Addition, "verify", lambda self, ex, text: Verdict(len(text) % 2 == 0, False, text, "test"))

    base = load_file(str(user_model / "model.safetensors"))
    common = dict(num_threads=1, project_dir=str(tmp_path), lora={"rank": 4, "alpha": 8.0})
    r = rl.run(build(rl.Config, dict(out_dir=str(tmp_path / "rl"), init=str(user_model), tasks=["addition"], steps=2,
                                     prompts_per_step=2, group_size=4, max_new_tokens=8, eval_every=0, eval_examples=2,
                                     dynamic_sampling=False, beta=0.04, optim={"lr": 1e-2}, **common)))
    ckpt = load_file(str(tmp_path / "rl" / "checkpoints" / "ckpt-000002" / "model.safetensors"))
    assert all(torch.equal(ckpt[k], v) for k, v in base.items())
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in ckpt.items())
    assert (tmp_path / "rl" / "adapter" / "adapter_model.safetensors").exists()
    merged = load_file(str(Path(r["model_dir"]) / "model.safetensors"))
    assert set(merged) == set(base) and any(not torch.equal(merged[k], base[k]) for k in base)
    d = distill.run(build(distill.Config, dict(out_dir=str(tmp_path / "kd"), teacher=r["model_dir"], init=str(user_model),
                                               mode="logit", tasks=["addition"], num_prompts=4, samples_per_prompt=1,
                                               max_new_tokens=8, teacher_temperature=1.0, steps=2, batch_size=2,
                                               eval_examples=2, progress=False, **common)))
    assert (tmp_path / "kd" / "student_kd" / "adapter" / "adapter_config.json").exists()
    student = load_file(str(Path(d["student_dir"]) / "model.safetensors"))
    assert set(student) == set(base)
