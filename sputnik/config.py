"""Plain dataclass configs: file loading (TOML/YAML/JSON), dotted CLI overrides, validation.

A config is a (possibly nested) dataclass whose fields are declared with `knob(...)`, which
carries the help text and the allowed range. Every value that reaches a config - from a file,
from `--model.num_hidden_layers 4`, from a preset - goes through `build()`, which rejects unknown
keys, wrong types and out-of-range values with a message naming the key, the value and what is
allowed. Dataclasses may add cross-field checks in `__post_init__` (raise ValueError).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
import hashlib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

MISSING = dataclasses.MISSING


def knob(default=MISSING, help: str = "", *, choices=None, min=None, max=None, default_factory=MISSING):
    """A config field with help text and an allowed range (inclusive bounds)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------
# Type handling
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value, tp):
    """Check (and where lossless, convert) `value` to the annotated type `tp`."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{key}={value!r}: expected {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}={value!r}: allowed {', '.join(repr(a) for a in args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}={value!r}: expected a list")
        inner = args[0] if args else Any
        items = [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{key}={value!r}: expected a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}={value!r}: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    pass
                else:
                    if f.is_integer():
                        return int(f)
        raise ValueError(f"{key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}={value!r}: expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ValueError(f"{key}={value!r}: expected a string")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return build(tp, value, prefix=key + ".")
        raise ValueError(f"{key}={value!r}: expected a table of {tp.__name__} settings")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ValueError(f"{key}={value!r}: expected {_type_name(tp)}")


def _check_range(key: str, value, meta) -> None:
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"{key}={value!r}: allowed {', '.join(repr(c) for c in choices)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and value < lo:
            raise ValueError(f"{key}={value!r}: must be >= {lo}")
        if hi is not None and value > hi:
            raise ValueError(f"{key}={value!r}: must be <= {hi}")


# ---------------------------------------------------------------------------------------------
# Building configs
def build(cls, values: dict | None = None, prefix: str = "", base=None):
    """Make a `cls` from a nested dict, on top of `base` (an instance) or the defaults.
    Raises ValueError naming the dotted key for unknown keys, wrong types or bad ranges."""
    values = dict(values or {})
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key {prefix}{unknown[0]!s} (allowed keys under "
            f"{prefix.rstrip('.') or cls.__name__}: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        key, tp = prefix + name, hints[name]
        current = getattr(base, name) if base is not None else _default(f)
        if name in values:
            v = values[name]
            if _is_dataclass_type(tp) and isinstance(v, dict):
                v = build(tp, v, prefix=key + ".", base=current if current is not MISSING else None)
            else:
                v = _coerce(key, v, tp)
            _check_range(key, v, f.metadata)
            kwargs[name] = v
        elif current is MISSING:
            raise ValueError(f"config key {key} is required ({f.metadata.get('help', '')})")
        else:
            _check_range(key, current, f.metadata)
            kwargs[name] = current
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e)) from None


def _default(f: dataclasses.Field):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def replace(cfg, **changes):
    """dataclasses.replace with validation of the changed values."""
    return build(type(cfg), changes, base=cfg)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg) -> str:
    """Short stable hash of the resolved config (the ledger groups runs by it)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_config_file(path: str | Path) -> dict:
    """TOML, YAML or JSON -> dict. A missing or unparsable file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"config file {path}: use .toml, .yaml/.yml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"config file {path} is not valid: {e}") from None
    except Exception as e:  # yaml.YAMLError without importing yaml at module level
        if type(e).__module__.startswith("yaml"):
            raise ValueError(f"config file {path} is not valid YAML: {e}") from None
        raise
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: top level must be a table/mapping")
    return data


def set_dotted(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ValueError(f"config key {dotted}: {p} is not a table")
    d[parts[-1]] = value


def merge(a: dict, b: dict) -> dict:
    """Deep merge b onto a (b wins)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------------------------
