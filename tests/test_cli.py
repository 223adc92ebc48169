"""The command line: every subcommand explains its flags, the flag set is a deliberate decision
(snapshot), and user mistakes exit 2 with a message naming the key and the value."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sputnik.cli import build_parser, main

SNAPSHOT = Path(__file__).parent / "cli_flags.json"


def _subparsers(parser):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return action.choices
    return {}


def flag_table() -> dict[str, list[str]]:
    out = {}
    for name, sub in _subparsers(build_parser()).items():
        flags = sorted(o for a in sub._actions for o in a.option_strings)
        out[name] = flags
        for sname, ssub in _subparsers(sub).items():
            out[f"{name} {sname}"] = sorted(o for a in ssub._actions for o in a.option_strings)
    return out


def test_every_flag_has_help():
    for name, sub in _subparsers(build_parser()).items():
        for parser in [sub, *_subparsers(sub).values()]:
            for a in parser._actions:
                if a.option_strings and a.dest != "help":
                    assert a.help and len(a.help) > 8, f"sputnik {name}: {a.option_strings} has no help"


def test_flag_snapshot():
    """New or removed flags must be a deliberate decision: regenerate tests/cli_flags.json
    (`python tests/test_cli.py`) in the same change."""
    current = flag_table()
    assert SNAPSHOT.exists(), "tests/cli_flags.json is missing: regenerate it with python tests/test_cli.py"
    assert current == json.loads(SNAPSHOT.read_text())


if __name__ == "__main__":  # regenerate the snapshot after a deliberate change of flags
    SNAPSHOT.write_text(json.dumps(flag_table(), indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("argv, message", [
    (["sft", "--model.num_hidden_layers", "zero"], "model.num_hidden_layers='zero': expected an integer"),
    (["pretrain", "--optim.schedule", "linear"], "optim.schedule='linear': allowed"),
    (["rl", "--group_size", "1"], "group_size=1: must be >= 2"),
    (["speedrun", "--preset", "tpu"], "preset='tpu': allowed"),
])
def test_bad_config_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-m", "sputnik", "speedrun", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "usage: sputnik speedrun" in out.stdout, out.stderr


def test_torchrun_worker_exit_keeps_code_and_output():
    """Under torchrun (WORLD_SIZE > 1) __main__ leaves with os._exit: the exit code and the buffered
    output (a pipe here, so block-buffered) must survive it."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"WORLD_SIZE": "2"}
    out = subprocess.run([sys.executable, "-m", "sputnik"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and "usage: sputnik" in out.stdout, out.stderr


def test_every_subcommand_help_exits_zero(capsys):
    for name in _subparsers(build_parser()):
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert f"usage: sputnik {name}" in capsys.readouterr().out


def test_the_run_flags_have_one_name_everywhere():
    """What every run has is one dataclass (config.RunConfig): the stages share its flags, and every
    command that loads a model takes --tokenizer and the device flags (config.DeviceConfig); the
    retired dialects (--max_steps, --ledger_dir, --init.hf_dir, --task_args, ...) are gone everywhere."""
    import dataclasses

    from sputnik.config import DeviceConfig, RunConfig, leaf_fields
    from sputnik.evaluate import EvalConfig
    from sputnik.inference.chat import ChatConfig
    from sputnik.inference.serve import ServeConfig
    from sputnik.stages import distill, pretrain, rl, sft

    table = flag_table()
    flags = lambda cls: {"--" + key for key, _, _ in leaf_fields(cls)}  # noqa: E731
    device_flags, run_flags = flags(DeviceConfig), flags(RunConfig)
    assert device_flags == {"--device", "--num_threads", "--compile", "--cuda_graphs", "--cpu_kernels"}
    assert {"--out_dir", "--project_dir", "--init", "--tokenizer", "--seed", "--resume", "--checkpoint_every",
            "--keep_last"} | device_flags <= run_flags
    for stage, cls in (("pretrain", pretrain.Config), ("sft", sft.Config), ("rl", rl.Config),
                       ("distill", distill.Config)):
        assert issubclass(cls, RunConfig), stage
        assert run_flags <= set(table[stage]), (stage, sorted(run_flags - set(table[stage])))
        assert "--steps" in table[stage], stage
    for cmd, cls in (("eval", EvalConfig), ("chat", ChatConfig), ("serve", ServeConfig)):
        assert issubclass(cls, DeviceConfig) and "tokenizer" in {f.name for f in dataclasses.fields(cls)}, cmd
        assert device_flags | {"--tokenizer", "--model"} <= set(table[cmd]), cmd
    retired = {"--max_steps", "--ledger_dir", "--init.hf_dir", "--init.checkpoint", "--init.hf_impl", "--task_args",
               "--student_init", "--ledger_command", "--knob"}
    assert not retired & {f for flags in table.values() for f in flags}


def test_environment_overrides_config_fields_and_flags_win(monkeypatch):
    """The one documented environment channel (config.ENVIRONMENT): a variable sets its field for any
    command that has it; a flag still wins; the value lands in the resolved config."""
    from sputnik.config import ENVIRONMENT, config_from_args
    from sputnik.stages import rl

    assert set(ENVIRONMENT) == {"SPUTNIK_COMPILE", "SPUTNIK_CUDA_GRAPHS", "SPUTNIK_CPU_KERNELS"}
    parser = build_parser()
    monkeypatch.delenv("SPUTNIK_CUDA_GRAPHS", raising=False)
    monkeypatch.setenv("SPUTNIK_COMPILE", "1")
    monkeypatch.setenv("SPUTNIK_CPU_KERNELS", "0")
    args = parser.parse_args(["rl", "--init", "x"])
    cfg = config_from_args(args, rl.Config)
    assert cfg.compile is True and cfg.cpu_kernels is False and cfg.cuda_graphs is True
    args = parser.parse_args(["rl", "--init", "x", "--compile", "false"])
    assert config_from_args(args, rl.Config).compile is False
    monkeypatch.setenv("SPUTNIK_COMPILE", "maybe")
    with pytest.raises(ValueError, match="compile='maybe': expected a boolean"):
        config_from_args(parser.parse_args(["rl", "--init", "x"]), rl.Config)


def test_one_task_spec_syntax(tmp_path):
    """name[:knob=value...] everywhere, reasoning-gym names included; malformed specs name themselves."""
    from sputnik.tasks import parse_task, parse_tasks

    t = parse_task("addition:max_digits=6")
    assert t.name == "addition" and t.max_digits == 6
    assert parse_task("countdown").name == "countdown"
    assert [x.name for x in parse_tasks(["addition", "subtraction:max_digits=2"])] == ["addition", "subtraction"]
    with pytest.raises(ValueError, match="'max_digits' is not knob=value"):
        parse_task("addition:max_digits")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        parse_task("nope:x=1")
    with pytest.raises(ValueError, match="max_digits"):
        parse_task("addition:max_digits=zero")
    with pytest.raises(ValueError, match="no tasks"):
        parse_tasks([])
    for spec, words in (("", "expected name"), ("addition:=3", "'=3' is not knob=value"),
                        ("addition:max_digits=6:", "'' is not knob=value"), ("rg:", "dataset is required")):
        with pytest.raises(ValueError, match=words):
            parse_task(spec)
    # A value may hold colons (a path): a piece that does not start "knob=" continues the value.
    data = tmp_path / "run:2" / "svamp.json"
    data.parent.mkdir()
    data.write_text('[{"Body": "Ann has 3 apples.", "Question": "How many?", "Answer": 3}]')
    assert parse_task(f"svamp:path={data}").path == str(data)
    with pytest.raises(ValueError, match="max_digits"):
        parse_task("addition:max_digits=6:7")
    pytest.importorskip("reasoning_gym")
    rg = parse_task("rg:chain_sum:min_terms=3:use_rg_scorer=true")  # the dataset name keeps its colon
    assert (rg.name, rg.dataset, rg.config, rg.use_rg_scorer) == ("rg:chain_sum", "chain_sum", {"min_terms": 3}, True)


@pytest.mark.parametrize("argv", [
    ["eval", "--model", "/nowhere", "--task", "addition:max_digits"],
    ["distill", "--teacher", "/nowhere", "--tasks", "addition:max_digits"],
    ["tasks", "preview", "addition:max_digits"],
])
def test_commands_read_task_specs_with_the_one_parser(argv, capsys, tmp_path, monkeypatch):
    """A malformed spec is the same clear error (exit 2) from every command, before any work."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert "task spec 'addition:max_digits': 'max_digits' is not knob=value" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error, code, words", [
    ("diverged", 3, "consecutive steps"),
    ("stopped", 4, "sputnik rl: stopped: entropy collapse at step 7"),
    ("health", 4, "sputnik rl: stopped: mean entropy 0.01 < min_entropy"),
    ("value", 2, "sputnik rl: error: bad value"),
    ("interrupt", 130, "sputnik rl: interrupted"),
])
def test_exit_codes_name_how_a_command_ended(monkeypatch, capsys, error, code, words):
    """ValueError -> 2, TrainingDiverged -> 3, a run stopped on purpose (RunStopped, e.g. an RL health
    check's HealthStop) -> 4, Ctrl-C -> 130, each with its message on stderr."""
    from sputnik.accounting.ledger import RunStopped
    from sputnik.rl.health import HealthStop
    from sputnik.stages import rl
    from sputnik.train.session import TrainingDiverged

    exc = {"diverged": TrainingDiverged("rl: 5 consecutive steps with a non-finite loss"),
           "stopped": RunStopped("entropy collapse at step 7"),
           "health": HealthStop("mean entropy 0.01 < min_entropy 0.02 for 5 steps"),
           "value": ValueError("bad value"), "interrupt": KeyboardInterrupt()}[error]

    def boom(cfg, parents=()):
        raise exc

    monkeypatch.setattr(rl, "run", boom)
    assert main(["rl", "--init", "x"]) == code
    assert words in capsys.readouterr().err
