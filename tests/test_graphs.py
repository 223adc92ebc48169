"""The graph decoder (sputnik/inference/graphs.py: CUDA graphs on a GPU, the static-shape compiled step
on CPU). On CPU it runs without capture: the same static cache, bucketing, padding rows, in-place
compaction and weight tracking, so these tests check everything but torch.cuda.graph itself; the GPU
test checks the capture. A decoder that fails is swapped for its eager fallback by the engine."""
import pytest
import torch

from sputnik.inference.decoders import cached_model
from sputnik.inference.engine import Engine
from sputnik.inference.deepseek import lm_head_logits
from sputnik.inference.graphs import BUCKETS, GraphDecoder, bucket_for
from sputnik.inference.sampling import SamplingParams
from sputnik.inference.weights import tensors
from sputnik.kernels.cpu import kernels_off


def _v3(**kw):
    from test_engine import _v3 as micro_v3

    return micro_v3(**{"max_position_embeddings": 256, **kw})  # room for the 150-token wave


def _prompts(lengths, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def graph_engine(model, **engine_kw) -> tuple[Engine, GraphDecoder]:
    """An engine whose decoder is the graph decoder without capture (what CPU runs, uncompiled)."""
    eng = Engine(model, **engine_kw)
    eng.decoder = GraphDecoder(cached_model(model), torch.float32, compiled=False, capture=False)
    return eng, eng.decoder


def _same(a, b, tol=1e-4):
    for row_a, row_b in zip(a, b, strict=True):
        for ca, cb in zip(row_a, row_b, strict=True):
            assert ca.token_ids == cb.token_ids
            assert ca.finish_reason == cb.finish_reason
            assert max((abs(x - y) for x, y in zip(ca.logprobs, cb.logprobs)), default=0.0) < tol


def test_buckets():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 17, 33, 64, 65)] == [1, 2, 4, 8, 24, 48, 64, 96]
    assert bucket_for(BUCKETS[-1] + 1) == 768


@pytest.mark.parametrize("abacus", [False, True], ids=["rope", "abacus"])
def test_graph_runner_equals_eager_generation_with_compaction(abacus):
    """Rows stopping at different steps cross several buckets (compaction in the static cache, padding
    rows in each bucket); tokens and log-probs equal the eager engine's. With Abacus positions the
    static cache moves each row's cached places with its latent rows."""
    model = _v3(**(dict(abacus_max_index=40, abacus_digit_ids=list(range(7, 17))) if abacus else {}))
    prompts = _prompts([5, 9, 3, 7])
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=5, stop_token_ids=(3, 4, 5, 6))
    eager = Engine(model, cuda_graphs=False).generate(prompts, params, num_samples=5)
    eng, dec = graph_engine(model)
    graphed = eng.generate(prompts, params, num_samples=5)
    _same(eager, graphed)
    lengths = sorted(len(c.token_ids) for row in graphed for c in row)
    assert lengths[0] < lengths[-1] - 4, lengths  # rows really finished at different steps
    assert dec.failed is None and eng.decoder is dec
    assert dec.stats["captures"] >= 3 and dec.stats["replays"] > 0


def test_graph_runner_follows_weight_updates_and_longer_waves():
    """An optimizer step between generate calls (RL) is seen by the captured steps (the derived
    decode weights are refreshed in place), and a later, longer wave grows the static cache."""
    model = _v3()
    eng, dec = graph_engine(model)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2)
    prompts = _prompts([4, 6])
    captures = []
    for new_tokens in (8, 8, 150):
        params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=new_tokens)
        graphed = eng.generate(prompts, params, num_samples=2)
        _same(Engine(model, cuda_graphs=False).generate(prompts, params, num_samples=2), graphed)
        captures.append(dec.stats["captures"])
        model.train()
        ids = torch.tensor([prompts[0] * 2])
        model(ids, ids).loss.backward()
        opt.step()
        opt.zero_grad()
        model.eval()
    assert captures[1] == captures[0]  # the second wave replayed the graphs captured before the update
    assert captures[2] > captures[1]  # the longer wave grew the static cache: captured again
    assert dec.cache.kv_BSX[0].shape[1] >= 156
    assert dec.failed is None


