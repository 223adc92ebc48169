"""JSONL / GSM8K / SVAMP loaders and their tasks (tiny files in tmp_path; real files if present)."""
import json
from pathlib import Path

import pytest

from sputnik.tasks import format_completion, get_task, gsm8k, load_jsonl, svamp

GSM8K_PATH = Path("/work/shared/data/gsm8k_test.jsonl")
SVAMP_PATH = Path("/work/shared/data/svamp.json")
OVERLAP_PATH = Path("/work/shared/data/gsm8k_test_gsm_symbolic_overlap.json")


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_loads_and_canonicalises_answers(tmp_path):
    f = _write(tmp_path / "mine.jsonl", [
        json.dumps({"prompt": "2+2?", "answer": "4", "solution": "2+2=4"}),
        "",
        json.dumps({"prompt": "half of 3?", "answer": 1.5}),
        json.dumps({"prompt": "ten?", "answer": 10.0}),
    ])
    examples, bad = load_jsonl(f)
    assert bad == 0 and [(e.prompt, e.answer, e.solution) for e in examples] == [
        ("2+2?", "4", "2+2=4"), ("half of 3?", "1.5", ""), ("ten?", "10", "")]


@pytest.mark.parametrize("line, why", [
    ("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"), ('{"answer": "1"}', "'prompt' must be"),
    ('{"prompt": "q"}', "missing 'answer'"), ('{"prompt": "q", "answer": null}', "answer must be"),
    ('{"prompt": "q", "answer": true}', "answer must be"), ('{"prompt": "q", "answer": "1", "solution": 5}', "'solution' must be"),
    ('{"prompt": "q", "answer": NaN}', "not finite"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, why):
    f = _write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok", "answer": "1"}), line])
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{why}"):
        load_jsonl(f)


def test_jsonl_skip_bad_lines_counts(tmp_path):
    f = _write(tmp_path / "mixed.jsonl", ["{oops", json.dumps({"prompt": "q1", "answer": "1"}), "[]", "{}"])
    with pytest.warns(UserWarning) as caught:
        examples, bad = load_jsonl(f, skip_bad_lines=True)
    assert bad == 3 and [e.prompt for e in examples] == ["q1"]
    messages = [str(w.message) for w in caught]
    assert "mixed.jsonl:1: not valid JSON" in messages[0] and "skipped 3 malformed line(s)" in messages[-1]
    with pytest.warns(UserWarning):
        task = get_task("jsonl", path=str(f), skip_bad_lines=True)
    assert task.bad_lines == 3


def test_jsonl_task_hash_split_and_fixed_split(tmp_path):
    rows = [json.dumps({"prompt": f"What is {i}+{i}?", "answer": str(2 * i)}) for i in range(200)]
    f = _write(tmp_path / "sums.jsonl", rows)
    task = get_task("jsonl", path=str(f))
    test = task.generate(5, split="test")
    assert [e.prompt for e in test] == [f"What is {i}+{i}?" for i in (9, 13, 14, 17, 34)]  # file order, hash split
    with pytest.warns(UserWarning, match="asked for 1000 train examples, the file has 175"):
        train = task.generate(1000, split="train")
    assert len(train) == 175 and {e.prompt for e in train}.isdisjoint(e.prompt for e in test)
    assert task.verify(test[0], format_completion(test[0])).correct
    assert task.generate(3, split="train", seed=1) != task.generate(3, split="train", seed=2)
    fixed = get_task("jsonl", path=str(f), split_mode="train")
    assert len(fixed.generate(200, split="train")) == 200
    with pytest.raises(ValueError, match="declared split_mode='train'"):
        fixed.generate(1, split="test")
    with pytest.raises(ValueError, match="no such file"):
        get_task("jsonl", path=str(tmp_path / "missing.jsonl"))


def test_gsm8k_tiny(tmp_path):
    f = _write(tmp_path / "gsm.jsonl", [
        json.dumps({"question": "Q1", "answer": "a <<2*3=6>>6 apples\n#### 6"}),
        json.dumps({"question": "Q2", "answer": "lots\n#### 1,000"}),
    ])
    task = gsm8k(f)
    exs = task.generate(2, split="test")
    assert [(e.prompt, e.answer, e.solution) for e in exs] == [("Q1", "6", "a 6 apples"), ("Q2", "1000", "lots")]
    assert task.verify(exs[1], "<think>x</think><answer>1,000</answer>").correct
    with pytest.raises(ValueError, match="only split='test'"):
        task.generate(1, split="train")
    overlap = tmp_path / "overlap.json"
    overlap.write_text("[0]")
    assert [e.prompt for e in gsm8k(f, exclude_overlap=overlap).examples] == ["Q2"]
    bad = _write(tmp_path / "nogold.jsonl", [json.dumps({"question": "Q", "answer": "no marker"})])
    with pytest.raises(ValueError, match="nogold.jsonl:1: answer has no '#### <gold>'"):
        gsm8k(bad)


def test_svamp_tiny(tmp_path):
    f = tmp_path / "svamp.json"
    f.write_text(json.dumps([{"ID": "a", "Body": "Dan had 4 apples. He ate 1.", "Question": "How many are left?",
                              "Answer": 3.0}, {"ID": "b", "Body": "B", "Question": "Q?", "Answer": 2.5}]))
    task = svamp(f)
    exs = task.generate(2, split="test")
    assert [(e.prompt, e.answer) for e in exs] == [("Dan had 4 apples. He ate 1. How many are left?", "3"), ("B Q?", "2.5")]
    with pytest.raises(ValueError, match="only split='test'"):
        task.generate(1, split="train")
    f.write_text(json.dumps([{"Body": "x"}]))
    with pytest.raises(ValueError, match="item 0: needs string 'Body' and 'Question'"):
        svamp(f)


@pytest.mark.skipif(not GSM8K_PATH.exists(), reason="GSM8K test file not present")
def test_real_gsm8k():
    task = gsm8k(GSM8K_PATH)
    assert len(task.examples) == 1319 and task.examples[0].answer == "18"
    assert all(e.answer.lstrip("-").isdigit() for e in task.examples)  # README: every gold is an integer
    assert all(task.verify(e, format_completion(e)).correct for e in task.examples[:200])
    if OVERLAP_PATH.exists():
        assert len(gsm8k(GSM8K_PATH, exclude_overlap=OVERLAP_PATH).examples) == 1319 - 96


@pytest.mark.skipif(not SVAMP_PATH.exists(), reason="SVAMP file not present")
def test_real_svamp():
    task = svamp(SVAMP_PATH)
    assert len(task.examples) == 1000 and task.examples[0].answer == "51"
    assert all(e.answer.isdigit() for e in task.examples)
