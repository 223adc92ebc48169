"""The cost ledger: every outcome is recorded, appends survive SIGKILL, totals separate final vs all."""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sputnik.accounting import ledger
from sputnik.config import config_hash
from sputnik.model.config import tiny

REPO = Path(__file__).resolve().parent.parent
CPU2 = {"device_type": "cpu", "device_name": "test cpu", "count": 2}


@pytest.fixture
def prices(tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text("[price_usd_per_hour]\ncpu = 0.5\n[power_w]\ncpu = 10.0\n")
    return path


def _run(project, prices, **kw):
    return ledger.record_run(project, kw.pop("command", "pretrain"), kw.pop("config", tiny()), devices=CPU2,
                             prices=prices, energy_method="table", **kw)


def _python(code: str, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env)


def cli_main(argv: list[str]) -> int:
    """`sputnik ledger ...` through ledger.register alone (other commands are not this test's business)."""
    parser = argparse.ArgumentParser(prog="sputnik")
    ledger.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
def test_ok_run_records_config_git_devices_cost(tmp_path, prices):
    cfg = tiny()
    with _run(tmp_path, prices, config=cfg) as run:
        run.add(flops=1e9, tokens=100)
        run.add(flops=2e9, tokens=28)
        run.metrics.update({"loss": 2.5})
        run.artifacts.append(tmp_path / "ckpt")
        time.sleep(0.05)
    (row,) = ledger.load(tmp_path)
    assert row["status"] == "ok" and row["error"] is None and row["command"] == "pretrain"
    assert (row["flops"], row["tokens"], row["metrics"], row["artifacts"]) == (3e9, 128, {"loss": 2.5}, [str(tmp_path / "ckpt")])
    assert row["config_hash"] == config_hash(cfg) and row["config"]["hidden_size"] == 256
    assert row["config"]["config_class"] == "ModelConfig"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert row["git"]["revision"] == (head or None)  # None outside a git checkout
    assert isinstance(row["git"]["dirty"], bool) if head else row["git"]["dirty"] is None
    assert (row["device_type"], row["device_count"], row["device_key"], row["pid"]) == ("cpu", 2, "cpu", os.getpid())
    assert row["wall_s"] >= 0.05 and row["end_ts"] - row["start_ts"] == pytest.approx(row["wall_s"], abs=2e-3)
    assert row["device_hours"] == pytest.approx(row["wall_s"] * 2 / 3600, rel=1e-3)
    assert row["money_usd"] == pytest.approx(row["device_hours"] * 0.5)
    assert row["energy_method"] == "table" and row["energy_j"] == pytest.approx(10.0 * 2 * row["wall_s"], rel=0.05)
    assert not list((tmp_path / ".ledger").glob("*.json"))  # heartbeat removed at the end


def test_failed_aborted_and_stopped_are_recorded_and_reraised(tmp_path, prices):
    """A run that stops itself on purpose (RunStopped, e.g. an RL health check, and its subclasses)
    is "stopped": neither a failure nor a user's Ctrl-C ("aborted")."""
    from sputnik.rl.health import HealthStop

    with pytest.raises(RuntimeError, match="boom"), _run(tmp_path, prices, command="sft"):
        raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt), _run(tmp_path, prices, command="grpo"):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit), _run(tmp_path, prices, command="eval"):
        raise SystemExit(3)
    with pytest.raises(ledger.RunStopped, match="enough"), _run(tmp_path, prices, command="mine"):
        raise ledger.RunStopped("enough")
    with pytest.raises(HealthStop), _run(tmp_path, prices, command="rl") as run:
        run.add(flops=4.0, tokens=2)
        raise HealthStop("stopped by a health check at step 3: entropy collapse")
    rows = ledger.load(tmp_path)
    assert [(r["command"], r["status"], r["error"]) for r in rows] == [
        ("sft", "failed", "RuntimeError: boom"), ("grpo", "aborted", "KeyboardInterrupt"),
        ("eval", "failed", "SystemExit(3)"), ("mine", "stopped", "enough"),
        ("rl", "stopped", "stopped by a health check at step 3: entropy collapse")]
    assert (rows[-1]["flops"], rows[-1]["tokens"]) == (4.0, 2)  # what it spent is kept
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # our SIGTERM handler was removed


def test_sigterm_is_recorded_as_aborted(tmp_path, prices):
    code = ("import sys, time; from sputnik.accounting import ledger\n"
            "with ledger.record_run(sys.argv[1], 'pretrain', {'lr': 1}, devices={'device_type': 'cpu', 'count': 1},"
            " prices=sys.argv[2], energy_method='table') as run:\n"
            "    run.add(flops=5, tokens=1); open(sys.argv[1] + '/inside', 'w').close(); time.sleep(30)\n")
    proc = _python(code, tmp_path, prices)
    _wait_for(lambda: (tmp_path / "inside").exists())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) != 0
    (row,) = ledger.load(tmp_path)
    assert (row["status"], row["error"], row["flops"]) == ("aborted", "SIGTERM", 5.0)


