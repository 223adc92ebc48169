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
