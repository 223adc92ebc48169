"""Users' checkpoints on our own model: Llama (llama3 RoPE, tied head), Mistral (sliding window,
explicit head dim), Qwen2 (q/k/v biases), Qwen3 (q/k norms, head_dim != hidden/heads), each a
random-init transformers model of the real layout at reduced size. Per family: prefill logits and
every cached decode step equal transformers' (its own KV cache), batch == one by one, export round
trip into the same model_type, sharded safetensors, the GQA cache size; unsupported families fall
back to transformers with a notice; malformed configs are errors naming the key."""
import contextlib
import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, DynamicCache, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config,
                          Qwen3MoeConfig)

from sputnik.inference.decoders import cached_model
from sputnik.kernels import cpu as cpu_kernels
from sputnik.kernels.cpu import llama_step_library
from sputnik.model.accounting import param_counts
from sputnik.model.config import ModelConfig
from sputnik.model.hf_llama import NotOnFastPath, config_from_hf, load_hf_llama, save_hf_llama
from sputnik.model.llama import LlamaModel
from sputnik.train.loading import load_model

V = 128
COMMON = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, max_position_embeddings=128, initializer_range=0.1, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
FAMILY_CONFIGS = {
    # SmolLM2/Llama-3.2 style: tied head, llama3 RoPE scaling (context 32 so the tests' positions span
    # all three frequency bands)
    "llama": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    # window 8 < the tests' sequence lengths, so the window bites in prefill and decode
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=8, head_dim=32),
    "qwen2": lambda: Qwen2Config(**COMMON, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True),
    # a MoE layer (8 experts, top-2, renormalised) and a dense one (mlp_only_layers)
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, head_dim=32, num_experts=8, num_experts_per_tok=2,
                                        moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1]),
}
FAMILIES = sorted(FAMILY_CONFIGS)


def hf_model(family: str, **overrides):
    hc = FAMILY_CONFIGS[family]()
    for k, v in overrides.items():
        setattr(hc, k, v)
    hc._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hc).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: move them so a skipped one changes logits
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(params=FAMILIES)
def family_pair(request, tmp_path):
    hf = hf_model(request.param)
    hf.save_pretrained(tmp_path / "hf")
    return request.param, hf, load_hf_llama(tmp_path / "hf").eval(), tmp_path


