"""launch/chat.py and tanuki/chat.py against transformers: template rendering, greedy replies,
streaming of byte-fallback characters, multi-turn history, the CLI and its errors."""

import io
import json
import os
import runpy
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, compose
from torch import nn
from transformers import AutoTokenizer, LlamaForCausalLM

from tanuki.chat import (
    REPLACEMENT_CHAR,
    ChatConfig,
    ChatError,
    ChatSession,
    StreamDecoder,
    decode_stream,
    quote_text_overrides,
)
from tanuki.config import ConfigError, ModelConfig, from_dict
from tanuki.hf import export_hf
from tanuki.model import build_model
from tanuki.tokenizer.templates import get_template, write_chat_template

CFG = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=1280, max_seq_len=256)


@pytest.fixture(scope="module")
def hf_dir(tiny_corpus, tmp_path_factory):
    """A tiny random model exported with the tiny tokenizer and the Tulu template as its chat template."""
    model = build_model(CFG, seed=3).eval()
    with torch.no_grad():
        model.head.weight.mul_(20)  # greedy choices far from ties: float noise cannot flip one
    out = export_hf(model.state_dict(), CFG, tmp_path_factory.mktemp("chat") / "hf",
                    dtype=torch.float32, tokenizer_dir=tiny_corpus["tokenizer"])
    write_chat_template(out, "tulu")
    return out


@pytest.fixture(scope="module")
def no_template_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat_none") / "hf"
    shutil.copytree(hf_dir, out)
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return out


@pytest.fixture(scope="module")
def hf(hf_dir):
    return LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def loaded(hf_dir):
    """One tanuki model load shared by the sessions of this module (a session is cheap on top)."""
    s = ChatSession.from_config(ChatConfig(model=str(hf_dir)))
    return s.model, s.tokenizer, s.eos_token_id


def session(loaded, **kw) -> ChatSession:
    model, tok, eos = loaded
    return ChatSession(model, tok, eos_token_id=eos, **kw)


def hf_reply(hf, messages, max_new_tokens, chat_template=None) -> str:
    model, tok = hf
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, chat_template=chat_template,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# -- (a) a greedy reply equals transformers' generate on the same rendered prompt ----------------------


@pytest.mark.parametrize("system", [None, "あなたは親切なアシスタントです。"])
def test_greedy_reply_matches_transformers(loaded, hf, system):
    s = session(loaded, system=system, max_new_tokens=24)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "日本の首都は?"}]
    reply = s.reply("日本の首都は?")
    assert reply and reply == hf_reply(hf, messages, 24)


def test_template_override_renders_with_tanukis_template(loaded, hf):
    s = session(loaded, template="alpaca_ja", max_new_tokens=16)
    messages = [{"role": "user", "content": "こんにちは"}]
    jinja = get_template("alpaca_ja").jinja
    expected = hf[1].apply_chat_template(messages, add_generation_prompt=True, chat_template=jinja)["input_ids"]
    assert s.prompt_ids("こんにちは") == list(expected)
    assert expected[0] == hf[1].bos_token_id  # the template writes BOS; nothing is added twice
    assert s.reply("こんにちは") == hf_reply(hf, messages, 16, chat_template=jinja)


def test_sampling_is_reproducible_with_a_seed(loaded):
    a = session(loaded, temperature=1.0, top_p=0.9, seed=7, max_new_tokens=12).reply("hello")
    b = session(loaded, temperature=1.0, top_p=0.9, seed=7, max_new_tokens=12).reply("hello")
    assert a == b


# -- (b) streaming: pieces concatenate to the reply and never split a character -----------------------


def byte_ids(tok, text: str) -> list[int]:
    """The byte-fallback token ids spelling ``text`` byte by byte (<0xE3> <0x81> <0x82> for あ)."""
    ids = tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in text.encode("utf-8")])
    assert tok.unk_token_id not in ids
    return ids


