"""Continuous (iteration-level) batching for the server: requests join and leave the running batch
between decode steps, as in Orca (Yu et al., OSDI 2022) and vLLM, instead of waiting for a whole
static batch to finish.

One background thread owns the model. Each iteration of its loop (`step`):
  1. admit waiting requests while there is room (max_batch rows): prefill the prompt into a fresh
     one-row cache of the common max_len, sample its first token, and `concat` the cache onto the
     running batch cache;
  2. one decode step for every running row (each row feeds its last token at its own position);
  3. sample each row with its own SamplingParams and torch.Generator (seeded per request, so a
     request's tokens do not depend on who else shares the batch);
  4. finished rows leave: `cache.select(keep)`.
Tokens are turned into text incrementally (UTF-8 safe) and streamed to a per-request callback or
queue. Stop strings truncate the text (OpenAI semantics); text that may be the start of a stop
string is held back until it is decided.

Cache contract (decoders.py, the cached model): new_cache / forward_cached / step / cache.select,
plus the static `type(cache).concat(caches)` that stacks batch rows.

Shape legend: B running rows, V vocab.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from sputnik.inference.decoders import cached_model, compiled_step
from sputnik.inference.sampling import SamplingParams, mask_vocab, sample_next

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at queue_size: the server answers 429 (try again later)."""


class SchedulerClosed(RuntimeError):
    """The scheduler was shut down before or while the request ran."""


@dataclass
class Delta:
    """One streaming event: new text (may be "" while bytes of a character or a possible stop
    string are held back), the token ids sampled since the last event, and on the last event the
    finish_reason ("stop" | "length" | "cancelled" | "error")."""
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class Result:
    text: str
    token_ids: list[int]  # every sampled token, including a stop token that ended the request
    finish_reason: str
    prompt_tokens: int
    error: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


# ---------------------------------------------------------------------------------------------
# Incremental detokenisation with stop strings
class TextStream:
    """Append token ids, get text deltas. Decodes a short window (the read-offset scheme of HF
    TGI): a byte-level token may end in the middle of a UTF-8 character, whose partial decode is
    U+FFFD, so text is released only once the window decodes cleanly."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = ()):
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stop_strings if s)
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""  # decided text (stop-truncated once a stop string was found)
        self.sent = 0  # characters of self.text already released
        self.stopped = False

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        window = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(window) > len(prefix) and not window.endswith("\ufffd"):
            self._append(window[len(prefix):])
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def finish(self) -> None:
        """End of generation: release whatever the undecided window holds (even a broken char)."""
        if not self.stopped:
            prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
            self._append(self.tokenizer.decode(self.ids[self.prefix_offset:])[len(prefix):])

    def _append(self, piece: str) -> None:
        if self.stopped:
            return
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0) + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True

    def take(self, final: bool = False) -> str:
        """Release decided text; hold back a tail that could still grow into a stop string."""
        end = len(self.text)
        if not final and not self.stopped:
            end -= max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


# ---------------------------------------------------------------------------------------------
# One request: the handle the caller keeps, and the row state the scheduler updates
class Request:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, device,
                 on_token: Callable[[Delta], None] | None):
        self.prompt_ids, self.params, self.on_token = list(prompt_ids), params, on_token
        self.stop_ids = frozenset(params.stop_token_ids)
        self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.token_ids: list[int] = []
        self.stream_text = TextStream(tokenizer, params.stop_strings)
        self.events: queue.Queue[Delta | None] = queue.Queue()
        self.done = threading.Event()
        self.result: Result | None = None
        self.cancelled = False

    # --- caller side
    def cancel(self) -> None:
        """Ask the scheduler to drop this request at its next step (e.g. the client went away)."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> Result:
        if not self.done.wait(timeout):
            raise TimeoutError(f"request not finished after {timeout} s")
        if self.result.finish_reason == "error":
            raise RuntimeError(self.result.error)
        return self.result

    def stream(self, timeout: float | None = None) -> Iterator[Delta]:
        """Deltas as they are produced (only without on_token); the last has finish_reason set."""
        while (d := self.events.get(timeout=timeout)) is not None:
            yield d

    # --- scheduler side
    def add_token(self, token_id: int) -> bool:
        """Record a sampled token, emit its text; True when the request is finished."""
        self.token_ids.append(token_id)
        if token_id in self.stop_ids:
            return self.finish("stop", [token_id])
        self.stream_text.push(token_id)
        if self.stream_text.stopped:
            return self.finish("stop", [token_id])
        if len(self.token_ids) >= self.params.max_new_tokens:
            return self.finish("length", [token_id])
        if self.cancelled:
            return self.finish("cancelled", [token_id])
        self._emit(Delta(self.stream_text.take(), [token_id]))
        return False

    def finish(self, reason: str, token_ids: list[int] = (), error: str | None = None) -> bool:
        if self.done.is_set():
            return True
        self.stream_text.finish()  # a stop token can follow a token whose character is still undecided
        self.result = Result(self.stream_text.text, list(self.token_ids), reason, len(self.prompt_ids), error)
        self._emit(Delta(self.stream_text.take(final=True), list(token_ids), reason))
        self.events.put(None)
        self.done.set()
        return True

    def _emit(self, delta: Delta) -> None:
        if self.on_token is None:
            self.events.put(delta)
            return
        try:
            self.on_token(delta)
        except Exception:  # a broken consumer must not take the scheduler down with it
            log.exception("on_token callback failed; cancelling the request")
            self.cancelled = True


