"""`sputnik serve`: an OpenAI-compatible HTTP API (and a small web chat page) over continuous batching.

    sputnik serve --model runs/sft/model [--host 127.0.0.1] [--port 8000]

Routes: GET / (the chat page, serve_page.html; `/?q=TEXT` sends TEXT on load, a testing/demo hook),
GET /v1/models[/{id}], POST /v1/chat/completions, POST /v1/completions. `stream: true` answers with
server-sent events (`data: {chunk}\\n\\n` ... `data: [DONE]`), as OpenAI does. Only the standard
library's ThreadingHTTPServer: one thread per connection parses and validates, the scheduler's
single thread runs the model (scheduler.py).

Chat requests are rendered in our reasoning format: the last user message becomes
`<|user|>{content}<|assistant|>` (the models are trained single-turn; earlier turns and system
messages are not shown to the model). The reply's `content` is the whole completion including the
`<think>` part; `reasoning_content` (non-standard, as DeepSeek's API) repeats the think part alone.

Errors are JSON `{"error": {"message", "type", "code", "param"}}`: 400 malformed JSON / bad or
missing field / prompt over the limit, 404 unknown model or route, 405 wrong method, 413 body too
large, 429 queue full (Retry-After: 1), 503 shutting down. There is no authentication: the default
host is 127.0.0.1; bind elsewhere only behind something that authenticates.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import time
import logging
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from sputnik.config import DeviceConfig, add_config_args, config_from_args, knob
from sputnik.inference.sampling import SamplingParams
from sputnik.inference.scheduler import QueueFull, Scheduler, SchedulerClosed
from sputnik.tokenizer import THINK, THINK_END

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 4 << 20  # a prompt at the token limit is far smaller; anything bigger is a mistake
REQUEST_TIMEOUT_S = 600.0


@dataclass
class ServeConfig(DeviceConfig):
    model: str = knob("", "model directory (a stage's <out>/model: weights, config.json, tokenizer); required")
    tokenizer: str = knob("", "tokenizer directory or tokenizer.json ('' = the one saved with the model)")
    host: str = knob("127.0.0.1", "address to bind (no authentication: keep it on loopback unless proxied)")
    port: int = knob(8000, "TCP port (0 = any free port)", min=0, max=65535)
    max_batch: int = knob(8, "requests decoded together (continuous batching)", min=1)
    max_prompt_tokens: int = knob(1024, "longest prompt accepted (400 beyond)", min=1)
    max_tokens_limit: int = knob(1024, "largest max_tokens a request may ask for (400 beyond)", min=1)
    queue_size: int = knob(64, "requests allowed to wait for a batch slot (429 beyond)", min=1)
    served_name: str = knob("", "model id in the API ('' = the model directory's name)")

    def __post_init__(self):
        if not self.model:
            raise ValueError("model: give a model directory (--model DIR)")


# ---------------------------------------------------------------------------------------------
# Model loading (shared with `sputnik chat`) and the reasoning split
def load_for_inference(cfg: DeviceConfig, model_dir: str, tokenizer: str = ""):
    """(model, tokenizer) from a model directory, through the same loaders the stages use; the process's
    threads and kernels set from cfg (a server lives as long as its process)."""
    from sputnik.common import pick_device, set_threads
    from sputnik.data import check_vocab
    from sputnik.kernels.cpu import use_cpu_kernels
    from sputnik.train.loading import load_model, load_tokenizer

    if not os.path.isdir(model_dir):
        raise ValueError(f"model={model_dir!r}: not a directory")
    choice = pick_device(cfg.device)
    set_threads(cfg.num_threads)
    use_cpu_kernels(cfg.cpu_kernels)
    tok, model = load_tokenizer(tokenizer, model_dir), load_model(model_dir)
    check_vocab(tok, model.config.vocab_size)
    # Inference only: no fp32 master weights needed, so run in the compute dtype outright.
    model = model.to(device=choice.device, dtype=choice.dtype).eval()
    print(f"sputnik: {choice.device} ({choice.reason})", file=sys.stderr)
    return model, tok


class ThinkSplitter:
    """Incrementally splits streamed text into ("think" | "tag" | "answer", piece) spans. The tags
    are special tokens (one whole piece each), but text can be cut anywhere by stop-string
    hold-back, so a tail that may be the start of the next tag is kept until it is decided."""

    def __init__(self):
        self.inside, self.pending, self.seen = False, "", False

    def feed(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        s, self.pending, out = self.pending + text, "", []
        while s:
            tag = THINK_END if self.inside else THINK
            kind = "think" if self.inside else "answer"
            i = s.find(tag)
            if i >= 0:
                out += [(kind, s[:i])] if i else []
                out.append(("tag", tag))
                self.inside, self.seen, s = not self.inside, True, s[i + len(tag):]
                continue
            keep = 0 if final else max((k for k in range(1, len(tag)) if s.endswith(tag[:k])), default=0)
            out += [(kind, s[:len(s) - keep])] if len(s) > keep else []
            self.pending = s[len(s) - keep:]
            break
        return out


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(think part without tags or None when there is none, the text after it)."""
    sp = ThinkSplitter()
    spans = sp.feed(text, final=True)
    think = "".join(p for k, p in spans if k == "think")
    return (think if sp.seen else None), "".join(p for k, p in spans if k == "answer")


