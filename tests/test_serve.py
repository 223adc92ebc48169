"""`sputnik serve` end to end: a tiny model that has memorised two reasoning traces is saved with
save_model, loaded the way the command loads it, served on 127.0.0.1 and driven with the real
`openai` client (chat, streaming, completions, models, 100 concurrent requests), raw HTTP for
the error paths, and headless Chromium for the web page."""
import base64
import fcntl
import http.client
import json
import os
import select
import shutil
import subprocess
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
import torch.nn.functional as F

from sputnik.model import build_model
from sputnik.model.config import tiny_dense
from sputnik.inference.scheduler import Scheduler
from sputnik.inference.serve import App, ServeConfig, ThinkSplitter, build_app, make_server, split_reasoning
from sputnik.tokenizer import train_tokenizer
from sputnik.train.loading import save_model

PAIRS = {"what is 2+2?": ("two plus two is four", "4"), "hi": ("greet back", "hello!")}
NAME = "sputnik-tiny"


def completion_of(prompt: str) -> str:
    think, answer = PAIRS[prompt]
    return f"<think>{think}</think><answer>{answer}</answer>"


def make_model_dir(path):
    """Train a tiny dense model until greedy decoding reproduces PAIRS exactly; save it."""
    tok = train_tokenizer([p + completion_of(p) for p in PAIRS] * 4 + ["the quick brown fox"], vocab_size=300)
    torch.manual_seed(0)
    cfg = tiny_dense(vocab_size=tok.vocab_size + 12, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=256)
    model = build_model(cfg)
    seqs = [tok.render_chat(p, completion_of(p)) for p in PAIRS]
    T = max(len(ids) for ids, _ in seqs)
    ids_BT, tgt_BT = torch.zeros(len(seqs), T, dtype=torch.long), torch.full((len(seqs), T), -100)
    for b, (ids, mask) in enumerate(seqs):
        ids_BT[b, :len(ids)] = torch.tensor(ids)
        tgt_BT[b, :len(ids) - 1] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = F.cross_entropy(model(ids_BT).logits.flatten(0, 1), tgt_BT.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_model(model.eval(), path, tok, cfg)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory.mktemp("serve") / "model")
    cfg = ServeConfig(model=str(model_dir), port=0, max_batch=8, max_prompt_tokens=40, max_tokens_limit=48,
                      queue_size=128, served_name=NAME, num_threads=1)
    app = build_app(cfg, access_log=False)
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield app, server.server_address[1]
    server.shutdown()
    server.server_close()
    app.scheduler.close()


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served[1]}/v1", api_key="x", max_retries=0, timeout=30)


def raw(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, (json.loads(data) if resp.getheader("Content-Type") == "application/json" else data)


# ---------------------------------------------------------------------------------------------
def test_models(client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).owned_by == "sputnik"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_completion(client, served):
    tok = served[0].tokenizer
    r = client.chat.completions.create(model=NAME, messages=[{"role": "system", "content": "be brief"},
                                                             {"role": "user", "content": "what is 2+2?"}],
                                       temperature=0)
    msg = r.choices[0].message
    assert msg.content == completion_of("what is 2+2?") and msg.role == "assistant"
    assert msg.reasoning_content == "two plus two is four"
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(tok.render_prompt("what is 2+2?"))
    assert r.usage.completion_tokens == len(tok.encode(msg.content)) + 1  # + the closing <|endoftext|>
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat(client):
    chunks = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    with_choice = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choice)
    think = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in with_choice)
    assert text == completion_of("hi") and think == "greet back"
    assert len(with_choice) > 4  # really streamed token by token, not one blob
    assert with_choice[-1].choices[0].finish_reason == "stop"
    # one chunk per text token, plus the role and finish chunks; usage also counts the closing eot
    assert chunks[-1].usage.completion_tokens == len(with_choice) - 2 + 1


def test_completions_and_limits(client):
    prompt = "<|user|>hi<|assistant|>"  # special-token strings in a raw prompt are the special ids
    r = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=30)
    assert r.choices[0].text == completion_of("hi") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert len(r.choices[0].text) > 7 and completion_of("hi").startswith(r.choices[0].text)
    parts = list(client.completions.create(model=NAME, prompt=prompt, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == completion_of("hi")
    # stop strings cut the text before the stop string (which is not returned)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], temperature=0,
                                       stop=["</think>"])
    assert r.choices[0].message.content == "<think>greet back" and r.choices[0].finish_reason == "stop"


def test_sampling_is_seeded(client):
    kw = dict(model=NAME, prompt="the quick", temperature=1.5, max_tokens=12, seed=123)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text


def test_hundred_concurrent_requests(client, served):
    prompts = [list(PAIRS)[i % 2] for i in range(100)]

    def ask(p):
        r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": p}], temperature=0)
        return r.choices[0].message.content

    t0 = time.perf_counter()
    with ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == [completion_of(p) for p in prompts]
    assert time.perf_counter() - t0 < 30
    assert served[0].scheduler.stats.max_running == 8  # batches really filled up


@pytest.mark.parametrize("path, body, status, code", [
    ("/v1/chat/completions", b"{not json", 400, "invalid_json"),
    ("/v1/chat/completions", b"[1, 2]", 400, "invalid_json"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "missing_required_parameter"),
    ("/v1/chat/completions", {"model": NAME, "messages": "hi"}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "system", "content": "x"}]}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "9"}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 49}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "word " * 50}]}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": NAME, "prompt": ["a", "b"]}, 400, "invalid_value"),
    ("/v1/embeddings", {"model": NAME, "input": "x"}, 404, "not_found"),
])
def test_errors_are_json_with_status(served, path, body, status, code):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, resp = raw(served[1], "POST", path, data)
    assert got == status, resp
    assert resp["error"]["code"] == code and resp["error"]["message"] and resp["error"]["type"]


