"""Dense Llama baseline: parity with transformers' LlamaForCausalLM both ways (logits, loss,
gradients), KV-cache decode == full forward (ragged rows, forks), parameter count, tied head,
checkpoint validation. Tiny random configs, no hub."""
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from sputnik.inference.decoders import cached_model
from sputnik.model.accounting import param_counts
from sputnik.model.config import tiny_dense
from sputnik.model.hf_llama import load_hf_llama, save_hf_llama
from sputnik.model.llama import LlamaModel

V = 128


def small_cfg(**kw):
    base = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5)
    return tiny_dense(**{**base, **kw})


def randomize_norms(model):
    """Norm weights start at 1: perturb them so a swapped or skipped norm changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_from(path):
    return LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.mark.parametrize("kv_heads", [2, 0], ids=["gqa", "mha"])
def test_export_logits_match_transformers(tmp_path, kv_heads):
    ours = randomize_norms(LlamaModel(small_cfg(num_key_value_heads=kv_heads))).eval()
    save_hf_llama(ours, tmp_path / "ckpt")
    hf = hf_from(tmp_path / "ckpt")
    assert hf.config.num_key_value_heads == (kv_heads or 4) and hf.config.rope_parameters["rope_theta"] == 500.0
    ids = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        ours_BTV, hf_BTV = ours(ids).logits, hf(ids).logits
    assert ours_BTV.shape == (2, 24, V)
    assert (ours_BTV - hf_BTV).abs().max() <= 1e-4
    assert ours_BTV.std() > 0.1  # not trivially equal because both are ~0


def test_load_transformers_checkpoint(tmp_path):
    hc = LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=96, max_position_embeddings=64, rope_parameters={"rope_type": "default",
                     "rope_theta": 1000.0}, initializer_range=0.1, attn_implementation="eager")
    hf = randomize_norms(LlamaForCausalLM(hc)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_llama(tmp_path / "hf").eval()
    assert ours.config.kv_heads == 2 and ours.config.rope_theta == 1000.0
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() <= 1e-4


def test_loss_and_grads_match_transformers(tmp_path):
    ours = randomize_norms(LlamaModel(small_cfg(initializer_range=0.1)))
    save_hf_llama(ours, tmp_path / "ckpt")
    hf = hf_from(tmp_path / "ckpt")
    ids = torch.randint(0, V, (3, 16))
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    # HF shifts labels inside; ours takes targets[t] = label[t+1], the last position ignored.
    targets = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
    out = ours(ids, targets)
    ref = hf(ids, labels=labels).loss
    assert out.logits is None and out.num_tokens.item() == 3 * 15 - 4
    assert abs(out.loss.item() - ref.item()) <= 1e-5 and out.loss.item() > 4.0  # ~ln(128) at random init
    assert out.ce_loss.item() == out.loss.item() and not out.ce_loss.requires_grad
    assert out.mtp_loss.item() == 0 and out.aux_loss.item() == 0
    out.loss.backward()
    ref.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, hf_params[name].grad, atol=1e-6), name


def test_loss_is_mean_ce_of_logits_and_zero_when_all_ignored():
    model = LlamaModel(small_cfg())
    ids = torch.randint(0, V, (2, 10))
    targets = torch.randint(0, V, (2, 10))
    logits = model(ids).logits
    assert torch.allclose(model(ids, targets).loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()), atol=1e-6)
    assert torch.allclose(model.lm_head(model.hidden_states(ids).hidden), logits)
    assert model(ids, torch.full_like(ids, -100)).loss.item() == 0.0
    assert model(ids, targets).expert_load == {} and model.update_expert_bias({}) is None


@pytest.mark.parametrize("kv_heads", [2, 0], ids=["gqa", "mha"])
def test_cached_decode_matches_full_forward_ragged(kv_heads):
    model = randomize_norms(LlamaModel(small_cfg(num_key_value_heads=kv_heads, initializer_range=0.1))).eval()
    lens = [7, 3, 5]
    seqs = [torch.randint(0, V, (n + 6,)) for n in lens]  # prompt + 6 decoded tokens per row
    with torch.no_grad():
        full = [model(s[None]).logits[0] for s in seqs]
    # prefill right-padded prompts at seqlens 0; junk at pad slots must never be attended to
    B, T = len(lens), max(lens)
    ids = torch.full((B, T), 5)
    for b, n in enumerate(lens):
        ids[b, :n] = seqs[b][:n]
    cm = cached_model(model)
    cache = cm.new_cache(B, T + 6, torch.float32, "cpu")
    logits = cm.forward_cached(ids, cache, torch.zeros(B, dtype=torch.long))
    for b, n in enumerate(lens):
        assert (logits[b, :n] - full[b][:n]).abs().max() <= 1e-4
    seqlens = torch.tensor(lens)
    # two single-token steps, then a 2-token chunk and 2 more single steps: ragged positions throughout
    for width in (1, 1, 2, 1, 1):
        step = torch.stack([seqs[b][n: n + width] for b, n in enumerate(seqlens.tolist())])
        logits = cm.forward_cached(step, cache, seqlens)
        for b, n in enumerate(seqlens.tolist()):
            assert (logits[b] - full[b][n: n + width]).abs().max() <= 1e-4
        seqlens = seqlens + width


def test_cache_select_forks_rows():
    model = LlamaModel(small_cfg(initializer_range=0.1)).eval()
    prompt, conts = torch.randint(0, V, (1, 5)), torch.randint(0, V, (3, 1))
    cm = cached_model(model)
    cache = cm.new_cache(1, 8, torch.float32, "cpu")
    cm.forward_cached(prompt, cache, torch.zeros(1, dtype=torch.long))
    forked = cache.select(torch.zeros(3, dtype=torch.long))
    logits = cm.forward_cached(conts, forked, torch.full((3,), 5))[:, 0]
    torch.testing.assert_close(cm.step(conts[:, 0], cache.select(torch.zeros(3, dtype=torch.long)), torch.full((3,), 5)),
                               logits)  # the one-token step is the same forward
    with torch.no_grad():
        ref = model(torch.cat([prompt.expand(3, 5), conts], 1)).logits[:, -1]
    assert (logits - ref).abs().max() <= 1e-4
    assert cache.k_LBKSC[:, :, :, 5].abs().sum() == 0  # the fork copied; the parent's slot 5 is untouched
    with pytest.raises(ValueError, match="cache overflow"):
        cm.forward_cached(torch.randint(0, V, (3, 3)), forked, torch.full((3,), 6))


def test_parameter_count_matches_tiny_dense_preset():
    cfg = tiny_dense()
    n = sum(p.numel() for p in LlamaModel(cfg).parameters())
    assert n == 4_327_680 == param_counts(cfg)["total"]  # "4.33M at vocab 4096"
    tied = tiny_dense(tie_word_embeddings=True)
    assert sum(p.numel() for p in LlamaModel(tied).parameters()) == 4_327_680 - 4096 * 256 == param_counts(tied)["total"]


def test_tied_embeddings_round_trip(tmp_path):
    ours = LlamaModel(small_cfg(tie_word_embeddings=True, initializer_range=0.1)).eval()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, V, (2, 12))
    ours(ids, ids).loss.backward()  # one grad tensor gathers both uses
    assert ours.model.embed_tokens.weight.grad.abs().sum() > 0
    save_hf_llama(ours, tmp_path / "tied")
    assert json.loads((tmp_path / "tied" / "config.json").read_text())["tie_word_embeddings"] is True
    hf = hf_from(tmp_path / "tied")
    back = load_hf_llama(tmp_path / "tied")
    assert back.lm_head.weight is back.model.embed_tokens.weight
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max() <= 1e-4
        assert torch.equal(back(ids).logits, ours(ids).logits)
    hf.save_pretrained(tmp_path / "hf_tied")  # HF omits the tied head too
    assert torch.equal(load_hf_llama(tmp_path / "hf_tied").lm_head.weight, ours.lm_head.weight)


def test_load_rejects_mismatched_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf_llama(LlamaModel(small_cfg()), tmp_path / "c")
    state = load_file(tmp_path / "c" / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 64)
    state["model.layers.9.mlp.extra.weight"] = torch.zeros(1)
    del state["model.norm.weight"]
    save_file(state, tmp_path / "c" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        load_hf_llama(tmp_path / "c")
    msg = str(err.value)
    assert "model.norm.weight" in msg and "model.layers.9.mlp.extra.weight" in msg and "(3, 64)" in msg
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    (tmp_path / "c" / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act"):
        load_hf_llama(tmp_path / "c")


def test_save_over_existing_dir_keeps_other_files(tmp_path):
    a, b = LlamaModel(small_cfg()), LlamaModel(small_cfg())
    save_hf_llama(a, tmp_path / "c")
    (tmp_path / "c" / "tokenizer.json").write_text("{}")
    save_hf_llama(b, tmp_path / "c")
    assert (tmp_path / "c" / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp dirs left behind
    assert torch.equal(load_hf_llama(tmp_path / "c").lm_head.weight, b.lm_head.weight)


def test_meta_device_build_then_init_weights():
    cfg = small_cfg(tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model.to_empty(device="cpu")
    model.init_weights()  # real init: re-ties the head and recomputes the RoPE tables
    ref = LlamaModel(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.rotary.cos_PC, ref.rotary.cos_PC) and torch.equal(model.rotary.sin_PC, ref.rotary.sin_PC)
    assert abs(model.model.layers[0].mlp.up_proj.weight.std().item() - cfg.initializer_range) < 2e-3
    assert torch.equal(model.model.norm.weight, torch.ones(64))
