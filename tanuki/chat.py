"""Chat with an exported model: a quick look at what training made (``launch/chat.py``).

A :class:`ChatSession` holds a conversation. Each :meth:`ChatSession.reply` renders the whole history
plus the new user turn with the model's own chat template, exactly as transformers does
(``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``: the rendered text tokenized
without adding special tokens, the template writes BOS itself where it wants one), continues it with
:func:`tanuki.generate.generate` (KV cache, greedy or temperature / top-p sampling, stop at EOS) and
appends the decoded reply to the history, so the next turn is rendered over the full conversation.

Streaming: :class:`StreamDecoder` turns the new token ids into text pieces as they come. A byte-fallback
tokenizer spells a character it has no piece for as its UTF-8 bytes, one token each, so one token may
be half a character, and the bytes are decoded run by run (a run that is not valid UTF-8 becomes one
U+FFFD per byte, so a later byte can change how the earlier ones decode). The decoder decodes the
reply up to the last token that cannot change any more (before a trailing run of byte tokens) and
hands out the new suffix: no piece splits a character, and the pieces concatenate to exactly
``tokenizer.decode(reply_ids, skip_special_tokens=True)``, the text transformers users see. This
relies on decoding being prefix-stable outside byte runs, as SentencePiece-style decoders are
(``▁`` -> space, fuse, strip one leading space).

Command-line text: Hydra's override grammar takes no unquoted non-ASCII text (``prompt=こんにちは`` is a
lexer error), so :func:`quote_text_overrides` quotes the ``prompt=`` and ``system=`` arguments before
Hydra parses them; the text arrives verbatim, commas, quotes and ``${`` included.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional, Sequence

import torch

import tanuki.generate  # generate() is looked up when called: tests spy on it
from tanuki.config import ConfigError
from tanuki.hf import import_hf, read_hf_config
from tanuki.tokenizer import load
from tanuki.tokenizer.templates import TEMPLATES, ChatTemplate, get_template

#: what an incomplete UTF-8 sequence decodes to
REPLACEMENT_CHAR = "\ufffd"


class ChatError(ValueError):
    """A model that cannot be chatted with as asked (no chat template, conversation too long)."""


@dataclass(frozen=True)
class ChatConfig:
    """``python launch/chat.py model=<HF dir>``: see conf/chat.yaml."""

    #: a Hugging Face model directory (config.json, safetensors, tokenizer files), e.g. an SFT export
    model: str
    #: one-shot: print the reply to this user message and exit; null: interactive
    prompt: Optional[str] = None
    #: an optional system message at the start of the conversation
    system: Optional[str] = None
    #: one of tanuki's templates (alpaca_ja, llmjp, tulu) instead of the tokenizer's own chat template
    template: Optional[str] = None
    #: the most tokens of one reply (fewer when the model's context fills up)
    max_new_tokens: int = 256
    #: 0 = greedy; otherwise logits are divided by it before sampling
    temperature: float = 0.0
    #: nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = all)
    top_p: float = 1.0
    #: seed of the sampling (reply i of the session uses seed + i); null = not reproducible
    seed: Optional[int] = None
    #: auto = cuda if available, else cpu; or cpu, cuda, cuda:1, ...
    device: str = "auto"
    #: auto = bfloat16 on CUDA, float32 on CPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ConfigError("model", "must name a Hugging Face model directory")
        if self.template is not None:
            get_template(self.template)  # ConfigError naming the valid templates
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens", f"must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError("temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ConfigError("device", f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)


#: a byte-fallback piece: SentencePiece spells a character it has no piece for as its UTF-8 bytes
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def byte_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's byte-fallback pieces (``<0x00>`` ... ``<0xFF>``); empty for other tokenizers."""
    return frozenset(i for piece, i in tokenizer.get_vocab().items() if _BYTE_PIECE.fullmatch(piece))


