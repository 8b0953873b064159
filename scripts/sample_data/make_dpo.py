"""Generate tanuki's bundled preference data: ``dpo.jsonl`` (training pairs) and ``dpo_eval.jsonl``
(held-out pairs), deterministically.

The pairs are Japanese and English, written for tanuki (no public dataset is copied), on top of the
instruction data of ``make_sft.py``, whose generators they reuse so that prompts and correct answers
have exactly the shapes and formats the SFT model was trained on:

* task pairs (about 80%): a checkable question of a ``make_sft.py`` task family (arithmetic, larger
  number, units, capitals, readings, katakana -> hiragana, reversing, counting, past tenses,
  translation); ``chosen`` is the correct answer in the SFT format, ``rejected`` a plausible wrong one
  of a kind a small model makes (:data:`TASK_KINDS`): a number off by one, the wrong operation, the
  wrong counter or unit, another prefecture's or country's capital, another word's reading, the
  input copied instead of transformed, a regularised past tense ("goed"), the answer repeated, or cut
  short. A tenth of them follow an earlier question and answer (multi-turn prompts).
* style pairs (about 20%): the hand-written questions and writing tasks of ``make_sft.py``;
  ``chosen`` is the SFT answer, ``rejected`` a curt non-answer, an answer cut off mid-sentence, a
  sentence repeated, the answer to another question, an answer in the other language, or the input
  copied back (:data:`STYLE_KINDS`).

Held out: the keys of ``sft_eval.jsonl`` (drawn exactly as ``make_sft.py`` draws them; the script
checks it reproduces that file's records) never appear in a training pair, neither in a question
nor as a wrong answer, and a few hand-written questions are kept for evaluation only.
``dpo_eval.jsonl`` holds one pair per ``sft_eval.jsonl`` prompt (the same messages; chosen = its
exact answer) and style pairs on the held-out questions, so the preference accuracy of a model and
its exact-match accuracy are measured on the same prompts.

Record format (``tanuki.data.preference``): ``prompt`` is a string, or a messages list (system
optional), or a string with ``system``; ``chosen`` / ``rejected`` are mostly strings and sometimes
assistant messages; ``task`` and ``kind`` (which corruption made ``rejected``) are extra fields for
analysis, ignored by the reader.

    python scripts/sample_data/make_dpo.py                # rewrite dpo.jsonl and dpo_eval.jsonl
    python scripts/sample_data/make_dpo.py --out-dir /tmp/dpo --pairs 5000 --seed 1

The same arguments always give the same bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import sys
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
#: the package's sample data (``tanuki/sample_data/``): where the generated files go by default
DATA = HERE.parents[1] / "tanuki" / "sample_data"
#: seed and size of the committed files
SAMPLE_SEED = 0
SAMPLE_PAIRS = 1000


def _load_sft_module():
    # make_sft.py defines dataclasses, which need their module registered while it runs
    name = "tanuki_make_sft"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "make_sft.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


S = _load_sft_module()
C = S.C

#: the corruptions that make ``rejected`` for the task pairs
TASK_KINDS = ("off_by_one", "wrong_operation", "wrong_counter", "wrong_unit", "wrong_factor", "smaller_number",
              "other_capital", "city_from_name", "echo_question", "other_reading", "copy_input", "wrong_edit",
              "regular_past", "past_participle", "other_translation", "repeated", "curt")
#: the corruptions that make ``rejected`` for the style pairs
STYLE_KINDS = ("non_answer", "cut_off", "repeated_sentence", "off_topic", "wrong_language", "copy_input")

#: relative weights of the kinds that fit a question (others: 1). A right answer repeated, or bare,
#: is a format error (what exact match punishes; in the repeated answer DPO's signal sits on the
#: EOS, the one token where the two differ), wrong content is the more informative half.
KIND_WEIGHTS = {"repeated": 0.5, "curt": 0.5}

NON_ANSWER = {"ja": ["わかりません。", "知りません。", "答えられません。"],
              "en": ["I don't know.", "No idea.", "I can't answer that."]}
COUNTERS_JA = sorted({c for _, c in S.OBJECTS_JA})


# --------------------------------------------------------------------------------------------------
# The held-out keys of make_sft.py
# --------------------------------------------------------------------------------------------------


def held_out(n_eval: int = S.SAMPLE_EVAL, seed: int = S.SAMPLE_SEED) -> tuple[dict[str, set], list[tuple]]:
    """The held-out keys by group, and the eval prompts of ``sft_eval.jsonl`` with the family and key
    each asks about: ``[(family, key, item, record), ...]`` in the file's order.

    This replays the first draws of ``make_sft.generate`` (the eval keys and prompts come before
    any training record), and checks that the records equal what ``make_sft.generate`` writes.
    """
    rng = random.Random(seed)
    held: dict[str, set] = {}
    eval_keys: dict[str, list] = {}
    eval_total = sum(f.n_eval for f in S.FAMILIES)
    for fam in S.FAMILIES:
        keys = fam.keys()
        k = max(1, round(fam.n_eval * n_eval / eval_total))
        eval_keys[fam.name] = [keys[i] for i in rng.sample(range(len(keys)), k)]
        held.setdefault(fam.group or fam.name, set()).update(eval_keys[fam.name])
    entries = []
    for fam in S.FAMILIES:
        for key in eval_keys[fam.name]:
            item = fam.make(rng, key)
            if rng.random() < 1 / 3:
                messages = S._alpaca_messages(item.instruction, item.input)
            else:
                messages = S._system(rng, item.lang) + [{"role": "user", "content": item.user_text()}]
            entries.append((fam, key, item, {"messages": messages, "answer": item.answer, "task": item.task}))
    rng.shuffle(entries)  # the permutation depends only on the length, as in make_sft
    if [e[3] for e in entries] != S.generate(0, n_eval, seed)[1]:
        raise RuntimeError("make_sft.py no longer draws its held-out keys as make_dpo.held_out replays them; update it")
    return held, entries


# --------------------------------------------------------------------------------------------------
# Wrong answers
# --------------------------------------------------------------------------------------------------


def _number(answer: str) -> tuple[int, str]:
    """``"1,200メートルです。"`` -> ``(1200, "メートルです。")``; also the English ``"16 apples."``."""
    m = re.fullmatch(r"(\d[\d,]*)(.*)", answer, re.S)
    return int(m.group(1).replace(",", "")), m.group(2)


def _sep(lang: str) -> str:
    return "" if lang == "ja" else " "


def _repeated(item) -> str:
    return item.answer + _sep(item.lang) + item.answer


def _curt_number(item) -> str:
    return str(_number(item.answer)[0])


def _arith(wrong_ops: list[Callable[[int, int], int]]):
    """Wrong answers of the arithmetic families (``key = (a, b)``; answer ``"{n}{suffix}"``)."""

    def kinds(rng: random.Random, key, item, pool) -> dict[str, Callable[[], Optional[str]]]:
        a, b = key
        n, suffix = _number(item.answer)

        def with_number(m: int) -> Optional[str]:
            return f"{m}{suffix}" if m >= 0 else None

        def wrong_counter() -> str:
            if item.lang == "ja":
                counter = suffix[: -len("です。")]
                return f"{n}{rng.choice([c for c in COUNTERS_JA if c != counter])}です。"
            obj = suffix.strip(" .")
            return f"{n} {rng.choice([o for o in S.OBJECTS_EN if o != obj])}."

        return {
            "off_by_one": lambda: with_number(n + rng.choice([-1, 1])),
            "wrong_operation": lambda: with_number(rng.choice(wrong_ops)(a, b)),
            "wrong_counter": wrong_counter,
            "echo_question": lambda: with_number(rng.choice([a, b])),
            "repeated": lambda: _repeated(item),
            "curt": lambda: _curt_number(item),
        }

    return kinds


def _compare(rng, key, item, pool):
    return {"smaller_number": lambda: f"{min(key)}です。", "repeated": lambda: _repeated(item),
            "curt": lambda: _curt_number(item)}


def _unit(rng, key, item, pool):
    i, n = key
    ja_from, ja_to, en_from, en_to, f = C.CONVERSIONS[i]
    factors = sorted({c[4] for c in C.CONVERSIONS if c[4] != f})

    def text(value: int, same_unit: bool = False) -> str:
        # same_unit: the converted number with the unit of the question ("11リットルは11,000リットルです。")
        if item.lang == "ja":
            return f"{n}{ja_from}は{value:,}{ja_from if same_unit else ja_to}です。"
        return f"{n} {en_from} is {value:,} {en_from if same_unit else en_to}."

    return {
        # another conversion's factor, or the right one off by a power of ten
        "wrong_factor": lambda: text(n * rng.choice([*factors, f * 10, f // 10])),
        "wrong_unit": lambda: text(n * f, same_unit=True),
        "repeated": lambda: _repeated(item),
    }


def _prefecture(rng, key, item, pool):
    pref, kind, region, capital, _, _ = C.PREFECTURES[key]
    near = [C.PREFECTURES[k][3] for k in pool if k != key and C.PREFECTURES[k][2] == region]
    anywhere = [C.PREFECTURES[k][3] for k in pool if k != key]
    kinds = {"other_capital": lambda: f"{rng.choice(near or anywhere)}です。", "repeated": lambda: _repeated(item)}
    stem_city = pref[:-1] + "市"
    if kind == "県" and stem_city != capital:  # 宮城県 -> "宮城市", a natural mistake
        kinds["city_from_name"] = lambda: f"{stem_city}です。"
    return kinds


def _capital(rng, key, item, pool):
    country_ja, _, country_en, _ = C.COUNTRIES[key]
    others = [C.COUNTRIES[k] for k in pool if k != key]
    if item.lang == "ja":
        return {"other_capital": lambda: f"{rng.choice(others)[1]}です。", "echo_question": lambda: f"{country_ja}です。",
                "repeated": lambda: _repeated(item)}
    return {"other_capital": lambda: f"{rng.choice(others)[3]}.", "echo_question": lambda: f"{country_en}.",
            "repeated": lambda: _repeated(item)}


def _reading(rng, key, item, pool):
    word, reading = key
    return {"other_reading": lambda: f"「{word}」は「{rng.choice([r for w, r in pool if r != reading])}」と読みます。",
            "echo_question": lambda: f"「{word}」は「{word}」と読みます。", "repeated": lambda: _repeated(item)}


def _edit(text: str, rng: random.Random) -> Optional[str]:
    """``text`` with one plausible slip: two neighbours swapped or the last character dropped."""
    if len(text) < 3:
        return None
    if rng.random() < 0.5:
        i = rng.randrange(len(text) - 1)
        out = text[:i] + text[i + 1] + text[i] + text[i + 2:]
    else:
        out = text[:-1]
    return out if out != text else None


def _transform(rng, key, item, pool):
    # katakana -> hiragana and reversing: the input copied back, or the right output with a slip
    return {"copy_input": lambda: item.input, "wrong_edit": lambda: _edit(item.answer, rng),
            "repeated": lambda: _repeated(item)}


def _count(rng, key, item, pool):
    n, suffix = _number(item.answer)
    return {"off_by_one": lambda: f"{n + rng.choice([-1, 1])}{suffix}", "curt": lambda: _curt_number(item),
            "repeated": lambda: _repeated(item)}


def _translate(rng, key, item, pool):
    side = 1 if item.lang == "ja" else 0  # translate_ja answers in Japanese, translate_en in English
    return {"other_translation": lambda: C.PAIRS[rng.choice([k for k in pool if k != key])][side],
            "copy_input": lambda: item.input, "wrong_edit": lambda: _edit(item.answer, rng)}


def _past(rng, key, item, pool):
    base, past, participle, _ = C.IRREGULAR_VERBS[key]
    regular = base + ("d" if base.endswith("e") else "ed")
    kinds = {"regular_past": lambda: f"The past tense of {base} is {regular}."}
    if participle != past:
        kinds["past_participle"] = lambda: f"The past tense of {base} is {participle}."
    kinds["repeated"] = lambda: _repeated(item)
    return kinds


#: family name -> the wrong answers that fit it: ``(rng, key, item, keys to draw distractors from)``
#: -> {kind: () -> wrong answer or None}
WRONG = {
    "add_ja": _arith([lambda a, b: abs(a - b), lambda a, b: a * b]),
    "sub_ja": _arith([lambda a, b: a + b]),
    "mul_ja": _arith([lambda a, b: a + b, lambda a, b: a * (b + 1), lambda a, b: a * (b - 1)]),
    "compare_ja": _compare,
    "unit_ja": _unit,
    "prefecture_ja": _prefecture,
    "capital_ja": _capital,
    "reading_ja": _reading,
    "katakana_ja": _transform,
    "reverse_ja": _transform,
    "count_ja": _count,
    "translate_ja": _translate,
    "add_en": _arith([lambda a, b: abs(a - b), lambda a, b: a * b]),
    "sub_en": _arith([lambda a, b: a + b]),
    "capital_en": _capital,
    "past_en": _past,
    "unit_en": _unit,
    "reverse_en": _transform,
    "count_en": _count,
    "translate_en": _translate,
}


def wrong_answer(rng: random.Random, fam, key, item, pool: list) -> tuple[str, str]:
    """``(kind, wrong answer)`` for a question of ``fam`` about ``key``; distractors (another capital,
    reading or translation) come from ``pool``, the family's keys that may be used."""
    kinds = WRONG[fam.name](rng, key, item, pool)
    names = sorted(kinds)
    weights = [KIND_WEIGHTS.get(k, 1.0) for k in names]
    for _ in range(20):
        kind = rng.choices(names, weights)[0]
        text = kinds[kind]()
        if text and text.strip() and text != item.answer:
            return kind, text
    return "repeated", _repeated(item)