def test_sigkilled_run_is_marked_killed_at_next_start(tmp_path, prices):
    code = ("import sys, time; from sputnik.accounting import ledger\n"
            "with ledger.record_run(sys.argv[1], 'pretrain', {'lr': 1}, devices={'device_type': 'cpu', 'count': 4},"
            " prices=sys.argv[2], energy_method='table', heartbeat_s=0.1) as run:\n"
            "    run.add(flops=7e12, tokens=4096); run.metrics['step'] = 3; time.sleep(60)\n")
    proc = _python(code, tmp_path, prices)
    _wait_for(lambda: ledger.ledger_path(tmp_path).exists())
    time.sleep(0.6)  # a few heartbeats
    t_kill = time.time()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (row,) = ledger.load(tmp_path)  # read-only view: dead, not yet written
    assert (row["status"], row["recorded"]) == ("killed", False)
    with _run(tmp_path, prices, command="next"):
        pass
    records, corrupt = ledger.read_records(ledger.ledger_path(tmp_path))
    assert [(r["event"], r.get("status")) for r in records] == [
        ("started", None), ("finished", "killed"), ("started", None), ("finished", "ok")]
    killed = ledger.load(tmp_path)[0]
    assert killed["status"] == "killed" and "recorded" not in killed and corrupt == 0
    assert (killed["flops"], killed["tokens"], killed["metrics"]) == (7e12, 4096, {"step": 3})
    # wall time ends at the last heartbeat: within one heartbeat (+ scheduling slack) of the kill
    assert 0.3 < killed["wall_s"] <= t_kill - killed["start_ts"] + 0.01
    assert killed["end_ts"] > t_kill - 0.5
    assert killed["device_hours"] == pytest.approx(killed["wall_s"] * 4 / 3600, rel=1e-3)
    assert killed["energy_j"] == pytest.approx(10.0 * 4 * killed["wall_s"], rel=0.1)
    with _run(tmp_path, prices, command="again"):  # reaped once only
        pass
    assert [r["status"] for r in ledger.load(tmp_path)] == ["killed", "ok", "ok"]
    assert len(ledger.read_records(ledger.ledger_path(tmp_path))[0]) == 6


WRITER = """
import os, sys, random
from sputnik.accounting.ledger import append_record
path, ack, wid = sys.argv[1], sys.argv[2], sys.argv[3]
rng = random.Random(int(wid))
fd = os.open(ack, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
for seq in range(100000):
    n = rng.choice([10, 3000, 20000, 70000])  # multi-page lines can be torn by SIGKILL
    append_record(path, {"event": "finished", "run_id": f"{wid}-{seq}", "n": n, "pad": "x" * n})
    os.write(fd, f"{wid}-{seq}\\n".encode())  # acknowledged only after the append returned
"""


def test_no_acknowledged_record_is_lost_under_sigkill(tmp_path):
    path, rng = tmp_path / "ledger.jsonl", random.Random(0)
    procs = [_python(WRITER, path, tmp_path / f"ack{i}", i) for i in range(4)]
    _wait_for(lambda: all((tmp_path / f"ack{i}").exists() for i in range(4)))
    for p in procs:  # kill each at a random moment of its loop
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()
    if path.read_bytes().endswith(b"\n"):  # make sure the repair path below has a torn tail to repair
        with open(path, "ab") as f:
            f.write(b'{"event": "finished", "run_id": "torn", "pad": "xx')
    records, corrupt = ledger.read_records(path)
    acked = {line for i in range(4) for line in (tmp_path / f"ack{i}").read_text().split("\n") if line}
    ids = [r["run_id"] for r in records]
    assert len(acked) > 20 and acked <= set(ids) and len(ids) == len(set(ids))
    assert all(r["n"] == len(r["pad"]) for r in records)  # every parsed record is whole
    assert corrupt >= 1
    ledger.append_record(path, {"event": "finished", "run_id": "after", "n": 0, "pad": ""})
    records2, corrupt2 = ledger.read_records(path)
    assert [r["run_id"] for r in records2] == ids + ["after"] and corrupt2 == corrupt


def test_torn_trailing_line_is_skipped_then_isolated(tmp_path, capsys):
    path = ledger.ledger_path(tmp_path)
    ledger.append_record(path, {"event": "started", "run_id": "a", "command": "x"})
    with open(path, "ab") as f:
        f.write(b'{"event": "finished", "run_id": "a", "sta')  # a writer killed mid-line
    assert ledger.read_records(path) == ([{"event": "started", "run_id": "a", "command": "x"}], 1)
    ledger.append_record(path, {"event": "finished", "run_id": "a", "status": "ok", "end": "t"})
    lines = path.read_bytes().split(b"\n")
    assert lines[1] == b'{"event": "finished", "run_id": "a", "sta' and lines[-1] == b""
    records, corrupt = ledger.read_records(path)
    assert [r["event"] for r in records] == ["started", "finished"] and corrupt == 1
    assert cli_main(["ledger", "--project", str(tmp_path)]) == 0
    assert "corrupt lines skipped: 1" in capsys.readouterr().out


