"""A killable worker process for checks that can hang or explode: math-verify and reasoning-gym
scorers. The common numeric path never comes here.

Why a process and not math-verify's own timeout: math-verify bounds time with signal.alarm, which
(1) only works in the main thread (GRPO may score from threads), (2) replaces any SIGALRM handler
the host has (pytest-timeout, other alarms), (3) has whole-second resolution and (4) cannot stop
a long C-level computation such as a huge integer power inside sympy. A separate process can
always be killed, and gets an address-space limit so `10**10**10` fails with MemoryError instead
of taking the machine down.

Why subprocess + JSON lines and not multiprocessing: no fork of a parent that runs torch threads
(fork-after-threads deadlocks), no re-import of the user's __main__ (spawn/forkserver do that),
and no pickle: a worker that ever ran something hostile cannot send back an object that executes
code when the parent unpickles it. Requests name an operation from the fixed table OPS, never a
module path chosen by the caller.

Protocol: the parent writes {"op", "args"} as one JSON line; the worker answers {"ok", "result"}
or {"ok": false, "error"}. A reply later than the deadline kills the worker and starts a
replacement at once. Worker startup (~1 s: importing sympy) is NOT charged to a call's deadline,
so a legitimate first check never fails for being first; a call therefore takes at most
timeout_s, plus the startup of a worker that is not ready yet. One request at a time per worker
(a lock); a forked child process gets its own worker. POSIX only (select on pipes).
"""
from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

# op name -> (module, function, heavy modules) run inside the worker with **args; results must be
# JSON. The heavy modules are imported once per worker, before the op's first call, under the
# startup timeout, so no call's deadline pays for importing sympy or reasoning-gym.
OPS = {
    "math_verify": ("sputnik.tasks.symbolic", "worker_math_equal", ("math_verify",)),
    "rg_score": ("sputnik.tasks.reasoning_gym", "worker_score", ("reasoning_gym", "math_verify")),
    "sleep": ("sputnik.tasks.sandbox", "worker_sleep", ()),  # exercises the kill path in tests
}
MEMORY_LIMIT_BYTES = 4 << 30  # address space, not RSS: sympy + numpy reserve far more than they use
MAX_REPLY_BYTES = 1 << 20
STARTUP_TIMEOUT_S = 60.0     # importing sympy on a busy 2-core machine can take several seconds


class SandboxTimeout(Exception):
    """The worker did not answer in time (it has been killed)."""


class SandboxError(Exception):
    """The worker failed: the operation raised, the worker died, or the reply was malformed."""


