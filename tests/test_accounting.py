"""Parameter counts against the published figures; FLOPs per token against hand arithmetic."""
import pytest

from sputnik.config import build
from sputnik.model.accounting import flops_per_token, param_counts
from sputnik.model.config import ModelConfig, small, small_dense, tiny, tiny_dense, v3_671b


def test_presets_match_published_counts():
    # peer-figures.md and reference §2.6 (counts without MTP, as published)
    t = param_counts(tiny(num_nextn_predict_layers=0))
    assert (round(t["total"] / 1e6, 2), round(t["active"] / 1e6, 2)) == (8.22, 4.09)
    assert round(param_counts(tiny_dense())["total"] / 1e6, 2) == 4.33
    s = param_counts(small())
    assert (round(s["total"] / 1e6, 1), round(s["active"] / 1e6, 1)) == (681.7, 179.9)
    assert round(param_counts(small_dense())["total"] / 1e6, 1) == 183.5
    v = param_counts(v3_671b())
    assert (round(v["total"] / 1e9, 2), round(v["active"] / 1e9, 2)) == (671.03, 37.55)
    assert round(v["embedding"] / 1e9, 2) == 0.93 and v["head"] == v["embedding"] == 129280 * 7168
    layer = v["per_layer"]
    assert round(layer["attention"] / 1e6, 1) == 187.1 and round(layer["dense_mlp"] / 1e6, 1) == 396.4
    assert round(layer["expert"] / 1e6, 2) == 44.04 and round(layer["moe"] / 1e9, 2) == 11.32
    assert round(layer["moe_active"] / 1e6, 1) == 398.2 and round(v["mtp"] / 1e9, 2) == 11.61
    assert (v["num_dense_layers"], v["num_moe_layers"]) == (3, 58)


def test_tiny_exact_and_mtp_module():
    p = param_counts(tiny())
    d = 256
    # MLA: q_a 256·128 + 128 + q_b 128·4·48 ; kv_a 256·(64+16) + 64 + kv_b 64·4·64 ; o 4·32·256
    attn = 256 * 128 + 128 + 128 * 4 * 48 + 256 * 80 + 64 + 64 * 4 * 64 + 4 * 32 * 256
    assert p["per_layer"]["attention"] == attn == 127168
    expert, router = 3 * 256 * 128, 16 * 256  # the router bias is a buffer, not a parameter
    moe = router + expert + 16 * expert  # + one shared expert of the same width
    assert (p["per_layer"]["moe"], p["per_layer"]["moe_active"]) == (moe, router + expert + 2 * expert)
    body = 4 * (2 * d + attn) + 3 * 256 * 768 + 3 * moe
    assert p["total"] == 2 * 4096 * 256 + body + d == 8_223_744
    assert p["active"] == p["total"] - 3 * 14 * expert
    # MTP: enorm + hnorm + eh_proj [d, 2d] + (norms + MLA + MoE) block + shared_head.norm; no embedding/head
    mtp = 2 * d + 2 * d * d + (2 * d + attn + moe) + d
    assert (p["mtp"], p["mtp_active"]) == (mtp, mtp - 14 * expert)
    assert (p["total_with_mtp"], p["active_with_mtp"]) == (p["total"] + mtp, p["active"] + mtp - 14 * expert)


def test_variants_no_q_lora_dense_mtp_tied_gqa():
    no_q = param_counts(tiny(q_lora_rank=0))["per_layer"]["attention"]
    assert no_q == 256 * 4 * 48 + 256 * 80 + 64 + 64 * 4 * 64 + 4 * 32 * 256 == 118848
    dense = param_counts(tiny(first_k_dense_replace=4))  # no MoE layer: the MTP block is dense too
    assert dense["num_moe_layers"] == 0 and dense["total"] == dense["active"]
    assert dense["mtp"] == 2 * 256 + 2 * 256 * 256 + 512 + 127168 + 3 * 256 * 768 + 256
    tied = param_counts(tiny(tie_word_embeddings=True))
    assert tied["head"] == 0 and tied["total"] == param_counts(tiny())["total"] - 4096 * 256
    gqa = param_counts(tiny_dense(num_key_value_heads=2))["per_layer"]["attention"]
    assert gqa == 2 * 256 * 256 + 2 * 256 * 2 * 64  # q, o full; k, v with 2 of 4 heads


