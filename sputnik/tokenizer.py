"""Byte-level BPE tokenizer: training, loading, the chat format and SFT loss masks.

A thin wrapper over Hugging Face `tokenizers` so that the saved files load unchanged in
`transformers.PreTrainedTokenizerFast` (and therefore in vLLM, TRL, the hub). Three choices:

- Byte-level (GPT-2 style): every UTF-8 byte is in the base alphabet, so any Unicode string
  encodes without an unknown token and `decode(encode(x)) == x` exactly. No normaliser (NFC/NFKC
  would change the text) and no prefix space (it would add a byte that decode cannot remove).
- Digits are split one per token before the byte-level split. With merged digit chunks
  ("123" one token, "1234" two tokens split arbitrarily), the model must learn carrying across
  ever-changing chunk boundaries; per-digit tokens align place values and make arithmetic learnable
  by small models (Llama, DeepSeek-V3 and PaLM all do this; see also Nogueira et al. 2021).
  Digits go *before* ByteLevel: after byte-to-char mapping some bytes become chars like '²' that
  count as digits, which would split UTF-8 sequences of non-digit characters.
- The reasoning-format tokens (docs/CONTRACTS.md) are added special tokens, so they are always one
  id. They are matched *inside any text* given to `encode`: a prompt that contains the string
  "<|endoftext|>" gets the end-of-text id, like every HF tokenizer with added tokens. Callers that
  must treat untrusted text literally have to strip these strings first.

Chat format:  <|user|>{prompt}<|assistant|>{completion}<|endoftext|>
The loss mask is 1 on the completion tokens and the closing <|endoftext|> (the model must learn to
stop), 0 on <|user|>, the prompt and <|assistant|>.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from sputnik.common import atomic_write_json, atomic_write_text

PAD, EOT = "<|pad|>", "<|endoftext|>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
THINK, THINK_END, ANSWER, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"
# Order fixes the ids: pad=0 and eot=1 match ModelConfig's pad_token_id/eos_token_id defaults.
SPECIAL_TOKENS = (PAD, EOT, USER, ASSISTANT, THINK, THINK_END, ANSWER, ANSWER_END)
SPECIAL_ID_ATTRS = {  # attribute name -> token string
    "pad_id": PAD, "eot_id": EOT, "user_id": USER, "assistant_id": ASSISTANT,
    "think_id": THINK, "think_end_id": THINK_END, "answer_id": ANSWER, "answer_end_id": ANSWER_END,
}
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS))

# Jinja twin of Tokenizer.render_chat, stored in tokenizer_config.json for HF users. Multi-turn
# conversations repeat the pattern; roles other than user/assistant are refused.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}" + USER + "{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}" + ASSISTANT + "{{ message['content'] }}" + EOT +
    "{%- else -%}{{ raise_exception('sputnik chat format supports user and assistant roles only, got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)


class Tokenizer:
    """Sputnik's tokenizer interface (docs/CONTRACTS.md). Native tokenizers carry all eight special
    ids; adapted HF tokenizers (`from_pretrained_hf`) may have None for the ones they lack."""

    pad_id: int
    eot_id: int
    user_id: int | None
    assistant_id: int | None
    think_id: int | None
    think_end_id: int | None
    answer_id: int | None
    answer_end_id: int | None

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "<in-memory>"):
        self.backend = backend
        self.source = source
        ids = {attr: backend.token_to_id(tok) for attr, tok in SPECIAL_ID_ATTRS.items()}
        missing = [SPECIAL_ID_ATTRS[a] for a, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{source}: not a sputnik tokenizer (missing special tokens {missing}); "
                             "use Tokenizer.from_pretrained_hf for other Hugging Face tokenizers")
        for attr, i in ids.items():
            setattr(self, attr, i)
        self._init_vocab()

    def _init_vocab(self) -> None:
        # max id + 1, not len(vocab): some HF vocabularies have holes, and the model's embedding
        # table must cover the largest id.
        self.vocab_size = max(self.backend.get_vocab(with_added_tokens=True).values()) + 1
        self.special_ids = frozenset(t for t in (getattr(self, a) for a in SPECIAL_ID_ATTRS) if t is not None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, source={self.source!r})"

    # -----------------------------------------------------------------------------------------
    # Text <-> ids
    def encode(self, text: str) -> list[int]:
        """Ids of `text`; no BOS/EOS is inserted, but special-token strings in it become their ids."""
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:
            if isinstance(text, str):  # tokenizers says "must be str" for lone surrogates
                raise ValueError("text is not valid Unicode (lone surrogate code point?)") from None
            raise

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) gives the same ids without tracking character
        # offsets, which we never use: ~1.5x the rate of encode_batch (benchmarks/bench_corpus.py)
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list or 1-D tensor). Ids outside [0, vocab_size) raise ValueError:
        the backend would silently drop them (e.g. ids sampled from a padded model vocabulary)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the tokenizer vocabulary [0, {self.vocab_size})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def digit_ids(self) -> list[int]:
        """Token ids of 0-9, for Abacus positions: each digit must be one token wherever it appears
        (checked on a long number, where a merging tokenizer would show its chunks)."""
        ids = [self.encode(str(d)) for d in range(10)]
        probe = "31415926535897932384"
        if any(len(i) != 1 for i in ids) or self.encode(probe) != [ids[int(c)][0] for c in probe]:
            raise ValueError(f"{self.source}: the tokenizer does not write each digit as one token, as Abacus positions "
                             "need (`sputnik tokenizer train` splits digits)")
        return [i[0] for i in ids]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end a completion: the end-of-turn token (and, for an adapted HF tokenizer, every
        eos id its checkpoint's generation_config.json lists, as Llama 3 and Qwen chat models have)."""
        return (self.eot_id,)

    # -----------------------------------------------------------------------------------------
    # Chat format
    def render_prompt(self, prompt: str) -> list[int]:
        """<|user|>{prompt}<|assistant|> — what the model sees before it writes <think>."""
        return [self.user_id, *self.encode(prompt), self.assistant_id]

    def render_chat(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of render_prompt(prompt) + encode(completion) + [eot]; the mask is 1 on
        the completion and the closing eot. The prompt ids equal render_prompt's exactly, so the
        model is trained on the same prefix it is later prompted with."""
        prompt_ids = self.render_prompt(prompt)
        completion_ids = [*self.encode(completion), self.eot_id]
        return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)

    # -----------------------------------------------------------------------------------------
    # Files
    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json + tokenizer_config.json (loadable by PreTrainedTokenizerFast)."""
        directory = Path(directory)
        atomic_write_text(directory / "tokenizer.json", self.backend.to_str(pretty=True))
        atomic_write_json(directory / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": EOT,  # eot doubles as BOS: every document follows an eot in packed data
            "eos_token": EOT,
            "pad_token": PAD,
            "additional_special_tokens": [USER, ASSISTANT, THINK, THINK_END, ANSWER, ANSWER_END],
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,  # HF's cleanup edits text; round trip must be exact
        })
        return directory

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a sputnik tokenizer from a directory holding tokenizer.json, or from the file."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"tokenizer file {file} does not exist")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exception on bad JSON
            raise ValueError(f"tokenizer file {file} is not a valid tokenizer.json: {e}") from None
        return cls(backend, source=str(file))

    @classmethod
    def load_any(cls, path: str | Path) -> Tokenizer:
        """Ours (a tokenizer.json with sputnik's special tokens), else any local Hugging Face fast
        tokenizer (from_pretrained_hf)."""
        try:
            return cls.load(path)
        except ValueError as e:
            if "not a sputnik tokenizer" in str(e):
                return cls.from_pretrained_hf(path)
            raise

    @staticmethod
    def from_pretrained_hf(path: str | Path) -> Tokenizer:
        """Adapt a local Hugging Face tokenizer (AutoTokenizer, fast) to this interface, so HF
        models can serve as policy, teacher or student. See HFTokenizer for the differences."""
        path = Path(path)
        if not path.exists():
            raise ValueError(f"Hugging Face tokenizer path {path} does not exist")
        from transformers import AutoTokenizer  # heavy import, only on this path

        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:
            raise ValueError(f"cannot load a Hugging Face tokenizer from {path}: {e}") from None
        if not getattr(hf, "is_fast", False):
            raise ValueError(f"{path}: only fast (tokenizer.json-backed) HF tokenizers are supported")
        return HFTokenizer(hf, source=str(path))


