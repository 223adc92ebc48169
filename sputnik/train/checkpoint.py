"""Training checkpoints: atomic, validated before use, resumable bit for bit.

Layout under `<out>/checkpoints/`:
    ckpt-000123/
        model.safetensors    weights and persistent buffers (the MoE router bias included)
        optimizer.pt         optimizer state dict (torch.save; loaded with weights_only=True)
        rng.pt               torch / CUDA RNG states of every rank
        state.json           step, loop state (loader position, counters), eval loss, Python and
                             NumPy RNG, file sizes; written last
        stage_config.json    the resolved stage config
    latest                   text file naming the newest complete checkpoint
    best                     text file naming the checkpoint with the lowest eval loss

Crash safety (STYLE.md §10): everything is written into `ckpt-000123.tmp/`, fsynced, then the
directory is renamed (os.replace is atomic on POSIX) and only then is `latest` rewritten (atomic
file replace). A writer killed at any point leaves the previous checkpoint and pointer intact; the
stale `.tmp` directory is ignored and removed by the next save.

Validation (`validate`) happens before a stage does any work: missing files, sizes that differ
from the ones recorded, a safetensors header that does not parse, tensor names or shapes that do
not match the model, a config that differs in a field that changes the run -> ValueError.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sputnik.common import atomic_write_json, atomic_write_text
from sputnik.config import to_dict

CKPT_RE = re.compile(r"^ckpt-(\d{6,})$")
FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "stage_config.json")
# Config fields that may change between a run and its resume without changing the trajectory.
RESUME_MAY_CHANGE = {"resume", "log_every", "progress", "checkpoint_every", "keep_last", "max_nonfinite_steps",
                     "num_threads", "poison_steps", "eval_every", "out_dir", "project_dir", "device"}


def checkpoints_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


# ---------------------------------------------------------------------------------------------
# RNG
def capture_rng() -> dict:
    """This process's RNG states: torch (+ CUDA) as tensors, Python and NumPy as JSON-able lists."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------
# Tensors <-> safetensors (tied weights are stored once, with their aliases in the metadata)
def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory; keep the first name of each storage view."""
    kept, aliases, seen = {}, {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
        else:
            if key is not None:
                seen[key] = name
            kept[name] = t.contiguous()
    return kept, aliases


def save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    kept, aliases = _dedupe(state)
    save_file(kept, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = load_file(str(path), device="cpu")
        with safe_open(str(path), "pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint weights {path} cannot be read: {e}") from None
    for name, target in aliases.items():
        state[name] = state[target]
    return state


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes from the safetensors header only (no tensor data is read)."""
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint weights {path} are corrupt or truncated: {e}") from None
    for name, target in aliases.items():
        shapes[name] = shapes[target]
    return shapes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# Save
def save(root: str | os.PathLike, step: int, *, model_state: dict[str, torch.Tensor], optimizer_state: dict,
         rng_states: list[dict], loop_state: dict, config, eval_loss: float | None = None,
         keep_last: int = 2) -> Path:
    """Write checkpoint `step` atomically, move the `latest` (and maybe `best`) pointer, prune.
    Call on rank 0 only, with full (gathered) states."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:06d}"
    final, tmp = root / name, root / f"{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # debris of a writer killed mid-save
    tmp.mkdir()
    save_tensors(model_state, tmp / "model.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save([{k: v for k, v in r.items() if k in ("torch", "cuda")} for r in rng_states], tmp / "rng.pt")
    atomic_write_json(tmp / "stage_config.json", {"config_class": type(config).__name__, **to_dict(config)})
    for f in FILES:
        _fsync_file(tmp / f)
    state = dict(step=step, eval_loss=eval_loss, loop_state=loop_state, world_size=len(rng_states),
                 host_rng=[{k: r[k] for k in ("python", "numpy")} for r in rng_states],
                 sizes={f: (tmp / f).stat().st_size for f in FILES}, torch_version=torch.__version__)
    atomic_write_json(tmp / "state.json", state)  # last: its presence marks the files complete
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
        old = root / f"{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest", name + "\n")
    best = best_checkpoint(root)
    best_loss = _read_state(best).get("eval_loss") if best else None
    if eval_loss is not None and (best_loss is None or eval_loss < best_loss or best == final):
        atomic_write_text(root / "best", name + "\n")
    prune(root, keep_last)
    return final


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints, never the one `best` or `latest` names."""
    keep = {p.name for p in (latest_checkpoint(root), best_checkpoint(root)) if p}
    ckpts = list_checkpoints(root)
    removed = []
    for p in ckpts[:-keep_last] if keep_last > 0 else ckpts:
        if p.name not in keep:
            shutil.rmtree(p)
            removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------
