"""`sputnik chat`: piped lines in, streamed replies out (the tiny model of test_serve has memorised
two reasoning traces, so the replies are known exactly); /exit stops; a terminal gets the think
part dimmed."""
import io
import subprocess
import sys

import pytest

from sputnik.inference.chat import ChatConfig, run
from sputnik.cli import main
from test_serve import completion_of, make_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("chat") / "model")


class RecordingOut(io.StringIO):
    """Keeps every write separately, to see that a reply arrives token by token."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def test_two_piped_lines_stream_two_replies(model_dir, monkeypatch):
    out = RecordingOut()
    monkeypatch.setattr(sys, "stdin", io.StringIO("what is 2+2?\n\nhi\n"))
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["chat", "--model", str(model_dir), "--temperature", "0", "--num_threads", "1"]) == 0
    assert out.getvalue() == completion_of("what is 2+2?") + "\n" + completion_of("hi") + "\n"
    first = out.writes[:out.writes.index("\n")]
    assert len([w for w in first if w]) >= 8  # streamed: one write per token, not one per reply


def test_exit_command_and_max_tokens(model_dir, capsys):
    out = io.StringIO()
    cfg = ChatConfig(model=str(model_dir), temperature=0, max_tokens=3, num_threads=1)
    assert run(cfg, stdin=io.StringIO("hi\n/exit\nwhat is 2+2?\n"), stdout=out, pretty=False) == 0
    reply = out.getvalue()
    assert reply.count("\n") == 1 and completion_of("hi").startswith(reply.strip())  # only the turn before /exit
    assert "[max_tokens reached after 3 tokens]" in capsys.readouterr().err


def test_terminal_output_dims_the_reasoning(model_dir):
    out = io.StringIO()
    cfg = ChatConfig(model=str(model_dir), temperature=0, num_threads=1)
    run(cfg, stdin=io.StringIO("what is 2+2?\n"), stdout=out, pretty=True)
    text = out.getvalue()
    dim = "\x1b[2;3m"  # rich's dim italic
    assert text.replace(dim, "").replace("\x1b[0m", "") == completion_of("what is 2+2?") + "\n"
    assert all(f"{dim}{piece}\x1b[0m" in text for piece in ("<think>", "two", " four", "</think>"))
    assert "\x1b[0m<answer>4</answer>\n" in text  # the answer is not dimmed


@pytest.mark.slow
def test_command_in_a_subprocess(model_dir):
    out = subprocess.run([sys.executable, "-m", "sputnik", "chat", "--model", str(model_dir), "--temperature", "0"],
                         input="hi\n", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == completion_of("hi") + "\n"


def test_speculative_chat_with_a_draft_gives_the_same_replies(model_dir, tmp_path, monkeypatch):
    """--draft: replies through draft-model speculative decoding, streamed; greedy, exactly the plain
    replies (here the draft is a perturbed copy of the model: it agrees often, not always)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    draft_dir = tmp_path / "draft"
    shutil.copytree(model_dir, draft_dir)
    state = load_file(str(draft_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(draft_dir / "model.safetensors"), metadata={"format": "pt"})
    from sputnik.inference import speculative

    stats, real = [], speculative.draft_speculative_generate

    def spy(*a, **kw):
        completion, st = real(*a, **kw)
        stats.append(st)
        return completion, st

    monkeypatch.setattr(speculative, "draft_speculative_generate", spy)
    outs = []
    for extra in ([], ["--draft", str(draft_dir), "--num_draft", "3"]):
        out = RecordingOut()
        monkeypatch.setattr(sys, "stdin", io.StringIO("what is 2+2?\nhi\n"))
        monkeypatch.setattr(sys, "stdout", out)
        assert main(["chat", "--model", str(model_dir), "--temperature", "0", "--num_threads", "1", *extra]) == 0
        outs.append(out)
    assert outs[1].getvalue() == outs[0].getvalue() == completion_of("what is 2+2?") + "\n" + completion_of("hi") + "\n"
    assert len([w for w in outs[1].writes if w]) >= 4  # streamed in pieces, not one write per reply
    assert len(stats) == 2 and 0 < sum(s.accepted for s in stats) < sum(s.drafted for s in stats)
