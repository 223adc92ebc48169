"""Continuous batching: a request's output through the scheduler equals the Engine's for the same
prompt and seed, whoever else joins or leaves the batch; the queue is bounded; text streams
UTF-8-safely and stops at stop strings. Real tiny models, tokenizer trained in-process."""
import threading

import pytest
import torch

from sputnik.inference.engine import Engine
from sputnik.inference.sampling import SamplingParams
from sputnik.model import build_model
from sputnik.model.config import tiny, tiny_dense
from sputnik.inference.scheduler import QueueFull, Scheduler, SchedulerClosed, TextStream
from sputnik.tokenizer import train_tokenizer

TEXTS = ["<|user|>what is 2+2?<|assistant|><think>two plus two</think><answer>4</answer><|endoftext|>",
         "the quick brown fox jumps over the lazy dog", "héllo wörld, ça va? 🚀 naïve café"] * 3


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


def _dense(tok, **kw):
    torch.manual_seed(0)
    # vocab wider than the tokenizer: the scheduler must never sample the extra rows
    cfg = tiny_dense(vocab_size=tok.vocab_size + 20, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256, **kw)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def model(tok):
    return _dense(tok, initializer_range=0.2)  # wide init: logits far apart, no near-ties in argmax


def _params(tok, n, **kw):
    return SamplingParams(max_new_tokens=n, stop_token_ids=(tok.eot_id,), **kw)


def _engine(model, tok, prompt, params):
    return Engine(model, tok).generate([prompt], params)[0][0]


PROMPTS = ["what is 2+2?", "the quick brown", "héllo", "fox jumps over the lazy dog and the cat"]


def test_single_request_equals_engine_greedy(model, tok):
    sched = Scheduler(model, tok, max_batch=4, max_len=96, start=False)
    for text in PROMPTS:
        prompt, params = tok.render_prompt(text), _params(tok, 20, temperature=0)
        req = sched.submit(prompt, params)
        while not req.done.is_set():
            sched.step()
        ref = _engine(model, tok, prompt, params)
        assert req.result.token_ids == ref.token_ids
        assert req.result.text == ref.text and req.result.finish_reason == ref.finish_reason
        assert all(t < tok.vocab_size for t in ref.token_ids)


def test_join_and_leave_mid_way_equals_engine(model, tok):
    """A runs alone, B and C join after 3 steps, B leaves early, D joins after B left: every
    output equals its own Engine run (greedy, and seeded sampling with top-k/top-p)."""
    sched = Scheduler(model, tok, max_batch=3, max_len=96, start=False)
    specs = {"A": (PROMPTS[0], _params(tok, 30, temperature=0)),
             "B": (PROMPTS[1], _params(tok, 4, temperature=0)),
             "C": (PROMPTS[2], _params(tok, 25, temperature=0.9, top_k=20, top_p=0.9, seed=7)),
             "D": (PROMPTS[3], _params(tok, 10, temperature=1.2, seed=3))}
    reqs, log = {}, []
    reqs["A"] = sched.submit(tok.render_prompt(specs["A"][0]), specs["A"][1])
    for step in range(40):
        if step == 3:
            for k in "BC":
                reqs[k] = sched.submit(tok.render_prompt(specs[k][0]), specs[k][1])
        if step == 9:
            reqs["D"] = sched.submit(tok.render_prompt(specs["D"][0]), specs["D"][1])
        sched.step()
        log.append(sched.num_running)
    assert all(r.done.is_set() for r in reqs.values())
    assert sched.stats.max_running == 3 and 1 in log[:3]  # really shared, really alone at first
    for k, (text, params) in specs.items():
        ref = _engine(model, tok, tok.render_prompt(text), params)
        assert reqs[k].result.token_ids == ref.token_ids, k
        assert reqs[k].result.text == ref.text, k