def test_derived_weights_are_refreshed_in_place():
    model = _v3()
    cm = cached_model(model)
    before = [t.data_ptr() for t in tensors(cm.step_weights())]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    after = cm.step_weights()
    assert [t.data_ptr() for t in tensors(after)] == before
    V, D = model.lm_head.weight.shape
    torch.testing.assert_close(lm_head_logits(torch.eye(D), after["lm_head"], V), model.lm_head.weight.t())


def test_mismatch_swaps_in_the_eager_decoder_and_generation_goes_on_correctly(caplog):
    """A captured step that disagrees with the eager step (simulated: the captured function adds 1 to
    the logits) is caught at its first replay; the engine swaps in the eager fallback, visibly (a
    warning), finishes the wave from the graph decoder's cache with the eager engine's output, and
    keeps the eager decoder for later waves."""
    model = _v3()
    prompts = _prompts([5, 8])
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    eager = Engine(model, cuda_graphs=False).generate(prompts, params, num_samples=2)
    eng, runner = graph_engine(model)
    good = runner.fn
    runner.fn = lambda *a: good(*a) + 1.0
    with caplog.at_level("WARNING"):
        out = eng.generate(prompts, params, num_samples=2)
    _same(eager, out)
    assert runner.failed and "differs" in runner.failed
    assert "compiled static-shape step (deepseek_v3) off" in caplog.text and "eager (deepseek_v3)" in caplog.text
    assert eng.decoder is not runner and eng.decoder.name == "eager (deepseek_v3)"
    _same(eager, eng.generate(prompts, params, num_samples=2))  # the next wave: eager from the start


def test_a_mismatch_after_compaction_falls_back_with_the_live_rows():
    """A graph that is wrong only for the small buckets fails mid-wave, after rows finished and were
    compacted in the static cache: the eager fallback gets exactly the live rows (fallback() copies
    them) and the wave ends with the eager engine's output."""
    model = _v3()
    prompts = _prompts([5, 9, 3, 7])
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=5, stop_token_ids=(3, 4, 5, 6))
    eager = Engine(model, cuda_graphs=False).generate(prompts, params, num_samples=5)
    eng, runner = graph_engine(model)
    good = runner.fn

    def wrong_when_small(model, tok_b, *a):
        return good(model, tok_b, *a) + (1.0 if tok_b.shape[0] <= 8 else 0.0)

    runner.fn = wrong_when_small
    _same(eager, eng.generate(prompts, params, num_samples=5))
    assert runner.failed and "differs" in runner.failed and eng.decoder is not runner
    assert int(runner.failed.split("bucket ")[1].rstrip(")")) <= 8
    assert runner.stats["captures"] >= 2 and runner.stats["replays"] > 0  # bigger buckets ran first


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_sampling_inside_the_step_equals_sampling_after_it(temperature):
    """step_sampled (the compiled CPU step's path; here uncompiled, same logic): the step and the
    sampling in one call, with the uniforms the engine draws and padding rows in each bucket, gives
    the eager engine's tokens and log-probs, rows finishing apart (compaction) and head rows past the
    tokenizer's vocabulary never sampled."""
    from sputnik.inference.graphs import step_and_sample

    model = _v3()
    prompts = _prompts([5, 8, 3])
    params = SamplingParams(max_new_tokens=14, temperature=temperature, seed=4, stop_token_ids=(5, 9, 33, 34, 35))
    eager_eng = Engine(model, cuda_graphs=False)
    eager_eng.vocab_limit = 40  # a head wider than the tokenizer (64 rows, 40 texts)
    eager = eager_eng.generate(prompts, params, num_samples=2)
    eng, runner = graph_engine(model)
    eng.vocab_limit = 40
    runner.sampled_fn = step_and_sample
    assert runner.can_sample(params) and not runner.can_sample(SamplingParams(top_k=5))
    out = eng.generate(prompts, params, num_samples=2)
    _same(eager, out)
    assert runner.failed is None and runner.stats["replays"] > 0 and len(runner.sampled_checked) > 1
    assert all(t < 40 for row in out for c in row for t in c.token_ids)


