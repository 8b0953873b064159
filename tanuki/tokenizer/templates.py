"""Chat templates: the Jinja ``chat_template`` written into ``tokenizer_config.json``, and the same
format as a Python renderer that also says which characters are the assistant's.

Each :class:`ChatTemplate` carries both. The Jinja string is what transformers' ``apply_chat_template``
renders at inference; :meth:`ChatTemplate.render` gives the identical text (the tests compare them for
every template) plus the character span of every assistant content + EOS, the part that gets the SFT
loss. Masks come from these spans, never from searching token ids for a response marker (see
``chat-templates.md``: a marker tokenizes differently in context).

Hugging Face renders ``chat_template`` with Jinja's ``trim_blocks=True, lstrip_blocks=True``, which
would eat a newline written right after a ``{% ... %}`` tag. The templates therefore emit every
newline from a string expression (``{{ '\\n\\n### 指示:\\n' }}``), never as literal template text.

Templates (:data:`TEMPLATES`, looked up with :func:`get_template`):

* ``alpaca_ja``: Japanese Alpaca, the format of llm-jp-3 instruct and Tanuki-8B.
* ``llmjp``: the same template under llm-jp's name (an alias: the published llm-jp-3 instruct format
  *is* Japanese Alpaca).
* ``tulu``: allenai open-instruct's Tulu format.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

from tanuki.config import ConfigError

#: The fixed system sentence of the Japanese Alpaca format (llm-jp-3 instruct, Tanuki-8B).
JAPANESE_ALPACA_SYSTEM = "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。"

#: The system sentence of the Japanese Alpaca variant whose instruction comes with an input (context)
#: block, as Japanese evaluation harnesses prompt: "...指示と、文脈のある入力の組み合わせです。..."
JAPANESE_ALPACA_INPUT_SYSTEM = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"

#: The header of the input block inside a user turn (Alpaca records with a non-empty ``input``).
JAPANESE_ALPACA_INPUT_HEADER = "\n\n### 入力:\n"

_UNKNOWN_ROLE = "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"

#: Japanese Alpaca (llm-jp-3 instruct; Tanuki-8B uses the same prompt format):
#:   BOS, then the fixed system sentence if there is a system message, each user turn as
#:   "\n\n### 指示:\n" + content, each assistant turn as "\n\n### 応答:\n" + content + EOS, and
#:   "\n\n### 応答:\n" as the generation prompt.
#: The system message's content is ignored, as in llm-jp-3, with one exception: a system message
#: whose content is exactly :data:`JAPANESE_ALPACA_INPUT_SYSTEM` writes that sentence, so that an
#: instruction with an input block renders exactly as the evaluation harnesses' variant. Any other
#: conversation of system/user/assistant messages renders byte for byte as llm-jp-3's template.
JAPANESE_ALPACA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] == '" + JAPANESE_ALPACA_INPUT_SYSTEM + "' %}"
    "{{ '" + JAPANESE_ALPACA_INPUT_SYSTEM + "' }}"
    "{% else %}"
    "{{ '" + JAPANESE_ALPACA_SYSTEM + "' }}"
    "{% endif %}"
    "{% elif message['role'] == 'user' %}"
    "{{ '\\n\\n### 指示:\\n' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '\\n\\n### 応答:\\n' + message['content'] + eos_token }}"
    "{% else %}"
    + _UNKNOWN_ROLE +
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '\\n\\n### 応答:\\n' }}"
    "{% endif %}"
)

#: Tulu (allenai open-instruct): no BOS; "<|system|>\n" + content + "\n", "<|user|>\n" + content + "\n",
#: "<|assistant|>\n" + content + EOS (+ "\n" unless it is the last message); generation prompt
#: "<|assistant|>\n" after the last message.
TULU_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% else %}"
    + _UNKNOWN_ROLE +
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}"
    "{{ '<|assistant|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
)

#: the template a freshly built tokenizer carries
DEFAULT_CHAT_TEMPLATE = JAPANESE_ALPACA_TEMPLATE

ROLES = ("system", "user", "assistant")


class TemplateError(ValueError):
    """A conversation the template cannot render (an unknown role)."""


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation: the text, and the ``[start, end)`` character span of each assistant
    turn's content + EOS (the only text that gets the SFT loss), in order."""

    text: str
    assistant_spans: tuple[tuple[int, int], ...]


