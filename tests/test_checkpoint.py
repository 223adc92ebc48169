"""Checkpoints: round trip, atomic writes, pruning, validation of corrupt/incompatible ones
(sputnik/train/checkpoint.py). Stage-level resume (SIGKILL, bit-identical) is in test_stages.py."""
import json
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

from sputnik.train import checkpoint as ck
from sputnik.config import knob


@dataclass
class Inner:
    width: int = knob(4, "width")


@dataclass
class Cfg:
    lr: float = knob(0.1, "lr")
    log_every: int = knob(10, "may change on resume")
    inner: Inner = field(default_factory=Inner)


class Net(nn.Module):
    def __init__(self, width=4, tie=True):
        super().__init__()
        self.embed = nn.Embedding(6, width)
        self.head = nn.Linear(width, 6, bias=False)
        if tie:
            self.head.weight = self.embed.weight
        self.register_buffer("e_score_correction_bias", torch.arange(3.0))


def _save(root, step, model, cfg=None, eval_loss=None, keep_last=2):
    opt = torch.optim.AdamW(model.parameters())
    return ck.save(root, step, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                   rng_states=[ck.capture_rng()], loop_state={"loader": {"cursor": step}}, config=cfg or Cfg(),
                   eval_loss=eval_loss, keep_last=keep_last)


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_roundtrip_tied_weights_buffers_and_loop_state(tmp_path):
    torch.manual_seed(1)
    net = Net()
    path = _save(tmp_path, 7, net)
    assert path.name == "ckpt-000007" and (tmp_path / "latest").read_text().strip() == "ckpt-000007"
    c = ck.validate(path, expected_shapes=_shapes(net), config=Cfg())
    model_state, optim_state, rng = ck.load(c)
    assert c.step == 7 and c.loop_state == {"loader": {"cursor": 7}}
    assert set(model_state) == set(net.state_dict())
    for k, v in net.state_dict().items():
        assert torch.equal(model_state[k], v)
    assert "state" in optim_state and "torch" in rng


def test_rng_capture_restore_is_exact():
    state = ck.capture_rng()
    a = (torch.rand(3), random.random(), np.random.rand())
    ck.restore_rng(json.loads(json.dumps({k: v for k, v in state.items() if k in ("python", "numpy")})) | {
        "torch": state["torch"], "cuda": []})
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_killed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    net = Net()
    _save(tmp_path, 1, net)

    def die(*args, **kwargs):  # the writer dies after model.safetensors, inside optimizer.pt
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ck.torch, "save", die)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, net)
    monkeypatch.undo()
    assert (tmp_path / "ckpt-000002.tmp" / "model.safetensors").exists()  # debris of the dead writer
    assert ck.latest_checkpoint(tmp_path).name == "ckpt-000001"
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["ckpt-000001"]
    c = ck.validate(ck.latest_checkpoint(tmp_path), expected_shapes=_shapes(net), config=Cfg())
    assert ck.load(c)[0].keys() == net.state_dict().keys()
    _save(tmp_path, 2, net)  # the next save cleans the debris
    assert not (tmp_path / "ckpt-000002.tmp").exists() and ck.latest_checkpoint(tmp_path).name == "ckpt-000002"


def test_missing_pointer_falls_back_to_newest_complete(tmp_path):
    net = Net()
    _save(tmp_path, 1, net)
    _save(tmp_path, 2, net)
    (tmp_path / "latest").unlink()  # writer died between the rename and the pointer update
    assert ck.latest_checkpoint(tmp_path).name == "ckpt-000002"


def test_prune_keeps_last_n_and_best(tmp_path):
    net = Net()
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, None)]:
        _save(tmp_path, step, net, eval_loss=loss, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["ckpt-000002", "ckpt-000004", "ckpt-000005"]
    assert ck.best_checkpoint(tmp_path).name == "ckpt-000002"
    assert ck.latest_checkpoint(tmp_path).name == "ckpt-000005"


def test_resolve_values(tmp_path):
    assert ck.resolve("", tmp_path) is None
    assert ck.resolve("auto", tmp_path) is None
    with pytest.raises(ValueError, match="no complete checkpoint"):
        ck.resolve("latest", tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        ck.resolve(str(tmp_path / "nope"), tmp_path)
    _save(ck.checkpoints_dir(tmp_path), 3, Net())
    assert ck.resolve("auto", tmp_path).name == "ckpt-000003"


# ---------------------------------------------------------------------------------------------
# Corrupt or incompatible checkpoints: ValueError before anything is loaded
def test_truncated_weights_rejected(tmp_path):
    net = Net()
    path = _save(tmp_path, 1, net)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        ck.validate(path, expected_shapes=_shapes(net), config=Cfg())


def test_garbage_header_rejected_even_without_recorded_sizes(tmp_path):
    net = Net()
    path = _save(tmp_path, 1, net)
    state = json.loads((path / "state.json").read_text())
    state.pop("sizes")
    (path / "state.json").write_text(json.dumps(state))
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        ck.validate(path, expected_shapes=_shapes(net), config=Cfg())


def test_wrong_shapes_rejected(tmp_path):
    path = _save(tmp_path, 1, Net(width=4))
    with pytest.raises(ValueError, match="wrong shape"):
        ck.validate(path, expected_shapes=_shapes(Net(width=8)), config=Cfg())


def test_wrong_tensor_names_rejected(tmp_path):
    path = _save(tmp_path, 1, Net())
    shapes = _shapes(Net()) | {"extra.weight": (2, 2)}
    with pytest.raises(ValueError, match="does not fit the model"):
        ck.validate(path, expected_shapes=shapes, config=Cfg())


def test_different_config_rejected_but_logging_knobs_may_change(tmp_path):
    net = Net()
    path = _save(tmp_path, 1, net, cfg=Cfg())
    with pytest.raises(ValueError, match=r"inner.width: checkpoint 4 != now 5"):
        ck.validate(path, expected_shapes=_shapes(net), config=Cfg(inner=Inner(width=5)))
    ck.validate(path, expected_shapes=_shapes(net), config=Cfg(log_every=1))  # allowed


def test_missing_files_and_world_size_rejected(tmp_path):
    net = Net()
    path = _save(tmp_path, 1, net)
    with pytest.raises(ValueError, match="written by 1 ranks"):
        ck.validate(path, expected_shapes=_shapes(net), config=Cfg(), world_size=2)
    (path / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match="incomplete: missing optimizer.pt"):
        ck.validate(path, expected_shapes=_shapes(net), config=Cfg())
    with pytest.raises(ValueError, match="does not exist"):
        ck.validate(tmp_path / "ckpt-000009", expected_shapes=_shapes(net), config=Cfg())
