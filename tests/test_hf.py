"""HF interop: our export loads in transformers' DeepseekV3ForCausalLM with equal logits and loss;
transformers' save_pretrained (per-expert and fused layouts) loads into ours; bad checkpoints fail
with the offending key named; save is atomic and keeps foreign files."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3ForCausalLM
from transformers.utils import logging as hf_logging

from sputnik.model.config import tiny
from sputnik.model.hf import load_hf, save_hf
from sputnik.model.transformer import Transformer

hf_logging.set_verbosity_error()  # the MTP layer is "unexpected" to HF by design (§3.3)

GROUPED_YARN = dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, n_shared_experts=1,
                    q_lora_rank=32, rope_type="yarn", rope_factor=4.0, max_position_embeddings=128,
                    original_max_position_embeddings=32, mscale=0.707, mscale_all_dim=1.0)
NO_QLORA_TIED = dict(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, n_shared_experts=2,
                     q_lora_rank=0, tie_word_embeddings=True, routed_scaling_factor=2.5)


def make(extra, seed=0):
    torch.manual_seed(seed)
    cfg = tiny(vocab_size=128, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=96,
               moe_intermediate_size=32, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
               qk_rope_head_dim=8, v_head_dim=12, num_nextn_predict_layers=1, initializer_range=0.1, **extra)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for moe in model.moe_layers().values():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)  # nonzero: selection must use it
    return model


def routing_margin(model, ids_BT):
    """Smallest gap between the k-th and (k+1)-th biased expert score over all tokens and layers;
    a routing flip under ~1e-6 numeric noise needs a gap that small."""
    gaps = []

    def hook(router, args, _out):
        choice = torch.sigmoid(args[0].float() @ router.weight.float().T) + router.e_score_correction_bias
        top = choice.topk(router.top_k + 1, dim=-1).values
        gaps.append((top[:, -2] - top[:, -1]).min())
    handles = [m.gate.register_forward_hook(hook) for m in model.moe_layers().values()]
    with torch.no_grad():
        model(ids_BT)
    for h in handles:
        h.remove()
    return min(g.item() for g in gaps)


def hf_load(path):
    return DeepseekV3ForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.mark.parametrize("extra", [GROUPED_YARN, NO_QLORA_TIED], ids=["grouped-yarn", "qproj-tied"])
def test_export_matches_transformers_logits_and_loss(tmp_path, extra):
    ours = make(extra)
    ids_BT = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    assert routing_margin(ours, ids_BT) > 1e-4
    save_hf(ours, tmp_path / "ckpt")
    theirs = hf_load(tmp_path / "ckpt")
    with torch.no_grad():
        ours_logits, theirs_logits = ours(ids_BT).logits, theirs(ids_BT).logits
        assert ours_logits.abs().max() > 0.1  # a non-trivial comparison
        torch.testing.assert_close(ours_logits, theirs_logits, atol=1e-4, rtol=0)
        targets_BT = torch.cat([ids_BT[:, 1:], torch.full((2, 1), -100)], 1)  # ours: pre-shifted
        ours_ce = ours(ids_BT, targets_BT).ce_loss
        torch.testing.assert_close(ours_ce, theirs(ids_BT, labels=ids_BT).loss, atol=1e-5, rtol=0)


def test_export_layout_follows_the_checklist(tmp_path):
    model = make(NO_QLORA_TIED)
    save_hf(model, tmp_path / "ckpt", tokenizer_ids={"eos_token_id": 7, "pad_token_id": 9})
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    assert cfg["num_key_value_heads"] == 4 and cfg["q_lora_rank"] is None and cfg["rope_interleave"] is True
    assert cfg["rope_scaling"] is None and cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert cfg["tie_word_embeddings"] is True and cfg["num_nextn_predict_layers"] == 1 and cfg["dtype"] == "float32"
    assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (7, 9)
    sd = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert sd["model.layers.1.mlp.experts.7.gate_proj.weight"].shape == (32, 64)
    assert sd["model.layers.2.mlp.experts.0.down_proj.weight"].shape == (64, 32)
    assert not any(k.endswith("gate_up_proj") for k in sd) and "lm_head.weight" not in sd  # tied
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    # MTP module 1 is layer L = 3, with copies of the shared embedding and head
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "self_attn.q_proj.weight"):
        assert f"model.layers.3.{key}" in sd
    assert torch.equal(sd["model.layers.3.embed_tokens.weight"], model.model.embed_tokens.weight)
    assert torch.equal(sd["model.layers.3.shared_head.head.weight"], model.lm_head.weight)
    yarn = json.loads((save_hf(make(GROUPED_YARN), tmp_path / "y") / "config.json").read_text())
    assert yarn["rope_scaling"]["type"] == "yarn" and yarn["rope_parameters"]["factor"] == 4.0


@pytest.mark.parametrize("original_format", [True, False], ids=["per-expert", "fused"])
def test_transformers_checkpoint_loads_into_ours(tmp_path, original_format):
    src = make(GROUPED_YARN, seed=3)
    save_hf(src, tmp_path / "a")
    theirs = hf_load(tmp_path / "a")
    theirs.save_pretrained(tmp_path / "b", save_original_format=original_format)
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f:
        assert any(k.endswith("experts.gate_up_proj") for k in f.keys()) != original_format
    with pytest.warns(UserWarning, match="no MTP layers"):  # HF never saves MTP weights
        ours = load_hf(tmp_path / "b").eval()
    ids_BT = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids_BT).logits, theirs(ids_BT).logits, atol=1e-4, rtol=0)
    assert ours.config.rope_type == "yarn" and ours.config.n_group == 4 and len(ours.mtp) == 0


def test_round_trip_is_exact_including_mtp(tmp_path):
    src = make(NO_QLORA_TIED, seed=4)
    save_hf(src, tmp_path / "ckpt")
    back = load_hf(tmp_path / "ckpt")
    assert back.lm_head.weight is back.model.embed_tokens.weight  # re-tied
    for (k, a), (k2, b) in zip(src.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    assert back.config == src.config


def test_bad_checkpoints_name_the_key(tmp_path):
    save_hf(make(NO_QLORA_TIED), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    good = load_file(path)
    cases = {"missing key model.layers.1.mlp.experts.5.up_proj.weight":
             {k: v for k, v in good.items() if k != "model.layers.1.mlp.experts.5.up_proj.weight"},
             "missing key model.norm.weight": {k: v for k, v in good.items() if k != "model.norm.weight"},
             "unexpected key model.layers.0.mlp.bogus": {**good, "model.layers.0.mlp.bogus": torch.zeros(1)},
             "shape mismatch for model.norm.weight": {**good, "model.norm.weight": torch.ones(3)}}
    for message, tensors in cases.items():
        save_file(tensors, path, metadata={"format": "pt"})
        with pytest.raises(ValueError, match=message):
            load_hf(tmp_path / "ckpt")
    cfg_path = tmp_path / "ckpt" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        load_hf(tmp_path / "ckpt")


def test_save_replaces_atomically_and_keeps_foreign_files(tmp_path):
    target = tmp_path / "ckpt"
    save_hf(make(NO_QLORA_TIED, seed=5), target)
    (target / "tokenizer.json").write_text("{}")
    model = make(NO_QLORA_TIED, seed=6)
    save_hf(model, target)
    assert (target / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left behind
    assert torch.equal(load_hf(target).model.norm.weight, model.model.norm.weight)


def test_native_transformers_model_loads_into_ours(tmp_path):
    """A model transformers built from its own config (q_lora_rank None, pad None, tied, no MTP)."""
    from transformers import DeepseekV3Config

    torch.manual_seed(7)
    hc = DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                          n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=None,
                          kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                          first_k_dense_replace=1, tie_word_embeddings=True, initializer_range=0.1,
                          num_mtp_layers=0, max_position_embeddings=64)
    theirs = DeepseekV3ForCausalLM(hc).eval()
    with torch.no_grad():
        theirs.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    theirs.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    assert ours.config.q_lora_rank == 0 and ours.config.tie_word_embeddings and len(ours.mtp) == 0
    ids_BT = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(8))
    assert routing_margin(ours, ids_BT) > 1e-4
    with torch.no_grad():
        theirs.config._attn_implementation = "eager"
        torch.testing.assert_close(ours(ids_BT).logits, theirs(ids_BT).logits, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# DeepSeek-V2 / V2-Lite checkpoints: the same MLA + DeepSeekMoE with softmax routing
@pytest.mark.parametrize("method, n_group, topk_group, q_lora", [("greedy", None, None, None),
                                                                 ("group_limited_greedy", 4, 2, 24)],
                         ids=["v2-lite-greedy", "v2-group-limited"])
def test_deepseek_v2_checkpoint_matches_transformers(tmp_path, method, n_group, topk_group, q_lora):
    """A DeepseekV2ForCausalLM directory loads as our Transformer (softmax router, no bias, the shared
    experts, q_lora_rank None as in V2-Lite): logits equal, prefill and cached decode steps (the
    few-token MoE path) equal, exported back as deepseek_v2 with the same logits."""
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    from sputnik.inference.decoders import cached_model
    from sputnik.model.transformer import Transformer
    from sputnik.train.loading import load_model

    hc = DeepseekV2Config(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                          n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
                          q_lora_rank=q_lora, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                          topk_method=method, n_group=n_group, topk_group=topk_group, routed_scaling_factor=1.5,
                          max_position_embeddings=128, initializer_range=0.1)
    hc._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hc).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "v2")
    ours = load_model(str(tmp_path / "v2")).eval()
    assert isinstance(ours, Transformer) and ours.config.topk_method == method
    assert not any("e_score_correction_bias" in k for k in ours.state_dict())
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        want = hf(ids).logits
        assert (ours(ids).logits - want).abs().max() <= 1e-4 and want.std() > 0.1
        cm = cached_model(ours)
        cache = cm.new_cache(2, 30)
        assert (cm.forward_cached(ids[:, :12], cache, torch.zeros(2, dtype=torch.long)) - want[:, :12]).abs().max() <= 1e-4
        for t in range(12, 20):
            assert (cm.step(ids[:, t], cache, torch.full((2,), t)) - want[:, t]).abs().max() <= 1e-4
    save_hf(ours, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "deepseek_v2"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    with torch.no_grad():
        assert (back(ids).logits - want).abs().max() <= 1e-4
    ours.update_expert_bias({name: torch.ones(8) for name in ours.moe_layers()})  # no bias to move: a no-op