# ---------------------------------------------------------------------------------------------
@dataclass
class SchedulerStats:
    steps: int = 0  # decode steps
    prefills: int = 0
    generated_tokens: int = 0  # first tokens (sampled from the prefill) included
    max_running: int = 0  # the most rows ever decoded together
    finished: dict = field(default_factory=dict)  # finish_reason -> count


class Scheduler:
    """Continuous batching over one model. `submit` is thread-safe; everything else about the
    model happens on the scheduler's own thread (or in `step`, for tests that drive it by hand
    with start=False)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_len: int = 1024, queue_size: int = 64,
                 start: bool = True, compile: bool = False):
        """compile: our DeepSeek-V3's decode step through torch.compile (one dynamic-shape graph)."""
        if max_batch < 1 or max_len < 2 or queue_size < 1:
            raise ValueError(f"max_batch={max_batch}, max_len={max_len}, queue_size={queue_size}: need "
                             "max_batch >= 1, max_len >= 2, queue_size >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.cm = cached_model(model)
        self.step_fn = compiled_step("dynamic") if compile and hasattr(self.cm, "draft") else None
        self.max_batch, self.max_len, self.queue_size = max_batch, max_len, queue_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # A head wider than the tokenizer has rows no text maps to: never sample them.
        self.vocab_limit = tokenizer.vocab_size
        probe = self.cm.new_cache(1, max_len, self.dtype, self.device)  # also checks max_len vs the context
        if not hasattr(type(probe), "concat"):
            raise ValueError(f"{type(probe).__name__} has no concat(): this model cannot join requests to a running batch")
        self.stats = SchedulerStats()
        self._waiting: deque[Request] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._rows: list[Request] = []  # running rows, in cache row order
        self._cache = self._seqlens_B = self._last_B = None
        self._weights = None  # the cached model's step weights, fetched when the running batch starts
        self._thread = threading.Thread(target=self._loop, name="sputnik-scheduler", daemon=True)
        if start:
            self._thread.start()

    # --- public API
    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_token: Callable[[Delta], None] | None = None) -> Request:
        """Queue a request. ValueError for a bad prompt, QueueFull when queue_size requests wait,
        SchedulerClosed after close()."""
        if not prompt_ids:
            raise ValueError("empty prompt: every prompt needs at least one token")
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab_limit), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_limit})")
        if len(prompt_ids) + params.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_new_tokens}) = "
                             f"{len(prompt_ids) + params.max_new_tokens} > max_len={self.max_len}")
        req = Request(prompt_ids, params, self.tokenizer, self.device, on_token)
        with self._cv:
            if self._closed:
                raise SchedulerClosed("the scheduler is shut down")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(f"server busy: {len(self._waiting)} requests already waiting (queue_size="
                                f"{self.queue_size}); retry later")
            self._waiting.append(req)
            self._cv.notify()
        return req

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop after the current step; unfinished requests end with finish_reason 'error'."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._fail_all("the scheduler was shut down")

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._rows)

    # --- the loop
    def _loop(self) -> None:
        # Grad mode is per thread: no_grad here covers every forward this thread runs.
        self.model.eval()
        with torch.no_grad():
            while True:
                with self._cv:
                    while not self._closed and not self._waiting and not self._rows:
                        self._cv.wait()
                    if self._closed:
                        return
                self.step()

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: admit, decode once, retire. A model error fails the requests involved
        (their callers see finish_reason 'error'), not the server."""
        with self._cv:
            room = self.max_batch - len(self._rows)
            new = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        try:
            for req in new:
                self._admit(req)
            if self._rows:
                self._decode()
        except Exception as e:
            log.exception("scheduler step failed")
            for req in new + self._rows:
                if not req.done.is_set():
                    req.finish("error", error=f"generation failed: {type(e).__name__}: {e}")
                    self._count(req)
            self._rows, self._cache = [], None

    def _count(self, req: Request) -> None:
        reason = req.result.finish_reason
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    def _admit(self, req: Request) -> None:
        if req.cancelled:
            req.finish("cancelled")
            self._count(req)
            return
        dev = self.device
        cache = self.cm.new_cache(1, self.max_len, self.dtype, dev)
        ids_1T = torch.tensor([req.prompt_ids], dtype=torch.long, device=dev)
        logits_1V = self.cm.forward_cached(ids_1T, cache, torch.zeros(1, dtype=torch.long, device=dev))[:, -1]
        self.stats.prefills += 1
        self.stats.generated_tokens += 1
        (token,) = self._sample(logits_1V, [req])
        if req.add_token(token):  # done after one token: never joins the batch
            self._count(req)
            return
        seqlen_1 = torch.tensor([len(req.prompt_ids)], device=dev)
        last_1 = torch.tensor([token], device=dev)
        if self._cache is None:
            self._cache, self._seqlens_B, self._last_B = cache, seqlen_1, last_1
            self._weights = self.cm.step_weights()
        else:  # same max_len on both sides, so rows stack
            self._cache = type(cache).concat([self._cache, cache])
            self._seqlens_B = torch.cat([self._seqlens_B, seqlen_1])
            self._last_B = torch.cat([self._last_B, last_1])
        self._rows.append(req)
        self.stats.max_running = max(self.stats.max_running, len(self._rows))

    def _decode(self) -> None:
        logits_BV = self.cm.step(self._last_B, self._cache, self._seqlens_B, self._weights, step_fn=self.step_fn)
        self._seqlens_B = self._seqlens_B + 1
        tokens = self._sample(logits_BV, self._rows)
        self.stats.steps += 1
        self.stats.generated_tokens += len(tokens)
        keep = [b for b, (req, t) in enumerate(zip(self._rows, tokens)) if not req.add_token(t)]
        for req in self._rows:
            if req.done.is_set():
                self._count(req)
        if not keep:
            self._rows, self._cache = [], None
            return
        self._last_B = torch.tensor(tokens, device=self.device)
        if len(keep) < len(self._rows):  # finished rows leave and stop costing compute
            keep_t = torch.tensor(keep, device=self.device)
            self._cache, self._seqlens_B, self._last_B = (self._cache.select(keep_t), self._seqlens_B[keep_t],
                                                          self._last_B[keep_t])
            self._rows = [self._rows[b] for b in keep]

    def _sample(self, logits_BV: torch.Tensor, reqs: list[Request]) -> list[int]:
        """Row b sampled with reqs[b]'s params and generator. Greedy rows share one argmax; sampled
        rows go one by one (each has its own generator, which is what makes a seeded request
        reproducible whatever else is in the batch)."""
        logits_BV = mask_vocab(logits_BV.float(), self.vocab_limit)
        out = logits_BV.argmax(-1).tolist()
        for b, req in enumerate(reqs):
            if req.params.temperature > 0:
                out[b] = int(sample_next(logits_BV[b:b + 1], req.params, req.generator)[0][0])
        return out

    def _fail_all(self, message: str) -> None:
        with self._cv:
            pending, self._waiting = list(self._waiting), deque()
        for req in pending + self._rows:
            req.finish("error", error=message)
