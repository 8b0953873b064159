"""Any Hugging Face chat template (``template=auto``): SFT masks and DPO splits derived from the Jinja
rendering itself. Oracles: transformers' ``apply_chat_template`` on the same template and tokenizer, the
assistant contents of the conversation (what the labels must decode to), and tanuki's hand-written
Python renderings of its own three templates (the spans derived from their Jinja must be the same)."""

import json

import pytest

from tanuki.config import ConfigError
from tanuki.data.preference import PreferencePair, tokenize_pairs
from tanuki.data.records import Conversation
from tanuki.data.sft import tokenize_conversations
from tanuki.tokenizer.jinja_template import read_chat_template, resolve_template, template_from_jinja
from tanuki.tokenizer.templates import TEMPLATES, TemplateError

# Qwen2.5's ChatML template without the tool branches: a default system message when there is none.
CHATML = r"""{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Meta Llama 3 Instruct's template (BOS first, contents trimmed, each turn ends with <|eot_id|>).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Cohere Command-R's template (without the tool / RAG parts): roles must alternate.
COMMAND_R = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% if system_message != false %}"
    "{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + system_message + '<|END_OF_TURN_TOKEN|>' }}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set content = message['content'] %}{% if message['role'] == 'user' %}"
    "{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + content.strip() + '<|END_OF_TURN_TOKEN|>' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>'  + content.strip() + '<|END_OF_TURN_TOKEN|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)

#: template -> (its special tokens: bos, eos, others; the text ending each assistant turn)
FORMATS = {
    "chatml": (CHATML, dict(bos_token=None, eos_token="<|im_end|>", extra=["<|im_start|>"]), "<|im_end|>"),
    # a base-model EOS (<|end_of_text|>) that differs from the end-of-turn token the template writes
    "llama3": (LLAMA3, dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                            extra=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]), "<|eot_id|>"),
    "command_r": (COMMAND_R, dict(bos_token="<BOS_TOKEN>", eos_token="<|END_OF_TURN_TOKEN|>",
                                  extra=["<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
                                         "<|SYSTEM_TOKEN|>"]), "<|END_OF_TURN_TOKEN|>"),
}

SYSTEM = {"role": "system", "content": "あなたは親切なアシスタントです。"}
TURNS = [
    {"role": "user", "content": "日本の首都は？"},
    {"role": "assistant", "content": "東京です。"},
    {"role": "user", "content": "Population?\nOne line, please."},
    {"role": "assistant", "content": "About 14 million.\n約1400万人です。🗼"},  # the emoji is byte fallback
    {"role": "user", "content": "ありがとう"},
    {"role": "assistant", "content": "どういたしまして。"},
]
#: one-, two- and three-turn conversations ending with an assistant turn, with and without a system message
CONVERSATIONS = [prefix + TURNS[:n] for prefix in ([], [SYSTEM]) for n in (2, 4, 6)]


def make_tokenizer(base_dir, out_dir, jinja, bos_token="<s>", eos_token="</s>", extra=()):
    """The test tokenizer with the template's special tokens added, saved with ``jinja`` as its chat
    template (transformers 5 writes it as chat_template.jinja)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(base_dir)
    specials = [t for t in (bos_token, eos_token, *extra) if t and t not in tok.get_vocab()]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.bos_token, tok.eos_token = bos_token, eos_token
    tok.chat_template = jinja
    tok.save_pretrained(out_dir)
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


@pytest.fixture(scope="module")
def tokenizers(tiny_corpus, tmp_path_factory):
    """name -> (tokenizer directory, tokenizer, end-of-turn text) for the three foreign formats and
    tanuki's own three (saved with their Jinja as the chat template)."""
    tmp = tmp_path_factory.mktemp("any_template")
    out = {}
    for name, (jinja, specials, end) in FORMATS.items():
        specials = dict(specials)
        out[name] = (tmp / name, make_tokenizer(tiny_corpus["tokenizer"], tmp / name, jinja,
                                                specials.pop("bos_token"), specials.pop("eos_token"),
                                                specials.pop("extra")), end)
    for name, t in TEMPLATES.items():
        out[name] = (tmp / name, make_tokenizer(tiny_corpus["tokenizer"], tmp / name, t.jinja), "</s>")
    return out