def test_config_switches_per_family(family_pair):
    family, hf, ours, _ = family_pair
    c = ours.config
    assert c.family == family and c.architecture == "llama"
    expect = {"llama": (False, False, False, 0, "llama3"), "mistral": (False, False, False, 8, "default"),
              "qwen2": (True, False, False, 0, "default"), "qwen3": (False, False, True, 0, "default"),
              "qwen3_moe": (False, False, True, 0, "default")}[family]
    assert (c.qkv_bias, c.o_proj_bias, c.qk_norm, c.sliding_window, c.rope_type) == expect
    assert c.attention_head_dim == (32 if family in ("mistral", "qwen3", "qwen3_moe") else 16)
    assert [c.is_moe_layer(i) for i in range(2)] == ([True, False] if family == "qwen3_moe" else [False, False])
    n_hf = sum(p.numel() for p in hf.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_hf == param_counts(c)["total"]


def test_prefill_and_every_cached_step_match_transformers(family_pair):
    family, hf, ours, _ = family_pair
    torch.manual_seed(1)
    prompt, steps = torch.randint(3, V, (2, 11)), torch.randint(3, V, (2, 12))
    with torch.no_grad():
        hf_cache = DynamicCache(config=hf.config)
        hf_logits = hf(prompt, cache=hf_cache, use_cache=True).logits
        assert (ours(prompt).logits - hf_logits).abs().max() <= 1e-4
        cm = cached_model(ours)
        cache = cm.new_cache(2, 23, torch.float32, "cpu")
        with cpu_kernels.kernels_off():  # the torch cache path (on a CPU the C prefill and step serve by default)
            ours_logits = cm.forward_cached(prompt, cache, torch.zeros(2, dtype=torch.long))
        assert (ours_logits - hf_logits).abs().max() <= 1e-4
        # the same steps through the C prefill and the one-call C step (llama_decode.py; Qwen3-MoE's sparse layers too)
        weights = cm.step_weights()
        assert weights is None if llama_step_library() is None else weights is not None
        fused_cache = cm.new_cache(2, 23, torch.float32, "cpu") if weights is not None else None
        if fused_cache is not None:
            fused_logits = cm.forward_cached(prompt, fused_cache, torch.zeros(2, dtype=torch.long))
            assert (fused_logits - hf_logits).abs().max() <= 1e-4
        for t in range(steps.shape[1]):  # past the sliding window (8) and llama3's 32-token context bands
            hf_step = hf(steps[:, t:t + 1], cache=hf_cache, use_cache=True).logits[:, -1]
            with cpu_kernels.kernels_off():
                ours_step = cm.step(steps[:, t], cache, torch.full((2,), 11 + t))
            assert (ours_step - hf_step).abs().max() <= 1e-4, f"decode step {t}"
            if fused_cache is not None:
                fused_step = cm.step(steps[:, t], fused_cache, torch.full((2,), 11 + t), weights)
                assert (fused_step - hf_step).abs().max() <= 1e-4, f"fused decode step {t}"
        assert hf_step.std() > 0.1  # not trivially equal because both are ~0


@pytest.mark.parametrize("kernels", [True, False], ids=["c", "torch"])
def test_batch_equals_one_by_one(family_pair, kernels):
    _, _, ours, _ = family_pair
    cm = cached_model(ours)
    lens = [9, 4, 13]
    seqs = [torch.randint(3, V, (n + 3,)) for n in lens]
    ids = torch.zeros(3, 13, dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, :n] = seqs[b][:n]
    cache = cm.new_cache(3, 16, torch.float32, "cpu")
    with torch.no_grad(), contextlib.nullcontext() if kernels else cpu_kernels.kernels_off():
        last = cm.forward_cached(ids, cache, torch.zeros(3, dtype=torch.long), logits_at_B=torch.tensor(lens) - 1)
        nxt = cm.step(torch.stack([s[n] for s, n in zip(seqs, lens)]), cache, torch.tensor(lens))
        for b, n in enumerate(lens):
            alone = ours(seqs[b][None, :n + 1]).logits[0]
            assert (last[b] - alone[n - 1]).abs().max() <= 1e-4
            assert (nxt[b] - alone[n]).abs().max() <= 1e-4


def test_export_round_trip_same_model_type(family_pair):
    family, hf, ours, tmp_path = family_pair
    save_hf_llama(ours, tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["architectures"] == [type(hf).__name__]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    assert type(back) is type(hf)
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        assert (back(ids).logits - ours(ids).logits).abs().max() <= 1e-4
    again = load_hf_llama(tmp_path / "export")
    assert again.config == ours.config
    for (k, a), (k2, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_gqa_cache_size_per_token(family_pair):
    _, _, ours, _ = family_pair
    c = ours.config
    cache = cached_model(ours).new_cache(3, 10, torch.float32, "cpu")
    per_token = (cache.k_LBKSC.numel() + cache.v_LBKSC.numel()) / (3 * 10)
    assert per_token == 2 * c.num_hidden_layers * c.kv_heads * c.attention_head_dim  # 2 KV heads, not 4


def test_sharded_checkpoint_with_index(tmp_path):
    hf = hf_model("qwen2")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.startswith("model-") for f in files) > 2
    ours = load_hf_llama(tmp_path / "sharded")
    ids = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() <= 1e-4


def test_bf16_checkpoint_loads_as_fp32(tmp_path):
    hf = hf_model("qwen3").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    ours = load_hf_llama(tmp_path / "bf16")
    assert ours.lm_head.weight.dtype == torch.float32
    assert torch.equal(ours.model.layers[0].self_attn.q_norm.weight, hf.model.layers[0].self_attn.q_norm.weight.float())


def test_load_model_routes_families_to_our_model_and_others_to_transformers(tmp_path, capsys):
    hf_model("mistral").save_pretrained(tmp_path / "mistral")
    capsys.readouterr()  # transformers' own progress bars
    assert isinstance(load_model(str(tmp_path / "mistral")), LlamaModel)
    assert capsys.readouterr().err == ""
    # a family we do not implement: wrapped through transformers, with a one-line notice
    from transformers import GPT2Config

    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    capsys.readouterr()
    from sputnik.model.hf_wrapper import HFCausalLM

    assert isinstance(load_model(str(tmp_path / "gpt2")), HFCausalLM)
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and "not on Sputnik's fast path (model_type 'gpt2'" in notices[0]
    assert "compiled/CUDA-graph steps" in notices[0]
    # a known family with an option we lack (Qwen2's per-layer sliding windows): the same fallback
    hf_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1).save_pretrained(tmp_path / "q")
    capsys.readouterr()
    assert isinstance(load_model(str(tmp_path / "q")), HFCausalLM)
    assert "use_sliding_window" in capsys.readouterr().err


def test_unknown_or_inconsistent_configs_are_errors(tmp_path):
    good = json.loads(FAMILY_CONFIGS["qwen3"]().to_json_string())
    cfg = config_from_hf(good)
    assert cfg.family == "qwen3" and cfg.head_dim == 32
    with pytest.raises(ValueError, match="num_attention_heads=4 must be divisible by num_key_value_heads=3"):
        config_from_hf({**good, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="hidden_size=None"):
        config_from_hf({k: v for k, v in good.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="llama3 RoPE needs 'low_freq_factor'"):
        config_from_hf({**good, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}})
    with pytest.raises(NotOnFastPath, match="yarn"):
        config_from_hf({**good, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**good, "vocab_size": -5}))
    with pytest.raises(ValueError, match=r"init=.*bad: config.json vocab_size=-5"):
        load_model(str(tmp_path / "bad"))


def test_family_switch_checks():
    ok = dict(architecture="llama", vocab_size=V, hidden_size=64, num_attention_heads=4, num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="family='qwen2' needs qkv_bias=True"):
        ModelConfig(**ok, family="qwen2")
    with pytest.raises(ValueError, match="family='qwen3' needs qk_norm=True"):
        ModelConfig(**ok, family="qwen3")
    with pytest.raises(ValueError, match="attention_bias covers q/k/v and o_proj"):
        ModelConfig(**ok, qkv_bias=True)
    with pytest.raises(ValueError, match="deepseek_v3 only"):
        ModelConfig(**ok, rope_type="yarn")
    assert ModelConfig(**ok, family="qwen3", qk_norm=True, head_dim=48).attention_head_dim == 48


def test_sliding_window_limits_attention():
    """Mistral's window: a token further back than the window cannot change the logits."""
    cfg = ModelConfig(architecture="llama", family="mistral", vocab_size=V, hidden_size=64, num_hidden_layers=1,
                      num_attention_heads=4, intermediate_size=96, sliding_window=4, num_nextn_predict_layers=0,
                      initializer_range=0.2)
    model = LlamaModel(cfg).eval()
    ids = torch.randint(3, V, (1, 10))
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1) % V
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[0, 6:], b[0, 6:])  # position 2 is outside every window from 6 on (one layer)
    assert (a[0, 2:6] - b[0, 2:6]).abs().max() > 1e-3


