"""Document-masked attention (model/documents.py): in a packed window each document's logits, losses
and gradients are those of the document alone, for our DeepSeek-V3 model (MTP included) and the dense
families; the pretraining stage's --document_mask uses it."""
import pytest
import torch

from sputnik.model import build_model
from sputnik.model.config import tiny, tiny_dense
from sputnik.model.documents import document_ids

from test_stages import ws  # noqa: F401  (fixture: text documents and a tokenizer)

EOT = 1
SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64, initializer_range=0.1)
CONFIGS = {
    "deepseek_v3": lambda: tiny(**SMALL, moe_intermediate_size=16, n_routed_experts=4, q_lora_rank=16, kv_lora_rank=16,
                                qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_nextn_predict_layers=1,
                                bias_update_speed=0.0),
    "llama_gqa": lambda: tiny_dense(**SMALL, num_key_value_heads=1),
}


def test_document_ids_start_after_each_end_of_text():
    ids = torch.tensor([[5, 6, EOT, 7, EOT, EOT, 8], [EOT, 9, 9, 9, 9, 9, 9]])
    assert document_ids(ids, EOT).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_document_of_a_window_is_computed_as_if_alone(name):
    torch.manual_seed(0)
    model = build_model(CONFIGS[name]()).eval()
    docs = [[5, 9, 12, 40, EOT], [7, 3, 3, 21, 22, 23, EOT], [30, 31, 32]]
    window = torch.tensor([sum(docs, [])])
    with torch.no_grad():
        masked = model(window, documents_BT=document_ids(window, EOT)).logits[0]
        plain = model(window).logits[0]
        start = 0
        for doc in docs:
            alone = model(torch.tensor([doc])).logits[0]
            torch.testing.assert_close(masked[start:start + len(doc)], alone, atol=2e-5, rtol=1e-4)
            start += len(doc)
    assert not torch.allclose(plain[5:], masked[5:], atol=1e-3)  # unmasked, later documents see earlier ones


def test_blocked_document_attention_equals_the_masked_square_and_skips_earlier_documents():
    """The CPU training kernel (layers.block_causal_attention with documents): outputs and gradients of
    q, k, v equal SDPA's over the full boolean mask, and blocks score keys only from the earliest
    document start among their queries (the blocks before it are skipped)."""
    import torch.nn.functional as F

    from sputnik.model.layers import block_causal_attention, document_starts

    g = torch.Generator().manual_seed(0)
    B, H, T, K, V = 3, 2, 100, 8, 6
    ids_BT = torch.randint(2, 50, (B, T), generator=g)
    for b, ends in enumerate([(20, 41, 70), (9, 55), (30, 31, 64, 90)]):
        ids_BT[b, list(ends)] = EOT
    documents_BT = document_ids(ids_BT, EOT)
    assert document_starts(documents_BT)[0].tolist()[18:24] == [0, 0, 0, 21, 21, 21]
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64, requires_grad=True) for d in (K, K, V))
    o_GTV = block_causal_attention(q.reshape(B * H, T, K), k.reshape(B * H, T, K), v.reshape(B * H, T, V), 0.3,
                                   documents_BT=documents_BT)
    o = o_GTV.view(B, H, T, V)
    mask_B1TT = ((documents_BT[:, :, None] == documents_BT[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril())[:, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1TT, scale=0.3)
    torch.testing.assert_close(o, ref)
    grad = torch.randn(B, H, T, V, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(o, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b)
    # blocks of 32: the first key each block scores, the earliest start of its first query's documents
    # (token 32: 21 / 10 / 32 in rows 0 / 1 / 2; token 64: 42 / 56 / 32; token 96: 71 / 56 / 91)
    assert o_GTV.grad_fn.firsts == [0, 10, 32, 56]


def test_the_masked_loss_is_the_documents_own():
    """Training forward with targets (CE + MTP): the loss over a window of two documents equals the
    token-weighted losses of the documents alone (targets not crossing the boundary)."""
    torch.manual_seed(0)
    model = build_model(CONFIGS["deepseek_v3"]()).train()
    a, b = [5, 9, 12, 40, 41, 42, EOT], [7, 3, 3, 21, 22, 23, 24, 25]
    ids = torch.tensor([a + b])
    targets = torch.tensor([a[1:] + [-100] + b[1:] + [-100]])  # no target crosses into the next document
    out = model(ids, targets, documents_BT=document_ids(ids, EOT))
    ce_a = model(torch.tensor([a]), torch.tensor([a[1:] + [-100]])).ce_loss
    ce_b = model(torch.tensor([b]), torch.tensor([b[1:] + [-100]])).ce_loss
    torch.testing.assert_close(out.ce_loss, (ce_a * 6 + ce_b * 7) / 13, atol=1e-5, rtol=1e-5)


def test_pretraining_with_document_masks(ws, tmp_path):  # noqa: F811
    """`pretrain --document_mask true`: trains, its held-out loss is computed as it trains (masked),
    and it differs from the unmasked run's (the windows hold several documents)."""
    import json

    from test_stages import pre_cfg

    from sputnik.stages import pretrain

    masked = pretrain.run(pre_cfg(ws, tmp_path / "masked", steps=8, document_mask=True))
    plain = pretrain.run(pre_cfg(ws, tmp_path / "plain", steps=8))
    assert json.loads((tmp_path / "masked" / "stage_config.json").read_text())["document_mask"] is True
    assert masked["final_eval_loss"] < 6 and masked["final_eval_loss"] != plain["final_eval_loss"]