def target_runs(sample):
    """The runs of consecutive target ids of a tokenized conversation."""
    ids, target = sample.input_ids, sample.target
    runs, cur = [], []
    for i, t in zip(ids, target):
        if t:
            cur.append(int(i))
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("name", [*FORMATS, *TEMPLATES])
def test_labels_are_the_assistant_contents_and_end_of_turn_tokens(tokenizers, name):
    directory, tok, end = tokenizers[name]
    template = resolve_template("auto", directory)
    if name in TEMPLATES:
        assert template is TEMPLATES[name]  # tanuki's own template resolves to it by name
    else:
        assert template.name == "auto" and template.source == str(directory / "chat_template.jinja")
        assert template.end_of_turn == end
    convs = [Conversation(tuple(m), f"conv{i}") for i, m in enumerate(CONVERSATIONS)]
    samples = tokenize_conversations(convs, tok, template)
    for messages, sample in zip(CONVERSATIONS, samples):
        # the ids are what transformers gives for the model's own template
        assert sample.input_ids.tolist() == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        want = [m["content"] + end for m in messages if m["role"] == "assistant"]
        got = [tok.decode(run, skip_special_tokens=False) for run in target_runs(sample)]
        assert got == want, name
        # the labels of the row are these targets, shifted
        tokens, labels = sample.row()
        assert (labels != -100).sum() == sample.loss_tokens == sum(len(r) for r in target_runs(sample))


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_spans_from_the_jinja_equal_tanukis_python_renderings(tokenizers, name):
    _, tok, _ = tokenizers[name]
    derived = template_from_jinja(TEMPLATES[name].jinja, tok, "test")
    for messages in CONVERSATIONS + [[SYSTEM, TURNS[0]], TURNS[:3]]:
        for gen in (False, True):
            kw = dict(bos_token=tok.bos_token, eos_token=tok.eos_token, add_generation_prompt=gen)
            assert derived.render(messages, **kw) == TEMPLATES[name].render(messages, **kw)
    assert derived.writes_bos == TEMPLATES[name].writes_bos


