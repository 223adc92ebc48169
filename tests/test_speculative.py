"""Self-speculative decoding with the MTP head: greedy output == plain greedy decoding, and
speculative sampling leaves the main model's distribution unchanged."""
import pytest
import torch

from sputnik.inference.engine import Engine
from sputnik.inference.sampling import SamplingParams
from sputnik.model import build_model
from sputnik.model.config import tiny
from sputnik.inference.speculative import accept_drafts, speculative_generate


def small_model(vocab=8, seed=0, init=0.3, dense=True):
    """Tiny V3 with one MTP module; wide init so that p and q are peaked and differ (a wrong
    accept rule then shows up in the statistics); a small vocab so drafts are accepted sometimes."""
    torch.manual_seed(seed)
    cfg = tiny(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               moe_intermediate_size=16, n_routed_experts=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
               qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64, initializer_range=init,
               first_k_dense_replace=2 if dense else 1, num_nextn_predict_layers=1)
    return build_model(cfg).eval()


def test_greedy_equals_plain_greedy():
    drafted = accepted = 0
    for seed, vocab in [(0, 8), (1, 8), (2, 64)]:
        model = small_model(vocab, seed, init=0.1, dense=seed != 1)  # seed 1: the MTP block is MoE
        params = SamplingParams(max_new_tokens=8, temperature=0)
        for prompt in ([1], [2, 3, 4, 5], [7, 6, 5, 4, 3, 2, 1]):
            spec, stats = speculative_generate(model, prompt, params)
            plain = Engine(model).generate([prompt], params)[0][0]
            assert spec.token_ids == plain.token_ids
            assert torch.allclose(torch.tensor(spec.logprobs), torch.tensor(plain.logprobs), atol=1e-4)
            drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    assert 0 < accepted < drafted  # both branches of the rule were exercised


def test_stop_token_and_length():
    model = small_model()
    plain = Engine(model).generate([[1, 2]], SamplingParams(max_new_tokens=10, temperature=0))[0][0]
    stop = plain.token_ids[3]
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=(stop,))
    spec, _ = speculative_generate(model, [1, 2], params)
    assert spec.token_ids == plain.token_ids[: plain.token_ids.index(stop) + 1] and spec.finish_reason == "stop"


def test_accept_rule_preserves_target_distribution():
    """Vectorised rule alone, 200k trials: the first emitted token ~ p_0, and after an accepted
    draft the bonus ~ p_1 (here the same for every trial, so the first two emitted tokens' joint
    is p_0(x)·p_1(y))."""
    g = torch.Generator().manual_seed(0)
    V, N = 5, 200_000
    p_JV = torch.softmax(2 * torch.randn(2, V, generator=g), -1)
    q_V = torch.softmax(2 * torch.randn(V, generator=g), -1)
    drafts_N1 = torch.multinomial(q_V, N, replacement=True, generator=g)[:, None]
    a_N, next_N = accept_drafts(p_JV.expand(N, 2, V), q_V.expand(N, 1, V), drafts_N1, g)
    first_N = torch.where(a_N == 1, drafts_N1[:, 0], next_N)
    freq_V = torch.bincount(first_N, minlength=V).float() / N
    assert (freq_V - p_JV[0]).abs().max() < 0.005  # ~4.5 standard errors at N = 200k
    bonus = next_N[a_N == 1]
    assert (torch.bincount(bonus, minlength=V).float() / len(bonus) - p_JV[1]).abs().max() < 0.01
    expected_accept = torch.minimum(p_JV[0], q_V).sum()  # Σ_x min(p, q)
    assert abs(a_N.float().mean() - expected_accept) < 0.005


def exact_pair_distribution(model, prompt, V):
    """P(tokens[1] = y, tokens[2] = z) of plain sampling at T = 1, marginalising tokens[0]."""
    with torch.no_grad():
        p0_V = torch.softmax(model(torch.tensor([prompt])).logits[0, -1], -1)
        seqs = torch.tensor([prompt + [x, y] for x in range(V) for y in range(V)])  # [V·V, T+2]
        logp = torch.softmax(model(seqs).logits, -1)
        p1_XY = logp[:, -2].view(V, V, V)[:, 0, :]  # p(y | x): the same in every y-row of a block
        p2_XYZ = logp[:, -1].view(V, V, V)  # p(z | x, y)
    return (p0_V[:, None, None] * p1_XY[:, :, None] * p2_XYZ).sum(0)  # [V(y), V(z)]