class StreamDecoder:
    """Incremental detokenizer: :meth:`add` a token id, get the text it settles (possibly "").

    Text is handed out only once no later token can change it:

    * A run of byte-fallback tokens is decoded as a whole (the ``ByteFallback`` decoder of
      ``tokenizers``): valid UTF-8 gives its characters, anything else one U+FFFD per byte, so a
      further byte can still turn a complete "あ" into four U+FFFD. The run is therefore held until a
      token that is not a byte ends it (or :meth:`finish`); the text before it is settled.
    * Byte-level BPE tokenizers (no byte pieces) decode the bytes so far, an incomplete character at
      the end as U+FFFD: text ending in U+FFFD is held until the character completes.

    The pieces concatenate to ``tokenizer.decode(ids, skip_special_tokens=True)``.
    """

    def __init__(self, tokenizer, byte_ids: Optional[frozenset[int]] = None):
        self.tokenizer = tokenizer
        self.byte_ids = byte_token_ids(tokenizer) if byte_ids is None else byte_ids
        self.ids: list[int] = []
        #: the text handed out so far
        self.emitted = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _release(self, text: str) -> str:
        if not text.startswith(self.emitted):
            # decoding more tokens rewrote earlier text (a decoder this module does not know): hand
            # out nothing until it agrees again, so that no piece has to be taken back
            return ""
        piece = text[len(self.emitted):]
        self.emitted = text
        return piece

    def add(self, token_id: int) -> str:
        """Take one new id; return the text it settles."""
        self.ids.append(int(token_id))
        settled = len(self.ids)
        while settled > 0 and self.ids[settled - 1] in self.byte_ids:
            settled -= 1
        text = self._decode(self.ids[:settled])
        if text.endswith(REPLACEMENT_CHAR) and not self.byte_ids:
            return ""
        return self._release(text)

    def finish(self) -> str:
        """The rest, at the end of generation (a character cut off mid-way decodes to U+FFFD)."""
        return self._release(self._decode(self.ids))


def decode_stream(tokenizer, ids: Sequence[int]) -> list[str]:
    """The non-empty text pieces :class:`StreamDecoder` hands out for ``ids``, the final flush included."""
    dec = StreamDecoder(tokenizer)
    pieces = [dec.add(i) for i in ids]
    pieces.append(dec.finish())
    return [p for p in pieces if p]


#: the options whose value is free text (a message), quoted for Hydra by quote_text_overrides
TEXT_KEYS = ("prompt", "system")


def hydra_quote(text: str) -> str:
    """``text`` as a quoted Hydra override value that Hydra and OmegaConf read back verbatim.

    Inside quotes Hydra un-escapes ``\\'`` and backslashes right before a quote or the end, and
    OmegaConf resolves ``${...}`` unless written ``\\${...}``; backslashes before such a spot are
    doubled, everything else is left as it is.
    """
    def escape(m: re.Match) -> str:
        return m.group(1) * 2 + {"'": "\\'", "${": "\\${", "": ""}[m.group(2)]

    return "'" + re.sub(r"(\\*)('|\$\{|$)", escape, text) + "'"


def quote_text_overrides(args: Sequence[str], keys: Sequence[str] = TEXT_KEYS) -> list[str]:
    """Command-line arguments with every ``key=<text>`` for ``key`` in ``keys`` quoted for Hydra,
    so that ``prompt=日本の首都は?`` or ``prompt=a, b`` mean that text. A value already in matching
    quotes (``'prompt="a, b"'``) is left to Hydra."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        if eq and key in keys and not quoted:
            arg = f"{key}={hydra_quote(value)}"
        out.append(arg)
    return out


def eos_token_ids(tokenizer, model_dir: Optional[str | os.PathLike] = None) -> list[int]:
    """Ids that end a reply: the tokenizer's EOS and the ``eos_token_id`` of the model's
    ``generation_config.json`` (an int or a list), as transformers' ``generate`` stops at the latter."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if model_dir is not None:
        path = Path(model_dir) / "generation_config.json"
        if path.is_file():
            try:
                eos = json.loads(path.read_text()).get("eos_token_id")
            except (OSError, ValueError):
                eos = None
            for i in [eos] if isinstance(eos, int) else (eos or []):
                if int(i) not in ids:
                    ids.append(int(i))
    return ids


def chat_template_override(tokenizer, template: Optional[str | ChatTemplate]) -> Optional[str]:
    """The Jinja of ``template`` (a name or a :class:`ChatTemplate`), or None to use the tokenizer's own
    chat template; a :class:`ChatError` that says what to do when there is neither."""
    if isinstance(template, str):
        template = get_template(template)
    if template is not None:
        return template.jinja
    if not getattr(tokenizer, "chat_template", None):
        raise ChatError(
            f"{getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}: the tokenizer has no chat template "
            "(no chat_template in tokenizer_config.json, no chat_template.jinja); pass template=<name> with "
            f"one of tanuki's templates ({', '.join(TEMPLATES)})"
        )
    return None


