"""Any Hugging Face chat template as a :class:`~tanuki.tokenizer.templates.ChatTemplate`: the assistant
spans come from the Jinja rendering itself, with no Python twin written per template.

``template=auto`` reads the model's own template (``chat_template.jinja``, which transformers 5 writes and
reads in preference, else ``chat_template`` in ``tokenizer_config.json``). When it is one of tanuki's
templates it resolves to that one by name (:data:`~tanuki.tokenizer.templates.TEMPLATES`); any other
template is rendered with transformers' own Jinja renderer (``render_jinja_template``, the function
``apply_chat_template`` calls, with the tokenizer's special tokens as variables), so the text trained on
is byte for byte what ``apply_chat_template`` gives at inference.

How the assistant spans are found. For the assistant message ``i`` of a conversation, render

* ``P``: the messages before it with the generation prompt (``add_generation_prompt=True``),
* ``F``: the messages up to and including it, without the generation prompt,
* ``R``: the whole conversation.

A template fit for training renders prefixes as prefixes: ``P`` is a prefix of ``F`` and ``F`` one of
``R`` (otherwise what the model sees at inference, ``P``, is not what it was trained on, or a later
turn rewrites an earlier one: a template that prints the number of turns first, one that moves the
system message to the last user turn, one that drops the reasoning of earlier turns). Then
``F[len(P):]`` is the assistant turn as the model generates it: the content (as written, or stripped
when the template trims it) and a tail of the template's own text. The span trained on is the content
plus the tail up to and including its last special token, the end-of-turn token (``<|im_end|>``,
``<|eot_id|>``, ``<|END_OF_TURN_TOKEN|>``, EOS): the token generation stops at. What follows it in the
tail, such as ChatML's ``\\n`` after ``<|im_end|>``, is masked: a model stopped at ``<|im_end|>`` never
generates it, and the template writes it again in front of the next turn, where it is prompt, not
answer (it is also where TRL's completion-only collators put the boundary). A DPO completion is
likewise content + end-of-turn token: the prompt with its generation prompt followed by the completion
is a prefix of the full rendering, and nothing after the end-of-turn token is scored.

A template that breaks one of these rules is refused, with the reason and the file it came from, when
the stage starts (:func:`resolve_template` renders probe conversations) and for any conversation of the
data that breaks it later (:class:`~tanuki.tokenizer.templates.TemplateError`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

from tanuki.config import ConfigError
from tanuki.tokenizer.templates import AUTO, TEMPLATES, ChatTemplate, Part, TemplateError, check_template_name

#: the probe conversations a template must render as prefixes (with and without a system message;
#: a template that refuses a system message is probed without one)
PROBES = (
    [{"role": "system", "content": "あなたは親切なアシスタントです。"},
     {"role": "user", "content": "日本の首都は？"}, {"role": "assistant", "content": "東京です。"},
     {"role": "user", "content": "人口は？"}, {"role": "assistant", "content": "約1400万人です。"}],
    [{"role": "user", "content": "日本の首都は？"}, {"role": "assistant", "content": "東京です。"},
     {"role": "user", "content": "人口は？"}, {"role": "assistant", "content": "約1400万人です。"}],
)


def read_chat_template(tokenizer_dir: str | Path) -> Optional[tuple[str, Path]]:
    """``(jinja, file)`` of the chat template of a tokenizer directory, or None when it has none.

    ``chat_template.jinja`` wins over ``tokenizer_config.json``'s ``chat_template``, as in transformers 5;
    a list of named templates (transformers' multi-template form) gives its ``default`` one.
    """
    directory = Path(tokenizer_dir)
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), jinja_file
    config_file = directory / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return (template, config_file) if isinstance(template, str) and template else None


def special_token_texts(tokenizer) -> tuple[str, ...]:
    """The texts the tokenizer reads as special tokens (its named ones and every added special token)."""
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    texts.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    return tuple(sorted((t for t in texts if t), key=len, reverse=True))


class TemplateRefused(TemplateError):
    """The template itself refused a conversation (its ``raise_exception``, e.g. roles that do not
    alternate): a property of the record, skipped and counted with ``data.on_error=skip``."""


class JinjaRenderer:
    """Renders a Jinja chat template as transformers does and splits the text into assistant and other
    parts (the ``parts`` of a :class:`ChatTemplate`; see the module docstring)."""

    def __init__(self, jinja: str, special_tokens: Mapping[str, object], control_texts: Sequence[str], source: str):
        self.jinja = jinja
        self.special_tokens = dict(special_tokens)
        self.control_texts = tuple(control_texts)
        self.source = source

    def text(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool, bos: str, eos: str) -> str:
        from jinja2.exceptions import TemplateError as JinjaError
        from transformers.utils.chat_template_utils import render_jinja_template

        kwargs = {**self.special_tokens, "bos_token": bos, "eos_token": eos}
        try:
            rendered, _ = render_jinja_template([list(messages)], chat_template=self.jinja,
                                                add_generation_prompt=add_generation_prompt, **kwargs)
        except JinjaError as e:
            raise TemplateRefused(f"the chat template of {self.source} refused the conversation: {e}") from None
        return rendered[0]

    def _refuse(self, why: str) -> TemplateError:
        return TemplateError(f"the chat template of {self.source} cannot be trained on: {why}")

    def parts(self, messages: Sequence[Mapping[str, str]], bos: str, eos: str, add_generation_prompt: bool) -> list[Part]:
        full = self.text(messages, add_generation_prompt, bos, eos)
        parts: list[Part] = []
        pos = 0
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            prompt = self.text(messages[:i], True, bos, eos)
            turn = self.text(messages[: i + 1], False, bos, eos)
            if not turn.startswith(prompt):
                raise self._refuse(
                    f"it does not render a conversation's prefixes as prefixes: the first {i} messages with the "
                    f"generation prompt ({prompt[-40:]!r} at the end) are not the start of the first {i + 1} messages "
                    "(what the model is prompted with must be how the assistant turn it is trained on starts)")
            if not full.startswith(turn):
                at = next((k for k in range(min(len(turn), len(full))) if turn[k] != full[k]), min(len(turn), len(full)))
                raise self._refuse(
                    f"it does not render a conversation's prefixes as prefixes: the first {i + 1} of {len(messages)} "
                    f"messages render differently from the start of the whole conversation (at character {at}: "
                    f"{turn[at:at + 40]!r} vs {full[at:at + 40]!r}), so a turn would be trained in a context the "
                    "model never sees at inference")
            start = len(prompt)
            body = turn[start:]
            content = m.get("content", "")
            if body.startswith(content):
                n = len(content)
            elif content.strip() and body.startswith(content.strip()):
                n = len(content.strip())  # the template trims the content (Llama 3: `message['content'] | trim`)
            else:
                raise self._refuse(f"assistant turn {i} does not start with its content right after the generation "
                                   f"prompt (it renders as {body[:60]!r})")
            tail = body[n:]
            end = max((tail.rfind(t) + len(t) for t in self.control_texts if t in tail), default=-1)
            if end < 0:
                raise self._refuse(f"assistant turn {i} ends without a special token ({tail!r} after the content): "
                                   "there is no end-of-turn token to train the model to stop on")
            parts += [(full[pos:start], False), (full[start:start + n + end], True)]
            pos = start + n + end
        parts.append((full[pos:], False))
        return parts


def template_from_jinja(jinja: str, tokenizer, source: str | Path) -> ChatTemplate:
    """A :class:`ChatTemplate` (named ``auto``) rendering ``jinja`` with ``tokenizer``'s special tokens.

    Checked here on :data:`PROBES`: a template that does not render prefixes as prefixes, has no
    generation prompt in front of the assistant content, or ends an assistant turn without a special
    token is a :class:`~tanuki.config.ConfigError` on key ``template`` naming ``source``.
    """
    source = str(source)
    renderer = JinjaRenderer(jinja, tokenizer.special_tokens_map, special_token_texts(tokenizer), source)
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    probed: list[tuple[str, list[Part]]] = []
    refused = []
    for probe in PROBES:
        try:
            probed.append((renderer.text(probe, False, bos, eos), renderer.parts(probe, bos, eos, False)))
        except TemplateRefused as e:
            refused.append(str(e))  # e.g. a template that raises on a system message: probe without one
        except TemplateError as e:
            raise ConfigError("template", str(e)) from None
    if not probed:
        raise ConfigError("template", refused[-1])
    text, parts = probed[-1]
    ends = {_end_of_turn(piece, renderer.control_texts) for piece, is_assistant in parts if is_assistant}
    if len(ends) != 1:
        raise ConfigError("template", f"the chat template of {source} ends assistant turns with different special "
                                      f"tokens ({sorted(ends)}); one end-of-turn token is needed")
    return ChatTemplate(name=AUTO, jinja=jinja, parts=renderer.parts, writes_bos=bool(bos) and text.startswith(bos),
                        end_of_turn=ends.pop(), source=source)


def _end_of_turn(span: str, control_texts: Sequence[str]) -> str:
    return next(t for t in control_texts if span.endswith(t))


def resolve_template(name: str, tokenizer_dir: str | Path, tokenizer=None, *, fallback: Optional[str] = None) -> ChatTemplate:
    """The template a fine-tuning stage trains with.

    ``name`` is one of tanuki's templates, or ``auto``: the tokenizer's own chat template (tanuki's by
    name when it is one of them, else :func:`template_from_jinja`); with no chat template, ``fallback``
    (a tanuki template name), else a :class:`~tanuki.config.ConfigError`. ``tokenizer`` (default: the
    one in ``tokenizer_dir``) supplies the special tokens the template renders.
    """
    check_template_name(name)
    if name != AUTO:
        return TEMPLATES[name]
    found = read_chat_template(tokenizer_dir)
    if found is None:
        if fallback is not None:
            return TEMPLATES[fallback]
        raise ConfigError("template", f"the tokenizer in {tokenizer_dir} has no chat template; name one: "
                                      f"template=<{'|'.join(TEMPLATES)}>")
    jinja, source = found
    for t in TEMPLATES.values():
        if jinja == t.jinja:
            return t
    if tokenizer is None:
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    return template_from_jinja(jinja, tokenizer, source)


def template_label(template: ChatTemplate) -> str:
    """How a run reports its template: tanuki's by name, a tokenizer's own by its file."""
    return template.name if template.source is None else f"{template.name} ({template.source})"