def _generation_eos_ids(source: str) -> list[int]:
    """eos_token_id (an int or a list) of generation_config.json beside a tokenizer, if there is one."""
    path = Path(source)
    path = path if path.is_dir() else path.parent
    try:
        eos = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    eos = eos if isinstance(eos, list) else [eos]
    return [i for i in eos if isinstance(i, int)]


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer behind the sputnik interface.

    - eot_id is the HF eos token (the stop token; required), pad_id the pad token or eos.
    - The other special ids are the ids of those exact strings when the tokenizer has them as added
      tokens (Qwen3 and R1-distills have <think>), else None: the reasoning tags are then plain text,
      which still works because verifiers parse decoded text, not ids.
    - render_prompt uses the tokenizer's own chat template (with the generation prompt) when it has
      one, else our format as plain text. render_chat appends encode(completion) + [eos]: the exact
      sequence the model generates, independent of how the template would re-render an assistant turn.
    """

    def __init__(self, hf, source: str = "<in-memory>"):
        self.hf = hf
        self.backend = hf.backend_tokenizer
        self.source = source
        if hf.eos_token_id is None:
            raise ValueError(f"{source}: the Hugging Face tokenizer has no eos_token (needed as the stop token)")
        added = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items()}
        for attr, tok in SPECIAL_ID_ATTRS.items():
            setattr(self, attr, added.get(tok))
        self.eot_id = hf.eos_token_id
        self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
        self._init_vocab()
        self._stop_ids = (self.eot_id, *(i for i in _generation_eos_ids(source) if i != self.eot_id and
                                         0 <= i < self.vocab_size))

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self._stop_ids

    def render_prompt(self, prompt: str) -> list[int]:
        if self.hf.chat_template:
            text = self.hf.apply_chat_template([{"role": "user", "content": prompt}],
                                               add_generation_prompt=True, tokenize=False)
        else:
            text = f"{USER}{prompt}{ASSISTANT}"
        return self.encode(text)

    def save(self, directory: str | Path) -> Path:
        self.hf.save_pretrained(str(directory))
        return Path(directory)


# ---------------------------------------------------------------------------------------------
# Training
def new_backend() -> tokenizers.Tokenizer:
    """An untrained byte-level BPE pipeline: per-digit split, then GPT-2 byte-level regex split."""
    tk = tokenizers.Tokenizer(models.BPE())  # no unk token: the byte alphabet covers every input
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    return tk


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE on `texts`. `vocab_size` counts the 256 byte tokens and the special
    tokens and is an upper bound: a small corpus can run out of pairs seen >= min_frequency times."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size}: must be >= {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency}: must be >= 1")
    backend = new_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    num_texts = 0

    def pieces():
        # The trainer does not match added tokens in its input, so rendered chats would teach it
        # merges like "<|endoft"; cut the special strings out and train on the text between them.
        nonlocal num_texts
        for text in texts:
            num_texts += 1
            yield from (p for p in _SPECIAL_RE.split(text) if p)

    backend.train_from_iterator(pieces(), trainer=trainer)
    if num_texts == 0:
        raise ValueError("train_tokenizer: no training texts")
    return Tokenizer(backend, source="<trained>")


def bytes_per_token(tokenizer: Tokenizer, texts: Sequence[str]) -> float:
    """Compression: UTF-8 bytes / tokens over `texts` (higher = fewer tokens per byte)."""
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    num_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    if num_tokens == 0:
        raise ValueError("bytes_per_token: the texts are empty")
    return num_bytes / num_tokens
