"""What we run on, what it draws and what it costs: device detection, power/price/peak tables,
energy metering (NVML, else RAPL, else the power table x wall time), and the facts about the
host the ledger records (code revision, whether a process is still alive).

The tables are plain dicts in `DEFAULTS`; a user file (`--prices FILE`, or the SPUTNIK_PRICES
environment variable for the ledger) overrides any entry:

    [price_usd_per_hour]          # TOML; JSON/YAML with the same nesting also work
    h100 = 2.8
    [power_w]
    cpu = 6.0

A CPU "device" is one core: count = cores, device-hours = core-hours, power and price per core.
"""
from __future__ import annotations

import glob
import os
import platform
import socket
import subprocess
import threading
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Tables. Keys are device kinds (see device_key()).
DEFAULTS: dict[str, dict[str, float]] = {
    # Board power limit (TDP) in watts, from the vendor datasheets; a training job sits near it.
    "power_w": {
        "h100": 700.0,       # H100 SXM5 (PCIe card: 350)
        "h100_pcie": 350.0,
        "h800": 700.0,       # H800 SXM5: the H100 die with cut NVLink, same power
        "h200": 700.0,       # H200 SXM
        "a100": 400.0,       # A100 SXM4
        "rtx4090": 450.0,
        "gpu": 400.0,        # unknown GPU: an A100-class guess
        "mps": 30.0,         # Apple M-series SoC under load (package, rough)
        # Per core: a server socket of ~64 cores draws ~200-280 W at full load, ~3.5-4.5 W/core,
        # plus memory, board and fans. 10 W/core is a deliberate upper bound for a cloud vCPU.
        "cpu": 10.0,
    },
    # USD per device-hour (per core-hour for CPUs), on-demand cloud rental, 2024-2025 list prices.
    "price_usd_per_hour": {
        "h100": 2.25,        # specialised GPU clouds list H100 SXM at ~2.0-2.5 $/h
        "h100_pcie": 2.0,
        "h800": 2.0,         # the rate DeepSeek-V3 assumed (V3 Table 1: $2 per H800 GPU-hour)
        "h200": 3.0,
        "a100": 1.3,         # A100 80GB SXM ~1.1-1.8 $/h
        "rtx4090": 0.4,      # marketplace rentals ~0.3-0.7 $/h
        "gpu": 2.0,
        "mps": 0.0,          # your own laptop: electricity only (not priced here)
        "cpu": 0.02,         # cloud vCPU-hour ~0.02-0.05 on demand, less on spot
        "laptop": 0.0,
    },
    # Dense peak FLOP/s per device in the training precision (bf16 tensor cores; fp32 for CPU).
    "peak_flops": {
        "h100": 989e12,      # H100 SXM dense bf16 (1979 with 2:4 sparsity)
        "h100_pcie": 756e12,
        "h800": 989e12,      # same die as H100 SXM (reference §4.4)
        "h200": 989e12,
        "a100": 312e12,
        "rtx4090": 165e12,   # bf16 with fp32 accumulate, dense
        "mps": 5e12,         # M-series GPU fp32, rough
        # One Zen 3 core: 2 FMA pipes x 8 fp32 lanes x 2 FLOPs x ~3 GHz = 96e9; measured ~87e9
        # per thread on this project's EPYC (peer-figures.md).
        "cpu": 90e9,
    },
}
TABLES = tuple(DEFAULTS)


def load_tables(path: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """DEFAULTS overridden by a TOML/JSON/YAML file (None: SPUTNIK_PRICES if set, else defaults)."""
    tables = {name: dict(t) for name, t in DEFAULTS.items()}
    path = path or os.environ.get("SPUTNIK_PRICES")
    if not path:
        return tables
    from sputnik.config import read_config_file

    for name, entries in read_config_file(path).items():
        if name not in tables:
            raise ValueError(f"prices file {path}: unknown table {name!r} (allowed: {', '.join(TABLES)})")
        if not isinstance(entries, dict):
            raise ValueError(f"prices file {path}: {name} must be a table of device = number")
        for key, value in entries.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"prices file {path}: {name}.{key}={value!r}: expected a number >= 0")
            tables[name][key] = float(value)
    return tables