# Find
def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (renamed, with state.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CKPT_RE.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def _pointer(root: Path, name: str) -> Path | None:
    f = root / name
    if not f.is_file():
        return None
    target = root / f.read_text().strip()
    return target if CKPT_RE.match(target.name) and (target / "state.json").is_file() else None


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names, else the newest complete one (the pointer may be missing if
    a writer died between the rename and the pointer update)."""
    root = Path(root)
    ckpts = list_checkpoints(root)
    pointed = _pointer(root, "latest")
    if pointed and (not ckpts or _step_of(pointed) >= _step_of(ckpts[-1])):
        return pointed
    return ckpts[-1] if ckpts else None


def best_checkpoint(root: str | os.PathLike) -> Path | None:
    return _pointer(Path(root), "best")


def _step_of(path: Path) -> int:
    return int(CKPT_RE.match(path.name).group(1))


def resolve(resume: str, out_dir: str | os.PathLike) -> Path | None:
    """--resume value -> checkpoint dir. "" = fresh start; "auto" = latest if any, else fresh;
    "latest" = latest, which must exist; anything else = a checkpoint directory path."""
    if not resume:
        return None
    root = checkpoints_dir(out_dir)
    if resume in ("auto", "latest"):
        path = latest_checkpoint(root)
        if path is None and resume == "latest":
            raise ValueError(f"--resume latest: no complete checkpoint under {root}")
        return path
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"--resume {resume}: checkpoint directory does not exist")
    return path


# ---------------------------------------------------------------------------------------------
# Validate and load
@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict  # state.json

    @property
    def loop_state(self) -> dict:
        return self.state["loop_state"]


def _read_state(path: Path) -> dict:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {path}: state.json unreadable: {e}") from None


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (fields in RESUME_MAY_CHANGE are allowed to)."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUME_MAY_CHANGE or key == "config_class":
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, list) and isinstance(b, tuple) and a == list(b)):
            diffs.append(f"{prefix}{key}: checkpoint {a!r} != now {b!r}")
    return diffs


def validate(path: str | os.PathLike, *, expected_shapes: dict[str, tuple[int, ...]], config,
             world_size: int = 1) -> Checkpoint:
    """Check a checkpoint against the model (names, shapes) and the config before any work.
    Raises ValueError with what is wrong; reads headers and sizes only, no tensor data."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} does not exist")
    missing = [f for f in (*FILES, "state.json") if not (path / f).is_file()]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    state = _read_state(path)
    for f, size in state.get("sizes", {}).items():
        actual = (path / f).stat().st_size
        if actual != size:
            raise ValueError(f"checkpoint {path}: {f} is {actual} bytes, {size} were written (truncated or altered)")
    shapes = tensor_shapes(path / "model.safetensors")
    if shapes.keys() != expected_shapes.keys():
        extra, lacking = sorted(shapes.keys() - expected_shapes.keys()), sorted(expected_shapes.keys() - shapes.keys())
        raise ValueError(f"checkpoint {path} does not fit the model: unexpected tensors {extra[:3]}, "
                         f"missing tensors {lacking[:3]} ({len(extra)} unexpected, {len(lacking)} missing)")
    bad = [f"{k} {shapes[k]} vs model {expected_shapes[k]}" for k in shapes if tuple(shapes[k]) != tuple(expected_shapes[k])]
    if bad:
        raise ValueError(f"checkpoint {path} has tensors of the wrong shape: {'; '.join(bad[:3])}")
    try:
        saved_cfg = json.loads((path / "stage_config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {path}: stage_config.json unreadable: {e}") from None
    diffs = config_differences(saved_cfg, to_dict(config))
    if diffs:
        raise ValueError(f"checkpoint {path} was written with a different config: {'; '.join(diffs[:5])}")
    if state.get("world_size", 1) != world_size:
        raise ValueError(f"checkpoint {path} was written by {state.get('world_size')} ranks; resume with the "
                         f"same number (now {world_size}) so every rank's data position is restored")
    return Checkpoint(path=path, step=int(state["step"]), state=state)


def load(ckpt: Checkpoint, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(model_state, optimizer_state, rng_state of this rank) of a validated checkpoint."""
    model_state = load_tensors(ckpt.path / "model.safetensors")
    try:
        optim_state = torch.load(ckpt.path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng_tensors = torch.load(ckpt.path / "rng.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise ValueError(f"checkpoint {ckpt.path}: optimizer/RNG state unreadable: {e}") from None
    rng = {**rng_tensors[rank], **ckpt.state["host_rng"][rank]}
    return model_state, optim_state, rng
