"""The cost ledger: one append-only JSONL file per project recording every run, failures included.

DeepSeek-V3's $5.576M covers the final training run only and excludes "prior research and ablation
experiments" (V3 §1). This ledger keeps both numbers: `totals()` reports the runs in the final
model's lineage next to everything spent, failed, aborted and killed runs included.

Protocol (`<project>/ledger.jsonl`):
- A run appends a "started" record when it begins and a "finished" record (status ok | failed |
  aborted | stopped) when it ends; `load()` merges the two into one row per run_id.
- A SIGKILLed process cannot write. Its run keeps a heartbeat file (`<project>/.ledger/<run_id>.json`,
  rewritten every `heartbeat_s` with time, FLOPs, tokens, energy) and the next run that starts in the
  project finds the started-without-finished run whose process is gone (same host, pid dead or reused)
  and appends its "finished" record with status "killed", wall time = last heartbeat - start.
- Each record is ONE os.write of one line on an O_APPEND fd, under flock, then fsync. A write cut
  short (SIGKILL inside a multi-page write, disk full) leaves a torn last line: readers skip a final
  line without '\\n', and the next writer first appends '\\n' so the torn fragment becomes a line of
  its own that readers skip and count ("corrupt lines skipped").
Only rank 0 records; the other ranks get a Run that records nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import platform
import signal
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from sputnik.accounting import hardware

LEDGER_FILE = "ledger.jsonl"
STATE_DIR = ".ledger"  # heartbeat files and the reaping lock
SCHEMA = 1
STATUSES = ("ok", "failed", "aborted", "stopped", "killed", "running")


class RunStopped(Exception):
    """A run that ended early on purpose, by a check of its own (an RL health check): status "stopped",
    neither a failure nor a user's Ctrl-C ("aborted")."""


def ledger_path(project_dir: str | os.PathLike) -> Path:
    return Path(project_dir) / LEDGER_FILE


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Low level: append one record, read records
def _finite_json(obj):
    """NaN and inf as strings ("nan", "inf"), as metrics.jsonl writes them: bare NaN is not JSON, and
    a run that trained zero steps (a finished stage rerun) reports a NaN train loss."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append `record` as one JSON line: flock, repair a torn tail, one os.write, fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(_finite_json(record), sort_keys=True, default=str, allow_nan=False)
            + "\n").encode("utf-8")  # no raw newlines inside
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if we die holding it
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # isolate a torn line left by a killed writer
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {path}: {written} of {len(line)} bytes (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:  # make the new directory entry durable too
        dfd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)


def read_records(path: str | os.PathLike) -> tuple[list[dict], int]:
    """(records, corrupt lines skipped). A final line without '\\n' is partial: skipped, counted."""
    path = Path(path)
    if not path.exists():
        return [], 0
    *lines, tail = path.read_bytes().split(b"\n")
    records, corrupt = [], int(bool(tail.strip()))
    for raw in filter(bytes.strip, lines):
        try:
            rec = json.loads(raw)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            rec = None
        if isinstance(rec, dict) and rec.get("event") in ("started", "finished") and rec.get("run_id"):
            records.append(rec)
        else:
            corrupt += 1
    return records, corrupt


def _write_json_atomic(path: Path, obj) -> None:
    """Temp file + rename: a killed writer leaves the previous heartbeat. Not fsynced (a heartbeat
    lost to a power cut only loosens the bound); common.atomic_write_json would import torch (2 s)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_finite_json(obj), default=str, allow_nan=False))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Building records: config, cost, the record of a killed run
def _config_fields(config) -> tuple[dict, str | None]:
    """(resolved config as a dict, config_hash). Dicts hash the way sputnik.config.config_hash does."""
    if config is None:
        return {}, None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        from sputnik.config import config_hash, to_dict

        return {"config_class": type(config).__name__, **to_dict(config)}, config_hash(config)
    if isinstance(config, dict):
        blob = json.dumps(config, sort_keys=True, default=str).encode()
        return dict(config), hashlib.sha256(blob).hexdigest()[:16]
    raise ValueError(f"config={config!r}: expected a config dataclass or a dict")


def _cost(started: dict, wall_s: float) -> dict:
    device_hours = wall_s * float(started.get("device_count", 1)) / 3600.0
    return dict(wall_s=wall_s, device_hours=device_hours,
                money_usd=device_hours * float(started.get("price_usd_per_hour", 0.0)))