def test_sampled_step_mismatch_falls_back_with_the_same_samples(caplog):
    """A sampled step whose logits disagree with the eager step is caught at its bucket's first call;
    that step's tokens come from the eager logits with the uniforms already drawn, so the output is
    still the eager engine's."""
    from sputnik.inference.graphs import step_and_sample

    model = _v3()
    prompts = _prompts([6, 4])
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7)
    eager = Engine(model, cuda_graphs=False).generate(prompts, params, num_samples=2)
    eng, runner = graph_engine(model)

    def off_by_one(*a):
        logits, tok, logp = step_and_sample(*a)
        return logits + 1.0, tok, logp

    runner.sampled_fn = off_by_one
    with caplog.at_level("WARNING"):
        _same(eager, eng.generate(prompts, params, num_samples=2))
    assert runner.failed and "differs" in runner.failed and eng.decoder is not runner
    assert eng.decoder.name == "eager (deepseek_v3)" and "differs from the eager step" in caplog.text


def test_a_compile_that_fails_falls_back_to_eager_decoding(monkeypatch, caplog):
    """Engine(compile=True) on a CPU: every compiled step raising (no C++ compiler, an inductor error)
    fails the graph decoder and the wave goes on with the plain eager decoder, not another compiled
    step, which would fail the same way; later waves stay eager. Output = the eager engine's."""
    from sputnik.inference import decoders, graphs

    model = _v3()
    prompts = _prompts([5, 7])
    params = SamplingParams(max_new_tokens=9, temperature=1.0, seed=5)
    eager = Engine(model).generate(prompts, params, num_samples=2)
    kinds = []

    def no_compiler(*a):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    def compiled_step(kind, arch="deepseek_v3"):
        kinds.append(kind)
        return no_compiler

    monkeypatch.setattr(decoders, "compiled_step", compiled_step)
    monkeypatch.setattr(graphs, "compiled_step", compiled_step)
    with kernels_off():  # with the kernels on, compile=True takes the faster C step (below)
        eng = Engine(model, compile=True)
    runner = eng.decoder
    assert isinstance(runner, GraphDecoder) and runner.fn is no_compiler and runner.sampled_fn is no_compiler
    with caplog.at_level("WARNING"):
        _same(eager, eng.generate(prompts, params, num_samples=2))
    assert "C++ compiler" in runner.failed and "C++ compiler" in caplog.text
    assert eng.decoder.name == "eager (deepseek_v3)" and eng.decoder.step_fn is None
    asked = len(kinds)
    _same(eager, eng.generate(prompts, params, num_samples=2))  # the next wave: eager from the start
    assert len(kinds) == asked  # and no compiled step was asked for again


def test_capture_error_falls_back_to_eager(caplog):
    model = _v3()
    prompts = _prompts([6])
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=2)
    eager = Engine(model, cuda_graphs=False).generate(prompts, params, num_samples=3)
    eng, runner = graph_engine(model)

    def broken(b):
        raise RuntimeError("operation not permitted when stream is capturing")

    runner._capture = broken
    with caplog.at_level("WARNING"):
        _same(eager, eng.generate(prompts, params, num_samples=3))
    assert "not permitted" in runner.failed and eng.decoder is not runner
    assert eng.decoder.name == "eager (deepseek_v3)" and "not permitted" in caplog.text
    _same(eager, eng.generate(prompts, params, num_samples=3))  # the next wave: eager from the start