def test_non_finite_metrics_are_written_as_strict_json(tmp_path):
    # A rerun of a finished stage trains zero steps and reports a NaN train loss; bare NaN is not JSON.
    path = ledger.ledger_path(tmp_path)
    ledger.append_record(path, {"event": "finished", "run_id": "a", "status": "ok",
                                "metrics": {"final_train_loss": float("nan"), "peak": [float("inf"), 1.5]}})
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")
    rec = json.loads(path.read_text(), parse_constant=refuse)
    assert rec["metrics"] == {"final_train_loss": "nan", "peak": ["inf", 1.5]}


# ---------------------------------------------------------------------------------------------
def _row(rid, status, money, final=False, parents=(), device_hours=None):
    return dict(run_id=rid, status=status, money_usd=money, device_hours=device_hours or money / 2, flops=money * 1e18,
                tokens=int(money * 1000), energy_j=money * 1e6, wall_s=money * 3600, final_model=final,
                parents=list(parents), device_key="h800")


def test_totals_separate_final_lineage_from_everything():
    rows = [_row("ablation", "ok", 3.0), _row("pre", "ok", 10.0), _row("crash", "failed", 2.0),
            _row("ext", "ok", 1.0, parents=["pre"]), _row("oom", "killed", 4.0), _row("ctrl-c", "aborted", 0.5),
            _row("sft", "ok", 0.5, final=True, parents=["ext"]), _row("sft-bad", "failed", 0.25, final=True),
            _row("rl-health", "stopped", 1.5, final=True, parents=["sft"])]  # stopped: never the final model
    t = ledger.totals(rows)
    assert t["final_run_ids"] == ["ext", "pre", "sft"]
    assert (t["final"]["runs"], t["final"]["money_usd"], t["final"]["device_hours"]) == (3, 11.5, 5.75)
    assert (t["all"]["runs"], t["all"]["money_usd"], t["all"]["tokens"]) == (9, 22.75, 22750)
    assert t["final"]["flops"] == pytest.approx(11.5e18) and t["all"]["energy_j"] == pytest.approx(22.75e6)
    assert {s: v["runs"] for s, v in t["by_status"].items()} == {"ok": 4, "failed": 2, "aborted": 1, "stopped": 1,
                                                                  "killed": 1}
    assert t["by_status"]["killed"]["money_usd"] == 4.0 and t["by_status"]["stopped"]["money_usd"] == 1.5
    assert t["overhead"] == pytest.approx(22.75 / 11.5)
    assert t["final"]["device_hours_by_device"] == {"h800": 5.75}
    assert ledger.totals(rows[:3])["overhead"] is None  # no final model yet


def test_lineage_end_to_end_and_cli_json(tmp_path, prices, capsys):
    with _run(tmp_path, prices, command="pretrain") as pre:
        pre.add(flops=10, tokens=1)
    with pytest.raises(ValueError), _run(tmp_path, prices, command="sft"):
        raise ValueError("diverged")
    with _run(tmp_path, prices, command="sft", parents=[pre.run_id]) as sft:
        sft.add(flops=1, tokens=1)
        sft.final_model = True  # decided at the end, e.g. after eval
    assert cli_main(["ledger", "--project", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in out["rows"]] == ["ok", "failed", "ok"] and out["corrupt_lines_skipped"] == 0
    assert out["totals"]["final_run_ids"] == sorted([pre.run_id, sft.run_id])
    assert (out["totals"]["final"]["flops"], out["totals"]["all"]["runs"]) == (11.0, 3)
    assert cli_main(["ledger", "--project", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "final lineage" in text and "of which failed" in text
    with pytest.raises(ValueError, match="no ledger at"):
        cli_main(["ledger", "--project", str(tmp_path / "none")])


def test_other_ranks_record_nothing(tmp_path, prices, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with _run(tmp_path, prices) as run:
        run.add(flops=1)
    assert not run.recording and not ledger.ledger_path(tmp_path).exists()


def test_bad_inputs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="devices=42"), ledger.record_run(tmp_path, "x", devices=42):
        pass
    with pytest.raises(ValueError, match="expected a config dataclass or a dict"), \
            ledger.record_run(tmp_path, "x", config=[1], devices="cpu", energy_method="table"):
        pass


def test_superseded_final_models_count_as_overhead():
    from sputnik.accounting.ledger import final_lineage, totals

    rows = [dict(run_id="pre", status="ok", start_ts=1, money_usd=1.0),
            dict(run_id="old-final", status="ok", start_ts=2, money_usd=2.0, final_model=True, parents=["pre"]),
            dict(run_id="retry", status="ok", start_ts=3, money_usd=4.0),
            dict(run_id="new-final", status="ok", start_ts=4, money_usd=8.0, final_model=True, parents=["pre", "retry"])]
    assert final_lineage(rows) == {"new-final", "pre", "retry"}
    t = totals(rows)
    assert t["final"]["money_usd"] == 13.0 and t["all"]["money_usd"] == 15.0
