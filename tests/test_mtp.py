"""Multi-token prediction: masking at sequence ends, 1/T normalisation, [emb; h] concat order,
h^0 = post-final-norm hidden, gradients into eh_proj and the shared embedding, drafting (the MTP
module as the inference engine's draft head, checked against the training path)."""
import torch
import torch.nn.functional as F

from oracles import mtp_draft
from sputnik.inference.decoders import cached_model
from sputnik.model.config import tiny
from sputnik.model.transformer import Transformer


def mtp_model(depth=1, **kw):
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=2,
                q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                num_nextn_predict_layers=depth, seq_aux_loss_alpha=0.0, max_position_embeddings=64)
    return Transformer(tiny(**{**base, **kw}))


def by_hand_depth1(model, ids_BT, targets_BT):
    """Per-position CE of module 1, computed from its parts: position i uses h^0_i (post-norm),
    Emb(ids[i+1]) and predicts targets[i+1]; returns ce_B(T−1) (0 where ignored)."""
    T = ids_BT.shape[1]
    mod = model.mtp[0]
    h0_BTD, emb_BTD = model.hidden_states(ids_BT).hidden, model.model.embed_tokens(ids_BT)
    merged = mod.eh_proj(torch.cat([mod.enorm(emb_BTD[:, 1:]), mod.hnorm(h0_BTD[:, : T - 1])], -1))
    cos, sin = model.rope(T - 1, merged.dtype)
    h1_BTD, _ = super(type(mod), mod).forward(merged, cos, sin)  # the decoder block alone
    logits_BTV = model.lm_head(mod.shared_head.norm(h1_BTD))
    tgt = targets_BT[:, 1:]
    return F.cross_entropy(logits_BTV.transpose(1, 2), tgt, ignore_index=-100, reduction="none")


def test_mtp_loss_masking_at_sequence_end_and_ignored_targets():
    torch.manual_seed(0)
    model = mtp_model()
    ids_BT = torch.tensor([[5, 9, 2, 7, 11, 3]])
    # targets[i] = ids[i+1]; last has no next token; position 1 ignored (e.g. a prompt token)
    targets_BT = torch.tensor([[9, -100, 7, 11, 3, -100]])
    out = model(ids_BT, targets_BT)
    assert out.num_tokens.item() == 4
    ce_BT = by_hand_depth1(model, ids_BT, targets_BT)
    # module 1 at i predicts targets[i+1]: i=0 -> -100 (masked), i=1..3 -> 7, 11, 3, i=4 -> -100 (past the end)
    assert (ce_BT[0] == 0).tolist() == [True, False, False, False, True]
    expected = ce_BT.sum() / 4  # divided by T = the main loss's 4 tokens, not by the 3 MTP positions
    torch.testing.assert_close(out.mtp_loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.ce_loss + 0.3 * out.mtp_loss + out.aux_loss, atol=1e-6, rtol=0)


def test_mtp_one_over_T_normalisation_over_the_batch():
    torch.manual_seed(1)
    model = mtp_model()
    ids_BT = torch.randint(0, 64, (3, 8))
    targets_BT = torch.cat([ids_BT[:, 1:], torch.full((3, 1), -100)], 1)  # 7 valid per row
    out = model(ids_BT, targets_BT)
    ce_BT = by_hand_depth1(model, ids_BT, targets_BT)  # 6 valid MTP positions per row
    assert (ce_BT > 0).sum().item() == 18 and out.num_tokens.item() == 21
    torch.testing.assert_close(out.mtp_loss, ce_BT.sum() / 21, atol=1e-5, rtol=1e-5)
    # i.e. 6/7 of the MTP positions' own mean: the paper's 1/T, not 1/(T−k)
    torch.testing.assert_close(out.mtp_loss, ce_BT.sum() / 18 * 18 / 21, atol=1e-5, rtol=1e-5)


def test_depth_two_chains_modules_and_averages_depths():
    torch.manual_seed(2)
    model = mtp_model(depth=2)
    ids_BT = torch.randint(0, 64, (2, 7))
    targets_BT = torch.cat([ids_BT[:, 1:], torch.full((2, 1), -100)], 1)
    out = model(ids_BT, targets_BT)
    h0 = model.hidden_states(ids_BT).hidden
    emb = model.model.embed_tokens(ids_BT)
    cos, sin = model.rope(7, h0.dtype)
    h1, _ = model.mtp[0](h0[:, :6], emb[:, 1:], cos[:6], sin[:6])
    h2, _ = model.mtp[1](h1[:, :5], emb[:, 2:], cos[:5], sin[:5])  # depth 2 consumes depth 1's output
    ce = [F.cross_entropy(model.lm_head(m.shared_head.norm(h)).transpose(1, 2), targets_BT[:, k:],
                          ignore_index=-100, reduction="sum")
          for k, m, h in ((1, model.mtp[0], h1), (2, model.mtp[1], h2))]
    torch.testing.assert_close(out.mtp_loss, (ce[0] + ce[1]) / 12 / 2, atol=1e-5, rtol=1e-5)


