import argparse
import json
from dataclasses import dataclass, field

import pytest

from sputnik.config import add_config_args, build, config_from_args, knob, read_config_file, save_config
from sputnik.model.config import ModelConfig, tiny


@dataclass
class Optim:
    lr: float = knob(1e-3, "learning rate", min=0.0)
    schedule: str = knob("cosine", "schedule", choices=("cosine", "wsd"))


@dataclass
class Stage:
    steps: int = knob(10, "steps", min=1)
    name: str = knob("run", "name")
    model: ModelConfig = field(default_factory=tiny)
    optim: Optim = field(default_factory=Optim)


def test_build_nested_and_defaults():
    cfg = build(Stage, {"steps": 5, "model": {"num_hidden_layers": 2}, "optim": {"lr": "3e-4"}})
    assert cfg.steps == 5 and cfg.model.num_hidden_layers == 2 and cfg.optim.lr == 3e-4
    assert cfg.model.hidden_size == 256  # preset default kept under the override


@pytest.mark.parametrize("values, message", [
    ({"stepz": 1}, "unknown config key stepz"),
    ({"model": {"num_layers": 4}}, "unknown config key model.num_layers"),
    ({"steps": "many"}, "steps='many': expected an integer"),
    ({"steps": 0}, "steps=0: must be >= 1"),
    ({"optim": {"schedule": "linear"}}, "optim.schedule='linear': allowed 'cosine', 'wsd'"),
    ({"model": {"n_routed_experts": 6, "n_group": 4}}, "n_routed_experts=6 must be divisible by n_group=4"),
    ({"model": {"tie_word_embeddings": "maybe"}}, "expected a boolean"),
])
def test_bad_values_name_key_value_and_allowed(values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build(Stage, values)


def test_cli_overrides_file_and_json(tmp_path):
    (tmp_path / "c.toml").write_text('steps = 7\n[model]\nhidden_size = 128\n')
    (tmp_path / "c.yaml").write_text('optim:\n  lr: 0.5\n')
    p = argparse.ArgumentParser()
    add_config_args(p, Stage)
    args = p.parse_args(["--config", str(tmp_path / "c.toml"), "--model.num_hidden_layers", "3", "--optim.lr", "0.1"])
    cfg = config_from_args(args, Stage)
    assert (cfg.steps, cfg.model.hidden_size, cfg.model.num_hidden_layers, cfg.optim.lr) == (7, 128, 3, 0.1)
    assert read_config_file(tmp_path / "c.yaml") == {"optim": {"lr": 0.5}}
    save_config(cfg, tmp_path / "out" / "config.json")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model"]["num_hidden_layers"] == 3 and saved["config_class"] == "Stage"
    assert build(Stage, {k: v for k, v in saved.items() if k != "config_class"}) == cfg
    # a run's saved config reruns it (--config), flags still override; another command's is refused
    again = config_from_args(p.parse_args(["--config", str(tmp_path / "out" / "config.json"), "--steps", "9"]), Stage)
    assert again == build(Stage, {**{k: v for k, v in saved.items() if k != "config_class"}, "steps": 9})
    (tmp_path / "other.json").write_text(json.dumps({**saved, "config_class": "PretrainConfig"}))
    with pytest.raises(ValueError, match="saved by a PretrainConfig run; this command takes a Stage"):
        config_from_args(p.parse_args(["--config", str(tmp_path / "other.json")]), Stage)


def test_bad_config_file(tmp_path):
    (tmp_path / "bad.toml").write_text("steps = = 3")
    with pytest.raises(ValueError, match="not valid"):
        read_config_file(tmp_path / "bad.toml")
    with pytest.raises(ValueError, match="does not exist"):
        read_config_file(tmp_path / "missing.toml")


def _resolve(cls, argv, base=None):
    p = argparse.ArgumentParser()
    add_config_args(p, cls)
    return config_from_args(p.parse_args(argv), cls, base)


def test_environment_overrides_sit_between_presets_and_files(tmp_path, monkeypatch):
    """config.ENVIRONMENT: each variable sets its field for any config class that has it, on top of the
    defaults and a preset (`base`), under a --config file and the flags; the resolved (and hashed)
    config records the value."""
    from sputnik.config import ENVIRONMENT, RunConfig, config_hash, environment_overrides

    assert {var: key for var, (key, _) in ENVIRONMENT.items()} == {
        "SPUTNIK_COMPILE": "compile", "SPUTNIK_CUDA_GRAPHS": "cuda_graphs", "SPUTNIK_CPU_KERNELS": "cpu_kernels"}
    for var in ENVIRONMENT:
        monkeypatch.delenv(var, raising=False)
    plain = _resolve(RunConfig, [])
    assert (plain.compile, plain.cuda_graphs, plain.cpu_kernels) == (False, True, True)

    monkeypatch.setenv("SPUTNIK_COMPILE", "1")
    monkeypatch.setenv("SPUTNIK_CUDA_GRAPHS", "0")
    monkeypatch.setenv("SPUTNIK_CPU_KERNELS", "0")
    env = _resolve(RunConfig, [], base={"compile": False, "cuda_graphs": True})  # env beats the preset
    assert (env.compile, env.cuda_graphs, env.cpu_kernels) == (True, False, False)
    assert config_hash(env) != config_hash(plain)
    assert _resolve(RunConfig, ["--compile", "false"]).compile is False  # a flag wins
    (tmp_path / "c.toml").write_text("cuda_graphs = true\n")
    from_file = _resolve(RunConfig, ["--config", str(tmp_path / "c.toml")])  # so does a --config file
    assert (from_file.compile, from_file.cuda_graphs) == (True, True)

    assert environment_overrides(Stage) == {}  # a config without the fields ignores the variables
    assert _resolve(Stage, []) == build(Stage, {})
    monkeypatch.setenv("SPUTNIK_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="compile='sometimes': expected a boolean"):
        _resolve(RunConfig, [])