@pytest.mark.parametrize("name", [*FORMATS, *TEMPLATES])
def test_dpo_split_is_the_generation_prompt_rendering_plus_the_completion(tokenizers, name):
    directory, tok, end = tokenizers[name]
    template = resolve_template("auto", directory)
    prompts = [tuple(c[:-1]) for c in CONVERSATIONS]
    pairs = [PreferencePair(p, "はい、そうです。", "いいえ。", f"pair{i}") for i, p in enumerate(prompts)]
    for pair, s in zip(pairs, tokenize_pairs(pairs, tok, template)):
        prompt = tok.apply_chat_template(list(pair.prompt), add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
        assert s.prompt_ids.tolist() == prompt
        for content, ids in ((pair.chosen, s.chosen_ids), (pair.rejected, s.rejected_ids)):
            assert tok.decode(ids, skip_special_tokens=False) == content + end
            full = tok.apply_chat_template([*pair.prompt, {"role": "assistant", "content": content}], tokenize=True,
                                           return_dict=True)["input_ids"]
            # prompt + completion is the full rendering up to the end-of-turn token; after it at most
            # the template's trailing whitespace (ChatML's newline), which is not scored
            n = len(prompt) + len(ids)
            assert full[:n] == prompt + ids.tolist()
            assert tok.decode(full[n:]).strip() == ""


# A template printing the number of turns first, and one moving the system message behind the first
# user turn: neither renders the prefix of a conversation as a prefix of its rendering.
COUNTS_TURNS = ("{{ messages | length }} turns\n{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content"
                " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SYSTEM_LAST = ("{% for m in messages %}{% if m.role != 'system' %}{{ '<|im_start|>' + m.role + '\n' + m.content + "
               "'<|im_end|>\n' }}{% endif %}{% endfor %}{% for m in messages %}{% if m.role == 'system' %}"
               "{{ '<|im_start|>system\n' + m.content + '<|im_end|>\n' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
NO_END_TOKEN = ("{% for m in messages %}{{ m.role + ': ' + m.content + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


@pytest.mark.parametrize("jinja, why", [
    (COUNTS_TURNS, "does not render a conversation's prefixes as prefixes"),
    (SYSTEM_LAST, "does not render a conversation's prefixes as prefixes"),
    (NO_END_TOKEN, "ends without a special token"),
    ("{{ messages[0]['content'] }}", "does not start with its content"),
])
def test_a_template_unfit_for_training_is_refused_naming_the_file(tiny_corpus, tmp_path, jinja, why):
    make_tokenizer(tiny_corpus["tokenizer"], tmp_path, jinja, eos_token="<|im_end|>", extra=["<|im_start|>"])
    with pytest.raises(ConfigError, match=why) as e:
        resolve_template("auto", tmp_path)
    assert e.value.key == "template" and str(tmp_path / "chat_template.jinja") in str(e.value)


def test_a_data_conversation_that_breaks_the_prefix_rule_is_refused(tokenizers, tiny_corpus, tmp_path):
    # prefix-preserving on the probes, but not once a conversation has more than three assistant turns
    jinja = CHATML.replace("{%- for message in messages %}",
                           "{%- if messages | length > 7 %}{{ 'long conversation\n' }}{%- endif %}\n"
                           "{%- for message in messages %}", 1)
    tok = make_tokenizer(tiny_corpus["tokenizer"], tmp_path, jinja, bos_token=None, eos_token="<|im_end|>",
                         extra=["<|im_start|>"])
    template = resolve_template("auto", tmp_path)
    long = TURNS + TURNS[:2]
    with pytest.raises(TemplateError, match=f"{tmp_path / 'chat_template.jinja'}.*prefixes as prefixes"):
        tokenize_conversations([Conversation(tuple(long), "x")], tok, template)


def test_template_files_and_names(tiny_corpus, tmp_path):
    # tokenizer_config.json's chat_template when there is no chat_template.jinja
    tok = make_tokenizer(tiny_corpus["tokenizer"], tmp_path, CHATML, bos_token=None, eos_token="<|im_end|>",
                         extra=["<|im_start|>"])
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert read_chat_template(tmp_path) == (CHATML, tmp_path / "tokenizer_config.json")
    assert resolve_template("auto", tmp_path, tok).source == str(tmp_path / "tokenizer_config.json")
    assert resolve_template("tulu", tmp_path) is TEMPLATES["tulu"]  # a name still selects tanuki's template
    with pytest.raises(ConfigError, match="unknown chat template 'chatml'; valid: auto"):
        resolve_template("chatml", tmp_path)
    # no chat template at all: the fallback (SFT's alpaca_ja), else an error naming the directory
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert resolve_template("auto", tmp_path, fallback="alpaca_ja") is TEMPLATES["alpaca_ja"]
    with pytest.raises(ConfigError, match="has no chat template"):
        resolve_template("auto", tmp_path)
    assert read_chat_template(tmp_path) is None


# The stages from their entry points (prepare + run, as launch/sft.py and launch/dpo.py call them) on a
# tiny random Llama whose tokenizer carries the ChatML template.

STAGE = ["train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=3", "train.warmup_steps=0",
         "train.eval_every=0", "logging.every=1", "logging.wandb.mode=disabled", "checkpoint.every=100",
         "train.precision=fp32", "kernels=torch", "export.dtype=float32"]


@pytest.fixture(scope="module")
def chatml_model(tiny_corpus, tmp_path_factory):
    import torch

    from tanuki.config import ModelConfig
    from tanuki.hf import export_hf
    from tanuki.model import build_model
    from tanuki.tokenizer import sample_data_path

    tmp = tmp_path_factory.mktemp("chatml_model")
    tok = make_tokenizer(tiny_corpus["tokenizer"], tmp / "tok", CHATML, bos_token=None, eos_token="<|im_end|>",
                         extra=["<|im_start|>"])
    cfg = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=len(tok) + 6,
                      max_seq_len=256)
    export_hf(build_model(cfg, seed=0).state_dict(), cfg, tmp / "base", dtype=torch.float32, tokenizer_dir=tmp / "tok")
    for name, n in (("sft.jsonl", 64), ("dpo.jsonl", 16)):
        lines = sample_data_path(name).read_text(encoding="utf-8").splitlines()[:n]
        (tmp / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp


def run_stage(name, overrides, run_dir):
    import importlib

    from conftest import compose

    from tanuki.config import from_dict
    from tanuki.parallel.env import DistEnv

    stage = importlib.import_module(f"tanuki.{name}")
    config_class = stage.SFTConfig if name == "sft" else stage.DPOConfig
    env = DistEnv(0, 1, 0, "single")
    lines = []
    prep = stage.prepare(from_dict(config_class, compose(name, [*overrides, f"run.dir={run_dir}", *STAGE])), env)
    result = stage.run(prep, env, run_dir.resolve(), print_fn=lines.append)
    return result, lines


@pytest.mark.distributed
def test_lora_sft_then_dpo_with_a_chatml_model(chatml_model, single_process_group, tmp_path):
    import math

    from transformers import AutoTokenizer

    base = chatml_model / "base"
    source = str(base / "chat_template.jinja")
    result, lines = run_stage("sft", [f"init={base}", f"data.path={chatml_model / 'sft.jsonl'}", "method=lora",
                                      "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "train.lr=1e-2",
                                      "train.seq_len=128"], tmp_path / "sft")
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert any(f"SFT (lora, template auto ({source}))" in ln for ln in lines)
    sft_dir = tmp_path / "sft" / "hf"
    assert AutoTokenizer.from_pretrained(sft_dir).chat_template == CHATML  # the model keeps its own template
    assert (tmp_path / "sft" / "adapter" / "adapter_config.json").is_file()

    result, lines = run_stage("dpo", [f"init={sft_dir}", f"data.path={chatml_model / 'dpo.jsonl'}", "train.lr=1e-3",
                                      "train.seq_len=192", "data.max_prompt_length=150"], tmp_path / "dpo")
    steps = [r for r in result.history if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference before the update
    assert any(f"template auto ({sft_dir / 'chat_template.jinja'})" in ln for ln in lines)
    assert AutoTokenizer.from_pretrained(tmp_path / "dpo" / "hf").chat_template == CHATML


def test_a_conversation_the_template_refuses_is_a_data_error(tokenizers):
    from tanuki.data.records import SFTDataError
    from tanuki.data.sft import SFTStats

    directory, tok, _ = tokenizers["command_r"]
    template = resolve_template("auto", directory)
    bad = Conversation((TURNS[0], TURNS[2], TURNS[1]), "data.jsonl:3")  # two user turns in a row
    with pytest.raises(SFTDataError, match="data.jsonl:3: .*Conversation roles must alternate"):
        tokenize_conversations([bad], tok, template)
    stats = SFTStats()
    good = Conversation(tuple(TURNS[:2]), "data.jsonl:1")
    assert len(tokenize_conversations([good, bad], tok, template, on_error="skip", stats=stats)) == 1
    assert stats.skipped == {"template_refused": 1}
