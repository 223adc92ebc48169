"""Transformer: the loss contract (chunked CE == full-logits CE, loss decomposition, no logits with
targets), hidden states, tying, init, parameter counts == accounting, expert-balance hooks,
build_model dispatch. HF logit parity lives in test_hf.py."""
import pytest
import torch
import torch.nn.functional as F

from sputnik.model import ModelConfig, Transformer, build_model
from sputnik.model.accounting import param_counts
from sputnik.model.config import tiny, tiny_dense
from sputnik.model.layers import RMSNorm


def small(**kw):
    base = dict(vocab_size=96, hidden_size=48, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=64,
                moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, num_attention_heads=3,
                q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                seq_aux_loss_alpha=0.01, max_position_embeddings=64)
    return tiny(**{**base, **kw})


def batch(B=2, T=10, V=96, seed=0):
    ids_BT = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    targets_BT = torch.cat([ids_BT[:, 1:], torch.full((B, 1), -100)], 1)
    targets_BT[0, :3] = -100  # e.g. a prompt
    return ids_BT, targets_BT


def test_loss_contract_and_chunked_ce_equals_full_logits():
    model = Transformer(small())  # training mode: aux loss on
    routings = []  # each MoE forward's Routing, as the model returns it (nothing is kept on the modules)
    for m in model.moe_layers().values():
        m.register_forward_hook(lambda mod, args, out: routings.append(out[1]))
    ids_BT, targets_BT = batch()
    out = model(ids_BT, targets_BT)
    assert out.logits is None and out.num_tokens.item() == 2 * 9 - 3
    logits_BTV = model.lm_head(model.hidden_states(ids_BT).hidden)
    ce = F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.ce_loss, ce, atol=1e-5, rtol=1e-5)
    aux = sum(r.aux_loss for r in routings[:3])  # 2 main MoE layers + the MTP block of the training forward
    assert len(model.moe_layers()) == 3 and aux.item() > 0
    torch.testing.assert_close(out.aux_loss, aux.detach())
    torch.testing.assert_close(out.loss, ce + 0.3 * out.mtp_loss + aux, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert model.mtp[0].mlp.gate.weight.grad.abs().max() > 0  # aux + MTP reach the MTP router
    eval_out = model.eval()(ids_BT)
    torch.testing.assert_close(eval_out.logits, logits_BTV)
    assert eval_out.loss is None


def test_no_mtp_and_no_aux():
    model = Transformer(small(num_nextn_predict_layers=0, seq_aux_loss_alpha=0.0))
    out = model(*batch())
    assert out.mtp_loss.item() == 0 and out.aux_loss.item() == 0 and len(model.mtp) == 0
    torch.testing.assert_close(out.loss, out.ce_loss)


def test_tied_embeddings_share_one_matrix():
    model = Transformer(small(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" in model.state_dict()  # HF keys; hf.py drops it on export when tied


def test_init_weights():
    model = Transformer(tiny(initializer_range=0.02))
    sd = model.state_dict()
    assert sd["model.layers.1.mlp.experts.gate_up_proj"].std().item() == pytest.approx(0.02, rel=0.02)
    assert sd["model.layers.0.self_attn.kv_b_proj.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert sd["model.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.02)
    norms = [m.weight for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 4 * 4 + 1 + 7 and all(w.eq(1).all() for w in norms)  # 4 per block, final, MTP's 7
    assert all(m.gate.e_score_correction_bias.eq(0).all() for m in model.moe_layers().values())


@pytest.mark.parametrize("cfg", [tiny(), small(q_lora_rank=0, tie_word_embeddings=True, num_nextn_predict_layers=2),
                                 small(first_k_dense_replace=3)], ids=["tiny", "qproj-tied-mtp2", "all-dense"])
def test_num_params_equal_accounting(cfg):
    model, counts = Transformer(cfg), param_counts(cfg)
    assert model.num_params() == counts["total"]
    assert model.num_params(active=True) == counts["active"]
    assert model.num_params(include_mtp=True) == counts["total_with_mtp"]
    assert model.num_params(active=True, include_mtp=True) == counts["active_with_mtp"]
    # and they are what a checkpoint stores, less the router-bias buffers
    stored = {k: v for k, v in model.state_dict().items()
              if not k.startswith("mtp.") and not k.endswith("e_score_correction_bias")}
    if cfg.tie_word_embeddings:
        stored.pop("lm_head.weight")
    assert sum(v.numel() for v in stored.values()) == counts["total"]


def test_tiny_sizes():
    model = Transformer(tiny())
    assert model.num_params() == 8_223_744 and model.num_params(active=True) == 4_094_976


def test_expert_load_and_bias_update():
    model = Transformer(small(bias_update_speed=0.01))
    out = model(*batch(B=4, T=16))
    loads = out.expert_load
    assert list(loads) == ["model.layers.1.mlp", "model.layers.2.mlp", "mtp.0.mlp"]
    assert loads["model.layers.1.mlp"].sum().item() == 4 * 16 * 2  # every token routed to top-2
    assert loads["mtp.0.mlp"].sum().item() == 4 * 15 * 2  # the MTP block sees T - 1 positions
    load = loads["model.layers.1.mlp"].clone()
    assert all(m.gate.e_score_correction_bias.eq(0).all() for m in model.moe_layers().values())  # a forward moves nothing
    model.update_expert_bias({"model.layers.1.mlp": load})
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(bias, expected)
    assert bias.requires_grad is False
    assert model.model.layers[2].mlp.gate.e_score_correction_bias.eq(0).all()  # a layer not in `load` stays


def test_padding_is_not_expert_load_and_a_wrong_mask_is_an_error():
    """valid_BT marks the real tokens of a right-padded batch: the load counts only those (the MTP
    block at depth 1 sees valid_BT[:, 1:]); a mask of the wrong shape is an error, never ignored."""
    model = Transformer(small())
    ids_BT, targets_BT = batch(B=2, T=10)
    valid_BT = torch.ones(2, 10, dtype=torch.bool)
    valid_BT[1, 6:] = False  # row 1 is 6 real tokens + 4 padding
    out = model(ids_BT, targets_BT, valid_BT)
    assert out.expert_load["model.layers.1.mlp"].sum().item() == (10 + 6) * 2
    assert out.expert_load["mtp.0.mlp"].sum().item() == (9 + 5) * 2
    alone = model(ids_BT[1:, :6]).expert_load["model.layers.1.mlp"] + model(ids_BT[:1]).expert_load["model.layers.1.mlp"]
    torch.testing.assert_close(out.expert_load["model.layers.1.mlp"], alone)  # causal: row 1's real tokens see no padding
    # the logits-only forward and hidden_states report the main layers' load the same way (no MTP pass)
    for other in (model(ids_BT, valid_BT=valid_BT).expert_load, model.hidden_states(ids_BT, valid_BT).expert_load):
        assert list(other) == ["model.layers.1.mlp", "model.layers.2.mlp"]
        for k in other:
            torch.testing.assert_close(other[k], out.expert_load[k])
    with pytest.raises(ValueError, match="valid_BT has shape"):
        model(ids_BT, targets_BT, valid_BT[:, :9])
    with pytest.raises(ValueError, match="valid_BT has shape"):
        model.hidden_states(ids_BT, valid_BT[:1])


def test_build_model_dispatch():
    assert isinstance(build_model(small()), Transformer)
    dense = build_model(tiny_dense(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    assert type(dense).__name__ == "LlamaModel"
    with pytest.raises(ValueError, match="deepseek_v3"):
        Transformer(tiny_dense())
    assert isinstance(small(), ModelConfig)


def test_too_long_sequence_raises():
    model = Transformer(small())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))
    from sputnik.inference.decoders import cached_model

    with pytest.raises(ValueError, match="max_position_embeddings"):
        cached_model(model).new_cache(1, 65)


def _qwen3_moe_with_a_dense_layer(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from sputnik.model.hf_llama import load_hf_llama

    hc = Qwen3MoeConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=16, intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                        mlp_only_layers=[0], max_position_embeddings=64, initializer_range=0.1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hc).save_pretrained(tmp_path / "qwen3_moe")
    return load_hf_llama(tmp_path / "qwen3_moe").train()


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_padding_rows_are_not_computed_and_change_nothing(family, tmp_path, monkeypatch):
    """On a CPU every per-token layer of a block (norms, attention projections, dense FFNs, experts)
    runs on a right-padded batch's real tokens only, and the head on the scored rows only: they see exactly the
    real rows, and loss, its parts, the expert load and every gradient equal those of the path that
    computes every row (CUDA's and compile's)."""
    from sputnik.model import block, llama, moe

    torch.manual_seed(0)
    model = Transformer(small()).train() if family == "deepseek_v3" else _qwen3_moe_with_a_dense_layer(tmp_path)
    ids_BT, targets_BT = batch(B=3, T=12)
    valid_BT = torch.ones(3, 12, dtype=torch.bool)
    valid_BT[1, 7:] = valid_BT[2, 4:] = False
    ids_BT[~valid_BT], targets_BT[~valid_BT] = 0, -100
    # every per-token computation: FFNs (dense MLPs, shared experts, routed experts) and the attention's
    # projections (MLA's; Llama's q, k, v, o)
    ffns = [m for name, m in model.named_modules() if type(m).__name__ in ("MLP", "Experts")
            or name.endswith(("kv_a_proj_with_mqa", "q_a_proj", "kv_b_proj", "q_proj", "k_proj", "v_proj", "o_proj"))]
    rows_seen = set()
    hooks = [m.register_forward_hook(lambda m, args, out: rows_seen.add(args[0].shape[:-1].numel())) for m in ffns]

    def run():
        model.zero_grad()
        out = model(ids_BT, targets_BT, valid_BT)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    skipped, grads = run()
    real = {int(valid_BT.sum())} | ({int(valid_BT[:, 1:].sum())} if family == "deepseek_v3" else set())  # + MTP's
    assert rows_seen == real
    for mod in (block, llama, moe):
        monkeypatch.setattr(mod, "real_token_rows", lambda valid_BT, x: None)
    rows_seen.clear()
    every_row, ref_grads = run()
    assert rows_seen == {3 * 12} | ({3 * 11} if family == "deepseek_v3" else set())
    for h in hooks:
        h.remove()
    for k in ("loss", "ce_loss", "mtp_loss", "aux_loss"):
        torch.testing.assert_close(getattr(skipped, k), getattr(every_row, k), rtol=1e-5, atol=1e-7)
    assert skipped.expert_load.keys() == every_row.expert_load.keys() and skipped.expert_load
    for k in skipped.expert_load:
        assert torch.equal(skipped.expert_load[k], every_row.expert_load[k]), k
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_mask_that_is_not_a_right_padding_computes_every_row():
    """The row path gives padding zero keys and values, which only a right padding hides from every
    real query; a mask with a hole (a False before a True) falls back to computing every row."""
    from sputnik.model.layers import real_token_rows

    x_BTD = torch.zeros(2, 5, 4)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    holed = torch.tensor([[1, 0, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert real_token_rows(right, x_BTD).tolist() == [0, 1, 2, 5, 6, 7, 8, 9]
    assert real_token_rows(holed, x_BTD) is None
    torch.manual_seed(0)
    model = Transformer(small()).train()
    ids_BT, targets_BT = batch(B=2, T=10)
    valid_BT = torch.ones(2, 10, dtype=torch.bool)
    valid_BT[0, 3] = False
    out = model(ids_BT, targets_BT, valid_BT)
    ref = model(ids_BT, targets_BT)  # every row, every token attended
    torch.testing.assert_close(out.ce_loss, ref.ce_loss, rtol=1e-6, atol=1e-7)


def test_the_sft_step_keeps_pad_id_tokens_inside_a_row_real(monkeypatch):
    """A tokenizer whose pad token is its end-of-turn token (Llama 3: pad = eos) has it inside rows:
    the SFT step's mask keeps those positions real, so the row path runs on every real token and the
    loss equals the unmasked forward's (the padding after a row's end never changes it)."""
    import contextlib
    from types import SimpleNamespace

    from sputnik.distributed import DistInfo
    from sputnik.model import block
    from sputnik.train.balance import ExpertLoad
    from sputnik.train.step import forward_backward

    torch.manual_seed(0)
    model = Transformer(small()).train()
    PAD = 3
    ids_BT, targets_BT = batch(B=2, T=10)
    ids_BT[ids_BT == PAD] = PAD + 1
    ids_BT[0, 4] = PAD  # an end-of-turn token inside row 0
    ids_BT[1, 6:], targets_BT[1, 6:] = PAD, -100  # row 1: 6 real tokens, then padding
    rows_seen = []
    real_rows = block.real_token_rows
    monkeypatch.setattr(block, "real_token_rows", lambda v, x: rows_seen.append(real_rows(v, x)) or rows_seen[-1])
    s = SimpleNamespace(model=model, device=torch.device("cpu"), tokenizer=SimpleNamespace(pad_id=PAD, eot_id=PAD),
                        dist=DistInfo(), amp=contextlib.nullcontext)
    m = forward_backward(s, [(ids_BT, targets_BT)], ExpertLoad())
    assert rows_seen[0] is not None and rows_seen[0].numel() == 10 + 6
    assert m["real_tokens"] == 16  # what throughput and MFU count (the ledger counts all 20 positions)
    with torch.no_grad():
        ref = model(ids_BT, targets_BT)
    assert m["ce"] == pytest.approx(float(ref.ce_loss), rel=1e-5)