# --------------------------------------------------------------------------------------------------
# Style pairs
# --------------------------------------------------------------------------------------------------


def _first_sentence(text: str, lang: str) -> str:
    if lang == "ja":
        head = text.split("。")[0]
        return head + "。" if "。" in text else head
    m = re.match(r".+?[.!?](\s|$)", text, re.S)
    return m.group(0).strip() if m else text


def style_rejected(rng: random.Random, lang: str, answer: str, input: str, others: list[str],
                   other_language: list[str]) -> tuple[str, str]:
    """``(kind, a worse answer)`` to a hand-written question or writing task."""
    kinds: dict[str, Callable[[], Optional[str]]] = {
        "non_answer": lambda: rng.choice(NON_ANSWER[lang]),
        "off_topic": lambda: rng.choice([o for o in others if o != answer]),
        "wrong_language": lambda: rng.choice(other_language),
    }
    if len(answer) >= 12:
        # cut off mid-sentence, with no closing punctuation
        kinds["cut_off"] = lambda: answer[: max(4, int(len(answer) * rng.uniform(0.3, 0.6)))].rstrip(" 、,。.")
        first = _first_sentence(answer, lang)
        kinds["repeated_sentence"] = lambda: _sep(lang).join([first] * 3)
    if input:
        kinds["copy_input"] = lambda: input
    names = sorted(kinds)
    for _ in range(20):
        kind = rng.choice(names)
        text = kinds[kind]()
        if text and text.strip() and text != answer:
            return kind, text
    return "non_answer", NON_ANSWER[lang][0]


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


