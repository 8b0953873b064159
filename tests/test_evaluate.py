"""launch/evaluate.py and tanuki/evaluate.py: lm-evaluation-harness on local Japanese task data.

Oracles: the harness's log-likelihoods re-scored with tanuki's own model (import_hf + log-softmax)
and its accuracy recomputed from them; batch size 1 against 8; the task files the YAMLs name against
the files prepare writes; metrics.jsonl and the offline W&B run against results.json; FastChat's
answer format and transformers' apply_chat_template for MT-Bench. Tiny random models, data written
here, nothing downloaded (the evaluation runs with the Hub switched off).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, tiny_train_overrides
from wandb_reader import find_wandb_files, read_wandb_history

pytest.importorskip("lm_eval", reason="the eval extra (lm_eval) is not installed")

from tanuki.config import ConfigError, ModelConfig, from_dict  # noqa: E402
from tanuki.evaluate import (  # noqa: E402
    CHAT_SUFFIX,
    GROUPS,
    MT_BENCH_TEMPERATURE,
    SAMPLE_DATA_DIR,
    TASKS,
    TASKS_DIR,
    EvalConfig,
    EvalError,
    EvaluateConfig,
    check_task_data,
    choose_bos,
    compare_results,
    data_file,
    evaluate,
    evaluate_checkpoint,
    metric_rows,
    mt_bench_answers,
    offline,
    prepare_data,
    read_questions,
    resolve_tasks,
    run_harness,
    task_names,
    write_task_dir,
)
from tanuki.data.config import PreprocessConfig  # noqa: E402
from tanuki.data.preprocess import preprocess  # noqa: E402
from tanuki.hf import export_hf, import_hf  # noqa: E402
from tanuki.model import build_model  # noqa: E402
from tanuki.tokenizer.templates import write_chat_template  # noqa: E402

CFG = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=1280, max_seq_len=1024)
QUIET = dict(print_fn=lambda *a, **k: None)
HAS_FUGASHI = all(importlib.util.find_spec(m) for m in ("fugashi", "neologdn", "emoji"))  # xlsum's ROUGE


# --------------------------------------------------------------------------------------------------
# Data in the upstream layout, written here
# --------------------------------------------------------------------------------------------------


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


QA = [("日本の首都はどこですか？", ["大阪", "東京", "京都", "福岡", "札幌"], 1),
      ("雨の日に使うものは？", ["傘", "扇子", "鍋", "靴", "本"], 0),
      ("一年は何か月？", ["十", "十一", "十二", "十三", "九"], 2),
      ("冬の次の季節は？", ["夏", "秋", "冬", "春", "梅雨"], 3),
      ("魚が住む場所は？", ["山", "海", "空", "砂漠", "森"], 1),
      ("朝に昇るものは？", ["月", "星", "太陽", "雲", "虹"], 2)]
NLI = [("犬が走っています。", "動物が動いています。", 0), ("犬が走っています。", "犬は眠っています。", 1),
       ("犬が走っています。", "犬は三歳です。", 2), ("猫が寝ています。", "猫がいます。", 0),
       ("猫が寝ています。", "猫が走っています。", 1), ("猫が寝ています。", "猫は白いです。", 2)]
REVIEWS = [("とても良い商品です。", 0), ("すぐ壊れました。", 1), ("大満足です。", 0), ("最悪でした。", 1),
           ("また買います。", 0), ("二度と買いません。", 1)]
PASSAGES = [("富士山", "富士山は標高3776メートルの山である。", "富士山の標高は？", "3776メートル"),
            ("琵琶湖", "琵琶湖は滋賀県にある湖である。", "琵琶湖はどこにある？", "滋賀県"),
            ("将棋", "将棋は二人で指す遊びである。", "将棋は何人で指す？", "二人"),
            ("味噌", "味噌は大豆から作られる。", "味噌の原料は？", "大豆"),
            ("桜", "桜は春に咲く花である。", "桜はいつ咲く？", "春")]


def bench_records() -> dict[str, dict[str, list[dict]]]:
    """{task: {split: records}} for every benchmark, with the upstream fields."""
    jcqa = [{"q_id": i, "question": q, **{f"choice{j}": c[j] for j in range(5)}, "label": label}
            for i, (q, c, label) in enumerate(QA)]
    jnli = [{"sentence_pair_id": str(i), "sentence1": a, "sentence2": b, "label": label}
            for i, (a, b, label) in enumerate(NLI)]
    marc = [{"review_id": f"R{i}", "sentence": s, "label": label} for i, (s, label) in enumerate(REVIEWS)]
    squad = []
    for i, (title, text, q, a) in enumerate(PASSAGES):
        context = f"{title} [SEP] {text}"
        squad.append({"id": f"q{i}", "title": title, "context": context, "question": q,
                      "answers": {"text": [a], "answer_start": [context.index(a, len(title) + 7)]}})
    jaqket = [{"qid": f"J{i}", "question": q, "answers": {"text": [a]},
               "ctxs": {"id": [1, 2], "title": [t, "別"], "text": [x, "関係のない文。"], "has_answer": [True, False]}}
              for i, (t, x, q, a) in enumerate(PASSAGES)]
    mgsm_train = [{"question": f"問題：りんごが{a}個、みかんが{b}個あります。全部で何個？",
                   "answer": f"ステップごとの答え：{a}+{b}={a + b}。答えは{a + b}です。", "answer_number": a + b,
                   "equation_solution": f"{a}+{b}={a + b}"} for a, b in ((1, 2), (2, 3), (3, 1), (4, 2), (1, 1))]
    mgsm_test = [{"question": f"{a}足す{b}は？", "answer": None, "answer_number": a + b, "equation_solution": None}
                 for a, b in ((2, 2), (3, 4), (5, 1), (1, 6), (2, 7))]
    xlsum = [{"id": str(i), "url": "", "title": t, "summary": x.split("は")[0] + "について。", "text": x * 2}
             for i, (t, x, _, _) in enumerate(PASSAGES)]
    wino = [{"sentence1": "太郎は花子に本を貸した。花子は本を読んだ。",
             "sentence2": "太郎は花子に本を貸した。本は花子を読んだ。", "answer": "1"},
            {"sentence1": "雨が降ったので傘を差した。", "sentence2": "傘を差したので雨が降った。", "answer": "1"},
            {"sentence1": "猫は魚を食べた。魚は猫を食べた。", "sentence2": "猫は魚を食べた。それはおいしかった。",
             "answer": "2"},
            {"sentence1": "ボールが窓を割った。それは硬かった。", "sentence2": "ボールが窓を割った。窓が投げた。",
             "answer": "1"},
            {"sentence1": "氷は冷たいので溶けた。", "sentence2": "氷は暖かい部屋で溶けた。", "answer": "2"}]
    half = lambda rows: {"train": rows[: len(rows) // 2 + 1], "validation": rows}  # noqa: E731
    return {"jcommonsenseqa": half(jcqa), "jnli": half(jnli), "marc_ja": half(marc), "jsquad": half(squad),
            "jaqket_v2": half(jaqket), "mgsm": {"train": mgsm_train, "test": mgsm_test},
            "xlsum": {"train": xlsum, "test": xlsum}, "xwinograd": {"test": wino}}


def write_bench_data(root: Path) -> Path:
    for name, splits in bench_records().items():
        for split, rows in splits.items():
            _jsonl(data_file(root, TASKS[name], split), rows)
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_bench_data(tmp_path_factory.mktemp("bench_data"))


@pytest.fixture(scope="module")
def hf_dir(tiny_corpus, tmp_path_factory):
    """A tiny random model with the tiny tokenizer (whose tokenizer(text) adds BOS) and alpaca_ja."""
    model = build_model(CFG, seed=5).eval()
    out = export_hf(model.state_dict(), CFG, tmp_path_factory.mktemp("eval_hf") / "hf", dtype=torch.float32,
                    tokenizer_dir=tiny_corpus["tokenizer"])
    write_chat_template(out, "alpaca_ja")
    return out


@pytest.fixture(scope="module")
def loaded(hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(hf_dir))


@pytest.fixture(scope="module")
def task_dir(data_dir, tmp_path_factory):
    return write_task_dir(tmp_path_factory.mktemp("tasks"), data_dir, cache_dir=tmp_path_factory.mktemp("hfds"))


MC_TASKS = ["jcommonsenseqa", "jnli", "marc_ja"]


def harness(loaded, task_dir, tasks, **kw):
    with offline():
        return run_harness(*loaded, tasks, task_dir, **kw)


@pytest.fixture(scope="module")
def mc_results(loaded, task_dir):
    return harness(loaded, task_dir, MC_TASKS, batch_size=8, limit=5, add_bos_token=True)


# --------------------------------------------------------------------------------------------------
# The harness's numbers against tanuki's model
# --------------------------------------------------------------------------------------------------


def tanuki_loglikelihood(model, tokenizer, context: str, continuation: str, add_bos: bool) -> float:
    """log p(continuation | context) with tanuki's model, the pair tokenized as the harness documents it
    (trailing spaces of the context move to the continuation; the continuation's tokens are those of the
    whole text after the context's)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    enc = lambda s: tokenizer(s, add_special_tokens=add_bos)["input_ids"]  # noqa: E731
    whole, ctx = enc(context + continuation), enc(context)
    cont = whole[len(ctx):]
    ids = torch.tensor([(ctx + cont)[-(model.cfg.max_seq_len + 1):][:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).float(), dim=-1)[0]
    targets = torch.tensor(cont)
    return float(logp[-len(cont):].gather(1, targets[:, None]).sum())


def test_harness_loglikelihoods_equal_tanukis_own_scores(mc_results, hf_dir, loaded):
    model = import_hf(hf_dir).eval()
    tokenizer = loaded[1]
    worst = 0.0
    for task in MC_TASKS:
        samples = mc_results["samples"][task]
        assert len(samples) == 5
        correct = []
        for s in samples:
            ours = [tanuki_loglikelihood(model, tokenizer, ctx, cont, add_bos=True) for ctx, cont in s["arguments"]]
            theirs = [r[0][0] for r in s["resps"]]
            for a, b in zip(ours, theirs):
                worst = max(worst, abs(a - b))
                assert a == pytest.approx(b, abs=1e-5, rel=0), (task, s["doc_id"])
            correct.append(float(max(range(len(ours)), key=ours.__getitem__) == s["target"]))
            assert s["arguments"][0][0].startswith("以下は、タスクを説明する指示と"), "the upstream prompt"
        assert mc_results["results"][task]["acc,none"] == pytest.approx(sum(correct) / len(correct), abs=1e-12)
    assert worst < 1e-5
    print(f"largest |harness - tanuki| log-likelihood difference: {worst:.2e}")


def test_batch_size_one_and_eight_give_the_same_scores(mc_results, loaded, task_dir):
    one = harness(loaded, task_dir, MC_TASKS, batch_size=1, limit=5, add_bos_token=True)
    for task in MC_TASKS:
        for a, b in zip(one["samples"][task], mc_results["samples"][task]):
            assert a["arguments"] == b["arguments"]
            for ra, rb in zip(a["resps"], b["resps"]):
                assert ra[0][0] == pytest.approx(rb[0][0], abs=1e-5, rel=0)
        assert one["results"][task]["acc,none"] == mc_results["results"][task]["acc,none"]


def test_bos_reaches_the_prompt_as_chosen(loaded, task_dir, hf_dir):
    """add_bos_token=False: the harness's token ids are tokenizer(text, add_special_tokens=False)."""
    results = harness(loaded, task_dir, ["marc_ja"], batch_size=8, limit=2, add_bos_token=False)
    model = import_hf(hf_dir).eval()
    for s in results["samples"]["marc_ja"]:
        for (ctx, cont), resp in zip(s["arguments"], s["resps"]):
            ours = tanuki_loglikelihood(model, loaded[1], ctx, cont, add_bos=False)
            assert ours == pytest.approx(resp[0][0], abs=1e-5, rel=0)
            assert ours != pytest.approx(tanuki_loglikelihood(model, loaded[1], ctx, cont, add_bos=True), abs=1e-3)


# --------------------------------------------------------------------------------------------------
# Every shipped task on local files
# --------------------------------------------------------------------------------------------------


def test_every_shipped_yaml_is_a_known_task():
    names = {p.stem for p in TASKS_DIR.glob("*.yaml")}
    assert names == set(task_names())
    assert set(GROUPS["ja"]) == {"jcommonsenseqa", "jnli", "marc_ja", "jsquad"}
    for name, task in TASKS.items():
        cfg = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
        assert cfg["include"].endswith(f"/{task.upstream}.yaml") and cfg["num_fewshot"] == task.num_fewshot
        files = cfg["dataset_kwargs"]["data_files"]
        assert set(files) == set(task.splits)
        assert all(v == f"${{DATA_DIR}}/{task.data_name}/{k}.jsonl" for k, v in files.items())


def test_mode_tasks_writes_a_folder_the_lm_eval_cli_indexes(data_dir, tmp_path):
    """Every shipped YAML, resolved, is a task (or group) the harness's own indexer finds by its short name."""
    from lm_eval.tasks import TaskManager

    from tanuki.evaluate import main

    lines = []
    main(EvaluateConfig(mode="tasks", data_dir=str(data_dir), output=str(tmp_path)), print_fn=lines.append)
    assert f"--include_path {tmp_path} --tasks ja" in lines[-1]
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    assert set(manager.all_tasks) == set(task_names())
    jnli = yaml.safe_load((tmp_path / "jnli.yaml").read_text(encoding="utf-8"))
    assert jnli["dataset_kwargs"]["data_files"]["validation"] == str((data_dir / "JNLI/validation.jsonl").resolve())
    assert Path(jnli["include"]).is_file() and "cache_dir" not in jnli["dataset_kwargs"]


def plain_tasks():
    return [t for t in TASKS if t != "xlsum" or HAS_FUGASHI]


def test_every_plain_task_runs_offline_on_local_files(hf_dir, data_dir, tmp_path):
    tasks = plain_tasks()
    out = evaluate(EvaluateConfig(model=str(hf_dir), tasks=tuple(tasks), data_dir=str(data_dir), limit=3,
                                  max_gen_toks=8, output=str(tmp_path)), **QUIET)
    results = out.results
    assert sorted(results["configs"]) == sorted(tasks)
    for name in tasks:
        task = TASKS[name]
        assert results["n-samples"][name]["effective"] == 3
        assert results["n-shot"][name] == task.num_fewshot
        assert any(k.startswith(task.metric + ",") for k in results["results"][name]), (name, results["results"][name])
        files = results["configs"][name]["dataset_kwargs"]["data_files"]
        assert {Path(v) for v in files.values()} == {data_file(data_dir, task, s).resolve() for s in task.splits}
    assert {r["task"] for r in metric_rows(results)} == set(tasks)
    saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert {"configs", "versions", "n-shot", "n-samples", "tanuki"} <= set(saved)
    assert saved["tanuki"]["add_bos_token"] is True and "tokenizer(text)" in saved["tanuki"]["add_bos_token_reason"]
    assert saved["tanuki"]["apply_chat_template"] is False and saved["tanuki"]["fewshot_as_multiturn"] is False
    assert (tmp_path / "results.md").read_text(encoding="utf-8").count("\n| ") == len(metric_rows(results)) + 1
    assert (tmp_path / "samples_jsquad.jsonl").is_file()


def test_every_chat_variant_runs_with_the_chat_template(hf_dir, data_dir, tmp_path, loaded):
    tasks = [t for t in plain_tasks() if TASKS[t].chat]
    out = evaluate(EvaluateConfig(model=str(hf_dir), tasks=tuple(tasks), data_dir=str(data_dir), limit=2,
                                  max_gen_toks=8, apply_chat_template=True, output=str(tmp_path)), **QUIET)
    assert sorted(out.results["configs"]) == sorted(t + CHAT_SUFFIX for t in tasks)
    info = out.info
    assert info["add_bos_token"] is False and info["chat_template_name"] == "alpaca_ja"
    assert info["fewshot_as_multiturn"] is True
    # The prompt is the conversation rendered by the tokenizer's template: BOS once, no doubled headers,
    # the shots as earlier turns, the fixed Alpaca system sentence.
    tokenizer = loaded[1]
    sample = out.results["samples"]["jcommonsenseqa_chat"][0]
    context = sample["arguments"][0][0]
    assert context.startswith(tokenizer.bos_token) and context.count(tokenizer.bos_token) == 1
    assert "### 指示：" not in context and context.count("### 指示:\n") == 4 and context.endswith("### 応答:\n")
    doc = sample["doc"]
    choices = "\n".join(f"- {doc[f'choice{i}']}" for i in range(5))
    assert context.endswith(f"質問：{doc['question']}\n選択肢：\n{choices}\n\n### 応答:\n")


def test_the_bundled_demo_items_are_in_the_upstream_layout(hf_dir, tmp_path):
    card = [TASKS[t] for t in GROUPS["ja"]]
    found = check_task_data(card, SAMPLE_DATA_DIR)
    assert len(found) == 8 and all(10 <= f["rows"] <= 20 for f in found.values())
    out = evaluate(EvaluateConfig(model=str(hf_dir), data_dir="sample", limit=2, max_gen_toks=4, output=str(tmp_path),
                                  log_samples=False), **QUIET)
    assert [r["task"] for r in metric_rows(out.results)] == list(GROUPS["ja"])
    assert "bundled demo items" in out.table and not list(tmp_path.glob("samples_*"))


# --------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A source folder in four different local layouts, and the data_dir prepare made of it."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = bench_records()
    src = tmp_path_factory.mktemp("source")
    # JCommonsenseQA: a DatasetDict saved with save_to_disk (ClassLabel labels)
    features = datasets.Features({"q_id": datasets.Value("int64"), "question": datasets.Value("string"),
                                  **{f"choice{i}": datasets.Value("string") for i in range(5)},
                                  "label": datasets.ClassLabel(num_classes=5)})
    datasets.DatasetDict({s: datasets.Dataset.from_list(r, features=features)
                          for s, r in records["jcommonsenseqa"].items()}).save_to_disk(str(src / "JCommonsenseQA"))
    # JNLI: a clone of the JGLUE repository (JSON lines, labels spelled out, valid- for validation)
    names = {0: "entailment", 1: "contradiction", 2: "neutral"}
    for split, rows in records["jnli"].items():
        jsplit = "valid" if split == "validation" else split
        _jsonl(src / "datasets/jnli-v1.1" / f"{jsplit}-v1.1.json", [{**r, "label": names[r["label"]]} for r in rows])
    # MARC-ja: the Hub's parquet shards
    (src / "MARC-ja").mkdir()
    for split, rows in records["marc_ja"].items():
        pq.write_table(pa.Table.from_pylist(rows), src / "MARC-ja" / f"{split}-00000-of-00001.parquet")
    # JSQuAD: JGLUE's SQuAD-format JSON (answers as a list of records)
    for split, rows in records["jsquad"].items():
        doc = {"version": "v1.1", "data": [{"title": r["title"], "paragraphs": [{"context": r["context"], "qas": [
            {"id": r["id"], "question": r["question"], "is_impossible": False,
             "answers": [{"text": t, "answer_start": a}
                         for t, a in zip(r["answers"]["text"], r["answers"]["answer_start"])]}]}]}
            for r in rows]}
        path = src / "datasets/jsquad-v1.1" / f"{'valid' if split == 'validation' else split}-v1.1.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    out = tmp_path_factory.mktemp("prepared")
    written = prepare_data(["ja"], out, src, **QUIET)
    return {"source": src, "out": out, "written": written, "records": records}


def test_prepare_writes_exactly_the_files_the_tasks_read(prepared, tmp_path):
    out = prepared["out"]
    on_disk = sorted(p for p in out.rglob("*") if p.is_file())
    assert sorted(prepared["written"]) == on_disk
    tasks = write_task_dir(tmp_path / "tasks", out)
    read = set()
    for name in GROUPS["ja"]:
        cfg = yaml.safe_load((tasks / f"{name}.yaml").read_text(encoding="utf-8"))
        read |= {Path(v) for v in cfg["dataset_kwargs"]["data_files"].values()}
    assert read == {p.resolve() for p in on_disk}
    check_task_data([TASKS[t] for t in GROUPS["ja"]], out)
    for name in GROUPS["ja"]:
        for split, expected in prepared["records"][name].items():
            lines = data_file(out, TASKS[name], split).read_text(encoding="utf-8").splitlines()
            got = [json.loads(line) for line in lines]
            keep = ("id", "context", "question", "answers") if name == "jsquad" else tuple(expected[0])
            assert [{k: g[k] for k in keep} for g in got] == [{k: e[k] for k in keep} for e in expected], (name, split)


def test_prepare_names_the_task_and_what_it_looked_for(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(EvalError, match=r"task jnli: no train split of JNLI in .*looked for .*JNLI/train\.jsonl"):
        prepare_data(["jnli"], tmp_path / "out", tmp_path / "src", **QUIET)
    _jsonl(tmp_path / "src/JNLI/train.jsonl", [{"sentence1": "a", "sentence2": "b", "label": "maybe"}])
    with pytest.raises(EvalError, match="label 'maybe' is none of entailment, contradiction, neutral"):
        prepare_data(["jnli"], tmp_path / "out", tmp_path / "src", **QUIET)
    assert not (tmp_path / "out/JNLI/train.jsonl").exists()


# --------------------------------------------------------------------------------------------------
# A run: results in the run dir, metrics.jsonl, its W&B run; compare
# --------------------------------------------------------------------------------------------------


def make_run(run_dir: Path, corpus: dict, steps=(2, 4)) -> Path:
    """A run directory as the training stages write it: config.yaml, tokenizer/, metrics.jsonl, its
    offline W&B run, and ZeRO-0 checkpoints (the module's weights in mp_rank_00_model_states.pt)."""
    from tanuki.checkpoint import begin_checkpoint, commit_checkpoint, step_tag
    from tanuki.config import WandbConfig, to_dict
    from tanuki.metrics import MetricsLogger
    from tanuki.stage import write_run_files

    config = {"model": to_dict(CFG), "parallel": {"tp": 1, "sp": False, "zero_stage": 0},
              "train": {"seq_len": 32, "global_batch_size": 8}, "data": {"prefixes": [corpus["prefix"]]},
              "logging": {"wandb": {"mode": "offline", "project": "tanuki-test"}}}
    write_run_files(config, corpus["tokenizer"], run_dir)
    logger = MetricsLogger(run_dir, wandb=WandbConfig(mode="offline", project="tanuki-test"), **QUIET)
    for step in range(1, max(steps) + 1):
        logger.log({"step": step, "tokens": step * 8 * 32 + 5, "loss": 7.0 - step * 0.1})
    logger.close()
    root = run_dir / "checkpoints"
    for step in steps:
        partial = begin_checkpoint(root, step)
        model = build_model(CFG, seed=step)
        torch.save({"module": model.state_dict()}, partial / "mp_rank_00_model_states.pt")
        commit_checkpoint(root, step, {"stage": "pretrain", "step": step, "skipped_steps": 0, "world_size": 1,
                                       "zero_stage": 0, "config": config}, keep_last=0)
        assert (root / step_tag(step)).is_dir()
    return run_dir


@pytest.fixture(scope="module")
def run_eval(tiny_corpus, prepared, tmp_path_factory):
    run_dir = make_run(tmp_path_factory.mktemp("run"), tiny_corpus)
    data = str(prepared["out"])
    latest = evaluate(EvaluateConfig(model=str(run_dir), data_dir=data, limit=3, max_gen_toks=4), **QUIET)
    first = evaluate_checkpoint(run_dir / "checkpoints/step_00000002", run_dir,
                                EvalConfig(tasks=("ja",), data_dir=data, limit=3), **QUIET)
    return {"run_dir": run_dir, "latest": latest, "first": first}


def test_results_land_in_the_run_directory(run_eval):
    run_dir, latest = run_eval["run_dir"], run_eval["latest"]
    out = run_dir / "eval/step_00000004"
    assert latest.out_dir == out and (out / "results.json").is_file() and (out / "results.md").is_file()
    assert run_eval["first"].out_dir == run_dir / "eval/step_00000002"
    assert not list((run_dir / "eval").glob(".export-*")), "the temporary export is removed"
    info = json.loads((out / "results.json").read_text(encoding="utf-8"))["tanuki"]
    assert info["step"] == 4 and info["tokens"] == 4 * 8 * 32 + 5, "tokens of the training record of that step"
    # The pretraining documents (tanuki's preprocessing, bos=auto) start with BOS, as tokenizer(text) does.
    assert info["add_bos_token"] is True and info["tokenizer_adds_bos"] is True
    assert "pretraining documents" in info["add_bos_token_reason"]
    first_ctx = latest.results["samples"]["jnli"][0]["arguments"][0][0]
    assert not first_ctx.startswith("<s>")


def test_metrics_jsonl_and_wandb_get_one_record_per_metric(run_eval):
    from tanuki.metrics import read_metrics

    run_dir = run_eval["run_dir"]
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]
    expected = run_eval["latest"].records + run_eval["first"].records
    assert records == expected and len(expected) == 8
    by_step = {s: {k: v for r in records if r["step"] == s for k, v in r.items()} for s in (2, 4)}
    for step, outcome in ((4, run_eval["latest"]), (2, run_eval["first"])):
        for row in metric_rows(outcome.results):
            assert by_step[step][f"eval/{row['task']}/{row['metric']}"] == row["value"]
        assert by_step[step]["tokens"] == step * 8 * 32 + 5
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    files = find_wandb_files(run_dir)
    assert len(files) == 3 and all(f.name == f"run-{run_id}.wandb" for f in files), "the run's own W&B run, resumed"
    history = [row for f in files for row in read_wandb_history(f, wait_for_exit=60)]
    logged = {}
    for row in history:
        for k, v in row.items():
            if k.startswith("eval/"):
                logged[(row["step"], k)] = v
    assert logged == {(r["step"], k): v for r in expected for k, v in r.items() if k.startswith("eval/")}


def test_evaluate_checkpoint_logs_through_the_jobs_logger_and_leaves_the_rngs(run_eval, prepared):
    """What a training job's rank 0 does: its open logger gets the records (no second W&B run is
    started), and the RNGs training draws from are as they were (the harness seeds them)."""
    import random

    import numpy as np

    class JobLogger:
        def __init__(self):
            self.records = []

        def log(self, record, line=None):
            self.records.append(dict(record))

    run_dir = run_eval["run_dir"]
    wandb_files = find_wandb_files(run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    job = JobLogger()
    out = evaluate_checkpoint(run_dir / "checkpoints/step_00000002", run_dir,
                              EvalConfig(tasks=("jnli",), data_dir=str(prepared["out"]), limit=2), logger=job, **QUIET)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]
    assert job.records == out.records and [set(r) for r in job.records] == [
        {"step", "tokens", "eval/jnli/acc", "eval/jnli/acc_stderr"}]
    assert find_wandb_files(run_dir) == wandb_files and (run_dir / "metrics.jsonl").read_text().splitlines() == lines
    assert evaluate_checkpoint(run_dir, run_dir, EvalConfig(), **QUIET) is None  # eval.tasks empty: off


def test_a_lora_sft_checkpoint_is_exported_merged_with_its_template(tiny_corpus, tmp_path):
    """A LoRA run's checkpoint holds base weights + factors: the export carries W + B A * scale (what
    the stage's own export writes) and the run's chat template, and BOS follows the template."""
    from tanuki.checkpoint import begin_checkpoint, commit_checkpoint
    from tanuki.config import to_dict
    from tanuki.evaluate import hf_directory, resolve_model
    from tanuki.lora import LoraConfig, apply_lora, merge_lora
    from tanuki.stage import write_run_files
    from tanuki.tokenizer.templates import get_template

    lora = LoraConfig(r=4, alpha=8.0, dropout=0.0)
    model = apply_lora(build_model(CFG, seed=1), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(0, 0.05)  # a trained adapter (B starts at zero)
    config = {"model": to_dict(CFG), "parallel": {"tp": 1}, "method": "lora", "lora": to_dict(lora),
              "template": "alpaca_ja", "data": {"path": ["sft.jsonl"]}}
    write_run_files(config, tiny_corpus["tokenizer"], tmp_path)
    partial = begin_checkpoint(tmp_path / "checkpoints", 3)
    torch.save({"module": model.state_dict()}, partial / "mp_rank_00_model_states.pt")
    commit_checkpoint(tmp_path / "checkpoints", 3, {"step": 3, "zero_stage": 0, "config": config}, keep_last=0)
    merged = merge_lora(model).state_dict()
    with hf_directory(resolve_model(tmp_path), "float32", **QUIET) as hf:
        exported = import_hf(hf).state_dict()
        tok_cfg = json.loads((hf / "tokenizer_config.json").read_text(encoding="utf-8"))
        from transformers import AutoTokenizer

        bos = choose_bos(AutoTokenizer.from_pretrained(hf), run_dir=tmp_path, apply_chat_template=False)
    for name, value in exported.items():
        if not name.endswith("inv_freq"):
            torch.testing.assert_close(value, merged[name], rtol=0, atol=0)
    assert any(not torch.equal(merged[k], v) for k, v in build_model(CFG, seed=1).state_dict().items()
               if k in merged and not k.endswith("inv_freq")), "the adapters changed some weights"
    assert tok_cfg["chat_template"] == get_template("alpaca_ja").jinja
    assert bos == (True, "the run's data was rendered with the alpaca_ja template, which writes BOS")


def test_compare_writes_a_table_and_a_plot_against_tokens(run_eval, tmp_path):
    table, md, png = compare_results([run_eval["run_dir"]], tmp_path, **QUIET)
    assert md.read_text(encoding="utf-8") == table and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = table.splitlines()
    assert lines[0].startswith("| checkpoint | step | tokens | jcommonsenseqa/acc")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| step_00000002", "| step_00000004"]
    assert "| 1,029 |" in lines[3]  # 4 x 8 x 32 + 5 tokens: the training record of step 4
    value = run_eval["latest"].results["results"]["jnli"]["acc,none"]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert float(cells[header.index("jnli/acc")]) == pytest.approx(value, abs=5e-5)


# --------------------------------------------------------------------------------------------------
# BOS and template choices
# --------------------------------------------------------------------------------------------------


def test_bos_follows_what_the_model_was_trained_on(loaded, tiny_corpus, tmp_path):
    tok = loaded[1]

    def with_config(config):
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        return choose_bos(tok, run_dir=tmp_path, apply_chat_template=False)

    assert choose_bos(tok, run_dir=None, apply_chat_template=False)[0] is True  # tokenizer(text) does
    assert choose_bos(tok, run_dir=None, apply_chat_template=True)[0] is False  # the template writes it
    assert choose_bos(tok, run_dir=None, apply_chat_template=False, override=False)[0] is False
    assert with_config({"template": "alpaca_ja", "data": {"path": ["x.jsonl"]}})[0] is True
    assert with_config({"template": "tulu", "data": {"path": ["x.jsonl"]}})[0] is False
    assert with_config({"template": None})[0] is True  # DPO: the tokenizer's template, alpaca_ja here
    # tanuki's preprocessing writes BOS when the tokenizer adds one (bos=auto); bos=false data has none
    assert with_config({"data": {"prefixes": [tiny_corpus["prefix"]]}}) == (
        True, f"64 of the first 64 pretraining documents of {tiny_corpus['prefix']} start with BOS")
    no_bos = str(tmp_path / "no_bos")
    preprocess(PreprocessConfig(input=str(tiny_corpus["dir"] / "corpus.jsonl"), tokenizer=tiny_corpus["tokenizer"],
                                output_prefix=no_bos, progress=False, bos=False))
    assert with_config({"data": {"prefixes": [no_bos]}}) == (
        False, f"0 of the first 64 pretraining documents of {no_bos} start with BOS")
    assert with_config({"data": {"prefixes": ["/nonexistent/prefix"]}})[0] is False


def test_offline_switches_the_hub_off_and_back(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with offline():
        assert os.environ["HF_DATASETS_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE is True
        assert datasets.config.HF_HUB_OFFLINE is True
    assert "HF_DATASETS_OFFLINE" not in os.environ and huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_eval_config_cadence():
    assert not EvalConfig().enabled and not EvalConfig().due(10, 10)
    at_end = EvalConfig(tasks=("ja",), data_dir="d")
    assert [s for s in range(1, 11) if at_end.due(s, 10)] == [10]
    every = EvalConfig(tasks=("jnli",), data_dir="d", every=4)
    assert [s for s in range(1, 11) if every.due(s, 10)] == [4, 8, 10]
    with pytest.raises(ConfigError) as e:
        EvalConfig(tasks=("ja",))
    assert e.value.key == "eval.data_dir"


# --------------------------------------------------------------------------------------------------
# MT-Bench answers
# --------------------------------------------------------------------------------------------------


QUESTIONS = [
    {"question_id": 1, "category": "writing",
     "turns": ["京都についての短い詩を書いてください。", "それを英語に訳してください。"]},
    {"question_id": 2, "category": "math", "turns": ["3 + 4 はいくつですか？", "それに 5 を掛けると？"]},
    {"question_id": 3, "category": "humanities", "turns": ["江戸時代とは何ですか？", "一文で要約してください。"]},
]


def test_mt_bench_answers_are_fastchat_records_over_the_chat_template(hf_dir, loaded, tmp_path):
    (tmp_path / "question.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUESTIONS),
                                             encoding="utf-8")
    questions = read_questions(tmp_path / "question.jsonl")
    tokenizer = loaded[1]
    model = import_hf(hf_dir).eval()
    answers = mt_bench_answers(model, tokenizer, questions, model_id="tiny", max_new_tokens=6, seed=3)
    again = mt_bench_answers(model, tokenizer, questions, model_id="tiny", max_new_tokens=6, seed=3)
    assert [a.record["choices"] for a in answers] == [a.record["choices"] for a in again], "seeded"
    for q, a in zip(QUESTIONS, answers):
        rec = json.loads(json.dumps(a.record, ensure_ascii=False))  # what a line of the file reads back as
        assert set(rec) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert rec["question_id"] == q["question_id"] and rec["model_id"] == "tiny"
        assert isinstance(rec["answer_id"], str) and isinstance(rec["tstamp"], float)
        assert len(rec["choices"]) == 1 and rec["choices"][0]["index"] == 0
        turns = rec["choices"][0]["turns"]
        assert len(turns) == 2 and all(isinstance(t, str) for t in turns)
        assert a.temperature == MT_BENCH_TEMPERATURE[q["category"]]
        def rendered(conv):
            return tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]

        first = [{"role": "user", "content": q["turns"][0]}]
        second = [*first, {"role": "assistant", "content": turns[0]}, {"role": "user", "content": q["turns"][1]}]
        expected = [rendered(first), rendered(second)]
        assert a.prompts == [list(e) for e in expected]
        assert a.prompts[0][0] == tokenizer.bos_token_id and a.prompts[1][: len(a.prompts[0])] == a.prompts[0]
    assert {a.temperature for a in answers} == {0.5, 0.1, 0.2}


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_unknown_and_mismatched_tasks_are_config_errors():
    with pytest.raises(ConfigError, match=r"unknown task 'jglue'; valid: ja, jcommonsenseqa") as e:
        EvaluateConfig(model="m", data_dir="d", tasks=("jglue",))
    assert e.value.key == "tasks"
    with pytest.raises(ConfigError, match="apply_chat_template=true"):
        EvaluateConfig(model="m", data_dir="d", tasks=("jnli_chat",))
    with pytest.raises(ConfigError, match="xwinograd scores bare sentences"):
        resolve_tasks(["xwinograd"], apply_chat_template=True)
    assert resolve_tasks(["ja", "jnli"], apply_chat_template=True)[0] == ["ja_chat", "jnli_chat"]
    with pytest.raises(ConfigError) as e:
        from_dict(EvaluateConfig, {"model": "m"})
    assert e.value.key == "data_dir"


def test_missing_or_malformed_data_names_the_task_and_the_file(hf_dir, data_dir, tmp_path):
    with pytest.raises(EvalError, match=rf"task jsquad: missing data file {tmp_path}/JSQuAD/train\.jsonl"):
        evaluate(EvaluateConfig(model="no-such-model", data_dir=str(tmp_path), tasks=("jsquad",)), **QUIET)
    shutil.copytree(data_dir / "JNLI", tmp_path / "JNLI")
    _jsonl(tmp_path / "JNLI/validation.jsonl", [{"premise": "a", "hypothesis": "b", "label": 0}])
    with pytest.raises(EvalError, match=r"task jnli: .*validation\.jsonl:1 lacks the field\(s\) sentence1, sentence2"):
        evaluate(EvaluateConfig(model=str(hf_dir), data_dir=str(tmp_path), tasks=("jnli",)), **QUIET)


def test_a_model_without_a_tokenizer_is_a_clear_error(hf_dir, data_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(hf_dir / f, bare / f)
    with pytest.raises(EvalError, match="no tokenizer"):
        evaluate(EvaluateConfig(model=str(bare), data_dir=str(data_dir), tasks=("jnli",), limit=1), **QUIET)
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        evaluate(EvaluateConfig(model=str(tmp_path / "nope"), data_dir=str(data_dir), tasks=("jnli",)), **QUIET)


def test_the_cli_reports_bad_input_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "launch/evaluate.py", "model=whatever", f"data_dir={tmp_path}",
                           "tasks=[marc_ja]"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: task marc_ja: missing data file {tmp_path}/MARC-ja/train.jsonl")
    proc = subprocess.run([sys.executable, "launch/evaluate.py", "tasks=[nope]", "model=m", "data_dir=d"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "config key 'tasks': unknown task 'nope'" in proc.stderr


# --------------------------------------------------------------------------------------------------
# End to end: a real (ZeRO-3) training run, evaluated from the command line
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_trained_run_is_evaluated_from_the_command_line(tiny_corpus, data_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "TANUKI_RUN_DIR"):
        env.pop(var, None)
    run_dir = tmp_path / "run"
    replaced = ("train.max_steps=", "logging.wandb.mode=")
    overrides = [o for o in tiny_train_overrides(tiny_corpus, run_dir) if not o.startswith(replaced)]
    overrides += ["train.max_steps=2", "logging.wandb.mode=offline"]
    proc = subprocess.run([sys.executable, "launch/pretrain.py", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "launch/evaluate.py", f"model={run_dir}", f"data_dir={data_dir}",
                           "tasks=[jcommonsenseqa,jnli]", "limit=2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| jcommonsenseqa | acc |" in proc.stdout and "| jnli | acc |" in proc.stdout
    saved = json.loads((run_dir / "eval/step_00000002/results.json").read_text(encoding="utf-8"))
    assert saved["tanuki"]["step"] == 2 and saved["tanuki"]["tokens"] == 2 * 8 * 32
    assert saved["tanuki"]["add_bos_token"] is True  # the documents start with BOS (bos=auto)
    from tanuki.metrics import read_metrics

    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval/jnli/acc" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2
    assert evals[0]["eval/jnli/acc"] == saved["results"]["jnli"]["acc,none"]
    rows = [row for f in find_wandb_files(run_dir) for row in read_wandb_history(f, wait_for_exit=60)]
    assert any(row.get("eval/jnli/acc") == evals[0]["eval/jnli/acc"] for row in rows)


@pytest.mark.slow
def test_eval_during_training_records_each_evaluated_checkpoint(tiny_corpus, data_dir, tmp_path):
    """``eval.tasks`` in a stage config: rank 0 benchmarks the checkpoints of every ``eval.every`` steps and
    the final one; the records sit in metrics.jsonl at those steps, after the training records of the step."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "TANUKI_RUN_DIR"):
        env.pop(var, None)
    run_dir = tmp_path / "run"
    replaced = ("train.max_steps=", "logging.wandb.mode=", "checkpoint.every=")
    overrides = [o for o in tiny_train_overrides(tiny_corpus, run_dir) if not o.startswith(replaced)]
    overrides += ["train.max_steps=3", "logging.wandb.mode=disabled", "checkpoint.every=100", "eval.tasks=[jnli]",
                  f"eval.data_dir={data_dir}", "eval.limit=2", "eval.every=2"]
    proc = subprocess.run([sys.executable, "launch/pretrain.py", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from tanuki.metrics import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if "eval/jnli/acc" in r]
    assert [r["step"] for r in evals] == [2, 3]  # every 2 steps, and the final checkpoint
    for r in evals:
        saved = json.loads((run_dir / f"eval/step_{r['step']:08d}/results.json").read_text(encoding="utf-8"))
        assert r["eval/jnli/acc"] == saved["results"]["jnli"]["acc,none"]
    # the step-2 checkpoint was written for the benchmark although checkpoint.every=100
    assert (run_dir / "checkpoints/step_00000002").is_dir() or "step_00000002" in proc.stdout
