"""Progress bar, throughput/MFU meter and metrics-file helpers for the training loops.

Kept apart from session.py (one concern per file): nothing here knows about models, ranks
or optimizers; the loops feed it numbers.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from sputnik.common import atomic_write_text, print0


def trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines written after the checkpoint (the run repeats those steps)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [ln for ln in lines if ln.strip() and _step_of_line(ln) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def _step_of_line(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, ValueError, TypeError):
        return sys.maxsize  # a torn last line from a killed writer: drop it


class Progress:
    """Live bar (rich) with loss, tokens/s, MFU and ETA on a terminal; plain lines every
    log_every steps otherwise (logs, CI, pytest). Rank 0 only."""

    def __init__(self, total: int, start: int, live: bool, title: str):
        self.bar, self.task, self.total, self.title, self.speed = None, None, total, title, (None, None)
        if not live:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        console = Console(stderr=True)
        if console.is_terminal:
            self.bar = RichProgress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                    TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                    console=console)
            self.task = self.bar.add_task(title, total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, loss: float, speed: tuple[float, float | None] | None = None) -> None:
        """Every step; `speed` = (tokens/s, MFU) on log steps, which also print a plain line
        when there is no live bar."""
        if speed is not None:
            self.speed = speed
        info = format_info(loss, *self.speed)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif speed is not None:
            print0(f"{self.title} step {step}/{self.total} {info}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class Throughput:
    """Tokens/s and MFU (model FLOPs / (seconds x nominal peak)) between two reads, of real tokens:
    a padded batch's padding is not counted (the ledger's FLOPs count it)."""

    def __init__(self, peak: float | None):
        self.peak, self.tokens, self.flops, self.t0 = peak, 0, 0.0, time.time()

    def add(self, tokens: int, flops: float) -> None:
        self.tokens, self.flops = self.tokens + tokens, self.flops + flops

    def read(self) -> tuple[float, float | None]:
        dt = max(time.time() - self.t0, 1e-9)
        tok_s, mfu = self.tokens / dt, (self.flops / dt / self.peak if self.peak else None)
        self.tokens, self.flops, self.t0 = 0, 0.0, time.time()
        return tok_s, mfu


def format_info(loss: float, tok_s: float | None, mfu: float | None) -> str:
    speed = f" | {tok_s:,.0f} tok/s" if tok_s is not None else ""
    return f"loss {loss:.4f}{speed}" + (f" mfu {100 * mfu:.2f}%" if mfu is not None else "")