def device_key(device_type: str, device_name: str = "") -> str:
    """Map a device to its table key: 'NVIDIA H100 80GB HBM3' -> 'h100', a CPU -> 'cpu'."""
    name = device_name.lower().replace(" ", "")
    if device_type == "cpu":
        return "cpu"
    if device_type == "mps":
        return "mps"
    for token, key in (("h100pcie", "h100_pcie"), ("h100", "h100"), ("h800", "h800"), ("h200", "h200"),
                       ("a100", "a100"), ("4090", "rtx4090")):
        if token in name:
            return key
    return "gpu"


# ---------------------------------------------------------------------------------------------
# Detection
def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def detect() -> dict:
    """Describe the hardware of this job. `count` is the number of devices the job pays for: the
    torchrun WORLD_SIZE (one GPU per rank) or 1 for a single-process GPU job; for CPU jobs, the
    cores in the affinity mask. `visible` is how many GPUs this process can see."""
    info = dict(device_type="cpu", device_name=cpu_model(), count=cpu_cores(), visible=0,
                cpu_model=cpu_model(), cpu_cores=cpu_cores(), host=socket.gethostname())
    try:
        import torch
    except ImportError:  # the ledger must still work in a bare interpreter
        torch = None
    if torch is not None and torch.cuda.is_available():
        visible = torch.cuda.device_count()
        info.update(device_type="cuda", device_name=torch.cuda.get_device_name(0), visible=visible,
                    count=int(os.environ.get("WORLD_SIZE", 1)))
    elif torch is not None and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        info.update(device_type="mps", device_name="Apple MPS", count=1, visible=1)
    info["device_key"] = device_key(info["device_type"], info["device_name"])
    return info


def resolve_devices(devices=None) -> dict:
    """None: detect(); a table key like 'h100': one such device ('cpu': all our cores); a dict with
    at least device_type (optionally device_name, count) describes them explicitly."""
    if devices is None:
        return detect()
    if isinstance(devices, str):
        info = {"device_type": "cpu" if devices == "cpu" else "cuda", "device_name": devices,
                "count": cpu_cores() if devices == "cpu" else 1}
    elif isinstance(devices, dict) and "device_type" in devices:
        info = {"device_name": devices["device_type"], "count": 1, **devices}
    else:
        raise ValueError(f"devices={devices!r}: expected None, a device key like 'h100', or a dict with device_type")
    info.setdefault("device_key", device_key(info["device_type"], str(info["device_name"])))
    return info


# ---------------------------------------------------------------------------------------------
# The code and the processes (the ledger records the revision and asks whether the process of
# an unfinished run still exists)
def git_info(repo_dir: str | os.PathLike | None = None) -> dict:
    """{'revision', 'dirty'} of the code that runs, by read-only git calls; None when unknown.
    GIT_OPTIONAL_LOCKS=0 keeps `git status` from refreshing (writing) the index."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo_dir or Path(__file__).resolve().parent.parent), *args],
                              capture_output=True, text=True, timeout=30, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    try:
        rev, st = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):  # no git installed, or it hung
        return {"revision": None, "dirty": None}
    return {"revision": rev.stdout.strip() if rev.returncode == 0 else None,
            "dirty": bool(st.stdout.strip()) if rev.returncode == 0 and st.returncode == 0 else None}


def proc_start(pid: int) -> str | None:
    """Kernel start time of a process (/proc/<pid>/stat field 22): tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(host: str | None, pid: int, start: str | None = None) -> bool | None:
    """Is process `pid` (started at kernel time `start`, if known) of `host` still running?
    None when it ran on another host: we cannot see its processes."""
    if host != socket.gethostname():
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): signal 0 checks existence only
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if fields[0] in ("Z", "X"):  # zombie: dead, waiting for its parent to collect it
        return False
    return start in (None, fields[19])  # another start time: the pid was reused


# ---------------------------------------------------------------------------------------------
# Energy
RAPL_ROOT = "/sys/class/powercap"


def _rapl_zones() -> list[Path]:
    """Top-level RAPL package zones (intel-rapl:N; AMD exposes the same names on Linux >= 5.8).
    Subzones (intel-rapl:N:M, core/dram) are inside their package, so counting them would double."""
    zones = []
    for d in sorted(glob.glob(f"{RAPL_ROOT}/*rapl:*")):
        if Path(d).name.count(":") == 1 and Path(d, "energy_uj").exists():
            zones.append(Path(d))
    return zones