class Worker:
    """One worker process, started lazily, restarted after a timeout or crash."""

    def __init__(self, memory_limit_bytes: int = MEMORY_LIMIT_BYTES):
        self.memory_limit_bytes = memory_limit_bytes
        self._proc: subprocess.Popen | None = None
        self._ready, self._prepared = False, set()
        self._pid = os.getpid()
        self._buf = b""
        self._lock = threading.Lock()
        self.restarts = 0  # workers killed for timeouts or crashes (for tests and logs)

    def call(self, op: str, args: dict, timeout_s: float):
        """Run OPS[op](**args) in the worker; SandboxTimeout after timeout_s (worker killed)."""
        if op not in OPS:
            raise ValueError(f"unknown sandbox op {op!r}: allowed {', '.join(OPS)}")
        with self._lock:
            self._ensure_started(op)
            return self._request(op, args, timeout_s)

    def _request(self, op: str, args: dict, timeout_s: float):
        """One request/reply on a started worker (caller holds the lock)."""
        request = (json.dumps({"op": op, "args": args}) + "\n").encode()
        try:
            self._proc.stdin.write(request)
            self._proc.stdin.flush()
            reply = json.loads(self._read_line(time.monotonic() + timeout_s))
        except SandboxTimeout:
            self._kill()
            self._spawn()  # the replacement imports while the caller carries on
            raise SandboxTimeout(f"{op} took longer than {timeout_s:g}s; worker killed") from None
        except (OSError, ValueError, SandboxError) as e:
            self._kill()
            raise SandboxError(f"{op}: worker failed ({type(e).__name__}: {e})") from None
        if not reply.get("ok"):
            raise SandboxError(f"{op}: {reply.get('error', 'unknown error')}")
        return reply.get("result")

    def warm(self, op: str = "math_verify") -> None:
        """Start the worker and import what `op` needs now, so the first real check is fast."""
        with self._lock:
            self._ensure_started(op)

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._pid == os.getpid():
                self._kill(count=False)

    # --- internals -------------------------------------------------------------------------
    def _spawn(self) -> None:
        """Start a worker without waiting for it (its imports overlap with our other work)."""
        root = str(Path(__file__).resolve().parents[2])  # so the worker imports this very sputnik
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
                   OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        code = f"from sputnik.tasks.sandbox import serve; serve({self.memory_limit_bytes})"
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, env=env, close_fds=True)
        self._buf, self._ready, self._prepared = b"", False, set()

    def _ensure_started(self, op: str) -> None:
        if self._pid != os.getpid():  # we are a forked child: the pipes belong to the parent
            self._proc, self._buf, self._pid = None, b"", os.getpid()
        if self._proc is None or self._proc.poll() is not None:
            self._spawn()
        if not self._ready:
            self._handshake()
        if op not in self._prepared:
            try:
                self._request("_prepare", {"op": op}, STARTUP_TIMEOUT_S)
            except SandboxTimeout:
                raise SandboxError(f"worker could not import what {op} needs in {STARTUP_TIMEOUT_S:g}s") from None
            self._prepared.add(op)

    def _handshake(self) -> None:
        try:
            ready = json.loads(self._read_line(time.monotonic() + STARTUP_TIMEOUT_S))
        except (SandboxTimeout, SandboxError, ValueError) as e:
            self._kill()
            raise SandboxError(f"worker did not start ({type(e).__name__}: {e})") from None
        if not ready.get("ready"):
            self._kill()
            raise SandboxError(f"worker did not start: {ready}")
        self._ready = True

    def _read_line(self, deadline: float) -> bytes:
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise SandboxTimeout
            chunk = os.read(fd, 65536)
            if not chunk:
                raise SandboxError("worker exited")
            self._buf += chunk
            if len(self._buf) > MAX_REPLY_BYTES:
                raise SandboxError("reply too large")
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _kill(self, count: bool = True) -> None:
        if self._proc is None:
            return
        try:
            self._proc.kill()
            self._proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self._proc, self._buf, self._ready, self._prepared = None, b"", False, set()
        self.restarts += count


_default: Worker | None = None
_default_lock = threading.Lock()


def default_worker() -> Worker:
    global _default
    with _default_lock:
        if _default is None:
            _default = Worker()
            atexit.register(_default.close)
        return _default


def call(op: str, args: dict, timeout_s: float):
    """Run an op in the shared worker (see Worker.call)."""
    return default_worker().call(op, args, timeout_s)


# ---------------------------------------------------------------------------------------------
# Worker side
def worker_sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def serve(memory_limit_bytes: int = MEMORY_LIMIT_BYTES) -> None:
    """Worker main loop: read requests on stdin, answer on the original stdout. fd 1 is pointed at
    stderr so a library that prints cannot corrupt the protocol."""
    import importlib
    import resource

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    except (ValueError, OSError):  # a lower hard limit is already in place: keep it
        pass
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        try:
            request = json.loads(line)
            if request["op"] == "_prepare":  # import an op's module and its heavy dependencies
                module, _, heavy = OPS[request["args"]["op"]]
                for name in (module, *heavy):
                    importlib.import_module(name)
                result = True
            else:
                module, func, _ = OPS[request["op"]]
                result = getattr(importlib.import_module(module), func)(**request.get("args", {}))
            reply = json.dumps({"ok": True, "result": result})
        except BaseException as e:  # noqa: BLE001 - report everything, the parent decides
            # Never str() an arbitrary exception: sympy messages can be huge or slow to render.
            msg = e.args[0] if e.args and isinstance(e.args[0], str) else ""
            reply = json.dumps({"ok": False, "error": f"{type(e).__name__}: {msg[:200]}"})
        out.write(reply + "\n")
