"""DeepSeekMoE: parity with transformers 5.x DeepseekV3MoE, grouped == loop (values and gradients),
routing rules with hand-made scores, the expert load each forward returns (padding excluded), the
aux-loss-free bias step (pure in the model, summed over micro-batches and ranks by train/balance.py)
and the sequence-wise balance loss."""
import math

import pytest
import torch

from sputnik.distributed import DistInfo
from sputnik.model.config import tiny
from sputnik.model.moe import MoE, Router, expert_bias_delta, grouped_mm_supported, seq_balance_loss
from sputnik.train.balance import ExpertLoad

HF_MOE = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, n_group=4, topk_group=2,
              num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True)
IMPLS = [("loop", None), ("grouped", None), ("grouped", False)]  # (moe_impl, use_grouped_mm); False = fallback


def make_moe(impl="grouped", use_grouped_mm=None, **overrides) -> MoE:
    moe = MoE(tiny(**{**HF_MOE, **overrides}, moe_impl=impl))
    moe.experts.use_grouped_mm = use_grouped_mm
    return moe


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float32)
    return torch.log(p) - torch.log1p(-p)


def router_with_scores(scores_NE, **overrides) -> tuple[Router, torch.Tensor]:
    """A router with D = E and W = I, and inputs x = logit(s): sigmoid(x Wᵀ) reproduces the given scores.
    Fewer than 8 experts are padded with experts scoring 0.01 (ModelConfig needs hidden_size >= 8)."""
    if scores_NE.shape[1] < 8:
        pad = torch.full((scores_NE.shape[0], 8 - scores_NE.shape[1]), 0.01)
        scores_NE = torch.cat([scores_NE, pad], dim=1)
    E = scores_NE.shape[1]
    cfg = tiny(**{**HF_MOE, "hidden_size": E, "n_routed_experts": E, **overrides})
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    return router, logit(scores_NE)