# ---------------------------------------------------------------------------------------------
# Request validation: every field checked for type and range, errors name the field
class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def _get(body: dict, name: str, types: tuple, default=None, required: bool = False):
    if name not in body or body[name] is None:
        if required:
            raise APIError(400, f"missing required field '{name}'", "missing_required_parameter", name)
        return default
    v = body[name]
    if isinstance(v, bool) and bool not in types or not isinstance(v, types):
        names = " or ".join(t.__name__ for t in types)
        raise APIError(400, f"'{name}' must be {names}, got {type(v).__name__}: {json.dumps(v)[:80]}", "invalid_type", name)
    return v


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise APIError(400, f"'{name}' {message}", "invalid_value", name)


def _chat_prompt(body: dict) -> str:
    messages = _get(body, "messages", (list,), required=True)
    _check(len(messages) > 0, "messages", "must not be empty")
    user = None
    for i, m in enumerate(messages):
        _check(isinstance(m, dict) and isinstance(m.get("role"), str), f"messages[{i}]", "must be an object with a role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones are meaningful here
            _check(all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content), f"messages[{i}].content", "parts must be {'type': 'text', 'text': str}")
            content = "".join(p["text"] for p in content)
        _check(content is None or isinstance(content, str), f"messages[{i}].content", "must be a string")
        if m["role"] == "user":
            user = content or ""
    _check(user is not None, "messages", "must contain a user message")
    return user


def _completion_prompt(body: dict) -> str:
    prompt = _get(body, "prompt", (str, list), required=True)
    if isinstance(prompt, list):
        _check(len(prompt) == 1 and isinstance(prompt[0], str), "prompt", "must be a string (or a list of one string)")
        prompt = prompt[0]
    return prompt


# ---------------------------------------------------------------------------------------------
class App:
    """Everything a request handler needs: the scheduler, the tokenizer, the limits."""

    def __init__(self, scheduler: Scheduler, tokenizer, name: str, max_prompt_tokens: int, max_tokens_limit: int,
                 access_log: bool = True):
        self.scheduler, self.tokenizer, self.name = scheduler, tokenizer, name
        self.max_prompt_tokens, self.max_tokens_limit, self.access_log = max_prompt_tokens, max_tokens_limit, access_log
        self.created = int(time.time())
        self.page = resources.files("sputnik.inference").joinpath("serve_page.html").read_bytes()
        # Stop at <|user|> too: a model that starts a new user turn has finished its own.
        self.stop_ids = tuple(t for t in (*tokenizer.stop_ids, getattr(tokenizer, "user_id", None)) if t is not None)

    def model_card(self) -> dict:
        # max_model_len as vLLM reports it; max_tokens_limit lets the page clamp its setting
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "sputnik",
                "max_model_len": self.scheduler.max_len, "max_tokens_limit": self.max_tokens_limit}

    def prepare(self, body: dict, chat: bool) -> tuple[list[int], SamplingParams]:
        """Validate a (chat) completion request -> (prompt ids, sampling params)."""
        model = _get(body, "model", (str,), required=True)
        if model != self.name:
            raise APIError(404, f"model '{model}' does not exist; this server serves '{self.name}'", "model_not_found", "model")
        _check(_get(body, "n", (int,), 1) == 1, "n", "must be 1 (one completion per request)")
        text = _chat_prompt(body) if chat else _completion_prompt(body)
        try:
            ids = self.tokenizer.render_prompt(text) if chat else self.tokenizer.encode(text)
        except ValueError as e:
            raise APIError(400, f"cannot tokenize the prompt: {e}", "invalid_value", "messages" if chat else "prompt")
        if not ids:
            raise APIError(400, "the prompt is empty", "invalid_value", "prompt")
        if len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {self.max_prompt_tokens}",
                           "context_length_exceeded", "messages" if chat else "prompt")
        room = self.scheduler.max_len - len(ids)
        max_tokens = _get(body, "max_completion_tokens", (int,))
        max_tokens = _get(body, "max_tokens", (int,)) if max_tokens is None else max_tokens
        if max_tokens is None:
            max_tokens = min(self.max_tokens_limit, room)
        _check(1 <= max_tokens <= self.max_tokens_limit, "max_tokens", f"must be in [1, {self.max_tokens_limit}], got {max_tokens}")
        _check(max_tokens <= room, "max_tokens", f"{max_tokens} + {len(ids)} prompt tokens exceed the context of {self.scheduler.max_len}")
        temperature = _get(body, "temperature", (int, float), 1.0)
        _check(0 <= temperature <= 2, "temperature", f"must be in [0, 2], got {temperature}")
        top_p = _get(body, "top_p", (int, float), 1.0)
        _check(0 < top_p <= 1, "top_p", f"must be in (0, 1], got {top_p}")
        top_k = _get(body, "top_k", (int,), 0)  # non-standard (vLLM, DeepSeek): 0 = off
        _check(top_k >= 0, "top_k", f"must be >= 0, got {top_k}")
        seed = _get(body, "seed", (int,))
        _check(seed is None or 0 <= seed < 2**63, "seed", f"must be in [0, 2^63), got {seed}")
        stop = _get(body, "stop", (str, list), [])
        stop = [stop] if isinstance(stop, str) else stop
        _check(len(stop) <= 4 and all(isinstance(s, str) and s for s in stop), "stop", "must be up to 4 non-empty strings")
        params = SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature), top_k=top_k, top_p=float(top_p),
                                stop_token_ids=self.stop_ids, stop_strings=tuple(stop),
                                seed=seed if seed is not None else secrets.randbits(63))
        return ids, params