def test_qwen3_moe_loss_balance_loss_gradients_and_load_match_transformers(tmp_path):
    """Training parity on the MoE family: CE + router_aux_loss_coef · Switch balance loss (with
    output_router_logits, as transformers trains it), gradients, and the expert load we report."""
    hf = hf_model("qwen3_moe", output_router_logits=True, router_aux_loss_coef=0.02).train()
    hf.save_pretrained(tmp_path / "moe")
    ours = load_hf_llama(tmp_path / "moe").train()
    assert ours.config.router_aux_loss_coef == 0.02
    ids, labels = torch.randint(0, V, (2, 16)), torch.randint(0, V, (2, 16))
    out_hf = hf(ids, labels=labels)
    out = ours(ids, torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1))  # ours takes shifted targets
    assert abs(out.loss.item() - out_hf.loss.item()) < 1e-5 and out.aux_loss.item() > 0
    assert abs(out.aux_loss.item() - 0.02 * out_hf.aux_loss.item()) < 1e-6
    out.loss.backward()
    out_hf.loss.backward()
    g_ours = ours.model.layers[0].mlp.experts.gate_up_proj.grad
    g_hf = hf.model.layers[0].mlp.experts.gate_up_proj.grad
    assert (g_ours - g_hf).abs().max() < 1e-5 and g_hf.abs().max() > 0
    assert (ours.model.layers[0].mlp.gate.weight.grad - hf.model.layers[0].mlp.gate.weight.grad).abs().max() < 1e-5
    # expert load: top-2 slots of the 32 tokens in the one MoE layer; padding is not load
    assert list(out.expert_load) == ["model.layers.0.mlp"] and int(out.expert_load["model.layers.0.mlp"].sum()) == 64
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, 10:] = False
    with torch.no_grad():
        load = ours(ids, valid_BT=valid).expert_load["model.layers.0.mlp"]
    assert int(load.sum()) == 2 * 26
    assert param_counts(ours.config)["active"] < param_counts(ours.config)["total"]