#: (text, is the assistant's content or EOS)
Part = tuple[str, bool]


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format as Jinja (for ``tokenizer_config.json``) and as a Python renderer."""

    name: str
    #: the ``chat_template`` string; rendered by transformers' ``apply_chat_template``
    jinja: str
    #: ``(messages, bos_token, eos_token, add_generation_prompt) -> parts``; use :meth:`render`
    parts: Callable[[Sequence[Mapping[str, str]], str, str, bool], list[Part]]
    #: whether the template writes BOS itself (tokenize its text with ``add_special_tokens=False``)
    writes_bos: bool
    #: the special token that ends an assistant turn (the last target of each turn); None: the EOS
    end_of_turn: Optional[str] = None
    #: where the Jinja came from (a template read from a tokenizer directory); None: tanuki's own
    source: Optional[str] = None

    def render(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        bos_token: str,
        eos_token: str,
        add_generation_prompt: bool = False,
    ) -> Rendered:
        """The text ``apply_chat_template(messages, tokenize=False)`` gives with :attr:`jinja`, and the
        character spans of the assistant contents + EOS within it."""
        text: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for piece, is_assistant in self.parts(messages, bos_token, eos_token, add_generation_prompt):
            if is_assistant and piece:
                if spans and spans[-1][1] == pos:  # content and EOS form one span
                    spans[-1] = (spans[-1][0], pos + len(piece))
                else:
                    spans.append((pos, pos + len(piece)))
            text.append(piece)
            pos += len(piece)
        return Rendered("".join(text), tuple(spans))


def _role(message: Mapping[str, str]) -> str:
    role = message.get("role")
    if role not in ROLES:
        raise TemplateError(f"unknown role {role}: use system, user or assistant")
    return role


def _alpaca_ja_parts(messages, bos: str, eos: str, add_generation_prompt: bool) -> list[Part]:
    parts: list[Part] = [(bos, False)]
    for m in messages:
        role = _role(m)
        if role == "system":
            keep = m["content"] == JAPANESE_ALPACA_INPUT_SYSTEM
            parts.append((JAPANESE_ALPACA_INPUT_SYSTEM if keep else JAPANESE_ALPACA_SYSTEM, False))
        elif role == "user":
            parts.append(("\n\n### 指示:\n" + m["content"], False))
        else:
            parts += [("\n\n### 応答:\n", False), (m["content"], True), (eos, True)]
    if add_generation_prompt:
        parts.append(("\n\n### 応答:\n", False))
    return parts


def _tulu_parts(messages, bos: str, eos: str, add_generation_prompt: bool) -> list[Part]:
    parts: list[Part] = []
    for i, m in enumerate(messages):
        role = _role(m)
        last = i == len(messages) - 1
        if role == "system":
            parts.append(("<|system|>\n" + m["content"] + "\n", False))
        elif role == "user":
            parts.append(("<|user|>\n" + m["content"] + "\n", False))
        else:
            parts += [("<|assistant|>\n", False), (m["content"], True), (eos, True)]
            if not last:
                parts.append(("\n", False))
        if last and add_generation_prompt:
            parts.append(("<|assistant|>\n", False))
    return parts


_ALPACA_JA = ChatTemplate("alpaca_ja", JAPANESE_ALPACA_TEMPLATE, _alpaca_ja_parts, writes_bos=True)

#: Every template by name. ``llmjp`` is ``alpaca_ja`` under llm-jp's name: the llm-jp-3 instruct
#: template is the Japanese Alpaca format (``chat-templates.md``), so it is the same object.
TEMPLATES: dict[str, ChatTemplate] = {
    "alpaca_ja": _ALPACA_JA,
    "llmjp": _ALPACA_JA,
    "tulu": ChatTemplate("tulu", TULU_TEMPLATE, _tulu_parts, writes_bos=False),
}


#: the ``template`` value that selects the tokenizer's own chat template (:mod:`tanuki.tokenizer.jinja_template`)
AUTO = "auto"


def check_template_name(name: str) -> None:
    """A :class:`~tanuki.config.ConfigError` on key ``template`` unless ``name`` is ``auto`` or one of
    :data:`TEMPLATES` (the check a config makes before any file is read)."""
    if name != AUTO and name not in TEMPLATES:
        raise ConfigError("template", f"unknown chat template {name!r}; valid: {AUTO} (the model's own chat template), "
                                      f"{', '.join(TEMPLATES)}")


def get_template(name: str) -> ChatTemplate:
    """The template called ``name``; a :class:`~tanuki.config.ConfigError` on key ``template`` names the
    valid ones otherwise."""
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        raise ConfigError("template", f"unknown chat template {name!r}; valid: {', '.join(TEMPLATES)}") from None


def write_chat_template(tokenizer_dir: str | os.PathLike, name: str) -> None:
    """Make the template ``name`` the chat template of the tokenizer in ``tokenizer_dir``.

    Sets ``chat_template`` in ``tokenizer_config.json``; a ``chat_template.jinja`` beside it (what
    transformers' ``save_pretrained`` writes, and what it reads in preference) is rewritten too.
    """
    template = get_template(name)
    directory = os.fspath(tokenizer_dir)
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["chat_template"] = template.jinja
    _replace(path, json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja_file):
        _replace(jinja_file, template.jinja)


def _replace(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)