class Handler(BaseHTTPRequestHandler):
    app: App  # set on the per-server subclass (make_server)
    protocol_version = "HTTP/1.1"  # keep-alive for plain JSON; streams close the connection
    server_version = "sputnik"
    timeout = 120  # an idle keep-alive connection frees its thread after this

    # --- plumbing
    def log_message(self, fmt, *args) -> None:
        if self.app.access_log:
            super().log_message(fmt, *args)

    def _send(self, status: int, data: bytes, content_type: str = "application/json", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _read_json(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise APIError(411, "a Content-Length header is required", "length_required") from None
        if length > MAX_BODY_BYTES:
            raise APIError(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}", "request_too_large")
        try:
            raw = self.rfile.read(length)
            self.body_read = True
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", "invalid_json")
        return body

    def _guard(self, fn) -> None:
        self.streaming, self.body_read = False, self.command != "POST"
        try:
            fn()
        except APIError as e:
            # An unread body must not be parsed as the next request on this keep-alive connection.
            self.close_connection = self.close_connection or not self.body_read
            self._send_json(e.status, e.body(), {"Retry-After": "1"} if e.status in (429, 503) else None)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug still answers in JSON (unless a stream already began) and the server lives on
            log.exception("request failed")
            self.close_connection = True
            if not self.streaming:
                self._send_json(500, APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error",
                                              type_="server_error").body())

    # --- routes
    def do_GET(self) -> None:
        self._guard(self._get)

    def do_POST(self) -> None:
        self._guard(self._post)

    def _get(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path in ("/", "/index.html"):
            self._send(200, self.app.page, "text/html; charset=utf-8")
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [self.app.model_card()]})
        elif path == f"/v1/models/{self.app.name}":
            self._send_json(200, self.app.model_card())
        elif path.startswith("/v1/models/"):
            raise APIError(404, f"model '{path[len('/v1/models/'):]}' does not exist", "model_not_found")
        elif path in ("/v1/chat/completions", "/v1/completions"):
            raise APIError(405, f"use POST for {path}", "method_not_allowed")
        else:
            raise APIError(404, f"no route GET {path}", "not_found")

    def _post(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/chat/completions", "/v1/completions"):
            raise APIError(404, f"no route POST {path}", "not_found")
        chat = path == "/v1/chat/completions"
        body = self._read_json()
        ids, params = self.app.prepare(body, chat)
        stream = _get(body, "stream", (bool,), False)
        usage_opt = _get(body, "stream_options", (dict,), {}).get("include_usage", False)
        try:
            req = self.app.scheduler.submit(ids, params)
        except QueueFull as e:
            raise APIError(429, str(e), "queue_full", type_="rate_limit_error") from None
        except SchedulerClosed as e:
            raise APIError(503, str(e), "shutting_down", type_="server_error") from None
        except ValueError as e:
            raise APIError(400, str(e), "invalid_value") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            self._stream(req, rid, chat, bool(usage_opt)) if stream else self._complete(req, rid, chat)
        finally:
            req.cancel()  # no-op when finished; frees the batch row if the client went away

    def _complete(self, req, rid: str, chat: bool) -> None:
        try:
            res = req.wait(REQUEST_TIMEOUT_S)
        except TimeoutError:
            raise APIError(504, f"generation took longer than {REQUEST_TIMEOUT_S} s", "timeout", type_="server_error") from None
        except RuntimeError as e:
            raise APIError(500, str(e), "generation_failed", type_="server_error") from None
        if chat:
            reasoning, _ = split_reasoning(res.text)
            choice = {"index": 0, "message": {"role": "assistant", "content": res.text, "reasoning_content": reasoning},
                      "finish_reason": res.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": res.text, "finish_reason": res.finish_reason, "logprobs": None}
        self._send_json(200, {"id": rid, "object": "chat.completion" if chat else "text_completion",
                              "created": int(time.time()), "model": self.app.name, "choices": [choice],
                              "usage": _usage(res.prompt_tokens, res.completion_tokens)})

    def _stream(self, req, rid: str, chat: bool, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the body ends when the connection does
        self.end_headers()
        self.close_connection = self.streaming = True
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.app.name}
        splitter, completion_tokens = ThinkSplitter(), 0

        def send(choices: list, **extra) -> None:
            self.wfile.write(b"data: " + json.dumps({**base, "choices": choices, **extra}).encode() + b"\n\n")
            self.wfile.flush()

        if chat:
            send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        for d in req.stream(timeout=REQUEST_TIMEOUT_S):
            completion_tokens += len(d.token_ids)
            if d.finish_reason == "error":
                self.wfile.write(b"data: " + json.dumps(APIError(500, req.result.error, "generation_failed",
                                                                 type_="server_error").body()).encode() + b"\n\n")
                break
            reason = d.finish_reason if d.finish_reason in ("stop", "length") else None
            if d.text and chat:
                think = "".join(p for k, p in splitter.feed(d.text) if k == "think")
                delta = {"content": d.text, **({"reasoning_content": think} if think else {})}
                send([{"index": 0, "delta": delta, "finish_reason": None}])
            elif d.text:
                send([{"index": 0, "text": d.text, "finish_reason": None, "logprobs": None}])
            if reason:
                final = {"delta": {}} if chat else {"text": "", "logprobs": None}
                send([{"index": 0, **final, "finish_reason": reason}])
        if include_usage:
            send([], usage=_usage(len(req.prompt_ids), completion_tokens))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---------------------------------------------------------------------------------------------
class Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never blocks shutdown
    request_queue_size = 256  # listen backlog: bursts of connections queue instead of being refused
    allow_reuse_address = True


def make_server(app: App, host: str = "127.0.0.1", port: int = 0) -> Server:
    return Server((host, port), type("BoundHandler", (Handler,), {"app": app}))


def build_app(cfg: ServeConfig, access_log: bool = True) -> App:
    model, tokenizer = load_for_inference(cfg, cfg.model, cfg.tokenizer)
    context = model.config.max_position_embeddings
    max_len = min(cfg.max_prompt_tokens + cfg.max_tokens_limit, context)
    prompt_limit, tokens_limit = min(cfg.max_prompt_tokens, max_len - 1), min(cfg.max_tokens_limit, max_len - 1)
    if (prompt_limit, tokens_limit) != (cfg.max_prompt_tokens, cfg.max_tokens_limit):
        print(f"sputnik serve: warning: the model's context is {context} tokens: max_prompt_tokens={prompt_limit}, "
              f"max_tokens_limit={tokens_limit} (a request's prompt + max_tokens must still fit {max_len})", file=sys.stderr)
    scheduler = Scheduler(model, tokenizer, max_batch=cfg.max_batch, max_len=max_len, queue_size=cfg.queue_size,
                          compile=cfg.compile)
    name = cfg.served_name or os.path.basename(os.path.abspath(cfg.model))
    return App(scheduler, tokenizer, name, prompt_limit, tokens_limit, access_log)


def run(cfg: ServeConfig) -> int:
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"sputnik serve: warning: binding {cfg.host}: the API has no authentication", file=sys.stderr)
    app = build_app(cfg)
    server = make_server(app, cfg.host, cfg.port)
    host, port = server.server_address[:2]
    print(f"sputnik serve: model '{app.name}' at http://{host}:{port}/v1 (chat page: http://{host}:{port}/)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.scheduler.close()
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API and web chat page for a model",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, ServeConfig)
    p.set_defaults(func=lambda args: run(config_from_args(args, ServeConfig)))