MICRO = dict(vocab_size=10, hidden_size=8, num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=16,
             num_attention_heads=2, q_lora_rank=4, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2,
             v_head_dim=2, moe_intermediate_size=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
             num_nextn_predict_layers=1)


def test_micro_config_by_hand():
    p = param_counts(build(ModelConfig, MICRO))
    # MLA 32+4+32 + 48+4+32 + 32 = 184; dense 3·8·16 = 384; expert 96; router 4·8 = 32
    # MoE 32 + 96 (shared) + 4·96 = 512, active 32 + 96 + 2·96 = 320
    # total = emb 80 + head 80 + 2·(16 + 184) + 384 + 512 + final norm 8 = 1464
    assert (p["total"], p["active"]) == (1464, 1272)
    # MTP: 16 (enorm, hnorm) + 128 (eh_proj) + 16 + 184 + 512 + 8 = 864, active 864 - 192 = 672
    assert (p["mtp"], p["mtp_active"]) == (864, 672)


def test_flops_per_token_by_hand():
    cfg = build(ModelConfig, MICRO)
    # forward matmul params: active 1272 - embedding 80 (head kept) = 1192 -> 2384 FLOPs
    # attention per layer: 2·n_h·(qk 4 + v 2)·(seq 6 / 2) = 2·2·6·3 = 72, two layers -> 144
    f = flops_per_token(cfg, 6, training=False, include_mtp=False)
    assert (f["matmul"], f["attention"], f["total"], f["mtp"]) == (2384, 144, 2528, 0)
    f = flops_per_token(cfg, 6, include_mtp=False)  # training = 3x forward
    assert (f["matmul"], f["attention"], f["total"]) == (7152, 432, 7584)
    # MTP adds its active params 672 + its pass through the shared head 80 = 752, and a third attention layer
    f = flops_per_token(cfg, 6)
    assert (f["matmul"], f["attention"]) == (3 * 2 * (1192 + 752), 3 * 3 * 72)
    assert f["mtp"] == 3 * (2 * 752 + 72) and f["total"] == 11664 + 648


def test_flops_llama_and_tied_head():
    cfg = tiny_dense()
    f = flops_per_token(cfg, 256, training=False)
    n = param_counts(cfg)["total"] - 4096 * 256  # everything but the embedding
    assert f["matmul"] == 2 * n and f["attention"] == 4 * 2 * 4 * (64 + 64) * 128
    tied = flops_per_token(tiny_dense(tie_word_embeddings=True), 256, training=False)
    assert tied["matmul"] == f["matmul"]  # the head matmul is done whether or not its matrix is shared
    with pytest.raises(ValueError, match="seq_len=0"):
        flops_per_token(cfg, 0)


def test_v3_training_flops_close_to_six_n_d():
    f = flops_per_token(v3_671b(), 4096, include_mtp=False)
    n = param_counts(v3_671b())["active"] - 129280 * 7168
    assert f["matmul"] == 6 * n and round(n / 1e9, 2) == 36.63
    assert f["attention"] == 3 * 61 * 2 * 128 * (192 + 128) * 2048


@pytest.mark.slow  # importing transformers takes ~3-10 s on this machine
def test_counts_equal_transformers_num_parameters():
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM

    for q_lora in (128, 0):
        cfg = tiny(num_nextn_predict_layers=0, q_lora_rank=q_lora)
        hf = DeepseekV3Config(**{k: getattr(cfg, k) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "first_k_dense_replace", "intermediate_size",
            "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "n_group",
            "topk_group", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")},
            q_lora_rank=q_lora or None, num_key_value_heads=cfg.num_attention_heads)
        with torch.device("meta"):
            assert DeepseekV3ForCausalLM(hf).num_parameters() == param_counts(cfg)["total"]
    cfg = tiny_dense(num_key_value_heads=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=4, intermediate_size=384,
                                             num_attention_heads=4, num_key_value_heads=2))
    assert model.num_parameters() == param_counts(cfg)["total"]
