"""Eval statistics on hand-made verdicts (score() is pure); `sputnik eval` end to end on a micro
model with a file task given by its spec, a separate tokenizer and a ledger entry."""
from dataclasses import dataclass

import pytest

from sputnik.config import build
from sputnik.inference.engine import Completion
from sputnik.evaluate import EvalConfig, markdown, score
from sputnik.metrics import bootstrap_interval, wilson_interval


@dataclass
class V:
    correct: bool
    well_formatted: bool
    extracted: str | None


def _comp(text, n_tok=3, reason="stop"):
    return Completion(0, 0, list(range(n_tok)), [0.0] * n_tok, text, reason)


def verify(ex, text):  # text encodes the verdict: "<answer>|<fmt>"
    ans, fmt = text.split("|")
    return V(ans == ex, fmt == "1", ans or None)


def test_pass_and_majority_on_hand_made_counts():
    examples = ["4", "9"]
    comps = [[_comp("4|1"), _comp("5|1"), _comp("5|0"), _comp("4|1")],  # 2/4 correct; vote tie 4 vs 5 -> 4 first
             [_comp("1|1"), _comp("|0", reason="length"), _comp("1|1"), _comp("9|1")]]  # 1/4; vote -> 1 (wrong)
    res, _ = score(examples, comps, verify, 4)
    assert res["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert res["pass@1_strict"] == pytest.approx((2 / 4 + 1 / 4) / 2)  # every right answer here is well formatted
    assert res["pass@4"] == pytest.approx(1.0)
    assert res["maj@4"] == pytest.approx(0.5)
    assert res["format_rate"] == pytest.approx((3 / 4 + 3 / 4) / 2)
    assert res["truncated_rate"] == pytest.approx(1 / 8)
    assert res["mean_length"] == 3
    # intervals over the 2 problems: Wilson for the proportions, the bootstrap of the per-problem means
    assert res["pass@4_ci"] == wilson_interval(2, 2) and res["pass@4_ci"][1] == 1.0
    assert res["maj@4_ci"] == wilson_interval(1, 2)
    assert res["pass@1_ci"] == bootstrap_interval([2 / 4, 1 / 4]) == (0.25, 0.5)


def test_markdown_has_every_metric():
    res, _ = score(["4"], [[_comp("4|1")]], verify, 1)
    res.update(task="addition", model="m", tokens_per_s=12.0, sampling={"temperature": 0})
    md = markdown(res)
    assert "| pass@1 (lenient parsing) | 1 |" in md and "| pass@1 (strict: exact format) | 1 |" in md
    assert "format compliance" in md and "tokens/s" in md


def test_strict_counts_only_well_formatted_right_answers():
    """Lenient parsing accepts a right answer in any form the task allows; strict also needs the format."""
    res, _ = score(["4", "9"], [[_comp("4|0"), _comp("4|1")], [_comp("9|0"), _comp("3|1")]], verify, 2)
    assert res["pass@1"] == pytest.approx((2 / 2 + 1 / 2) / 2)
    assert res["pass@1_strict"] == pytest.approx((1 / 2 + 0) / 2)


def test_config_guards():
    with pytest.raises(ValueError, match="greedy samples are identical"):
        build(EvalConfig, {"samples": 4, "temperature": 0})
    with pytest.raises(ValueError, match="must contain"):
        build(EvalConfig, {"prompt_template": "no placeholder"})
    with pytest.raises(ValueError, match="unknown config key task_args"):  # knobs ride in the task spec now
        build(EvalConfig, {"task": "svamp", "task_args": ["path=x.json"]})
    with pytest.raises(ValueError, match="unknown config key ledger_dir"):  # now project_dir
        build(EvalConfig, {"ledger_dir": "runs"})
    # a one-task preset is its spec; a preset of several tasks is refused, naming them
    assert build(EvalConfig, {"task": "@long_multiplication"}).task == \
        "multiplication:trace=digits:min_digits_a=2:max_digits_a=3:max_digits_b=1"
    with pytest.raises(ValueError, match="a preset of 3 tasks .*rg:chain_sum"):
        build(EvalConfig, {"task": "@reasoning_gym"})
    with pytest.raises(ValueError, match="unknown task preset '@nope'"):
        build(EvalConfig, {"task": "@nope"})


SVAMP = [{"ID": "a", "Body": "Dan had 4 apples. He ate 1.", "Question": "How many are left?", "Answer": 3.0},
         {"ID": "b", "Body": "Sam has 2 pens.", "Question": "How many pens?", "Answer": 2.0},
         {"ID": "c", "Body": "Ann ran 5 miles and 6 more.", "Question": "How far?", "Answer": 11.0}]


def test_eval_end_to_end_with_a_task_spec_a_tokenizer_and_the_ledger(tmp_path):
    """`svamp:path=FILE` reaches the task (every problem of the file, num_problems=0); `tokenizer` is
    used when the model directory has none; the results are score() of the engine's samples with
    the recorded settings; with project_dir the run is an "eval" row of the ledger."""
    import json

    from sputnik import evaluate
    from sputnik.accounting import ledger
    from sputnik.inference.engine import Engine
    from sputnik.inference.sampling import SamplingParams
    from sputnik.model import build_model
    from sputnik.model.config import tiny
    from sputnik.tasks import corpus_text, parse_task
    from sputnik.tokenizer import train_tokenizer
    from sputnik.train.loading import load_model, save_model

    micro = dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=64,
                 moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, num_attention_heads=2,
                 q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                 num_nextn_predict_layers=0, max_position_embeddings=128)
    tok = train_tokenizer(corpus_text(["addition"], 200, seed=0), 320)
    model_dir = save_model(build_model(tiny(**micro)), tmp_path / "model", tok, tiny(**micro))
    (model_dir / "tokenizer.json").unlink()  # the tokenizer lives elsewhere: --tokenizer
    tok_dir = tok.save(tmp_path / "tok")
    data = tmp_path / "svamp.json"
    data.write_text(json.dumps(SVAMP))
    spec = f"svamp:path={data}"
    kw = dict(model=str(model_dir), task=spec, num_problems=0, samples=2, temperature=1.0, max_new_tokens=6,
              out=str(tmp_path / "eval"), num_threads=1, seed=3)
    with pytest.raises(ValueError, match="tokenizer.json does not exist"):  # none in the model directory, none given
        evaluate.run(build(EvalConfig, kw))
    cfg = build(EvalConfig, dict(kw, tokenizer=str(tok_dir), project_dir=str(tmp_path / "proj")))
    res = evaluate._run_ledgered(cfg)
    assert res["problems"] == 3 and res["samples_per_problem"] == 2 and res["task"] == spec
    samples = [json.loads(l) for l in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == [f"{x['Body']} {x['Question']}" for x in SVAMP]
    assert [s["answer"] for s in samples] == ["3", "2", "11"]
    # the same samples again, scored independently of run()
    task = parse_task(spec)
    examples = task.generate(3, split="test")
    params = SamplingParams(max_new_tokens=6, temperature=1.0, stop_token_ids=(tok.eot_id,), seed=3)
    comps = Engine(load_model(str(model_dir)).eval(), tok).generate([tok.render_prompt(e.prompt) for e in examples],
                                                                    params, num_samples=2)
    assert [c[0].text for c in comps] == [s["completion"] for s in samples]
    want, _ = score(examples, comps, task.verify, 2)
    for key in ("pass@1", "pass@2", "maj@2", "format_rate", "mean_length", "truncated_rate"):
        assert res[key] == want[key], key
    assert res["sampling"]["seed"] == 3 and res["sampling"]["samples"] == 2
    (row,) = ledger.load(tmp_path / "proj")
    assert (row["command"], row["status"]) == ("eval", "ok")
    assert row["metrics"] == {"heldout_accuracy": res["pass@1"], "task": spec}
    assert row["config"]["tokenizer"] == str(tok_dir) and row["config"]["project_dir"] == str(tmp_path / "proj")