# argparse bridge: one flag per leaf field, `--section.field VALUE`
def leaf_fields(cls, prefix: str = ""):
    """Yield (dotted_key, type, field) for every leaf knob of a (nested) config dataclass."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            yield from leaf_fields(tp, prefix + f.name + ".")
        else:
            yield prefix + f.name, tp, f


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    """Add `--config FILE` and one `--dotted.key` flag per leaf field (values are strings,
    validated later by build(), so a bad value names its key)."""
    parser.add_argument("--config", metavar="FILE", help="TOML/YAML/JSON file of settings (flags override it)")
    group = parser.add_argument_group(f"{cls.__name__} settings (defaults shown)")
    for key, tp, f in leaf_fields(cls):
        d = _default(f)
        shown = "required" if d is MISSING else repr(d)
        extra = []
        if f.metadata.get("choices"):
            extra.append("choices: " + ", ".join(map(str, f.metadata["choices"])))
        if get_origin(tp) is Literal:
            extra.append("choices: " + ", ".join(map(str, get_args(tp))))
        if f.metadata.get("min") is not None or f.metadata.get("max") is not None:
            extra.append(f"range: [{f.metadata.get('min', '')}, {f.metadata.get('max', '')}]")
        help_text = f"{f.metadata.get('help', '')} (default {shown}{'; ' + '; '.join(extra) if extra else ''})"
        group.add_argument(f"--{key}", dest=f"cfg__{key}", metavar=_type_name(tp).upper()[:12] if not extra else "V",
                           default=None, help=help_text.replace("%", "%%"))


def config_from_args(args: argparse.Namespace, cls, base: dict | None = None):
    """Defaults <- preset dict `base` <- environment (ENVIRONMENT) <- --config file <- dotted flags;
    then validate. A run's saved config.json (save_config: it names its class) is a valid --config for
    the same command."""
    values = merge(dict(base or {}), environment_overrides(cls))
    if getattr(args, "config", None):
        data = read_config_file(args.config)
        saved_as = data.pop("config_class", cls.__name__)
        if saved_as != cls.__name__:
            raise ValueError(f"config file {args.config} was saved by a {saved_as} run; this command takes a "
                             f"{cls.__name__}")
        values = merge(values, data)
    for name, v in vars(args).items():
        if name.startswith("cfg__") and v is not None:
            set_dotted(values, name[len("cfg__"):], v)
    return build(cls, values)


def save_config(cfg, path: str | Path) -> None:
    from sputnik.common import atomic_write_json

    atomic_write_json(path, {"config_class": type(cfg).__name__, **to_dict(cfg)})


# ---------------------------------------------------------------------------------------------
# What every run has: one dataclass, the same names and checks for every command
@dataclass
class DeviceConfig:
    """Where and how a model runs: every command that loads one (stages, eval, chat, serve)."""
    device: Literal["auto", "cpu", "cuda", "mps"] = knob("auto", "compute device (auto: cuda > mps > cpu)")
    num_threads: int = knob(0, "CPU threads (0 = all cores of the affinity mask)", min=0)
    compile: bool = knob(False, "torch.compile the training forward and the decode step: for long runs (tens of "
                                "seconds of compiling per shape first; docs/benchmarks.md)")
    cuda_graphs: bool = knob(True, "on a CUDA device, replay the decode step of our DeepSeek-V3 from CUDA graphs")
    cpu_kernels: bool = knob(True, "on a CPU, the hand-written C kernels (MoE decode experts, decode-step linear layers, "
                                   "log-prob head); "
                                   "off: the torch path, same results up to rounding")


@dataclass
class LoRAConfig:
    """Low-rank adapters instead of full fine-tuning (train/lora.py); rank 0 = off."""
    rank: int = knob(0, "LoRA rank r (0 = full fine-tuning; else only the adapters train, the base frozen)", min=0)
    alpha: float = knob(32.0, "LoRA alpha: the update is scaled by alpha / rank", min=0.0)
    targets: list[str] = knob(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj"],
                              help="names of the linear layers that get adapters (module name suffixes)")
    base_dtype: Literal["auto", "float32", "bfloat16"] = knob(
        "auto", "dtype of the frozen base weights: auto (the run's, fp32) or bfloat16 (halves their memory; GPUs)")
    save_adapter: bool = knob(True, "at the end also write <out>/adapter in the PEFT format (<out>/model always "
                                    "holds the merged model in the base's layout, for the next stage's --init)")

    def __post_init__(self):
        if self.rank and not self.targets:
            raise ValueError("lora.targets is empty: name the linear layers to adapt (e.g. q_proj,v_proj)")


@dataclass
class RunConfig(DeviceConfig):
    """Every stage run (tokenizer aside): where it writes, what it starts from, how it resumes."""
    out_dir: str = knob("runs/run", "output directory: metrics.jsonl, checkpoints/, model/, config.json")
    project_dir: str = knob("", "directory of the cost ledger ledger.jsonl ('' = the parent of out_dir)")
    init: str = knob("", "model to start from: a model directory (a stage's <out>/model, or any local Hugging Face "
                         "causal LM) or a sputnik checkpoint directory ('' = a fresh model)")
    init_impl: Literal["auto", "transformers"] = knob(
        "auto", "auto: our model code for deepseek_v3 and the dense families (llama, mistral, qwen2, qwen3), "
                "transformers otherwise; "
                "transformers: always AutoModelForCausalLM")
    tokenizer: str = knob("", "tokenizer directory or tokenizer.json ('' = the one saved with init)")
    seed: int = knob(0, "seed of the init, the data order, the sampling", min=0)
    resume: str = knob("", "'' fresh start; 'auto' the latest checkpoint if any; 'latest'; or a checkpoint directory")
    checkpoint_every: int = knob(100, "checkpoint every N steps (the last step always)", min=1)
    keep_last: int = knob(2, "checkpoints kept besides the best", min=1)
    max_nonfinite_steps: int = knob(5, "stop after this many consecutive steps with a NaN/inf loss or gradient", min=1)
    poison_steps: list[int] = knob(default_factory=list, help="testing only: make the loss NaN at these steps")
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        if not self.out_dir:
            raise ValueError("out_dir='': give an output directory")

    @property
    def ledger_dir(self) -> str:
        """The project directory whose ledger.jsonl records this run."""
        return self.project_dir or str(Path(self.out_dir).resolve().parent)


# Environment variables that override a config field for every command (set by config_from_args,
# recorded in the resolved config like any other value). The only other variables read are paths:
# SPUTNIK_KERNEL_CACHE (kernels/cpu.py) and SPUTNIK_PRICES (accounting/hardware.py).
ENVIRONMENT = {
    "SPUTNIK_COMPILE": ("compile", "1 = compile=true, 0 = compile=false"),
    "SPUTNIK_CUDA_GRAPHS": ("cuda_graphs", "0 = cuda_graphs=false"),
    "SPUTNIK_CPU_KERNELS": ("cpu_kernels", "0 = cpu_kernels=false"),
}


def environment_overrides(cls) -> dict:
    """{field: value} from the ENVIRONMENT variables that are set, for the fields `cls` has."""
    import os

    names = {f.name for f in dataclasses.fields(cls)}
    return {key: os.environ[var] for var, (key, _) in ENVIRONMENT.items() if var in os.environ and key in names}
