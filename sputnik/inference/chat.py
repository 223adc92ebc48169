"""`sputnik chat`: talk to a model in the terminal, token by token.

    sputnik chat --model runs/sft/model [--temperature 0.6] [--max_tokens 512]

Each line read from stdin is one user turn, rendered single-turn in our format
(`<|user|>{line}<|assistant|>`, the way the models are trained); `/exit` (or end of input) quits.
On a terminal the `<think>` part is shown dimmed (rich) and Ctrl-C stops the current reply; with
piped input/output the completion text is written as is, one reply per turn, so
`printf 'what is 2+2?\\n' | sputnik chat --model DIR` works in scripts and tests.

Generation goes through the same Scheduler as `sputnik serve` (one row), which gives streaming,
stop tokens, seeded sampling and vocabulary masking for free.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from sputnik.config import DeviceConfig, add_config_args, config_from_args, knob
from sputnik.inference.sampling import SamplingParams
from sputnik.inference.scheduler import Delta, Result, Scheduler
from sputnik.inference.serve import ThinkSplitter, load_for_inference

EXIT_COMMANDS = ("/exit", "/quit")


@dataclass
class ChatConfig(DeviceConfig):
    model: str = knob("", "model directory (a stage's <out>/model: weights, config.json, tokenizer); required")
    tokenizer: str = knob("", "tokenizer directory or tokenizer.json ('' = the one saved with the model)")
    temperature: float = knob(0.6, "sampling temperature (0 = greedy; DeepSeek-R1 recommends 0.5-0.7)", min=0.0, max=2.0)
    top_p: float = knob(0.95, "nucleus sampling mass (1 = off)", min=0.0, max=1.0)
    top_k: int = knob(0, "sample among the k most likely tokens (0 = off)", min=0)
    max_tokens: int = knob(512, "longest reply in tokens", min=1)
    seed: int = knob(0, "seed of turn i is seed + i (replies are reproducible)", min=0)
    draft: str = knob("", "a smaller model of the same tokenizer as a speculative-decoding draft ('' = none): "
                          "the same replies (exactly, greedy), fewer target forwards when the draft agrees")
    num_draft: int = knob(4, "with --draft: tokens the draft proposes a step", min=1)

    def __post_init__(self):
        if not self.model:
            raise ValueError("model: give a model directory (--model DIR)")
        if self.top_p <= 0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")


class Printer:
    """Writes streamed deltas: raw text when piped; on a terminal the think part dimmed."""

    def __init__(self, out, pretty: bool):
        self.out, self.splitter = out, ThinkSplitter()
        self.console = None
        if pretty:
            from rich.console import Console

            self.console = Console(file=out, force_terminal=True, soft_wrap=True, highlight=False)

    def __call__(self, delta: Delta) -> None:
        if self.console is None:
            self.out.write(delta.text)
            self.out.flush()
            return
        for kind, piece in self.splitter.feed(delta.text, final=delta.finish_reason is not None):
            self.console.print(piece, style="dim italic" if kind != "answer" else None, end="", markup=False)
        self.out.flush()


def _read_turn(stdin, interactive: bool) -> str | None:
    """The next user line, or None at end of input."""
    if interactive:
        try:
            return input("you › ")
        except EOFError:
            return None
    line = stdin.readline()
    return line if line else None


def run(cfg: ChatConfig, stdin=None, stdout=None, pretty: bool | None = None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin is sys.stdin and stdin.isatty()
    pretty = stdout.isatty() if pretty is None else pretty
    model, tokenizer = load_for_inference(cfg, cfg.model, cfg.tokenizer)
    max_len = model.config.max_position_embeddings
    stop_ids = tuple(t for t in (*tokenizer.stop_ids, getattr(tokenizer, "user_id", None)) if t is not None)
    draft = None
    if cfg.draft:
        draft, _ = load_for_inference(cfg, cfg.draft, cfg.tokenizer or cfg.model)
        if draft.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"draft={cfg.draft}: vocabulary {draft.config.vocab_size} differs from the model's "
                             f"{model.config.vocab_size}; a draft must share the model's tokenizer")
        max_len -= cfg.num_draft + 2  # a verify step writes up to num_draft + 1 slots past the reply
    sched = Scheduler(model, tokenizer, max_batch=1, max_len=max_len, queue_size=1, compile=cfg.compile)
    if interactive:
        print(f"sputnik chat: {cfg.model} (type /exit to quit)", file=sys.stderr)
    try:
        turn = 0
        while (line := _read_turn(stdin, interactive)) is not None:
            line = line.strip()
            if line in EXIT_COMMANDS:
                break
            if not line:
                continue
            prompt = tokenizer.render_prompt(line)
            room = max_len - len(prompt)
            if room < 1:
                print(f"sputnik chat: the message has {len(prompt)} tokens; the model's context is {max_len}",
                      file=sys.stderr)
                continue
            params = SamplingParams(max_new_tokens=min(cfg.max_tokens, room), temperature=cfg.temperature,
                                    top_k=cfg.top_k, top_p=cfg.top_p, stop_token_ids=stop_ids, seed=cfg.seed + turn)
            if draft is not None:
                result = _speculative_turn(model, draft, tokenizer, prompt, params, cfg.num_draft,
                                           Printer(stdout, pretty))
            else:
                req = sched.submit(prompt, params, on_token=Printer(stdout, pretty))
                try:
                    result = req.wait()
                except KeyboardInterrupt:  # stop this reply, keep the conversation going
                    req.cancel()
                    result = req.done.wait(5) and req.result
            stdout.write("\n")
            stdout.flush()
            if result and result.finish_reason in ("length", "cancelled"):
                note = "max_tokens reached" if result.finish_reason == "length" else "interrupted"
                print(f"[{note} after {result.completion_tokens} tokens]", file=sys.stderr)
            turn += 1
    finally:
        sched.close()
    return 0


def _speculative_turn(model, draft, tokenizer, prompt, params, num_draft, printer) -> Result:
    """One reply through draft-model speculative decoding, streamed as text deltas (the reply's text so
    far, less what was printed; a trailing stop token is not text)."""
    from sputnik.inference.speculative import draft_speculative_generate

    shown = [""]
    stops = set(params.stop_token_ids)

    def text_of(ids):
        return tokenizer.decode(ids[:-1] if ids and ids[-1] in stops else ids)

    def on_tokens(ids):
        text = text_of(ids)
        if text.endswith("\ufffd"):  # a character's bytes not all decoded yet: hold them back
            return
        printer(Delta(text[len(shown[0]):], []))
        shown[0] = text

    completion, _ = draft_speculative_generate(model, draft, prompt, params, num_draft, on_tokens)
    text = text_of(completion.token_ids)
    printer(Delta(text[len(shown[0]):], [], completion.finish_reason))
    return Result(text, completion.token_ids, completion.finish_reason, len(prompt))


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (streaming, think part dimmed)",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, ChatConfig)
    p.set_defaults(func=lambda args: run(config_from_args(args, ChatConfig)))