def test_stream_decoder_holds_partial_characters(loaded):
    _, tok, _ = loaded
    a, b = tok("今日は", add_special_tokens=False).input_ids, tok("good", add_special_tokens=False).input_ids
    ids = a + byte_ids(tok, "あ") + byte_ids(tok, "🦝") + b + [tok.eos_token_id]
    dec = StreamDecoder(tok)
    pieces = [dec.add(i) for i in ids] + [dec.finish()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=True).startswith("今日はあ🦝")
    assert not any(REPLACEMENT_CHAR in p for p in pieces)
    assert "".join(pieces[: len(a)]) == "今日は"
    # the run of seven byte tokens is held until the token after it settles it
    assert pieces[len(a) : len(a) + 7] == [""] * 7 and pieces[len(a) + 7].startswith("あ🦝")


@pytest.mark.parametrize("tail", [
    "",        # nothing held: ends on a whole piece
    "cut",     # generation stops mid-character: decode gives U+FFFD per byte, so does the stream
    "invalid",  # '3' as a byte token, then a stray continuation byte: the run decodes to U+FFFD U+FFFD
])
def test_stream_pieces_equal_decode(loaded, tail):
    _, tok, _ = loaded
    ids = tok("今日は", add_special_tokens=False).input_ids
    if tail == "cut":
        ids += byte_ids(tok, "あ")[:2]
    elif tail == "invalid":
        ids += byte_ids(tok, "3") + byte_ids(tok, "あ")[1:2] + tok("x", add_special_tokens=False).input_ids
    pieces = decode_stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    if tail == "cut":
        assert pieces[-1] == REPLACEMENT_CHAR * 2
    if tail == "invalid":
        assert "3" not in "".join(pieces)  # never handed out, then contradicted


class ScriptedModel(nn.Module):
    """Stands in for the Transformer: its logits always pick the next id of a fixed script."""

    def __init__(self, script: list[int], vocab_size: int):
        super().__init__()
        self.cfg = SimpleNamespace(max_seq_len=512, vocab_size=vocab_size)
        self.script = script
        self.dummy = nn.Parameter(torch.zeros(1))

    def new_cache(self):
        return {"step": 0}

    def forward(self, ids, cache):
        logits = torch.zeros(1, ids.shape[1], self.cfg.vocab_size)
        logits[0, -1, self.script[min(cache["step"], len(self.script) - 1)]] = 1.0
        cache["step"] += 1
        return logits


def test_streamed_reply_with_byte_fallback_characters(loaded):
    _, tok, eos = loaded
    script = tok("答え:", add_special_tokens=False).input_ids + byte_ids(tok, "鰻") + byte_ids(tok, "あ") + [tok.eos_token_id]
    s = ChatSession(ScriptedModel(script, len(tok)), tok, eos_token_id=eos)
    pieces: list[str] = []
    reply = s.reply("質問", on_text=pieces.append)
    assert reply == "答え:鰻あ" == tok.decode(script, skip_special_tokens=True)
    assert "".join(pieces) == reply
    assert pieces[-1] == "鰻あ"  # the run of six byte tokens arrives whole, once EOS ends it
    assert s.history[-1] == {"role": "assistant", "content": reply}