def test_http_edge_cases(served):
    port = served[1]
    assert raw(port, "GET", "/v1/nothing")[0] == 404
    assert raw(port, "GET", "/v1/chat/completions")[0] == 405
    status, resp = raw(port, "POST", "/v1/completions", b"{}", {"Content-Length": str(64 << 20)})
    assert status == 413 and resp["error"]["code"] == "request_too_large"
    status, page = raw(port, "GET", "/?q=hello")
    assert status == 200 and b"<title>sputnik chat</title>" in page


def test_queue_full_is_429(served):
    app = served[0]
    sched = Scheduler(app.scheduler.model, app.tokenizer, max_batch=1, max_len=64, queue_size=1, start=False)
    busy = App(sched, app.tokenizer, NAME, 40, 16, access_log=False)
    server = make_server(busy, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sched.submit([5, 6], busy.prepare({"model": NAME, "prompt": "x", "max_tokens": 2}, chat=False)[1])
        body = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi"}]}).encode()
        status, resp = raw(server.server_address[1], "POST", "/v1/chat/completions", body)
        assert status == 429 and resp["error"]["code"] == "queue_full" and "queue_size=1" in resp["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()
        sched.close()


def test_think_splitter_streams_and_holds_partial_tags():
    sp, spans = ThinkSplitter(), []
    for piece in ["<thi", "nk>ab", "c</", "think>", "<answer>4</answer>"]:
        spans += sp.feed(piece)
    assert "".join(p for k, p in spans if k == "think") == "abc"
    assert "".join(p for k, p in spans if k == "answer") == "<answer>4</answer>"
    assert split_reasoning("<think>x</think>y") == ("x", "y") and split_reasoning("plain") == (None, "plain")
    assert split_reasoning("<think>still going") == ("still going", "")


def _high_fd(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Chromium:
    """Headless Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON
    messages ending in NUL on the child's fds 3 and 4), standard library only. `--dump-dom` with
    `--virtual-time-budget` does not wait for a streamed fetch body, so the page is polled instead."""

    def __init__(self, profile):
        to_child, self._to_w = os.pipe()
        self._from_r, from_child = os.pipe()
        # Move the child's ends above fd 4, so the redirections below cannot clobber each other.
        to_child, from_child = (_high_fd(fd) for fd in (to_child, from_child))
        cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-pipe",
               "--window-size=900,600"]
        # The child needs the pipes as fds 3/4; bash moves them (preexec_fn is unsafe next to the server's
        # threads; dash accepts only one-digit fds in redirections).
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$@" 3<&{to_child} 4>&{from_child}', "bash", *cmd],
                                     pass_fds=(to_child, from_child), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buf, self._id = b"", 0

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 20) -> dict:
        self._id += 1
        os.write(self._to_w, json.dumps({"id": self._id, "method": method, "params": params or {},
                                         **({"sessionId": session} if session else {})}).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:  # skip events until our reply
                msg, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(msg)
                if reply.get("id") == self._id:
                    assert "error" not in reply, (method, reply["error"])
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_r], [], [], left)[0]:
                raise TimeoutError(f"chromium: no reply to {method}")
            chunk = os.read(self._from_r, 1 << 16)
            assert chunk, "chromium exited"
            self._buf += chunk

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
            self.proc.wait(5)
        except (TimeoutError, AssertionError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_w)
        os.close(self._from_r)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (apt-get install -y chromium)")
def test_web_page_in_headless_chromium(served, tmp_path):
    """The page auto-sends ?q= (its testing/demo hook), streams the reply and shows the think part
    in its own collapsible box, apart from the answer."""
    url = f"http://127.0.0.1:{served[1]}/?q=" + urllib.parse.quote("what is 2+2?")
    browser = Chromium(tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": url})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

        def js(expr):
            return browser.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session)["result"].get("value")

        deadline = time.monotonic() + 20
        while js("(document.querySelector('.msg.assistant') || {dataset: {}}).dataset.state") != "done":
            assert time.monotonic() < deadline, js("document.body.outerHTML")
            time.sleep(0.1)
        box = js("""(() => { const b = document.querySelector('.msg.assistant'), d = b.querySelector('details.reasoning');
                     return {think: b.querySelector('.reasoning-text').textContent, answer: b.querySelector('.answer').textContent,
                             open: d.open, hidden: d.hidden, summary: d.querySelector('summary').textContent,
                             user: document.querySelector('.msg.user').textContent}; })()""")
        assert box["think"] == "two plus two is four" and box["answer"] == "4" and box["user"] == "what is 2+2?"
        assert not box["hidden"] and not box["open"] and box["summary"].startswith("Reasoning")  # collapsed when done
        js("document.querySelector('details.reasoning summary').click()")
        assert js("document.querySelector('details.reasoning').open") is True  # and expands on click
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session)["data"]
        (tmp_path / "page.png").write_bytes(base64.b64decode(shot))  # for a human look when debugging
    finally:
        browser.close()