def _prompt_messages(rng: random.Random, instruction: str, input: str, lang: str) -> list[dict]:
    """The shapes of make_sft's prompts: Alpaca (a third of the time) or an optional system + user."""
    if rng.random() < 1 / 3:
        return S._alpaca_messages(instruction, input)
    user = f"{instruction}\n{input}" if input else instruction
    return S._system(rng, lang) + [{"role": "user", "content": user}]


def _completion(rng: random.Random, text: str):
    r = rng.random()
    if r < 0.08:
        return {"role": "assistant", "content": text}
    if r < 0.12:
        return [{"role": "assistant", "content": text}]
    return text


def make_record(rng: random.Random, messages: list[dict], chosen: str, rejected: str, task: str, kind: str) -> dict:
    """A record in one of the accepted shapes (string prompt, ``system`` + string, messages list)."""
    if len(messages) == 1:
        record = {"prompt": messages[0]["content"]}
    elif len(messages) == 2 and messages[0]["role"] == "system" and rng.random() < 0.5:
        record = {"system": messages[0]["content"], "prompt": messages[1]["content"]}
    else:
        record = {"prompt": messages}
    record.update(chosen=_completion(rng, chosen), rejected=_completion(rng, rejected), task=task, kind=kind)
    return record


def generate(n_pairs: int = SAMPLE_PAIRS, seed: int = SAMPLE_SEED, *, sft_eval: int = S.SAMPLE_EVAL,
             sft_seed: int = S.SAMPLE_SEED) -> tuple[list[dict], list[dict]]:
    """(training pairs, eval pairs); ``sft_eval`` and ``sft_seed`` are the arguments ``sft_eval.jsonl``
    was made with (``make_sft.py --eval --seed``), whose keys are held out."""
    held, eval_entries = held_out(sft_eval, sft_seed)
    rng = random.Random(f"make_dpo:{seed}")
    train_keys = {f.name: [k for k in f.keys() if k not in held[f.group or f.name]] for f in S.FAMILIES}

    general = {"ja": list(S.GENERAL_JA), "en": list(S.GENERAL_EN)}
    rewrites = {"ja": list(S.REWRITES_JA), "en": list(S.REWRITES_EN)}
    held_general = {lang: rng.sample(general[lang], k) for lang, k in (("ja", 5), ("en", 4))}
    held_rewrites = {lang: rng.sample(rewrites[lang], k) for lang, k in (("ja", 2), ("en", 1))}
    train_general = {lang: [q for q in general[lang] if q not in held_general[lang]] for lang in general}
    train_rewrites = {lang: [q for q in rewrites[lang] if q not in held_rewrites[lang]] for lang in rewrites}
    answers = {lang: [a for _, a in general[lang]] for lang in general}

    def other(lang: str) -> str:
        return "en" if lang == "ja" else "ja"

    def style_pair(lang: str, qa: tuple, is_rewrite: bool) -> dict:
        if is_rewrite:
            instruction, input_, answer = qa
            others = [o for _, _, o in rewrites[lang]]
        else:
            (instruction, answer), input_ = qa, ""
            others = answers[lang]
        kind, rejected = style_rejected(rng, lang, answer, input_, others, answers[other(lang)])
        messages = _prompt_messages(rng, instruction, input_, lang)
        return make_record(rng, messages, answer, rejected, "rewrite" if is_rewrite else "general", kind)

    # -- evaluation: one pair per sft_eval prompt, and style pairs on the held-out questions ---------
    eval_records = []
    for fam, key, item, record in eval_entries:
        kind, rejected = wrong_answer(rng, fam, key, item, fam.keys())
        eval_records.append({"prompt": record["messages"], "chosen": item.answer, "rejected": rejected,
                             "task": item.task, "kind": kind})
    for lang in ("ja", "en"):
        for qa in held_general[lang]:
            eval_records += [style_pair(lang, qa, False) for _ in range(2)]
        for qa in held_rewrites[lang]:
            eval_records += [style_pair(lang, qa, True) for _ in range(2)]

    # -- training --------------------------------------------------------------------------------
    weights = [f.weight for f in S.FAMILIES]
    records: list[dict] = []
    seen: set[str] = set()
    while len(records) < n_pairs:
        if rng.random() < 0.8:
            fam = rng.choices(S.FAMILIES, weights)[0]
            pool = train_keys[fam.name]
            key = rng.choice(pool)
            item = fam.make(rng, key)
            kind, rejected = wrong_answer(rng, fam, key, item, pool)
            messages = _prompt_messages(rng, item.instruction, item.input, item.lang)
            if rng.random() < 0.1:  # after an earlier exchange in the same language
                prev_lang = item.lang
                q, a = rng.choice(train_general[prev_lang])
                system = messages[:1] if messages[0]["role"] == "system" else []
                messages = system + [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                                     {"role": "user", "content": item.user_text()}]
            record = make_record(rng, messages, item.answer, rejected, item.task, kind)
        else:
            lang = "ja" if rng.random() < 0.55 else "en"
            if rng.random() < 0.75:
                record = style_pair(lang, rng.choice(train_general[lang]), False)
            else:
                record = style_pair(lang, rng.choice(train_rewrites[lang]), True)
        line = json.dumps(record, ensure_ascii=False)
        if line in seen:
            continue
        seen.add(line)
        records.append(record)
    return records, eval_records


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(DATA), help="directory for dpo.jsonl and dpo_eval.jsonl")
    parser.add_argument("--pairs", type=int, default=SAMPLE_PAIRS, help="training pairs")
    parser.add_argument("--seed", type=int, default=SAMPLE_SEED)
    args = parser.parse_args()
    train, evals = generate(args.pairs, args.seed)
    out = Path(args.out_dir)
    write_jsonl(out / "dpo.jsonl", train)
    write_jsonl(out / "dpo_eval.jsonl", evals)
    print(f"wrote {len(train)} pairs to {out / 'dpo.jsonl'} and {len(evals)} eval pairs to {out / 'dpo_eval.jsonl'}")


if __name__ == "__main__":
    main()