def _killed_record(project: Path, started: dict) -> dict:
    """The finished record of a run whose process died without writing one."""
    hb = {}
    with contextlib.suppress(OSError, ValueError):
        hb = json.loads((project / STATE_DIR / f"{started['run_id']}.json").read_text())
    last = float(hb.get("time", started["start_ts"]))
    return dict(event="finished", run_id=started["run_id"], status="killed", end=_iso(last), end_ts=last,
                error=f"process {started.get('pid')} on {started.get('host')} ended without a finished record "
                      "(SIGKILL, OOM killer, power loss); wall time counted to its last heartbeat",
                flops=hb.get("flops", 0.0), tokens=hb.get("tokens", 0), energy_j=hb.get("energy_j", 0.0),
                energy_method=hb.get("energy_method", "table"), metrics=hb.get("metrics", {}),
                artifacts=[], parents=hb.get("parents", started.get("parents", [])),
                final_model=False, **_cost(started, last - float(started["start_ts"])))


def reap(project_dir: str | os.PathLike) -> list[str]:
    """Append a "killed" record for every open run of this host whose process is gone; returns their ids.
    Runs on other hosts are left open (we cannot see their processes)."""
    project = Path(project_dir)
    (project / STATE_DIR).mkdir(parents=True, exist_ok=True)
    with open(project / STATE_DIR / "reap.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs starting together must not both reap
        reaped = []
        records = read_records(ledger_path(project))[0]
        finished = {r["run_id"] for r in records if r["event"] == "finished"}
        for rec in records:
            if rec["event"] == "started" and rec["run_id"] not in finished and _dead(rec):
                append_record(ledger_path(project), _killed_record(project, rec))
                with contextlib.suppress(OSError):
                    (project / STATE_DIR / f"{rec['run_id']}.json").unlink()
                reaped.append(rec["run_id"])
        return reaped


def _dead(started: dict) -> bool:
    """The process of this started record is gone (same host only; other hosts are unknown)."""
    return hardware.process_alive(started.get("host"), int(started.get("pid", -1)), started.get("proc_start")) is False


def _started_record(run_id: str, project: Path, command: str, config, info: dict, tables: dict, start: float,
                    final_model: bool, parents) -> dict:
    """The "started" record: what ran (command, config, git), where (host, pid, devices), its prices."""
    cfg_dict, cfg_hash = _config_fields(config)
    key = info["device_key"]
    return dict(
        event="started", schema=SCHEMA, run_id=run_id, project=str(project.resolve()), command=command,
        config_hash=cfg_hash, config=cfg_dict, git=hardware.git_info(), host=socket.gethostname(), pid=os.getpid(),
        proc_start=hardware.proc_start(os.getpid()), start=_iso(start), start_ts=start,
        device_type=info["device_type"], device_name=info.get("device_name"), device_key=key,
        device_count=info["count"], cpu_model=info.get("cpu_model") or hardware.cpu_model(),
        price_usd_per_hour=tables["price_usd_per_hour"].get(key, tables["price_usd_per_hour"]["gpu"]),
        power_w=tables["power_w"].get(key, tables["power_w"]["gpu"]), final_model=final_model,
        parents=list(parents), versions={"python": platform.python_version(),  # torch only if already imported
                                         "torch": getattr(sys.modules.get("torch"), "__version__", None)},
    )


# ---------------------------------------------------------------------------------------------
# The one call a stage makes
@dataclasses.dataclass
class Run:
    """What the stage reports: flops executed (accounting.flops_per_token x tokens), tokens seen."""

    run_id: str
    project: Path
    flops: float = 0.0
    tokens: int = 0
    metrics: dict = dataclasses.field(default_factory=dict)
    artifacts: list = dataclasses.field(default_factory=list)
    parents: list = dataclasses.field(default_factory=list)  # run_ids whose outputs this run consumed
    final_model: bool = False
    recording: bool = True

    def add(self, flops: float = 0.0, tokens: int = 0) -> None:
        self.flops += float(flops)
        self.tokens += int(tokens)


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM while a record is appended: its handler would otherwise raise between the
    write and the bookkeeping after it. The pending signal is delivered when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def record_run(project_dir: str | os.PathLike, command: str, config=None, *, devices=None,
               final_model: bool = False, parents=(), prices: str | os.PathLike | None = None,
               heartbeat_s: float = 30.0, energy_method: str | None = None):
    """Ledger one run: `with record_run(dir, "pretrain", cfg) as run: ...; run.add(flops=, tokens=)`.

    Status: "ok" on normal exit (or SystemExit(0)); "stopped" on RunStopped; "failed" on another
    exception (message kept, exception re-raised); "aborted" on KeyboardInterrupt or SIGTERM (turned into KeyboardInterrupt
    while the run is open, if nobody else handles SIGTERM); "killed" is written later by reap().
    final_model: this run produced the final model; with `parents` it defines the final lineage.
    prices: a TOML/JSON file overriding hardware.DEFAULTS (default: $SPUTNIK_PRICES).
    energy_method: force "table" (tests) instead of the best available meter."""
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    project = Path(project_dir)
    if int(os.environ.get("RANK", 0)) != 0:
        yield Run(run_id, project, recording=False, parents=list(parents), final_model=final_model)
        return
    tables = hardware.load_tables(prices)
    info = hardware.resolve_devices(devices)
    project.mkdir(parents=True, exist_ok=True)
    reap(project)
    meter = hardware.EnergyMeter(info, tables=tables, prefer=energy_method).__enter__()
    start = time.time()  # wall time and the energy meter both start here
    started = _started_record(run_id, project, command, config, info, tables, start, final_model, parents)
    path = ledger_path(project)
    run = Run(run_id, project, parents=list(parents), final_model=final_model)
    hb_path = project / STATE_DIR / f"{run_id}.json"

    def beat():
        _write_json_atomic(hb_path, dict(time=time.time(), flops=run.flops, tokens=run.tokens,
                                         energy_j=meter.poll(), energy_method=meter.method,
                                         metrics=dict(run.metrics), parents=list(run.parents)))

    def heartbeats():
        while not halt.wait(heartbeat_s):
            with contextlib.suppress(Exception):  # a missed heartbeat only widens the killed-run bound
                beat()

    halt = threading.Event()
    heart = threading.Thread(target=heartbeats, daemon=True, name="ledger-heartbeat")
    prev_term, status, error, written = None, "ok", None, False
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        prev_term = signal.signal(signal.SIGTERM, _raise_on_sigterm)  # before "started": no unrecorded window
    try:
        with _signals_deferred():
            append_record(path, started)
            written = True
        beat()
        heart.start()
        yield run
    except RunStopped as e:
        status, error = "stopped", str(e)
        raise
    except KeyboardInterrupt as e:
        status, error = "aborted", str(e) or "KeyboardInterrupt"
        raise
    except SystemExit as e:
        status, error = ("ok", None) if e.code in (0, None) else ("failed", f"SystemExit({e.code!r})")
        raise
    except BaseException as e:
        status, error = "failed", f"{type(e).__name__}: {e}"
        raise
    finally:
        if prev_term is not None:
            signal.signal(signal.SIGTERM, prev_term)
        halt.set()
        if heart.is_alive():
            heart.join(timeout=5)
        end = time.time()
        energy = meter.poll()
        if written:
            with _signals_deferred():
                append_record(path, dict(
                    event="finished", run_id=run_id, status=status, error=error, end=_iso(end), end_ts=end,
                    flops=run.flops, tokens=run.tokens, energy_j=energy, energy_method=meter.method,
                    metrics=run.metrics, artifacts=[str(a) for a in run.artifacts], parents=list(run.parents),
                    final_model=run.final_model, **_cost(started, end - start)))
        with contextlib.suppress(OSError):
            hb_path.unlink()


# ---------------------------------------------------------------------------------------------
# Reading: one row per run, and the two totals
def load(project_dir: str | os.PathLike) -> list[dict]:
    """One merged row per run (started + finished), oldest first. An open run whose process is
    gone reads as "killed" (recorded=False until the next run's reap() writes it); an open run
    that is alive, or on another host, reads as "running"."""
    return merge_runs(read_records(ledger_path(project_dir))[0], Path(project_dir))


def merge_runs(records: list[dict], project: Path | None = None) -> list[dict]:
    """Fold started/finished records into rows; with `project`, dead open runs read as killed."""
    rows: dict[str, dict] = {}
    for rec in records:
        body = {k: v for k, v in rec.items() if k != "event"}
        rid = rec["run_id"]
        if rec["event"] == "started":
            rows[rid] = {**body, "status": "running", **rows.get(rid, {})}
        elif "end" not in rows.get(rid, {}):  # the first finished record wins (a duplicate reap is ignored)
            rows.setdefault(rid, {}).update(body)
    for row in rows.values():
        if "end" not in row and project is not None and "start_ts" in row and _dead(row):
            row.update(_killed_record(project, row), recorded=False)
            row.pop("event", None)
    return list(rows.values())


def _sum(rows: list[dict]) -> dict:
    keys = ("wall_s", "device_hours", "flops", "tokens", "energy_j", "money_usd")
    out = {"runs": len(rows), **{k: sum(r.get(k) or 0 for r in rows) for k in keys}, "device_hours_by_device": {}}
    for r in rows:  # device-hours of different devices (GPU-h, core-h) are not comparable: also split
        by = out["device_hours_by_device"]
        by[r.get("device_key", "?")] = by.get(r.get("device_key", "?"), 0.0) + (r.get("device_hours") or 0)
    return out


def final_lineage(rows: list[dict]) -> set[str]:
    """run_ids of the runs that produced the final model: the latest ok run flagged final_model
    and, transitively, the runs named in its `parents`."""
    by_id = {r["run_id"]: r for r in rows}
    # Only the latest final model counts: earlier "final" attempts it superseded are overhead,
    # exactly the kind of spending a final-run-only figure hides.
    finals = [r for r in rows if r.get("final_model") and r.get("status") == "ok"]
    todo = [max(finals, key=lambda r: r.get("start_ts") or 0)["run_id"]] if finals else []
    seen: set[str] = set()
    while todo:
        rid = todo.pop()
        if rid in seen or rid not in by_id:
            continue
        seen.add(rid)
        todo.extend(by_id[rid].get("parents") or [])
    return seen


def totals(rows: list[dict]) -> dict:
    """{'final': sums over the final lineage (DeepSeek's kind of number), 'all': sums over every
    run, 'by_status': {status: sums}, 'overhead': all money / final money (None without a final)}."""
    lineage = final_lineage(rows)
    final, every = _sum([r for r in rows if r["run_id"] in lineage]), _sum(rows)
    by_status = {s: _sum([r for r in rows if r.get("status") == s]) for s in STATUSES}
    return dict(final=final, all=every, by_status={s: v for s, v in by_status.items() if v["runs"]},
                final_run_ids=sorted(lineage),
                overhead=every["money_usd"] / final["money_usd"] if final["money_usd"] else None)


# ---------------------------------------------------------------------------------------------
# CLI: sputnik ledger
def register(sub) -> None:
    p = sub.add_parser("ledger", help="show every run of a project and what it cost (final lineage vs all)")
    p.add_argument("--project", default=".", metavar="DIR", help="project directory holding ledger.jsonl")
    p.add_argument("--json", action="store_true", help="print rows and totals as JSON")
    p.set_defaults(func=main)


def main(args) -> int:
    path = ledger_path(args.project)
    if not path.exists():
        raise ValueError(f"no ledger at {path}")
    records, corrupt = read_records(path)
    rows = merge_runs(records, Path(args.project))
    if args.json:
        print(json.dumps({"rows": rows, "totals": totals(rows), "corrupt_lines_skipped": corrupt}, indent=2, default=str))
    else:
        _render(rows, totals(rows), corrupt, path)
    return 0


def _render(rows: list[dict], tot: dict, corrupt: int, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    def cells(r: dict) -> list[str]:  # device-h, FLOPs, tokens, kWh, USD
        return [f"{r.get('device_hours') or 0:.4g}", f"{r.get('flops') or 0:.3g}", f"{r.get('tokens') or 0:,}",
                f"{(r.get('energy_j') or 0) / 3.6e6:.4g}", f"{r.get('money_usd') or 0:,.4f}"]

    numeric = ["device-h", "FLOPs", "tokens", "energy kWh", "USD"]
    console = Console(width=None if sys.stdout.isatty() else 160)  # pipes get 160 columns, not 80
    runs = Table(title=f"runs in {path}", title_justify="left")
    for col in ["run", "command", "status", "start (UTC)", "wall s", "devices"] + numeric + ["final"]:
        runs.add_column(col, justify="right" if col in numeric or col == "wall s" else "left")
    colour = {"ok": "green", "failed": "red", "aborted": "yellow", "stopped": "yellow", "killed": "magenta",
              "running": "cyan"}
    for r in rows:
        st = r.get("status", "?")
        runs.add_row(r["run_id"], str(r.get("command", "?")), f"[{colour.get(st, 'white')}]{st}[/]",
                     str(r.get("start", "?"))[:16].replace("T", " "), f"{r.get('wall_s') or 0:,.0f}",
                     f"{r.get('device_count', '?')}x {r.get('device_key', '?')}", *cells(r),
                     "yes" if r["run_id"] in tot["final_run_ids"] else "")
    sums = Table(title="totals: the final model's lineage vs everything spent", title_justify="left")
    for col in ["", "runs"] + numeric:
        sums.add_column(col, justify="right" if col else "left")
    named = [("final lineage", tot["final"]), ("all runs", tot["all"])]
    for name, t in named + [(f"  of which {s}", v) for s, v in tot["by_status"].items()]:
        sums.add_row(name, str(t["runs"]), *cells(t))
    console.print(runs, sums)
    if tot["overhead"] is not None:
        console.print(f"everything spent = {tot['overhead']:.2f}x the final lineage's cost")
    if corrupt:
        console.print(f"[yellow]corrupt lines skipped: {corrupt}[/]")