def test_end_to_end_sampling_matches_plain_distribution():
    """Chi-square of speculative samples' (tokens[1], tokens[2]) against the exact joint of plain
    sampling: tokens[1] comes from the accept/resample rule, tokens[2] from the bonus or the
    next step's draft."""
    V, N, prompt = 3, 150, [1, 2, 0]  # ~25 ms a run on 1 shared core: N is small, the rule's own test is large
    model = small_model(V, seed=4, init=0.5)
    expected_YZ = exact_pair_distribution(model, prompt, V) * N
    counts_YZ = torch.zeros(V, V)
    drafted = accepted = 0
    for seed in range(N):
        c, st = speculative_generate(model, prompt, SamplingParams(max_new_tokens=3, temperature=1.0, seed=seed))
        counts_YZ[c.token_ids[1], c.token_ids[2]] += 1
        drafted, accepted = drafted + st.drafted, accepted + st.accepted
    big = expected_YZ >= 5  # pool the rare cells into one bin so chi-square applies
    obs = torch.cat([counts_YZ[big], counts_YZ[~big].sum()[None]])
    exp = torch.cat([expected_YZ[big], expected_YZ[~big].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert int(big.sum()) == 5  # 6 bins: the threshold below is for df = 5
    assert chi2 < 20.5  # p = 0.001; an "always accept" rule scores in the hundreds


# ---------------------------------------------------------------------------------------------
# A separate draft model (a small model of the same vocabulary)
def dense_model(vocab, seed, init=0.3, layers=2, width=32):
    from sputnik.model.config import tiny_dense

    torch.manual_seed(seed)
    return build_model(tiny_dense(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, initializer_range=init)).eval()


def noisy_copy(model, scale, seed):
    """A draft that agrees with the target often but not always: its weights plus noise."""
    import copy

    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def test_draft_model_greedy_equals_plain_greedy():
    from sputnik.inference.engine import Engine
    from sputnik.inference.speculative import draft_speculative_generate

    accepted = drafted = 0
    for seed, vocab, k in [(0, 8, 4), (1, 8, 1), (2, 64, 3), (3, 64, 2)]:
        target = dense_model(vocab, seed, init=0.1)
        # a smaller draft of the same vocabulary (seed 3), or a near copy that is often right
        draft = dense_model(vocab, seed + 10, init=0.1, layers=1, width=16) if seed == 3 else noisy_copy(target, 0.05, seed)
        params = SamplingParams(max_new_tokens=12, temperature=0)
        for prompt in ([1], [2, 3, 4, 5], [7, 6, 5, 4, 3, 2, 1]):
            plain = Engine(target).generate([prompt], params)[0][0]
            spec, st = draft_speculative_generate(target, draft, prompt, params, num_draft=k)
            assert spec.token_ids == plain.token_ids and len(spec.token_ids) == 12
            torch.testing.assert_close(torch.tensor(spec.logprobs), torch.tensor(plain.logprobs), atol=1e-5, rtol=0)
            drafted, accepted = drafted + st.drafted, accepted + st.accepted
    assert 0 < accepted < drafted  # both paths taken: accepted drafts and rejections
    # the target as its own draft: every draft accepted, K + 1 tokens a target forward
    target = dense_model(8, 0, init=0.1)
    spec, st = draft_speculative_generate(target, target, [1, 2], SamplingParams(max_new_tokens=11, temperature=0),
                                          num_draft=4)
    assert st.accepted == st.drafted and st.target_forwards == 2


def test_draft_model_sampling_matches_plain_distribution():
    """As the MTP test: the joint of (tokens[1], tokens[2]) against plain sampling's, chi-square."""
    from sputnik.inference.speculative import draft_speculative_generate

    V, N, prompt = 3, 200, [1, 2, 0]
    target = dense_model(V, 4, init=0.3)
    draft = noisy_copy(target, 0.3, 5)  # p and q differ: a wrong accept rule shows in the statistics
    expected_YZ = exact_pair_distribution(target, prompt, V) * N
    counts_YZ = torch.zeros(V, V)
    for seed in range(N):
        c, _ = draft_speculative_generate(target, draft, prompt, SamplingParams(max_new_tokens=3, temperature=1.0,
                                                                                seed=seed), num_draft=2)
        counts_YZ[c.token_ids[1], c.token_ids[2]] += 1
    big = expected_YZ >= 5
    obs = torch.cat([counts_YZ[big], counts_YZ[~big].sum()[None]])
    exp = torch.cat([expected_YZ[big], expected_YZ[~big].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    df = int(big.sum())  # bins - 1
    assert df >= 4 and chi2 < {4: 18.5, 5: 20.5, 6: 22.5, 7: 24.3, 8: 26.1}[df]  # p = 0.001


def test_draft_model_must_share_the_vocabulary():
    from sputnik.inference.speculative import draft_speculative_generate

    with pytest.raises(ValueError, match="draft's vocabulary \\(16\\) differs from the target's \\(8\\)"):
        draft_speculative_generate(dense_model(8, 0), dense_model(16, 1), [1], SamplingParams(max_new_tokens=2))
