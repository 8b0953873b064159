"""Chat templates. Oracles: transformers' ``apply_chat_template`` rendering the same Jinja string, and
the literal examples of ``../shared/reference/chat-templates.md``."""

import itertools
import json
import shutil

import pytest

from tanuki.config import ConfigError
from tanuki.data.records import alpaca_to_messages
from tanuki.tokenizer import load
from tanuki.tokenizer.templates import (
    JAPANESE_ALPACA_SYSTEM,
    TEMPLATES,
    TemplateError,
    get_template,
    write_chat_template,
)

SYSTEM = {"role": "system", "content": "あなたは親切なアシスタントです。"}
TURNS = [
    {"role": "user", "content": "日本の首都は？"},
    {"role": "assistant", "content": "東京です。"},
    {"role": "user", "content": "Population?\nOne line, please."},
    {"role": "assistant", "content": "About 14 million.\n約1400万人です。"},
]
# single- and multi-turn, with and without a system message, ending with a user or an assistant turn
CONVERSATIONS = [prefix + TURNS[:n] for prefix in ([], [SYSTEM]) for n in (1, 2, 3, 4)]


@pytest.fixture(scope="module")
def tok(tiny_corpus):
    return load(tiny_corpus["tokenizer"])


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_rendering_equals_apply_chat_template(tok, name):
    template = TEMPLATES[name]
    for messages, gen in itertools.product(CONVERSATIONS, (False, True)):
        expected = tok.apply_chat_template(messages, chat_template=template.jinja, tokenize=False,
                                           add_generation_prompt=gen)
        rendered = template.render(messages, bos_token=tok.bos_token, eos_token=tok.eos_token, add_generation_prompt=gen)
        assert rendered.text == expected, (messages, gen)
        # the spans are exactly each assistant content + EOS, in order
        contents = [m["content"] + tok.eos_token for m in messages if m["role"] == "assistant"]
        assert [rendered.text[a:b] for a, b in rendered.assistant_spans] == contents


def test_reference_examples():
    alpaca, tulu = TEMPLATES["alpaca_ja"], TEMPLATES["tulu"]
    msgs = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "日本の首都は？"}]
    assert alpaca.render(msgs, bos_token="<s>", eos_token="</s>", add_generation_prompt=True).text == (
        f"<s>{JAPANESE_ALPACA_SYSTEM}\n\n### 指示:\n日本の首都は？\n\n### 応答:\n")
    msgs += [{"role": "assistant", "content": "東京です。"}, {"role": "user", "content": "人口は？"}]
    assert alpaca.render(msgs, bos_token="<s>", eos_token="</s>", add_generation_prompt=True).text == (
        f"<s>{JAPANESE_ALPACA_SYSTEM}\n\n### 指示:\n日本の首都は？\n\n### 応答:\n東京です。</s>\n\n### 指示:\n人口は？\n\n### 応答:\n")
    msgs[0] = {"role": "system", "content": "…"}
    assert tulu.render(msgs, bos_token="<s>", eos_token="</s>", add_generation_prompt=True).text == (
        "<|system|>\n…\n<|user|>\n日本の首都は？\n<|assistant|>\n東京です。</s>\n<|user|>\n人口は？\n<|assistant|>\n")
    # the input variant used by Japanese evaluation harnesses, from an Alpaca record with an input
    msgs = alpaca_to_messages("要約してください。", "たぬきは夜に森から出てくる。")
    assert alpaca.render(msgs, bos_token="<s>", eos_token="</s>", add_generation_prompt=True).text == (
        "<s>以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
        "\n\n### 指示:\n要約してください。\n\n### 入力:\nたぬきは夜に森から出てくる。\n\n### 応答:\n")


def test_input_variant_renders_the_same_in_transformers(tok):
    msgs = alpaca_to_messages("要約してください。", "たぬきは夜に森から出てくる。", "たぬきは夜に出てくる。")
    for name, template in TEMPLATES.items():
        assert template.render(msgs, bos_token=tok.bos_token, eos_token=tok.eos_token).text == tok.apply_chat_template(
            msgs, chat_template=template.jinja, tokenize=False), name


def test_llmjp_is_the_japanese_alpaca_template():
    assert get_template("llmjp") is get_template("alpaca_ja")


def test_unknown_template_names_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown chat template 'chatml'; valid: alpaca_ja, llmjp, tulu") as e:
        get_template("chatml")
    assert e.value.key == "template"


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_unknown_role_is_an_error_in_both_renderers(tok, name):
    msgs = [{"role": "tool", "content": "x"}]
    with pytest.raises(TemplateError, match="unknown role tool"):
        TEMPLATES[name].render(msgs, bos_token="<s>", eos_token="</s>")
    with pytest.raises(Exception, match="unknown role tool"):
        tok.apply_chat_template(msgs, chat_template=TEMPLATES[name].jinja, tokenize=False)


def test_write_chat_template_is_what_transformers_loads(tiny_corpus, tmp_path):
    from transformers import AutoTokenizer

    directory = tmp_path / "tok"
    shutil.copytree(tiny_corpus["tokenizer"], directory)
    msgs = CONVERSATIONS[-1]
    for name in ("tulu", "alpaca_ja"):
        write_chat_template(directory, name)
        assert json.loads((directory / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATES[name].jinja
        tok = AutoTokenizer.from_pretrained(str(directory))
        assert tok.apply_chat_template(msgs, tokenize=False) == TEMPLATES[name].render(
            msgs, bos_token=tok.bos_token, eos_token=tok.eos_token).text
    # a chat_template.jinja (what save_pretrained writes, and what transformers prefers) is rewritten too
    tok.save_pretrained(str(directory))
    assert (directory / "chat_template.jinja").exists()
    write_chat_template(directory, "tulu")
    assert AutoTokenizer.from_pretrained(str(directory)).chat_template == TEMPLATES["tulu"].jinja