def test_graphs_need_cuda_to_capture():
    with pytest.raises(ValueError, match="CUDA"):
        GraphDecoder(cached_model(_v3()), torch.float32, capture=True)


def test_the_engine_chooses_its_decoder_once():
    """Eager on a CPU by default; with compile on a CPU the one-call C step where it runs, else the
    static-shape compiled step (the graph decoder without capture), for DeepSeek-V3 and the dense
    families alike."""
    from sputnik.model import build_model
    from sputnik.model.config import tiny_dense

    from sputnik.inference.decoders import EagerDecoder, choose_decoder, compiled_step

    model = _v3()
    eng = Engine(model)
    chosen = eng.decoder
    assert chosen.name == "eager (deepseek_v3)" and chosen.step_fn is None
    eng.generate(_prompts([3, 5]), SamplingParams(max_new_tokens=4, temperature=0), num_samples=2)
    assert eng.decoder is chosen  # kept across waves
    # compile on a CPU: the one-call C step where it runs (faster), the compiled static step where it does not
    c_step = Engine(model, compile=True).decoder
    assert isinstance(c_step, EagerDecoder) and c_step.step_fn is None and c_step.cm.step_weights()["c_step"] is not None
    with kernels_off():
        fast = Engine(model, compile=True).decoder
        assert fast.cm.step_weights()["c_step"] is None
    assert isinstance(fast, GraphDecoder) and not fast.capture
    assert fast.fn is compiled_step("static") and fast.sampled_fn is compiled_step("static_sampled")
    assert fast.name == "compiled static-shape step (deepseek_v3)"
    # On a GPU: CUDA graphs (which need the model there), or with cuda_graphs off and compile on, one
    # dynamic-shape compiled step, eagerly driven.
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        choose_decoder(model, dtype=torch.float32, device=cuda, compile=True, cuda_graphs=True)
    dyn = choose_decoder(model, dtype=torch.float32, device=cuda, compile=True, cuda_graphs=False)
    assert isinstance(dyn, EagerDecoder) and dyn.step_fn is compiled_step("dynamic")
    assert dyn.name == "compiled (deepseek_v3)"
    plain = choose_decoder(model, dtype=torch.float32, device=cuda, compile=False, cuda_graphs=False)
    assert isinstance(plain, EagerDecoder) and plain.step_fn is None
    dense = build_model(tiny_dense(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64))
    assert choose_decoder(dense, dtype=torch.float32, device=torch.device("cpu")).name == "eager (llama)"
    # compile on a CPU: the one-call C step where it runs (faster), the compiled static step where it does not
    d = choose_decoder(dense, dtype=torch.float32, device=torch.device("cpu"), compile=True)
    assert isinstance(d, EagerDecoder) and d.step_fn is None and d.cm.step_weights() is not None
    with kernels_off():
        d = choose_decoder(dense, dtype=torch.float32, device=torch.device("cpu"), compile=True)
    assert isinstance(d, GraphDecoder) and d.fn is compiled_step("static", "llama")
    assert d.name == "compiled static-shape step (llama)"
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        choose_decoder(dense, dtype=torch.float32, device=cuda, compile=False, cuda_graphs=True)
    d = choose_decoder(dense, dtype=torch.float32, device=cuda, compile=True, cuda_graphs=False)
    assert isinstance(d, EagerDecoder) and d.step_fn is compiled_step("dynamic", "llama")


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny", "tiny-dense"])
def test_cuda_graphs_equal_eager_decode_bf16(preset):
    """On a GPU: captured decode (bf16 autocast; our DeepSeek-V3 with its MoE through torch._grouped_mm,
    and the dense Llama layout) == eager decode."""
    from sputnik.model import build_model
    from sputnik.model.config import PRESETS

    torch.manual_seed(0)
    model = build_model(PRESETS[preset]()).cuda().eval()
    prompts = _prompts([32] * 4, vocab=4096)
    params = SamplingParams(max_new_tokens=64, temperature=0.0, stop_token_ids=())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = Engine(model, cuda_graphs=False).generate(prompts, params, num_samples=2)
        eng = Engine(model, cuda_graphs=True)
        graphed = eng.generate(prompts, params, num_samples=2)
    assert isinstance(eng.decoder, GraphDecoder) and eng.decoder.capture
    assert eng.decoder.failed is None and eng.decoder.stats["replays"] > 0
    agree = sum(ca.token_ids == cb.token_ids for ra, rb in zip(eager, graphed) for ca, cb in zip(ra, rb))
    assert agree >= 6  # greedy bf16: identical kernels, a rare near-tie may flip