# ---------------------------------------------------------------------------------------------
# Parity with transformers
@pytest.mark.parametrize("impl,use_grouped_mm", IMPLS)
def test_matches_transformers_deepseek_v3_moe(impl, use_grouped_mm):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_cfg = DeepseekV3Config(**HF_MOE)
    hf_cfg._experts_implementation = "eager"  # HF's per-expert loop: the plainest reference
    hf = DeepseekV3MoE(hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(std=0.3)  # wide enough that routing margins dwarf 1e-7 rounding
        hf.gate.e_score_correction_bias.normal_(std=0.3)
    ours = make_moe(impl, use_grouped_mm)
    assert sorted(ours.state_dict()) == sorted(hf.state_dict())
    ours.load_state_dict(hf.state_dict())

    x_BTD = torch.randn(3, 7, 32)
    x_ours = x_BTD.clone().requires_grad_()
    x_hf = x_BTD.clone().requires_grad_()
    y_ours, y_hf = ours(x_ours)[0], hf(x_hf)
    assert (y_ours - y_hf).abs().max() <= 1e-5

    # The bias really changes the selection here (else the test would not cover it).
    idx_biased = ours.gate(x_BTD.view(-1, 32))[0].sort(-1).values
    with torch.no_grad():
        saved = ours.gate.e_score_correction_bias.clone()
        ours.gate.e_score_correction_bias.zero_()
        idx_unbiased = ours.gate(x_BTD.view(-1, 32))[0].sort(-1).values
        ours.gate.e_score_correction_bias.copy_(saved)
    assert (idx_biased != idx_unbiased).any(dim=-1).sum() >= 3
    hf_idx = hf.gate(x_BTD)[2].sort(-1).values
    assert torch.equal(idx_biased, hf_idx)

    (y_ours.square().sum()).backward()
    (y_hf.square().sum()).backward()
    assert (x_ours.grad - x_hf.grad).abs().max() <= 1e-6 * x_hf.grad.abs().max()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():  # relative: these grads reach ~1e3
        assert (p.grad - hf_params[name].grad).abs().max() <= 1e-6 * max(1.0, p.grad.abs().max().item()), name


# ---------------------------------------------------------------------------------------------
# Grouped fast path == loop reference
@pytest.mark.parametrize("use_grouped_mm", [None, False])
def test_grouped_equals_loop_values_and_gradients(use_grouped_mm):
    kw = dict(hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, n_group=4, topk_group=2,
              num_experts_per_tok=3, seq_aux_loss_alpha=0.01)
    loop, grouped = make_moe("loop", **kw), make_moe("grouped", use_grouped_mm, **kw)
    with torch.no_grad():
        loop.gate.e_score_correction_bias.normal_(std=0.1)
        loop.gate.e_score_correction_bias[5] = -10.0  # expert 5 gets no token: an empty group in the sort
    grouped.load_state_dict(loop.state_dict())
    x_BTD = torch.randn(2, 24, 64)
    results = []
    for moe in (loop, grouped):
        x = x_BTD.clone().requires_grad_()
        y, routing = moe(x)
        (y.sin().sum() + routing.aux_loss).backward()  # non-uniform upstream gradient
        results.append((y.detach(), x.grad, {n: p.grad for n, p in moe.named_parameters()}, routing.load_E))
    (y_l, gx_l, g_l, load_l), (y_g, gx_g, g_g, load_g) = results
    assert (y_l - y_g).abs().max() <= 1e-5
    assert (gx_l - gx_g).abs().max() <= 1e-5
    for name, grad in g_l.items():
        assert (grad - g_g[name]).abs().max() <= 1e-5, name
    assert torch.equal(load_l, load_g) and load_l[5] == 0 and load_l.sum() == 2 * 24 * 3
    used = load_g > 0  # experts with tokens get gradient, the starved one none
    assert g_g["experts.gate_up_proj"].flatten(1).abs().amax(1).gt(0).tolist() == used.tolist()
    assert g_g["experts.down_proj"].flatten(1).abs().amax(1).gt(0).tolist() == used.tolist()


# ---------------------------------------------------------------------------------------------
# Routing rules on hand-made scores
def test_bias_changes_selection_not_gate_values():
    s = torch.tensor([[0.9, 0.8, 0.3, 0.1]])
    router, x = router_with_scores(s, n_group=1, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=2.5)
    idx, w, scores = router(x)
    order = idx.argsort(-1)
    assert idx.gather(1, order).tolist() == [[0, 1]]
    assert torch.allclose(w.gather(1, order), torch.tensor([[0.9, 0.8]]) / 1.7 * 2.5, atol=1e-6)
    assert torch.allclose(scores[:, :4], s, atol=1e-6)

    router.e_score_correction_bias[2] = 0.6  # z = [0.9, 0.8, 0.9, 0.1, 0.01, ...]
    idx, w, _ = router(x)
    order = idx.argsort(-1)
    assert idx.gather(1, order).tolist() == [[0, 2]]
    # gates come from the unbiased s = [0.9, 0.3], normalised then scaled: 2.5·[0.75, 0.25]
    assert torch.allclose(w.gather(1, order), torch.tensor([[1.875, 0.625]]), atol=1e-6)


def test_gates_unnormalised_when_norm_topk_prob_false():
    s = torch.tensor([[0.9, 0.8, 0.3, 0.1]])
    router, x = router_with_scores(s, n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=2.0)
    idx, w, _ = router(x)
    assert torch.allclose(w.sort(-1).values, torch.tensor([[1.6, 1.8]]), atol=1e-6)


def test_group_limited_routing_drops_best_expert_of_a_weak_group():
    # groups of 2: g0 = [0.95, 0.01] (top-2 sum 0.96), g1 = [0.6, 0.6] (1.2), g2 = [0.55, 0.55] (1.1), g3 (0.2)
    s = torch.tensor([[0.95, 0.01, 0.6, 0.6, 0.55, 0.55, 0.1, 0.1]])
    router, x = router_with_scores(s, n_group=4, topk_group=2, num_experts_per_tok=2)
    assert sorted(router(x)[0][0].tolist()) == [2, 3]  # expert 0 has the top score but its group is dropped
    router.n_group, router.topk_group = 1, 1
    assert 0 in router(x)[0][0].tolist()


def test_group_limited_routing_never_selects_a_dropped_group():
    E, G, TG, K = 16, 4, 2, 4
    router, _ = router_with_scores(torch.rand(1, E), n_group=G, topk_group=TG, num_experts_per_tok=K)
    x = torch.randn(500, E) * 2
    # All biased scores negative: a 0.0-masked (HF 4.5x) router would pick dropped experts here.
    router.e_score_correction_bias.fill_(-3.0)
    idx, _, scores = router(x)
    z = (scores + router.e_score_correction_bias).view(-1, G, E // G)
    kept = z.topk(2, dim=-1).values.sum(-1).topk(TG, dim=-1).indices  # by hand
    chosen_groups = idx // (E // G)
    assert (chosen_groups.unsqueeze(-1) == kept.unsqueeze(1)).any(-1).all()
    assert max(len(set(row)) for row in chosen_groups.tolist()) <= TG


def test_bias_stays_fp32_under_dtype_casts():
    moe = make_moe().to(torch.bfloat16)
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.gate.weight.dtype == torch.bfloat16
    moe.gate.e_score_correction_bias.fill_(0.5)
    moe.update_bias(torch.tensor([9.0, 0, 0, 0, 0, 0, 0, 7]), 0.001)  # 0.5 ± 0.001 is not representable in bf16
    assert moe.gate.e_score_correction_bias.sub(0.5).abs().max().item() == pytest.approx(0.001, abs=1e-7)
    y, _ = moe(torch.randn(1, 4, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Aux-loss-free balancing
def test_expert_bias_delta_formula():
    delta = expert_bias_delta(torch.tensor([1.0, 2.0, 3.0, 6.0]), 0.01)  # mean 3
    assert delta.tolist() == pytest.approx([0.01, 0.01, 0.0, -0.01])


def test_load_is_returned_and_summed_over_a_step_by_the_trainer():
    """Each forward returns its load (eval forwards too: the trainer decides what counts); ExpertLoad
    sums a step's micro-batches, and its apply moves the bias only for a step that was taken."""
    moe = make_moe()
    x = torch.randn(2, 5, 32)
    step = ExpertLoad()
    for _ in range(2):
        _, routing = moe(x)
        assert routing.load_E.sum().item() == 10 * 2  # 10 tokens x top-2
        step.add({"mlp": routing.load_E})
    counts = step.load["mlp"].tolist()
    assert sum(counts) == 40 and step.max_over_mean() == pytest.approx(max(counts) / 5)
    moe.eval()
    _, routing = moe(x)
    assert routing.aux_loss is None and routing.load_E.sum().item() == 20  # returned, counted only if added

    class One(torch.nn.Module):  # the model's side of the contract: moe_layers() and update_expert_bias(load)
        def __init__(self):
            super().__init__()
            self.moe = moe

        def moe_layers(self):
            return {"mlp": self.moe}

        def update_expert_bias(self, load):
            self.moe.update_bias(load["mlp"], 0.1)

    step.apply(One(), DistInfo(), stepped=False)  # a skipped step: its counts are dropped, the bias stays
    assert step.load == {} and step.max_over_mean() is None and moe.gate.e_score_correction_bias.abs().max() == 0
    moe.update_bias(torch.tensor([4.0, 0, 0, 0, 0, 0, 0, 4]), 0.0)  # γ = 0: the bias is frozen
    assert moe.gate.e_score_correction_bias.abs().max() == 0
    step.add({"mlp": torch.tensor([4.0, 0, 0, 0, 0, 0, 0, 4])})
    step.apply(One(), DistInfo(), stepped=True)
    assert moe.gate.e_score_correction_bias.tolist() == pytest.approx([-0.1] + [0.1] * 6 + [-0.1])
    assert step.load == {} and step.max_over_mean() is None  # reset for the next step


def _two_rank_balance(rank: int, path: str, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        moe, other = make_moe(), make_moe()

        class Two(torch.nn.Module):
            def moe_layers(self):
                return {"mlp": moe, "mtp": other}

            def update_expert_bias(self, load):
                moe.update_bias(load["mlp"], 0.1)
                other.update_bias(load["mtp"], 0.1)

        info = DistInfo(rank=rank, world_size=2, backend="gloo")
        step = ExpertLoad()  # step 1: each rank saw one side; layer "mtp" routed nothing on either
        step.add({"mlp": [torch.tensor([4.0, 0, 0, 0, 0, 0, 0, 0]), torch.tensor([0.0, 0, 0, 0, 0, 0, 0, 4])][rank]})
        step.apply(Two(), info, stepped=True)
        first = moe.gate.e_score_correction_bias.tolist()
        step = ExpertLoad()  # step 2: rank 1 kept no rows at all (an RL step): it still joins the sum
        if rank == 0:
            step.add({"mlp": torch.tensor([0.0, 6, 0, 0, 0, 0, 0, 2])})
        step.apply(Two(), info, stepped=True)
        out.put((rank, (first, moe.gate.e_score_correction_bias.tolist(), other.gate.e_score_correction_bias.tolist())))
    finally:
        dist.destroy_process_group()


def test_expert_load_is_summed_over_ranks(tmp_path):
    """V3 balances the global batch: two ranks that saw opposite experts get the bias of the summed
    load ([4, 0, ..., 0, 4]), the same on both, never their own share's; a rank with nothing to add
    (no rows, or a layer its forwards never ran) still takes part, with zeros."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_two_rank_balance, args=(r, str(tmp_path / "store"), out)) for r in range(2)]
    for proc in procs:
        proc.start()
    try:
        results = dict(out.get(timeout=120) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():  # a rank stuck in the collective: end it, the test fails on the queue
                proc.terminate()
    assert [proc.exitcode for proc in procs] == [0, 0]
    first = [-0.1] + [0.1] * 6 + [-0.1]
    second = [first[0] + 0.1, first[1] - 0.1] + [x + 0.1 for x in first[2:7]] + [first[7] - 0.1]  # load [0, 6, 0.., 2]
    for rank in (0, 1):
        got_first, got_second, got_other = results[rank]
        assert got_first == pytest.approx(first) and got_second == pytest.approx(second)
        assert got_other == [0.0] * 8


def test_bias_update_reduces_load_imbalance():
    D, E = 16, 8
    moe = make_moe(hidden_size=D, moe_intermediate_size=8, n_routed_experts=E, n_group=1, topk_group=1)
    u = torch.nn.functional.normalize(torch.randn(D), dim=0)
    with torch.no_grad():  # experts 0 and 1 align with the tokens' common direction u
        moe.gate.weight.normal_(std=0.1)
        moe.gate.weight[:2] += 3.0 * u
    x = torch.randn(4, 64, D) + 1.5 * u
    ratios = []
    for _ in range(100):
        _, routing = moe(x)
        load_E = routing.load_E
        ratios.append(float(load_E.max() / load_E.mean()))
        moe.update_bias(load_E, 0.01)
    assert ratios[0] > 3.0  # most tokens go to experts 0 and 1 (4.0 = all of them)
    # The sign rule with a fixed γ ends in a small limit cycle, so average its last steps.
    late = sum(ratios[-20:]) / 20
    assert late < 1.6 and late < 0.5 * ratios[0]
    assert moe.gate.e_score_correction_bias[:2].max() < moe.gate.e_score_correction_bias[2:].min()


# ---------------------------------------------------------------------------------------------
# Sequence-wise balance loss
def test_seq_balance_loss_hand_computed():
    scores = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.8, 0.1, 0.05, 0.05]],
                           [[0.2, 0.2, 0.4, 0.2], [0.1, 0.3, 0.3, 0.3]]])
    idx = torch.tensor([[[0], [0]], [[2], [1]]])  # K = 1
    # seq 0: P = [0.525, 0.175, 0.15, 0.15], f = [4, 0, 0, 0] -> 2.1
    # seq 1: P = [0.15, 0.25, 0.35, 0.25],   f = [0, 2, 2, 0] -> 1.2;  mean 1.65, x alpha 0.1
    assert seq_balance_loss(scores, idx, 0.1).item() == pytest.approx(0.165, rel=1e-6)
    uniform = torch.full((1, 4, 4), 0.3)
    assert seq_balance_loss(uniform, torch.tensor([[[0], [1], [2], [3]]]), 0.5).item() == pytest.approx(0.5)


def test_seq_balance_loss_ignores_padding():
    """A right-padded row with a mask gives the loss of the row alone (its T = the real length)."""
    torch.manual_seed(0)
    scores = torch.rand(2, 5, 4)
    idx = torch.randint(0, 4, (2, 5, 2))
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    alone = [seq_balance_loss(scores[:1], idx[:1], 0.1), seq_balance_loss(scores[1:, :3], idx[1:, :3], 0.1)]
    masked = seq_balance_loss(scores, idx, 0.1, valid)
    assert masked.item() == pytest.approx(((alone[0] + alone[1]) / 2).item(), rel=1e-6)
    assert seq_balance_loss(scores, idx, 0.1, torch.ones(2, 5, dtype=torch.bool)).item() == pytest.approx(
        seq_balance_loss(scores, idx, 0.1).item(), rel=1e-6)
    assert masked.item() != pytest.approx(seq_balance_loss(scores, idx, 0.1).item(), rel=1e-3)


def test_padding_is_not_expert_load():
    """With valid_BT a right-padded batch counts exactly the load of its rows run alone, in the main
    layers and in the MTP block (which gets valid_BT[:, 1:]); a mask of the wrong shape is an error."""
    from sputnik.model import build_model

    torch.manual_seed(0)
    model = build_model(tiny(vocab_size=64, hidden_size=32, num_hidden_layers=2, moe_intermediate_size=16,
                             n_routed_experts=8, num_experts_per_tok=2, num_attention_heads=2, q_lora_rank=16,
                             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                             intermediate_size=64)).train()
    assert len(model.moe_layers()) == 2  # layer 1 and the MTP block
    rows = [torch.randint(2, 64, (9,)), torch.randint(2, 64, (5,))]

    def load_of(ids_BT, valid_BT=None):
        return model(ids_BT, ids_BT, valid_BT).expert_load

    alone = [load_of(r[None]) for r in rows]
    padded = torch.zeros(2, 9, dtype=torch.long)  # pad id 0
    padded[0], padded[1, :5] = rows[0], rows[1]
    masked = load_of(padded, padded != 0)
    assert list(masked) == ["model.layers.1.mlp", "mtp.0.mlp"]
    for k in masked:
        assert torch.equal(masked[k], alone[0][k] + alone[1][k]), k
        assert masked[k].sum() < load_of(padded)[k].sum()  # unmasked, the 4 pads (3 at MTP depth 1) count
    moe = model.model.layers[1].mlp
    with pytest.raises(ValueError, match="valid_BT has shape"):
        moe(torch.randn(2, 9, 32), torch.ones(2, 8, dtype=torch.bool))


def test_moe_aux_loss_value_and_gradient_only_through_router():
    moe = make_moe(seq_aux_loss_alpha=0.01)
    x = torch.randn(2, 6, 32, requires_grad=True)
    _, routing = moe(x)
    idx, _, scores = moe.gate(x.detach().view(-1, 32))
    expected = seq_balance_loss(scores.view(2, 6, -1), idx.view(2, 6, -1), 0.01)
    assert routing.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert routing.aux_loss.item() == pytest.approx(0.01, rel=0.5)  # near-uniform at init
    routing.aux_loss.backward()
    assert moe.gate.weight.grad.abs().max() > 0 and x.grad.abs().max() > 0
    for name, p in moe.named_parameters():
        if not name.startswith("gate."):
            assert p.grad is None, name
    off = make_moe(seq_aux_loss_alpha=0.0)  # alpha = 0: not computed at all
    assert off(torch.randn(1, 3, 32))[1].aux_loss is None


def test_no_shared_experts_and_state_dict_layout():
    moe = make_moe(n_shared_experts=0)
    shapes = {k: tuple(v.shape) for k, v in moe.state_dict().items()}
    assert shapes == {"gate.weight": (8, 32), "gate.e_score_correction_bias": (8,),
                      "experts.gate_up_proj": (8, 32, 32), "experts.down_proj": (8, 32, 16)}
    assert moe(torch.randn(2, 3, 32))[0].shape == (2, 3, 32)


def test_grouped_mm_probe_is_not_fooled_by_no_grad():
    expected = grouped_mm_supported("cpu", torch.float32)
    grouped_mm_supported.cache_clear()
    with torch.inference_mode():  # a first call from generation code must not cache a false "unsupported"
        assert grouped_mm_supported("cpu", torch.float32) == expected
    if hasattr(torch, "_grouped_mm") and torch.__version__ >= (2, 9):
        assert expected  # torch >= 2.9 has a CPU kernel; if this fails we silently run the fallback



@pytest.mark.parametrize("grouped", [True, False])
def test_block_mm_op_for_torch_compile_matches_per_expert_matmuls(grouped):
    """The opaque op torch.compile sees (moe.block_mm): values and both gradients, an empty expert included."""
    from sputnik.model.moe import block_mm

    torch.manual_seed(0)
    counts_E = torch.tensor([5, 0, 7, 4])
    x_SF = torch.randn(16, 12, requires_grad=True)
    w_EOF = torch.randn(4, 8, 12, requires_grad=True)  # widths of 16-byte multiples, as grouped_linear requires
    offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    y_SO = block_mm(x_SF, w_EOF.transpose(-2, -1), offsets_E, grouped)
    ref_SO = torch.cat([x @ w.T for x, w in zip(x_SF.split(counts_E.tolist()), w_EOF.unbind(0))])
    g_SO = torch.randn_like(ref_SO)
    grads = torch.autograd.grad(y_SO, (x_SF, w_EOF), g_SO)
    ref_grads = torch.autograd.grad(ref_SO, (x_SF, w_EOF), g_SO)
    torch.testing.assert_close(y_SO, ref_SO)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    assert grads[1][1].eq(0).all()  # the empty expert gets an exact zero gradient
    # schema and fake-tensor registration (what torch.compile traces); the aot_dispatch checks take ~20 s
    torch.library.opcheck(block_mm, (x_SF, w_EOF.transpose(-2, -1), offsets_E, grouped),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

# ---------------------------------------------------------------------------------------------
# GPU: the torch._grouped_mm bf16 path
@pytest.mark.gpu
def test_grouped_mm_bf16_cuda_matches_loop():
    assert grouped_mm_supported("cuda", torch.bfloat16)
    kw = dict(hidden_size=256, moe_intermediate_size=128, n_routed_experts=16, n_group=1, topk_group=1)
    loop = make_moe("loop", **kw).cuda().to(torch.bfloat16)
    grouped = make_moe("grouped", None, **kw).cuda().to(torch.bfloat16)
    grouped.load_state_dict(loop.state_dict())
    x_BTD = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    outs = []
    for moe in (loop, grouped):
        x = x_BTD.clone().requires_grad_()
        y, _ = moe(x)
        y.float().square().sum().backward()
        outs.append((y.float(), x.grad.float(), moe.experts.gate_up_proj.grad.float()))
    for a, b in zip(*outs):
        assert (a - b).abs().max() <= 2e-2 * max(1.0, a.abs().max().item())
    assert not math.isnan(outs[1][0].sum().item())