class EnergyMeter:
    """`with EnergyMeter(info) as m: ...` then `m.joules`, `m.method` ('nvml' | 'rapl' | 'table').

    nvml:  nvmlDeviceGetTotalEnergyConsumption (mJ since driver load, Volta+) on the first
           `count` visible GPUs; if the job has more devices than this node sees (multi-node),
           the local reading is scaled by count/local.
    rapl:  /sys/class/powercap/*rapl:N/energy_uj, package energy of the whole machine, scaled
           by our cores / all cores (a share, since other processes draw from the same
           packages), corrected for counter wraparound at max_energy_range_uj. A
           counter can wrap more than once between two reads: call poll() at least every few
           minutes (the ledger's heartbeat thread does). Unreadable files (energy_uj is root-only
           on most distributions since 2020) fall through to the table.
    table: power_w[key] x count x wall seconds x utilisation (default 1.0: an upper bound, the
           device at its rated power the whole time)."""

    def __init__(self, info: dict | None = None, *, tables: dict | None = None, utilisation: float = 1.0,
                 prefer: str | None = None):
        self.info = info or detect()
        self.tables = tables or load_tables()
        self.utilisation = utilisation
        self.prefer = prefer  # force a method ("table" in tests); None = best available
        self.method, self._joules, self._last, self._ranges = "table", 0.0, None, None
        self._start = self._prev_t = None
        self.scale = 1.0  # nvml on one node of a multi-node job: local joules x count/local
        self._lock = threading.Lock()  # poll() runs on the ledger's heartbeat thread too

    # --- readings: dict of counter -> raw value, or None when the method is unavailable
    def _read_nvml(self):
        if self.info.get("device_type") != "cuda":
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")  # NVML numbers GPUs ignoring it
            ids = [int(x) for x in visible.split(",")] if visible.replace(",", "").isdigit() else \
                list(range(pynvml.nvmlDeviceGetCount()))
            ids = ids[:int(self.info.get("count", 1))]
            return {i: pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(i)) / 1e3
                    for i in ids}  # mJ -> J
        except Exception:  # no pynvml, no driver, or a GPU without the energy counter
            return None

    def _read_rapl(self):
        if self.info.get("device_type") != "cpu":
            return None
        try:
            zones = _rapl_zones()
            if not zones:
                return None
            if self._ranges is None:
                self._ranges = {str(z): int((z / "max_energy_range_uj").read_text()) / 1e6 for z in zones}
            return {str(z): int((z / "energy_uj").read_text()) / 1e6 for z in zones}
        except (OSError, ValueError):  # PermissionError included
            return None

    def _read(self, method):
        return {"nvml": self._read_nvml, "rapl": self._read_rapl}[method]()

    def __enter__(self):
        self._start = self._prev_t = time.monotonic()
        for method in ("nvml", "rapl"):
            if self.prefer not in (None, method):
                continue
            reading = self._read(method)
            if reading:
                self.method, self._last = method, reading
                if method == "rapl":  # the package serves every core: charge our share of it
                    self.scale = float(self.info.get("count", 1)) / (os.cpu_count() or 1)
                break
        return self

    def poll(self) -> float:
        """Accumulate energy since the last poll; returns joules so far."""
        with self._lock:
            return self._poll()

    def _poll(self) -> float:
        now = time.monotonic()
        if self.method == "table":
            watts = self.tables["power_w"].get(self.info.get("device_key", "gpu"), self.tables["power_w"]["gpu"])
            self._joules += watts * float(self.info.get("count", 1)) * (now - self._prev_t) * self.utilisation
        else:
            reading = self._read(self.method)
            if reading is None:  # lost access mid-run: continue from the table
                self.method = "table"
                return self._poll()
            for k, v in reading.items():
                delta = v - self._last.get(k, v)
                if delta < 0 and self._ranges and k in self._ranges:
                    delta += self._ranges[k]  # RAPL counter wrapped once
                elif delta < 0:
                    delta = v  # NVML counter restarted (driver reload): count from zero
                self._joules += delta
            if self.method == "nvml" and len(reading) < int(self.info.get("count", 1)):
                self.scale = int(self.info["count"]) / len(reading)
            self._last = reading
        self._prev_t = now
        return self.joules

    @property
    def joules(self) -> float:
        return self._joules * self.scale

    def __exit__(self, *exc):
        self.poll()
        return False