def test_decode_weights_are_cast_once_under_autocast(monkeypatch):
    """Under autocast the derived decode weights are kept in the autocast dtype (RoPE tables stay
    fp32): the decode logits are the same as casting on the fly, and the fp32 copies are untouched."""
    from sputnik.inference import weights

    model = _v3()
    cm = cached_model(model)
    ids = torch.randint(0, 64, (3, 7))

    def logits():
        cache = cm.new_cache(3, 16)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return cm.forward_cached(ids, cache, torch.zeros(3, dtype=torch.long))

    cast = logits()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = cm.step_weights()
    assert w["lm_head"].dtype == torch.bfloat16 and w["layers"][0][0]["a"].dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in w["rope"])
    assert cm.step_weights()["lm_head"].dtype == torch.float32  # outside autocast: the fp32 copies
    monkeypatch.setattr(weights, "_autocast_dtype", lambda t: None)
    for m in model.modules():  # drop the derived copies: rebuild everything without the cast variant
        weights._TABLE.pop(m, None)
    torch.testing.assert_close(cast, logits(), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# The dense families (Llama / Qwen layouts) through the same decoder
def _dense(**kw):
    from sputnik.model import build_model
    from sputnik.model.config import tiny_dense

    torch.manual_seed(0)
    cfg = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, max_position_embeddings=256, initializer_range=0.1)
    return build_model(tiny_dense(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("kw", [{}, dict(family="qwen3", qk_norm=True, head_dim=12),
                                dict(family="mistral", sliding_window=6)], ids=["llama-gqa", "qwen3", "mistral-window"])
def test_dense_families_through_the_graph_decoder_equal_eager(kw):
    """The static GQA cache, buckets, padding rows and compaction of the graph decoder (what a GPU
    captures) give the eager engine's tokens and log-probs; llama.static_step reads the whole buffer
    under a mask (the sliding window included)."""
    model = _dense(**kw)
    prompts = _prompts([5, 9, 3, 7])
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=5, stop_token_ids=(3, 4, 5, 6))
    eager = Engine(model).generate(prompts, params, num_samples=3)
    eng, dec = graph_engine(model)
    graphed = eng.generate(prompts, params, num_samples=3)
    _same(eager, graphed)
    assert dec.failed is None and dec.stats["captures"] >= 2 and dec.stats["replays"] > 0
    lengths = sorted(len(c.token_ids) for row in graphed for c in row)
    assert lengths[0] < lengths[-1], lengths


def test_dense_compiled_static_step_with_sampling_equals_eager():
    """Engine(compile=True) on a CPU for a dense model: the compiled static-shape step with the sampling
    inside, one graph per bucket, checked against the eager step; same samples as the eager engine."""
    model = _dense()
    prompts = _prompts([4, 6])
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    eager = Engine(model).generate(prompts, params, num_samples=2)
    with kernels_off():  # with the kernels on, compile=True takes the faster C step (above)
        eng = Engine(model, compile=True)
        _same(eager, eng.generate(prompts, params, num_samples=2))
    assert isinstance(eng.decoder, GraphDecoder) and eng.decoder.failed is None
