"""Registry, mixtures, corpus text, the verify dispatcher and the `sputnik tasks` commands."""
import argparse

import pytest

from sputnik.tasks import (Example, corpus_text, describe_task, example_text, format_completion, get_task, list_tasks,
                           mixture, verify)
from sputnik.tasks import cli


def test_list_and_get():
    assert list_tasks() == ["addition", "subtraction", "multiplication", "countdown", "word_problems",
                            "jsonl", "gsm8k", "svamp"]
    assert get_task("multiplication", max_digits_a="5").max_digits_a == 5  # CLI strings are coerced
    with pytest.raises(ValueError, match="unknown task 'divide'"):
        get_task("divide")
    description, knobs = describe_task("countdown")
    assert "reach a target" in description and [k[0] for k in knobs] == ["num_count", "max_number", "max_target"]
    assert [k[0] for k in describe_task("rg:chain_sum")[1]] == ["use_rg_scorer", "allow_test_derived"]


def test_mixture_round_robin_and_weights():
    mix = mixture(["addition", "countdown", "word_problems"], 7, split="train", seed=0)
    assert [e.task for e in mix] == ["addition", "countdown", "word_problems"] * 2 + ["addition"]
    assert mix == mixture(["addition", "countdown", "word_problems"], 7, split="train", seed=0)
    weighted = mixture(["addition", get_task("countdown", num_count=3)], 6, seed=1, weights=[2, 1])
    assert [e.task for e in weighted] == ["addition", "countdown", "addition", "addition", "countdown", "addition"]
    assert all(e.meta["split"] == "test" for e in mixture(["addition", "subtraction"], 10, split="test"))
    twice = mixture(["addition", "addition"], 20, seed=3)
    assert len({e.prompt for e in twice}) > 15  # the two entries get different seeds
    with pytest.raises(ValueError, match="weights"):
        mixture(["addition"], 5, weights=[1, 2])


def test_corpus_text(tmp_path):
    texts = corpus_text(["addition", "countdown"], 4, seed=0)
    assert len(texts) == 4
    first = texts[0].split("\n")
    assert first[0].startswith("What is ") and first[-1].startswith("Answer: ") and first[-2].count("=") == 1
    assert texts[1].startswith("Using the numbers")
    assert example_text(Example("rg:x", "Q?", "7", "")) == "Q?\nAnswer: 7"  # no trace: prompt + answer
    svamp_file = tmp_path / "svamp.json"
    svamp_file.write_text('[{"Body": "b", "Question": "q?", "Answer": 1.0}]')
    with pytest.raises(ValueError, match="only split='test'"):  # evaluation data never enters a corpus
        corpus_text([get_task("svamp", path=str(svamp_file))], 1)


def test_verify_dispatch():
    for name in ("addition", "countdown", "word_problems"):
        ex = get_task(name).generate(1, seed=2)[0]
        assert verify(ex, format_completion(ex)).correct
    file_example = Example("jsonl", "q", "7", "", {"key": "q", "split": "train"})
    assert verify(file_example, "<think>.</think><answer>7</answer>").correct
    assert not verify(Example("countdown", "q", "1+2", "", {}), "<answer>1+2</answer>").correct  # no numbers meta


def _run(argv, capsys):
    parser = argparse.ArgumentParser(prog="sputnik")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    code = args.func(args)
    return code, capsys.readouterr().out


def test_cli_list(capsys):
    code, out = _run(["tasks", "list"], capsys)
    assert code == 0 and "countdown" in out and "max_digits=4: largest operand length (digits) (1..30)" in out
    assert "rg:<dataset>" in out


def test_cli_preview(capsys):
    code, out = _run(["tasks", "preview", "addition:max_digits=2", "-n", "2", "--split", "test", "--seed", "3"], capsys)
    assert code == 0 and out.count("=== addition #") == 2
    assert out.count("verdict of the target completion: correct=True well_formatted=True") == 2
    # the knob reached the task: the examples of addition(max_digits=2), operands of at most 2 digits
    prompts = [line for line in out.splitlines() if line.startswith("What is")]
    assert prompts == [e.prompt for e in get_task("addition", max_digits=2).generate(2, split="test", seed=3)]
    operands = [x for p in prompts for x in p.removeprefix("What is ").rstrip("?").split(" + ")]
    assert len(operands) == 4 and all(x.isdigit() and len(x) <= 2 for x in operands)
    with pytest.raises(SystemExit):  # the retired flag
        _run(["tasks", "preview", "addition", "--knob", "max_digits=2"], capsys)
    with pytest.raises(ValueError, match="max_digits=0: must be >= 1"):
        _run(["tasks", "preview", "addition:max_digits=0"], capsys)
    with pytest.raises(ValueError, match="'novalue' is not knob=value"):
        _run(["tasks", "preview", "addition:novalue"], capsys)


def test_cli_flags_have_help():
    parser = argparse.ArgumentParser(prog="sputnik")
    cli.register(parser.add_subparsers(dest="command"))
    tasks = parser._subparsers._group_actions[0].choices["tasks"]
    for sub in tasks._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            assert action.help, (sub.prog, action.dest)


def test_presets_expand_and_every_target_completion_verifies_strictly():
    """Every preset's tasks generate in both splits, and their gold completions pass the verifier
    in the strict format too (a preset a model cannot be rewarded on would be a defect)."""
    from sputnik.tasks import PRESETS, expand_presets, parse_tasks

    assert expand_presets(["addition", "@countdown"]) == ["addition", *PRESETS["countdown"]]
    assert set(PRESETS["headroom"]) >= set(PRESETS["long_multiplication"]) | set(PRESETS["reasoning_gym"])
    with pytest.raises(ValueError, match="unknown task preset '@nope'"):
        parse_tasks(["@nope"])
    # where one task is expected (eval, tasks preview), a one-task preset is its spec
    from sputnik.tasks import parse_task

    one = parse_task("@long_multiplication")
    assert (one.name, one.trace, one.max_digits_b) == ("multiplication", "digits", 1)
    with pytest.raises(ValueError, match="a preset of 3 tasks"):
        parse_task("@reasoning_gym")
    for name in PRESETS:
        if name == "diverse":  # pretraining text only (its generation is tested in test_corpus.py)
            continue
        for task in parse_tasks([f"@{name}"]):
            for split in ("train", "test"):
                for ex in task.generate(5, split=split, seed=1):
                    v = task.verify(ex, format_completion(ex))
                    assert v.correct and v.well_formatted, (name, ex, v)