def test_concat_order_is_embedding_first():
    """eh_proj reads [enorm(emb); hnorm(h)]: with the projection's first half (the embedding's columns)
    zeroed, the output ignores the token embedding and still follows h; swapped halves fail both."""
    torch.manual_seed(3)
    mod = mtp_model().mtp[0]
    with torch.no_grad():
        mod.eh_proj.weight[:, :32].zero_()  # the embedding half
    h1, h2, e1, e2 = (torch.randn(1, 4, 32) for _ in range(4))
    cos, sin = torch.ones(4, 1, 2), torch.zeros(4, 1, 2)
    torch.testing.assert_close(mod(h1, e1, cos, sin)[0], mod(h1, e2, cos, sin)[0])
    assert (mod(h1, e1, cos, sin)[0] - mod(h2, e1, cos, sin)[0]).abs().max() > 1e-3


def test_gradients_reach_eh_proj_and_shared_embedding():
    torch.manual_seed(4)
    ids_BT = torch.randint(0, 64, (2, 6))
    targets_BT = torch.cat([ids_BT[:, 1:], torch.full((2, 1), -100)], 1)
    grads = {}
    for lam in (0.0, 0.3):
        torch.manual_seed(5)
        model = mtp_model(mtp_loss_weight=lam)
        model(ids_BT, targets_BT).loss.backward()
        grads[lam] = (model.mtp[0].eh_proj.weight.grad.clone(), model.model.embed_tokens.weight.grad.clone(),
                      model.lm_head.weight.grad.clone())
    assert grads[0.0][0].abs().max() == 0 and grads[0.3][0].abs().max() > 0
    # the MTP loss adds gradient to the (shared, not copied) embedding and head
    assert (grads[0.3][1] - grads[0.0][1]).abs().max() > 1e-6
    assert (grads[0.3][2] - grads[0.0][2]).abs().max() > 1e-6
    assert not any(n.startswith("mtp.") and "embed" in n for n, _ in mtp_model().named_parameters())


def test_cached_draft_matches_the_training_path():
    """Self-speculative drafting (inference/deepseek.py): one cache for the main layers and the MTP
    block, token by token, gives the MTP module's training-path logits and hidden states (the
    uncached draft of tests/oracles.py, itself checked against MTPModule.forward here)."""
    torch.manual_seed(6)
    model = mtp_model().eval()
    cm = cached_model(model)
    ids_BT = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        h0 = model.hidden_states(ids_BT).hidden
        ref_logits, ref_h1 = mtp_draft(model, h0[:, :5], ids_BT[:, 1:])
        emb = model.model.embed_tokens(ids_BT)
        cos, sin = model.rope(5, h0.dtype)
        h1, _ = model.mtp[0](h0[:, :5], emb[:, 1:], cos, sin)
        torch.testing.assert_close(ref_h1, h1)
        torch.testing.assert_close(ref_logits, model.lm_head(model.mtp[0].shared_head.norm(h1)))
        cache, seqlens_B = cm.new_cache(2, 8), torch.zeros(2, dtype=torch.long)
        for t in range(5):
            _, h_t = cm.forward_cached(ids_BT[:, t:t + 1], cache, seqlens_B, return_hidden=True)
            torch.testing.assert_close(h_t[:, 0], h0[:, t], atol=1e-5, rtol=1e-5)
            step, h1_t = cm.draft(h_t, ids_BT[:, t + 1:t + 2], cache, seqlens_B)
            torch.testing.assert_close(step[:, 0], ref_logits[:, t], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(h1_t[:, 0], ref_h1[:, t], atol=1e-4, rtol=1e-4)
            seqlens_B += 1
        # several positions at once (the engine drafts over every position accepted since the last draft)
        cache, zeros = cm.new_cache(2, 8), torch.zeros(2, dtype=torch.long)
        _, h_all = cm.forward_cached(ids_BT[:, :5], cache, zeros, return_hidden=True)
        many, _ = cm.draft(h_all, ids_BT[:, 1:6], cache, zeros)
        torch.testing.assert_close(many, ref_logits, atol=1e-4, rtol=1e-4)


def test_cached_draft_chains_depths():
    """Depth 2 drafts from depth 1's h^1 with its own cache layer (num_hidden_layers + 1): the cached
    chain equals the uncached one, which equals the training path's chained modules."""
    torch.manual_seed(7)
    model = mtp_model(depth=2).eval()
    cm = cached_model(model)
    ids_BT = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        h0 = model.hidden_states(ids_BT).hidden
        ref1, ref_h1 = mtp_draft(model, h0[:, :6], ids_BT[:, 1:])
        ref2, ref_h2 = mtp_draft(model, ref_h1[:, :5], ids_BT[:, 2:], depth=2)
        emb = model.model.embed_tokens(ids_BT)
        cos, sin = model.rope(5, h0.dtype)
        h2, _ = model.mtp[1](ref_h1[:, :5], emb[:, 2:], cos, sin)
        torch.testing.assert_close(ref_h2, h2)
        cache, zeros = cm.new_cache(2, 8), torch.zeros(2, dtype=torch.long)
        assert len(cache.kv_BSX) == 2 + 2  # main layers + one per MTP depth
        _, h_all = cm.forward_cached(ids_BT[:, :6], cache, zeros, return_hidden=True)
        logits1, h1 = cm.draft(h_all, ids_BT[:, 1:], cache, zeros)
        logits2, _ = cm.draft(h1[:, :5], ids_BT[:, 2:], cache, zeros, depth=2)
        torch.testing.assert_close(logits1, ref1, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits2, ref2, atol=1e-4, rtol=1e-4)
        assert cache.c_kv(3)[:, :5].abs().sum() > 0 and cache.c_kv(3)[:, 5:].abs().sum() == 0  # depth 2's layer