class ChatSession:
    """A conversation with a model: the history, and how to render and continue it.

    ``template`` (a name or a :class:`ChatTemplate`) replaces the tokenizer's own ``chat_template``;
    without one the tokenizer must carry a chat template (:class:`ChatError` otherwise).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        template: Optional[str | ChatTemplate] = None,
        system: Optional[str] = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: Optional[int] = None,
        eos_token_id: Optional[int | Sequence[int]] = None,
    ):
        #: the Jinja template passed to apply_chat_template (None: the tokenizer's own)
        self.chat_template = chat_template_override(tokenizer, template)
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        if eos_token_id is None:
            eos_token_id = eos_token_ids(tokenizer)
        self.eos_token_id = eos_token_id
        self.byte_ids = byte_token_ids(tokenizer)
        #: the user and assistant turns so far (the system message is added when rendering)
        self.history: list[dict[str, str]] = []
        #: replies generated by this session (the seed of reply i is seed + i)
        self.replies = 0

    @classmethod
    def from_config(cls, cfg: ChatConfig) -> "ChatSession":
        """Load the model directory of ``cfg`` (tokenizer and template checked before the weights)."""
        if not Path(cfg.model).exists():
            raise FileNotFoundError(f"model={cfg.model}: no such directory (expected a Hugging Face model directory)")
        read_hf_config(cfg.model)  # HFFormatError for a file, or a directory without config.json
        tokenizer = load(cfg.model)
        chat_template_override(tokenizer, cfg.template)  # before loading weights: fail fast
        device = cfg.resolved_device()
        model = import_hf(cfg.model, device=device, dtype=cfg.resolved_dtype(device)).eval()
        return cls(
            model,
            tokenizer,
            template=cfg.template,
            system=cfg.system,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=cfg.seed,
            eos_token_id=eos_token_ids(tokenizer, cfg.model),
        )

    def messages(self, user_text: Optional[str] = None) -> list[dict[str, str]]:
        """The conversation to render: system message, history, and ``user_text`` as the next turn."""
        out = [{"role": "system", "content": self.system}] if self.system is not None else []
        out += self.history
        if user_text is not None:
            out.append({"role": "user", "content": user_text})
        return out

    def prompt_ids(self, user_text: str) -> list[int]:
        """The token ids the model continues for the reply to ``user_text``."""
        enc = self.tokenizer.apply_chat_template(
            self.messages(user_text), chat_template=self.chat_template, add_generation_prompt=True,
            tokenize=True, return_dict=True,
        )
        return list(enc["input_ids"])

    def reply(self, user_text: str, on_text: Optional[Callable[[str], None]] = None) -> str:
        """Generate the reply to ``user_text``, add both turns to the history and return the reply.

        ``on_text`` receives the reply in pieces as it is generated (never half a character); the
        pieces concatenate to the returned text.
        """
        prompt = self.prompt_ids(user_text)
        limit = self.model.cfg.max_seq_len
        if len(prompt) >= limit:
            raise ChatError(
                f"the conversation is {len(prompt)} tokens, the model's context is {limit}: "
                "start over (/reset) or write a shorter message"
            )
        decoder = StreamDecoder(self.tokenizer, self.byte_ids)

        def on_token(token_id: int) -> None:
            piece = decoder.add(token_id)
            if piece and on_text is not None:
                on_text(piece)

        tanuki.generate.generate(
            self.model,
            prompt,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            eos_token_id=self.eos_token_id,
            vocab_limit=min(len(self.tokenizer), self.model.cfg.vocab_size),
            seed=None if self.seed is None else self.seed + self.replies,
            on_token=on_token,
        )
        rest = decoder.finish()
        if rest and on_text is not None:
            on_text(rest)
        self.replies += 1
        text = decoder.emitted
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        return text

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.history.clear()


def run_repl(
    session: ChatSession,
    lines: Iterator[str],
    write: Callable[[str], None],
    note: Callable[[str], None] = lambda text: None,
) -> None:
    """Read user turns from ``lines`` (e.g. stdin's lines) until ``/exit`` or their end.

    Each reply is streamed through ``write`` and ends with a newline; ``/reset`` clears the history.
    Messages to the user (history cleared, a reply interrupted with Ctrl-C and dropped from the
    history, a conversation too long for the context) go to ``note``.
    """
    for line in lines:
        text = line.rstrip("\r\n")
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            note("(history cleared)")
            continue
        try:
            session.reply(text, on_text=write)
        except KeyboardInterrupt:
            write("\n")
            note("(interrupted; the reply is not kept)")
            continue
        except ChatError as e:
            note(f"error: {e}")
            continue
        write("\n")


def summary(cfg: ChatConfig, session: ChatSession) -> str:
    """One line about what is loaded, for the start of a session."""
    model = session.model
    p = next(model.parameters())
    template = cfg.template or "the tokenizer's chat template"
    return f"{cfg.model}: {model.cfg.n_layers} layers, dim {model.cfg.dim}, on {p.device} in {str(p.dtype).removeprefix('torch.')}; {template}"

