"""reasoning-gym adapter: our verifiers by default, allow-listed scorers in the sandbox only,
gsm_symbolic kept out of training, the hash split on the question."""
import pytest

pytest.importorskip("reasoning_gym")

from sputnik.tasks import format_completion, get_task, verify  # noqa: E402
from sputnik.tasks.base import split_of  # noqa: E402
from sputnik.tasks.reasoning_gym import RG_SAFE_SCORERS  # noqa: E402


def test_examples_split_by_question_and_deterministic():
    task = get_task("rg:chain_sum", min_terms=2, max_terms=3)
    train, test = task.generate(40, split="train", seed=1), task.generate(10, split="test", seed=1)
    assert all(split_of(e.prompt) == "train" for e in train) and all(split_of(e.prompt) == "test" for e in test)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert train == task.generate(40, split="train", seed=1) != task.generate(40, split="train", seed=2)
    assert train[0].task == "rg:chain_sum" and train[0].solution == "" and train[0].meta["rg_config"] == {
        "min_terms": 2, "max_terms": 3}


def test_our_verifier_by_default():
    task = get_task("rg:chain_sum")
    ex = task.generate(1, seed=3)[0]
    assert task.verify(ex, format_completion(ex)).reason == "numeric match"
    wrong = task.verify(ex, f"<think>x</think><answer>{ex.answer} is my answer, or maybe {ex.answer}1</answer>")
    assert not wrong.correct  # the gym would give partial credit for the substring
    assert verify(ex, format_completion(ex)).correct  # the dispatcher rebuilds the verifier from the name


def test_text_answers_compare_normalised():
    task = get_task("rg:spell_backward")
    ex = task.generate(1)[0]
    assert task.verify(ex, f"<answer> {ex.answer.upper()} </answer>").correct
    assert not task.verify(ex, f"<answer>{ex.answer[:-1]}</answer>").correct


def test_countdown_uses_our_safe_checker(capfd):
    task = get_task("rg:countdown")
    ex = task.generate(1, seed=2)[0]
    assert task.verify(ex, format_completion(ex)).reason == "reaches the target"
    hostile = task.verify(ex, "<answer>__import__('os').system('echo hi')</answer>")
    assert not hostile.correct and "not allowed" in hostile.reason
    assert not task.verify(ex, "<answer>18**14**8</answer>").correct
    assert "hi" not in capfd.readouterr().out
    with pytest.raises(ValueError, match="use_rg_scorer=True is not allowed"):
        get_task("rg:countdown", use_rg_scorer=True)


@pytest.mark.parametrize("name", ["knights_knaves", "fraction_simplification"])
def test_allow_listed_scorer_is_binary_and_sandboxed(name):
    assert name in RG_SAFE_SCORERS
    task = get_task(f"rg:{name}", use_rg_scorer=True)
    ex = task.generate(2, seed=1)[1]
    v = task.verify(ex, format_completion(ex))
    assert v.correct and v.reason == "reasoning-gym score 1.0"
    assert verify(ex, format_completion(ex)).correct  # the dispatcher keeps the scorer choice (meta)
    partial = task.verify(ex, "<answer>1/1</answer>")  # the gym gives 0.01-0.1 for such answers
    assert not partial.correct and "< 1.0 counts as wrong" in partial.reason


def test_gsm_symbolic_refused_for_training():
    task = get_task("rg:gsm_symbolic")
    with pytest.raises(ValueError, match="built from GSM8K test questions"):
        task.generate(2, split="train")
    assert len(task.generate(2, split="test")) == 2  # evaluation use is fine
    assert len(get_task("rg:gsm_symbolic", allow_test_derived=True).generate(2, split="train")) == 2


def test_bad_names_and_configs():
    with pytest.raises(ValueError, match="did you mean chain_sum"):
        get_task("rg:chain_sums").generate(1)
    with pytest.raises(ValueError, match="rejected by reasoning-gym"):
        get_task("rg:chain_sum", no_such_option=3).generate(1)


def test_items_do_not_depend_on_the_global_random_state():
    """list_functions draws from the global `random`: the adapter seeds it per item (and gives the
    caller's state back), so a seed names the same items in every call and process."""
    import random

    task = get_task("rg:list_functions")
    random.seed(1)
    first = task.generate(5, seed=7)
    after = random.random()
    random.seed(2)
    assert task.generate(5, seed=7) == first
    random.seed(1)
    task.generate(5, seed=7)
    assert random.random() == after  # the caller's sequence goes on as if nothing had drawn from it


def test_the_command_line_fixes_the_str_hash_seed(tmp_path):
    """isomorphic_strings iterates sets of strings, whose order follows the process's hash salt: the
    CLI re-executes itself under PYTHONHASHSEED=0, so two runs preview the same items."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    cmd = [sys.executable, "-m", "sputnik", "tasks", "preview", "rg:isomorphic_strings", "-n", "3"]
    outs = [subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120) for _ in range(2)]
    assert all(o.returncode == 0 for o in outs), outs[0].stderr[-500:]
    assert outs[0].stdout == outs[1].stdout and "isomorphic" in outs[0].stdout