def test_threaded_submission_streams_and_matches(model, tok):
    with Scheduler(model, tok, max_batch=3, max_len=96, queue_size=16) as sched:
        out = {}

        def client(i):
            params = _params(tok, 12 + i, temperature=0 if i % 2 else 0.8, seed=i)
            req = sched.submit(tok.render_prompt(PROMPTS[i % 4]), params)
            deltas = list(req.stream(timeout=30))
            out[i] = (params, req.wait(30), deltas)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(out) == 8
    for i, (params, res, deltas) in out.items():
        ref = _engine(model, tok, tok.render_prompt(PROMPTS[i % 4]), params)
        assert res.token_ids == ref.token_ids and res.text == ref.text
        assert "".join(d.text for d in deltas) == res.text
        assert sum(len(d.token_ids) for d in deltas) == len(res.token_ids)
        assert deltas[-1].finish_reason == res.finish_reason and all(d.finish_reason is None for d in deltas[:-1])


def test_queue_bound_and_close(model, tok):
    sched = Scheduler(model, tok, max_batch=1, max_len=64, queue_size=2, start=False)
    p = _params(tok, 3, temperature=0)
    a, b = sched.submit([5, 6], p), sched.submit([7], p)
    with pytest.raises(QueueFull, match="queue_size=2"):
        sched.submit([8], p)
    sched.step()  # admits a (max_batch 1): one place frees in the queue
    c = sched.submit([8], p)
    sched.close()
    for r in (a, b, c):
        assert r.result.finish_reason == "error" and "shut down" in r.result.error
    with pytest.raises(SchedulerClosed):
        sched.submit([9], p)


def test_bad_requests_are_value_errors(model, tok):
    sched = Scheduler(model, tok, max_batch=1, max_len=32, start=False)
    with pytest.raises(ValueError, match="empty prompt"):
        sched.submit([], _params(tok, 3))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sched.submit([tok.vocab_size + 1], _params(tok, 3))
    with pytest.raises(ValueError, match="> max_len=32"):
        sched.submit([5] * 30, _params(tok, 3))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Scheduler(model, tok, max_len=10_000, start=False)


def test_wider_head_never_sampled(tok):
    m = _dense(tok)
    with torch.no_grad():
        m.lm_head.weight[tok.vocab_size:] = 50.0  # the padding rows would win every argmax
    sched = Scheduler(m, tok, max_batch=2, max_len=64, start=False)
    reqs = [sched.submit([5, 6], _params(tok, 8, temperature=t, seed=1)) for t in (0, 1.0)]
    while not all(r.done.is_set() for r in reqs):
        sched.step()
    assert all(0 <= t < tok.vocab_size for r in reqs for t in r.result.token_ids)


def test_stop_string_truncates_and_streaming_is_utf8_safe(tok):
    text = "héllo wörld 🚀 the quick brown fox"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte chars span several byte-level tokens
    s, deltas = TextStream(tok), []
    for t in ids:
        s.push(t)
        deltas.append(s.take())
    s.finish()
    deltas.append(s.take(final=True))
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)

    s, out = TextStream(tok, stop_strings=("brown",)), []
    for t in ids:
        s.push(t)
        out.append(s.take())
        if s.stopped:
            break
    out.append(s.take(final=True))
    assert s.stopped and "".join(out) == "héllo wörld 🚀 the quick "
    assert not any("bro" in d for d in out)  # a possible stop-string start is held back, never sent


def test_cancel_frees_the_row(model, tok):
    sched = Scheduler(model, tok, max_batch=2, max_len=96, start=False)
    a = sched.submit(tok.render_prompt("fox"), _params(tok, 50, temperature=0.8))
    sched.step()
    a.cancel()
    sched.step()
    assert a.result.finish_reason == "cancelled" and sched.num_running == 0


def test_mla_model_equals_engine(tok):
    """The DeepSeek-V3 Transformer (compressed MLA cache) through the same batching path."""
    torch.manual_seed(0)
    m = build_model(tiny(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                         moe_intermediate_size=32, n_routed_experts=4, intermediate_size=128,
                         max_position_embeddings=128, initializer_range=0.2)).eval()
    sched = Scheduler(m, tok, max_batch=2, max_len=64, start=False)
    params = [_params(tok, 12, temperature=0), _params(tok, 6, temperature=0), _params(tok, 9, temperature=1.0, seed=2)]
    reqs = [sched.submit(tok.render_prompt(p), q) for p, q in zip(PROMPTS, params)]
    for _ in range(40):
        sched.step()
    assert sched.stats.max_running == 2
    for p, q, r in zip(PROMPTS, params, reqs):
        assert r.result.token_ids == _engine(m, tok, tok.render_prompt(p), q).token_ids