def test_streamed_pieces_of_a_real_reply(loaded):
    pieces: list[str] = []
    reply = session(loaded, max_new_tokens=40).reply("こんにちは、元気ですか", on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == reply


# -- (c) multi-turn: each turn is rendered over the whole history --------------------------------------


def test_second_turn_prompt_is_the_full_history(loaded, hf, monkeypatch):
    import tanuki.generate

    prompts = []
    real = tanuki.generate.generate
    monkeypatch.setattr(tanuki.generate, "generate", lambda model, prompt, **kw: prompts.append(prompt) or real(model, prompt, **kw))
    system = "Be brief."
    s = session(loaded, system=system, max_new_tokens=10)
    first = s.reply("こんにちは")
    second = s.reply("もう一度")
    tok = hf[1]
    history = [{"role": "system", "content": system}, {"role": "user", "content": "こんにちは"},
               {"role": "assistant", "content": first}, {"role": "user", "content": "もう一度"}]
    assert prompts[1] == list(tok.apply_chat_template(history, add_generation_prompt=True)["input_ids"])
    assert second == hf_reply(hf, history, 10)
    s.reset()
    s.reply("こんにちは")
    assert prompts[2] == prompts[0]


def test_a_conversation_longer_than_the_context_is_a_clear_error(loaded):
    s = session(loaded)
    with pytest.raises(ChatError, match="context"):
        s.reply("あいうえお" * 200)
    assert s.history == []


# -- (d), (e) the command line ------------------------------------------------------------------------


def run_cli_here(monkeypatch, capsys, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """launch/chat.py run as __main__ in this process (Hydra and the exit-status handling included)."""
    monkeypatch.setattr(sys, "argv", ["launch/chat.py", *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "launch" / "chat.py"), run_name="__main__")
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_cli_one_shot(loaded, hf_dir):
    env = dict(os.environ, PYTHONIOENCODING="utf-8", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    prompt = "こんにちは, it's ${me}"  # non-ASCII, a comma, a quote and an interpolation: all verbatim
    proc = subprocess.run([sys.executable, "launch/chat.py", f"model={hf_dir}", f"prompt={prompt}", "max_new_tokens=8"],
                          cwd=REPO, env=env, capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == session(loaded, max_new_tokens=8).reply(prompt) + "\n"


def test_cli_interactive(monkeypatch, capsys, loaded, hf_dir):
    stdin = "こんにちは\n元気ですか\n/reset\nこんにちは\n/exit\nnot read\n"
    rc, out, err = run_cli_here(monkeypatch, capsys, f"model={hf_dir}", "max_new_tokens=8", stdin=stdin)
    s = session(loaded, max_new_tokens=8)
    one, two = s.reply("こんにちは"), s.reply("元気ですか")
    assert rc == 0, err
    assert out == f"{one}\n{two}\n{one}\n"  # /reset: the third turn starts over; /exit stops reading
    assert "history cleared" in err


def test_cli_missing_model_dir(monkeypatch, capsys, tmp_path):
    rc, out, err = run_cli_here(monkeypatch, capsys, f"model={tmp_path / 'nope'}", "prompt=こんにちは")
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and "nope: no such directory" in err and "Traceback" not in err


def test_cli_model_without_chat_template(monkeypatch, capsys, no_template_dir):
    rc, out, err = run_cli_here(monkeypatch, capsys, f"model={no_template_dir}", "prompt=こんにちは")
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and "no chat template" in err and "template=<name>" in err
    assert "alpaca_ja" in err and "tulu" in err


def test_cli_unknown_template(monkeypatch, capsys, hf_dir):
    rc, out, err = run_cli_here(monkeypatch, capsys, f"model={hf_dir}", "template=chatml", "prompt=hi")
    assert rc == 2 and "template" in err and "alpaca_ja" in err


@pytest.mark.parametrize("text", ["日本の首都は?", "a, b", "it's", "${x}", "a\\${x}", "end\\", "[1, 2]", "null", "", "x=1"])
def test_text_options_reach_the_config_verbatim(text):
    args = quote_text_overrides(["model=hf", f"prompt={text}", f"system={text}", "max_new_tokens=3"])
    cfg = from_dict(ChatConfig, compose("chat", args))
    assert cfg.prompt == text and cfg.system == text and cfg.max_new_tokens == 3
    already = from_dict(ChatConfig, compose("chat", quote_text_overrides(["model=hf", "prompt='a, b'"])))
    assert already.prompt == "a, b"


def test_template_option_rescues_a_model_without_one(no_template_dir, hf):
    with pytest.raises(ChatError, match="no chat template"):
        ChatSession.from_config(ChatConfig(model=str(no_template_dir)))
    s = ChatSession.from_config(ChatConfig(model=str(no_template_dir), template="tulu", max_new_tokens=8))
    assert s.reply("hi") == hf_reply(hf, [{"role": "user", "content": "hi"}], 8)


@pytest.mark.parametrize("override, key", [
    ({"template": "chatml"}, "template"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"device": "tpu"}, "device"),
])
def test_bad_options_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key):
        ChatConfig(model="hf", **override)
