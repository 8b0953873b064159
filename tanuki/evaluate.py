"""Japanese benchmarks on any model tanuki makes, offline, recorded beside the run (``launch/evaluate.py``).

The model cards report lm-evaluation-harness scores on JGLUE (JCommonsenseQA, JNLI, MARC-ja accuracy,
3-shot; JSQuAD exact match, 2-shot). This module runs the harness in-process on a Hugging Face
directory, a run directory (its latest checkpoint) or a checkpoint, and writes what it found where the
run keeps everything else.

Tasks. ``tanuki/eval_tasks/*.yaml`` are lm-evaluation-harness task configs that ``include:`` the
harness's own ``japanese_leaderboard`` tasks (their prompts, metrics and filters, unchanged) and replace
only where the data comes from (``dataset_path: json`` + local ``data_files``) and the shot count (the
cards'). :func:`write_task_dir` fills in two paths (the upstream task folder and the data folder) and
writes them to a folder the harness indexes on its own (``include_defaults=False``: nothing of the
harness's thousands of other tasks is read). Short names: :data:`TASKS` (``jcommonsenseqa``, ``jnli``,
``marc_ja``, ``jsquad``, ``jaqket_v2``, ``mgsm``, ``xlsum``, ``xwinograd``) and the group ``ja`` (the four
of the cards). The upstream prompts bake Japanese Alpaca headers (``### 指示：`` ...) into the text, which
a chat template would then wrap in its own headers: with ``apply_chat_template=true`` every name
resolves to its ``*_chat`` variant, a plain instruction as the user turn.

Data. ``data_dir/<name>/<split>.jsonl`` with the upstream fields (:class:`BenchTask` says which);
:func:`prepare_data` writes that layout from the Hub (once, where it is reachable) or from local copies
(``save_to_disk`` folders, JSONL/JSON/parquet files, a clone of the JGLUE repository). A missing file
fails before anything is loaded, naming the task and the file. The evaluation itself never touches the
network: :func:`offline` sets ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` for its duration (and the
already-imported libraries' copies of them), so a missing file is an error, never a retry loop.

What the model is fed, on purpose (:func:`choose_bos`). The harness prepends BOS whenever the
tokenizer's post-processor does (tanuki's does: ``tokenizer(text)`` starts with BOS, as Llama's), while
tanuki's pretraining documents carry none and its chat templates write BOS themselves. The evaluation
gives the model what it was trained on: with a chat template, the rendered text as it is (no extra
BOS, as in SFT); without one, what the run's data did (the first tokens of the pretraining documents,
or the SFT template), else what ``tokenizer(text)`` does. The choice, its reason, the chat template and
whether few-shot examples were turns of the conversation are recorded with the results.

Results. The harness's results JSON (configs, n-shot, versions, sample counts, plus a ``tanuki`` section
with the choices above and the SHA-256 of every data file) and a markdown table go to
``<run dir>/eval/<checkpoint>/`` (an HF directory: ``output``, default ``<model dir>/eval/``), with the
per-sample records; for a run, one record per metric (``eval/<task>/<metric>`` and its stderr, at the
checkpoint's step and tokens) is appended to ``metrics.jsonl`` and logged to the run's own W&B run
through :class:`tanuki.metrics.MetricsLogger` (same run id, resumed; offline unless the run says
otherwise). :func:`compare_results` tabulates and plots several checkpoints against training tokens.

Also here: :func:`evaluate_checkpoint`, for rank 0 of a training job (export, evaluate, log; no
collective), and :func:`mt_bench_answers`, two-turn Japanese MT-Bench answers in FastChat's
``model_answer`` format (the GPT-4 judge stays outside tanuki).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Sequence

from tanuki.config import ConfigError, WandbConfig, from_dict, require

#: the shipped task configs (package data)
TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
#: the bundled demo items (``data_dir=sample``): a few hand-written items per split, not the benchmarks
SAMPLE_DATA_DIR = Path(__file__).resolve().parent / "sample_data" / "eval"
#: how to get lm-evaluation-harness with the Japanese tasks' extra dependencies (xlsum's MeCab ROUGE)
LM_EVAL_INSTALL = 'pip install "lm_eval[japanese-leaderboard]>=0.4.9"  (or: pip install -e ".[eval]")'


class EvalError(ValueError):
    """An evaluation that cannot run as asked: missing data, a model without a tokenizer, no harness."""


# --------------------------------------------------------------------------------------------------
# The benchmarks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchTask:
    """One benchmark: the shipped task ``<name>.yaml`` (and ``<name>_chat.yaml``) and its data."""

    #: short name, the task name in the harness and in the metric keys
    name: str
    #: the harness task the YAML includes (``lm_eval/tasks/japanese_leaderboard/<upstream>.yaml``)
    upstream: str
    #: where the upstream task downloads from: (dataset_path, dataset_name) on the Hub
    hub: tuple[str, Optional[str]]
    #: folder under data_dir (the upstream dataset_name where it names one)
    data_name: str
    #: splits the task reads, each ``data_dir/<data_name>/<split>.jsonl``
    splits: tuple[str, ...]
    #: fields every record must have (what the prompt, the target and the metric read)
    fields: tuple[str, ...]
    #: the metric the harness reports
    metric: str
    #: shots (the model cards')
    num_fewshot: int
    #: what the benchmark measures (docs and tables)
    measures: str
    #: label names some copies spell out, and the ids the upstream task expects
    labels: tuple[tuple[str, int], ...] = ()
    #: the dataset's folder stem in the JGLUE repository (``datasets/<jglue>-v1.1/``), for prepare
    jglue: Optional[str] = None
    #: whether a ``<name>_chat`` variant exists (xwinograd scores bare sentences: no prompt to wrap)
    chat: bool = True


TASKS: dict[str, BenchTask] = {t.name: t for t in (
    BenchTask("jcommonsenseqa", "ja_leaderboard_jcommonsenseqa", ("Rakuten/JGLUE", "JCommonsenseQA"),
              "JCommonsenseQA", ("train", "validation"),
              ("question", "choice0", "choice1", "choice2", "choice3", "choice4", "label"), "acc", 3,
              "commonsense knowledge: pick one of five answers to a question", jglue="jcommonsenseqa"),
    BenchTask("jnli", "ja_leaderboard_jnli", ("Rakuten/JGLUE", "JNLI"), "JNLI", ("train", "validation"),
              ("sentence1", "sentence2", "label"), "acc", 3,
              "natural language inference: entailment / contradiction / neutral of a sentence pair",
              labels=(("entailment", 0), ("contradiction", 1), ("neutral", 2)), jglue="jnli"),
    BenchTask("marc_ja", "ja_leaderboard_marc_ja", ("Rakuten/JGLUE", "MARC-ja"), "MARC-ja", ("train", "validation"),
              ("sentence", "label"), "acc", 3, "sentiment of a product review: positive / negative",
              labels=(("positive", 0), ("negative", 1)), jglue="marc_ja"),
    BenchTask("jsquad", "ja_leaderboard_jsquad", ("Rakuten/JGLUE", "JSQuAD"), "JSQuAD", ("train", "validation"),
              ("context", "question", "answers"), "exact_match", 2,
              "reading comprehension: generate the answer span of a Wikipedia passage", jglue="jsquad"),
    BenchTask("jaqket_v2", "ja_leaderboard_jaqket_v2", ("kumapo/JAQKET", "v2.0"), "JAQKET-v2.0",
              ("train", "validation"), ("question", "answers", "ctxs"), "exact_match", 1,
              "quiz question answering over retrieved Wikipedia passages (knowledge)"),
    BenchTask("mgsm", "ja_leaderboard_mgsm", ("juletxara/mgsm", "ja"), "mgsm-ja", ("train", "test"),
              ("question", "answer", "answer_number"), "acc", 5,
              "grade-school math word problems solved step by step (the last number is the answer)"),
    BenchTask("xlsum", "ja_leaderboard_xlsum", ("mkshing/xlsum_ja", None), "xlsum_ja", ("train", "test"),
              ("text", "summary"), "rouge2", 1, "news summarisation (ROUGE-2 over MeCab words)"),
    BenchTask("xwinograd", "ja_leaderboard_xwinograd", ("polm-stability/xwinograd-ja", None), "xwinograd-ja",
              ("test",), ("sentence1", "sentence2", "answer"), "acc", 0,
              "pronoun / commonsense resolution: the more likely of two sentences", chat=False),
)}

#: groups of tasks, as task YAMLs of their own (``ja.yaml``, ``ja_chat.yaml``)
GROUPS: dict[str, tuple[str, ...]] = {"ja": ("jcommonsenseqa", "jnli", "marc_ja", "jsquad")}

CHAT_SUFFIX = "_chat"


def task_names() -> list[str]:
    """Every name ``tasks=`` accepts."""
    return [*GROUPS, *TASKS, *(f"{t.name}{CHAT_SUFFIX}" for t in TASKS.values() if t.chat),
            *(f"{g}{CHAT_SUFFIX}" for g in GROUPS)]


def base_names(names: Sequence[str]) -> list[str]:
    """The names without a ``_chat`` suffix (a chat variant reads the data of its task)."""
    return [n[: -len(CHAT_SUFFIX)] if n.endswith(CHAT_SUFFIX) else n for n in names]


def resolve_tasks(names: Sequence[str], apply_chat_template: bool,
                  key: str = "tasks") -> tuple[list[str], list[BenchTask]]:
    """The harness task (or group) names to run and the benchmarks they cover, for ``tasks=`` names.

    With ``apply_chat_template`` each name becomes its ``_chat`` variant (the upstream prompts carry
    their own Alpaca headers); a ``_chat`` name without a chat template, an unknown name or xwinograd
    with a chat template is a :class:`ConfigError` on ``key``.
    """
    require(len(names) > 0, key, "name at least one task, e.g. tasks=[ja]")
    harness: list[str] = []
    covered: dict[str, BenchTask] = {}
    for name in names:
        base = name[: -len(CHAT_SUFFIX)] if name.endswith(CHAT_SUFFIX) else name
        if base not in TASKS and base not in GROUPS or (name != base and base in TASKS and not TASKS[base].chat):
            raise ConfigError(key, f"unknown task {name!r}; valid: {', '.join(task_names())}")
        if name != base and not apply_chat_template:
            raise ConfigError(key, f"{name!r} is a chat-style prompt: use it with apply_chat_template=true "
                                   f"(or ask for {base!r})")
        members = GROUPS.get(base, (base,))
        if apply_chat_template:
            plain = [m for m in members if not TASKS[m].chat]
            if plain:
                raise ConfigError(key, f"{plain[0]} scores bare sentences, with no prompt a chat template could "
                                       "wrap: evaluate it with apply_chat_template=false")
        harness.append(base + CHAT_SUFFIX if apply_chat_template else base)
        for m in members:
            covered[m] = TASKS[m]
    return list(dict.fromkeys(harness)), list(covered.values())


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def _check_common(cfg, prefix: str = "") -> None:
    """Checks shared by :class:`EvalConfig` and :class:`EvaluateConfig` (no file system access)."""
    require(cfg.batch_size >= 1, prefix + "batch_size", f"must be >= 1, got {cfg.batch_size}")
    require(cfg.limit is None or (cfg.limit > 0 and math.isfinite(cfg.limit)), prefix + "limit",
            f"must be a positive count (or a fraction < 1), got {cfg.limit}")
    require(cfg.num_fewshot is None or cfg.num_fewshot >= 0, prefix + "num_fewshot",
            f"must be >= 0, got {cfg.num_fewshot}")


@dataclass(frozen=True)
class EvalConfig:
    """``eval``: benchmarks during training, run by rank 0 on saved checkpoints
    (:func:`evaluate_checkpoint`); off while ``tasks`` is empty."""

    #: tasks or groups (tanuki's short names: ja, jcommonsenseqa, jnli, marc_ja, jsquad, jaqket_v2,
    #: mgsm, xlsum, xwinograd); empty = no benchmark during training
    tasks: tuple[str, ...] = ()
    #: evaluate the checkpoint of every this many optimizer steps; 0 = the final checkpoint only
    every: int = 0
    #: local task data (data_dir/<dataset>/<split>.jsonl, see launch/evaluate.py mode=prepare)
    data_dir: Optional[str] = None
    #: items per task (a count, or a fraction < 1); null = all
    limit: Optional[float] = None
    batch_size: int = 8
    #: shots for every task; null = each task's own (the model cards')
    num_fewshot: Optional[int] = None
    #: render prompts with the model's chat template (the chat-style task variants)
    apply_chat_template: bool = False

    def __post_init__(self) -> None:
        require(self.every >= 0, "eval.every", f"must be >= 0 (0: at the end only), got {self.every}")
        _check_common(self, "eval.")
        if self.tasks:
            require(bool(self.data_dir), "eval.data_dir", "is required with eval.tasks (a folder written by "
                                                          "launch/evaluate.py mode=prepare, or 'sample')")
            resolve_tasks(self.tasks, self.apply_chat_template, key="eval.tasks")

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)

    def due(self, step: int, last_step: int) -> bool:
        """Whether the checkpoint of ``step`` is to be evaluated in a run that ends at ``last_step``."""
        return self.enabled and (step == last_step or (self.every > 0 and step % self.every == 0))


@dataclass(frozen=True)
class EvaluateConfig:
    """``conf/evaluate.yaml``: ``python launch/evaluate.py model=<HF dir | run dir | checkpoint> ...``."""

    #: evaluate (the benchmarks) | prepare (write data_dir from the Hub or ``source``) | tasks (write the
    #: resolved task YAMLs for the lm_eval CLI) | mt_bench (answers to MT-Bench questions) | compare
    mode: Literal["evaluate", "prepare", "tasks", "mt_bench", "compare"] = "evaluate"
    #: a Hugging Face directory, a run directory (its latest checkpoint) or a checkpoint directory
    model: Optional[str] = None
    #: tasks or groups: ja (the model cards' four), jcommonsenseqa, jnli, marc_ja, jsquad, jaqket_v2, mgsm,
    #: xlsum, xwinograd
    tasks: tuple[str, ...] = ("ja",)
    #: local task data: data_dir/<dataset>/<split>.jsonl; 'sample' = the bundled demo items
    data_dir: Optional[str] = None
    #: items per task (a count, or a fraction < 1); null = all
    limit: Optional[float] = None
    batch_size: int = 8
    #: shots for every task; null = each task's own (the model cards')
    num_fewshot: Optional[int] = None
    #: render prompts with the model's chat template (every task becomes its chat-style variant)
    apply_chat_template: bool = False
    #: with a chat template: few-shot examples as earlier user/assistant turns (else one user turn)
    fewshot_as_multiturn: bool = True
    #: a system message before the task's own description
    system_instruction: Optional[str] = None
    #: prepend BOS to every prompt; null = as the model was trained (see tanuki/evaluate.py choose_bos)
    add_bos_token: Optional[bool] = None
    #: most tokens generated per answer in generation tasks; null = the harness's default (256)
    max_gen_toks: Optional[int] = None
    #: evaluate: results folder (default <run dir>/eval/<checkpoint>, or <model dir>/eval);
    #: prepare / tasks: the data / task folder to write; mt_bench: the answers folder; compare: where
    #: compare.md and compare.png go
    output: Optional[str] = None
    #: prepare: local copies to convert (save_to_disk folders, JSONL/JSON/parquet files, a JGLUE clone);
    #: null = download from the Hub
    source: Optional[str] = None
    #: prepare from a JGLUE clone: the version folder to read (datasets/<name>-v<version>/)
    jglue_version: str = "1.1"
    #: result folders (or run directories: all their eval/*) to tabulate and plot against tokens
    compare: tuple[str, ...] = ()
    #: mt_bench: FastChat question.jsonl ({question_id, category, turns})
    questions: Optional[str] = None
    #: mt_bench: the model_id written into the answers (default: the model's name)
    model_id: Optional[str] = None
    #: mt_bench: most new tokens per answer (FastChat's default)
    max_new_tokens: int = 1024
    #: mt_bench: sampling seed (question i, turn t use seed + 2i + t)
    seed: int = 0
    #: auto = cuda if available, else cpu
    device: str = "auto"
    #: auto = bfloat16 on CUDA, float32 on CPU (also the dtype a checkpoint is exported in)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    #: W&B mode for logging into a run; null = the run's own logging.wandb.mode
    wandb_mode: Optional[Literal["offline", "online", "disabled"]] = None
    #: write the harness's per-sample records (prompts, answers, scores) beside the results
    log_samples: bool = True

    def __post_init__(self) -> None:
        _check_common(self)
        require(self.max_gen_toks is None or self.max_gen_toks >= 1, "max_gen_toks", "must be >= 1")
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), "device",
                f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        action = self.action
        if action in ("evaluate", "mt_bench"):
            require(bool(self.model), "model", "is required: a Hugging Face directory, a run directory or a checkpoint")
        if action in ("evaluate", "tasks"):
            require(bool(self.data_dir), "data_dir", "is required: the folder mode=prepare wrote "
                                                     "(or data_dir=sample for the bundled demo items)")
        if action in ("prepare", "tasks"):
            require(bool(self.output), "output", f"is required with mode={action}: the folder to write")
        if action == "mt_bench":
            require(bool(self.questions), "questions", "is required with mode=mt_bench: a FastChat question.jsonl")
        if action in ("evaluate", "tasks"):
            resolve_tasks(self.tasks, self.apply_chat_template)
        if action == "prepare":
            resolve_tasks(base_names(self.tasks), apply_chat_template=False)

    @property
    def action(self) -> str:
        """The mode, with ``compare=[...]`` alone meaning mode=compare."""
        if self.mode == "evaluate" and self.compare:
            return "compare"
        if self.mode == "compare":
            require(bool(self.compare), "compare", "name the result folders or run directories to compare")
        return self.mode

    def resolved_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self, device) -> str:
        if self.dtype == "auto":
            return "bfloat16" if device.type == "cuda" else "float32"
        return self.dtype

    def harness_limit(self) -> Optional[int | float]:
        """``limit`` as the harness takes it: a count as an int, a fraction as a float."""
        if self.limit is None:
            return None
        return int(self.limit) if float(self.limit).is_integer() else float(self.limit)


# --------------------------------------------------------------------------------------------------
# Offline, and the harness
# --------------------------------------------------------------------------------------------------

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """No Hub access inside: the environment variables, and the constants that ``huggingface_hub`` and
    ``datasets`` read from them at import time (they may be imported already, e.g. by a training job)."""
    import sys

    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    patched: list[tuple[Any, str, Any]] = []
    for k in _OFFLINE_ENV:
        os.environ[k] = "1"
    for module, names in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        mod = sys.modules.get(module)
        for name in names:
            if mod is not None and hasattr(mod, name):
                patched.append((mod, name, getattr(mod, name)))
                setattr(mod, name, True)
    try:
        yield
    finally:
        for mod, name, value in patched:
            setattr(mod, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        import lm_eval.tasks
    except ImportError as e:
        raise EvalError(f"lm-evaluation-harness is not installed ({e}): {LM_EVAL_INSTALL}") from None
    return lm_eval


def upstream_task_dir() -> Path:
    """The harness's ``japanese_leaderboard`` task folder, which the shipped YAMLs include."""
    lm_eval = _import_lm_eval()
    folder = Path(lm_eval.tasks.__file__).resolve().parent / "japanese_leaderboard"
    if not folder.is_dir():
        raise EvalError(f"{folder}: this lm_eval ({lm_eval_version()}) has no japanese_leaderboard tasks; "
                        f"{LM_EVAL_INSTALL}")
    return folder


def lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "not installed"


def resolve_data_dir(data_dir: str) -> Path:
    """``data_dir``, with ``sample`` meaning the bundled demo items."""
    return SAMPLE_DATA_DIR if data_dir == "sample" else Path(data_dir)


def _substitute(value: Any, mapping: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        for placeholder, text in mapping.items():
            value = value.replace(placeholder, text)
        return value
    if isinstance(value, dict):
        return {k: _substitute(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, mapping) for v in value]
    return value


def write_task_dir(out: str | os.PathLike, data_dir: str | os.PathLike, *,
                   cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Write the shipped task YAMLs into ``out`` with the upstream task folder and ``data_dir`` filled in.

    The result is an ordinary lm-evaluation-harness task folder (``lm_eval --include_path out``).
    ``cache_dir`` goes into every task's ``dataset_kwargs`` (where ``datasets`` keeps its Arrow copy of
    the JSONL files). The YAMLs are read and written as data (they hold no ``!function`` tags; the
    upstream files they include do, resolved by the harness beside those files), so any path is safe.
    """
    import yaml

    mapping = {"${LM_EVAL_JA}": str(upstream_task_dir()), "${DATA_DIR}": str(Path(data_dir).resolve())}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for src in sorted(TASKS_DIR.glob("*.yaml")):
        cfg = _substitute(yaml.safe_load(src.read_text(encoding="utf-8")), mapping)
        if cache_dir is not None and isinstance(cfg.get("dataset_kwargs"), dict):
            cfg["dataset_kwargs"]["cache_dir"] = str(cache_dir)
        (out / src.name).write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return out


def data_file(data_dir: str | os.PathLike, task: BenchTask, split: str) -> Path:
    """Where ``task`` reads ``split`` from."""
    return Path(data_dir) / task.data_name / f"{split}.jsonl"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_task_data(tasks: Sequence[BenchTask], data_dir: str | os.PathLike) -> dict[str, dict]:
    """Fail fast, naming the task and the file, unless every split file of ``tasks`` is there, is JSONL
    and its records have the fields the task reads. Returns ``{file: {"sha256", "rows"}}`` for the record."""
    found: dict[str, dict] = {}
    hint = f"write it with: python launch/evaluate.py mode=prepare output={data_dir} tasks=[...] [source=<local copy>]"
    for task in tasks:
        for split in task.splits:
            path = data_file(data_dir, task, split)
            if not path.is_file():
                raise EvalError(f"task {task.name}: missing data file {path} (the {split} split of {task.data_name}, "
                                f"JSONL with the fields {', '.join(task.fields)}); {hint}")
            rows = 0
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    rows += 1
                    if rows > 1:
                        continue  # the first record is checked; the harness reads the rest
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise EvalError(f"task {task.name}: {path}:{number} is not a JSON record ({e.msg})") from None
                    missing = [k for k in task.fields if not isinstance(record, dict) or k not in record]
                    if missing:
                        raise EvalError(f"task {task.name}: {path}:{number} lacks the field(s) {', '.join(missing)} "
                                        f"(expected {', '.join(task.fields)})")
            if rows == 0:
                raise EvalError(f"task {task.name}: {path} holds no records")
            found[str(path)] = {"sha256": sha256_file(path), "rows": rows}
    return found


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """What ``model=`` names: a Hugging Face directory, or a tanuki checkpoint (and its run)."""

    #: the HF directory, or the checkpoint directory
    path: Path
    #: the checkpoint to export first (None for an HF directory)
    checkpoint: Optional[Path]
    #: the run the checkpoint belongs to
    run_dir: Optional[Path]
    #: checkpoint directory name (step_00001000) or the model directory's name
    name: str
    step: Optional[int]


def resolve_model(model: str | os.PathLike) -> ModelRef:
    """An HF directory (it has config.json), else a run or checkpoint directory (its latest complete
    checkpoint); FileNotFoundError / CheckpointError otherwise."""
    p = Path(model)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model directory, run directory or checkpoint")
    if p.is_dir() and (p / "config.json").is_file():
        return ModelRef(p, None, None, p.resolve().name, None)
    from tanuki.checkpoint import read_state, resolve_checkpoint

    ckpt = resolve_checkpoint(p)
    return ModelRef(ckpt, ckpt, ckpt.parent.parent, ckpt.name, int(read_state(ckpt)["step"]))


def run_config(run_dir: Optional[Path]) -> dict:
    """The resolved config a training run wrote (``<run dir>/config.yaml``), or {}."""
    if run_dir is None or not (Path(run_dir) / "config.yaml").is_file():
        return {}
    import yaml

    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))
    return cfg if isinstance(cfg, dict) else {}


def checkpoint_tokens(run_dir: Path, step: int) -> Optional[int]:
    """Training tokens consumed up to ``step``: the training record of that step in metrics.jsonl, else
    step x global batch x sequence length from the run's config."""
    from tanuki.metrics import MetricsError, is_train, read_metrics

    try:
        for record in read_metrics(Path(run_dir) / "metrics.jsonl"):
            if is_train(record) and record["step"] == step and "tokens" in record:
                return int(record["tokens"])
    except (FileNotFoundError, MetricsError):
        pass
    train = run_config(run_dir).get("train") or {}
    if "global_batch_size" in train and "seq_len" in train:
        return int(step) * int(train["global_batch_size"]) * int(train["seq_len"])
    return None


def export_lora_checkpoint(checkpoint: Path, out: Path, lora: Mapping, dtype: str, tokenizer: Optional[Path]) -> Path:
    """A LoRA fine-tuning checkpoint as a plain HF directory: the adapters merged into the base weights,
    as the stage's own final export does."""
    import torch

    from tanuki.checkpoint import consolidate_checkpoint
    from tanuki.hf import export_hf
    from tanuki.lora import LoraConfig, merge_lora_state_dict

    model_cfg, sd = consolidate_checkpoint(checkpoint)
    sd = merge_lora_state_dict(sd, from_dict(LoraConfig, dict(lora), prefix="lora"))
    return export_hf(sd, model_cfg, out, dtype=getattr(torch, dtype), tokenizer_dir=tokenizer, overwrite=True)


@contextlib.contextmanager
def hf_directory(ref: ModelRef, dtype: str, print_fn: Callable[[str], None] = print) -> Iterator[Path]:
    """The HF directory of ``ref``: itself, or its checkpoint exported to a temporary one beside the
    run (``<run dir>/eval/.export-*``, removed afterwards) with the run's tokenizer and, for an SFT or
    DPO run, its chat template (LoRA adapters merged)."""
    if ref.checkpoint is None:
        yield ref.path
        return
    from tanuki.pretrain import export_checkpoint
    from tanuki.tokenizer.templates import write_chat_template

    config = run_config(ref.run_dir)
    parent = ref.run_dir / "eval"
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=parent) as tmp:
        out = Path(tmp) / "hf"
        t0 = time.perf_counter()
        if config.get("method") == "lora":
            tokenizer = ref.run_dir / "tokenizer"
            export_lora_checkpoint(ref.checkpoint, out, config.get("lora") or {}, dtype,
                                   tokenizer if tokenizer.is_dir() else None)
        else:
            export_checkpoint(ref.checkpoint, out, dtype=dtype)
        template = config.get("template")
        if isinstance(template, str) and (out / "tokenizer_config.json").is_file():
            write_chat_template(out, template)
        print_fn(f"exported {ref.checkpoint} ({dtype}) in {time.perf_counter() - t0:.1f} s")
        yield out


def check_tokenizer_files(hf_dir: Path, ref: Optional[ModelRef] = None) -> None:
    if (hf_dir / "tokenizer.json").is_file() or (hf_dir / "tokenizer.model").is_file():
        return
    if ref is not None and ref.checkpoint is not None:
        raise EvalError(f"{ref.checkpoint}: the run {ref.run_dir} has no tokenizer/ to export with the checkpoint; "
                        "export it yourself with launch/export_hf.py tokenizer=<dir> and evaluate that directory")
    raise EvalError(f"{hf_dir}: no tokenizer (tokenizer.json or tokenizer.model) in the model directory; copy the "
                    "tokenizer files into it (launch/export_hf.py tokenizer=<dir> does)")


def load_hf(hf_dir: Path, device, dtype: str, ref: Optional[ModelRef] = None):
    """``(model, tokenizer)`` from an HF directory with transformers (what the harness evaluates)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_tokenizer_files(hf_dir, ref)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).to(device).eval()
    return model, tokenizer


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` starts with BOS (the harness's default prompt encoding)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("日本")["input_ids"]
    return bool(ids) and ids[0] == bos


def template_name(chat_template: Optional[str]) -> Optional[str]:
    """The tanuki template whose Jinja ``chat_template`` is, if any."""
    from tanuki.tokenizer.templates import TEMPLATES

    for name, template in TEMPLATES.items():
        if chat_template == template.jinja:
            return name
    return None


def _pretraining_bos(prefixes: Sequence[str], bos_id: Optional[int], documents: int = 64) -> Optional[tuple[bool, str]]:
    from tanuki.data.indexed import IndexedDataset, dataset_exists

    for prefix in prefixes:
        if not dataset_exists(prefix):
            continue
        ds = IndexedDataset(prefix)
        n = min(documents, ds.num_documents)
        if n == 0:
            continue
        firsts = [int(doc[0]) for doc in (ds.document(i) for i in range(n)) if len(doc)]
        starts = sum(1 for t in firsts if bos_id is not None and t == bos_id)
        return starts * 2 > n, f"{starts} of the first {n} pretraining documents of {prefix} start with BOS"
    return None


def choose_bos(tokenizer, *, run_dir: Optional[Path], apply_chat_template: bool,
               override: Optional[bool] = None) -> tuple[bool, str]:
    """Whether the harness prepends BOS to every prompt, and why (recorded with the results).

    In order: ``override``; with a chat template never (the template writes BOS where the model saw it,
    and SFT tokenized the rendered text with ``add_special_tokens=False``); for a run, what its data did
    (an SFT/DPO run: its template; pretraining: the first tokens of its documents, and tanuki's
    preprocessing writes no BOS); otherwise what ``tokenizer(text)`` does.
    """
    if override is not None:
        return override, f"add_bos_token={str(override).lower()} was given"
    if apply_chat_template:
        return False, ("the chat template writes BOS itself; the rendered text is tokenized as in SFT, "
                       "with add_special_tokens=False")
    config = run_config(run_dir)
    if config:
        from tanuki.tokenizer.templates import TEMPLATES

        template = config.get("template") if "template" in config else None
        if "template" in config and template is None:
            template = template_name(getattr(tokenizer, "chat_template", None))
        if template in TEMPLATES:
            writes = TEMPLATES[template].writes_bos
            verb = "writes" if writes else "writes no"
            return writes, f"the run's data was rendered with the {template} template, which {verb} BOS"
        prefixes = (config.get("data") or {}).get("prefixes") or []
        if prefixes:
            found = _pretraining_bos([str(p) for p in prefixes], tokenizer.bos_token_id)
            if found is not None:
                return found
            return False, (f"the run's pretraining data ({prefixes[0]}) is not readable here; tanuki's preprocessing "
                           "writes no BOS")
    adds = tokenizer_adds_bos(tokenizer)
    return adds, f"tokenizer(text) {'starts with' if adds else 'adds no'} BOS"


# --------------------------------------------------------------------------------------------------
# Running the harness
# --------------------------------------------------------------------------------------------------


def run_harness(model, tokenizer, tasks: Sequence[str], task_dir: Path, *, batch_size: int = 8,
                limit: Optional[int | float] = None, num_fewshot: Optional[int] = None,
                apply_chat_template: bool = False, fewshot_as_multiturn: bool = False,
                system_instruction: Optional[str] = None, add_bos_token: Optional[bool] = None,
                max_gen_toks: Optional[int] = None, log_samples: bool = True) -> dict:
    """``lm_eval.simple_evaluate`` of a loaded transformers model on the tasks of ``task_dir``.

    The model is wrapped in the harness's ``HFLM`` as an object, so the harness sets up no process
    group of its own (safe on rank 0 of a training job). The harness seeds Python, NumPy and torch: the
    caller's RNG states are restored afterwards, so evaluating does not change what training draws.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tanuki.checkpoint import rng_state, set_rng_state

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=add_bos_token)
    saved = rng_state()
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot, limit=limit,
            log_samples=log_samples, apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=fewshot_as_multiturn and apply_chat_template,
            system_instruction=system_instruction,
            gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks is not None else None,
        )
    finally:
        set_rng_state(saved)
    if results is None:  # only on a non-zero harness rank, which HFLM-from-an-object never is
        raise EvalError("the harness returned no results")
    return results


def _task_rank(task: str) -> tuple[int, str]:
    """Tables list the tasks in the order of :data:`TASKS` (the cards' four first), a variant after its task."""
    order = list(TASKS)
    base = task[: -len(CHAT_SUFFIX)] if task.endswith(CHAT_SUFFIX) else task
    return (order.index(base) if base in order else len(order), task)


def metric_rows(results: Mapping) -> list[dict]:
    """One row per (task, metric) of the leaf tasks: task, metric (``name`` or ``name_filter`` when a
    metric has several filters), value, stderr (None when the harness has none), n-shot, samples."""
    rows = []
    for task in sorted(results.get("configs", {}), key=_task_rank):
        entry = results["results"].get(task, {})
        pairs = [k.split(",", 1) for k in entry if "," in k and not k.split(",", 1)[0].endswith("_stderr")]
        filters_per_metric: dict[str, int] = {}
        for metric, _ in pairs:
            filters_per_metric[metric] = filters_per_metric.get(metric, 0) + 1
        for metric, flt in pairs:
            value = entry[f"{metric},{flt}"]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            stderr = entry.get(f"{metric}_stderr,{flt}")
            samples = results.get("n-samples", {}).get(task, {})
            rows.append({
                "task": task,
                "metric": metric if filters_per_metric[metric] == 1 else f"{metric}_{flt}",
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) and not isinstance(stderr, bool) else None,
                "n_shot": results.get("n-shot", {}).get(task),
                "samples": samples.get("effective") if isinstance(samples, dict) else None,
            })
    return rows


def metric_records(results: Mapping, step: int, tokens: Optional[int]) -> list[dict]:
    """The records for metrics.jsonl / W&B: one per metric, ``eval/<task>/<metric>`` (and its stderr)."""
    records = []
    for row in metric_rows(results):
        key = f"eval/{row['task']}/{row['metric']}"
        record: dict[str, Any] = {"step": int(step)}
        if tokens is not None:
            record["tokens"] = int(tokens)
        record[key] = row["value"]
        if row["stderr"] is not None and math.isfinite(row["stderr"]):
            record[key + "_stderr"] = row["stderr"]
        records.append(record)
    return records


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def results_table(results: Mapping, info: Mapping) -> str:
    """The markdown summary: what was evaluated and how, then one row per metric."""
    where = ""
    if info.get("step") is not None:
        where = f" (step {info['step']}" + (f", {info['tokens']:,} tokens)" if info.get("tokens") is not None else ")")
    data_note = " (the bundled demo items, not the benchmarks)" if info.get("sample_data") else ""
    if info.get("apply_chat_template"):
        shots = "as earlier turns" if info.get("fewshot_as_multiturn") else "in one user turn"
        chat = f"{info.get('chat_template_name') or 'the tokenizer'}'s, few-shot examples {shots}"
    else:
        chat = "not applied (plain prompts)"
    limit = f", limit {info['limit']}" if info.get("limit") else ""
    lines = [
        f"# {info.get('name')}",
        "",
        f"- model: `{info.get('model')}`{where}",
        f"- data: `{info.get('data_dir')}`{data_note}",
        f"- BOS: {'prepended' if info.get('add_bos_token') else 'not prepended'} ({info.get('add_bos_token_reason')})",
        f"- chat template: {chat}",
        f"- lm-evaluation-harness {info.get('lm_eval_version')}{limit}",
        "",
        "| task | metric | value | stderr | n-shot | samples |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in metric_rows(results):
        cells = [row["task"], row["metric"], _fmt(row["value"]), _fmt(row["stderr"]),
                 "-" if row["n_shot"] is None else str(row["n_shot"]),
                 "-" if row["samples"] is None else str(row["samples"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _json_default(obj):
    try:
        from lm_eval.utils import handle_non_serializable

        return handle_non_serializable(obj)
    except ImportError:  # pragma: no cover
        return str(obj)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_results(results: Mapping, info: Mapping, out_dir: Path) -> dict[str, Path]:
    """``results.json`` (the harness's results without the samples, plus ``tanuki``: ``info``),
    ``results.md`` (:func:`results_table`) and ``samples_<task>.jsonl`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {k: v for k, v in results.items() if k != "samples"}
    doc["tanuki"] = dict(info)
    paths = {"results": out_dir / "results.json", "table": out_dir / "results.md"}
    _write_atomic(paths["results"], json.dumps(doc, indent=2, ensure_ascii=False, default=_json_default) + "\n")
    _write_atomic(paths["table"], results_table(results, info))
    for task, samples in (results.get("samples") or {}).items():
        path = out_dir / f"samples_{task}.jsonl"
        lines = (json.dumps(s, ensure_ascii=False, default=_json_default) for s in samples)
        _write_atomic(path, "".join(line + "\n" for line in lines))
        paths[f"samples_{task}"] = path
    return paths


def log_to_run(run_dir: Path, records: Sequence[Mapping], *, logger=None, wandb_mode: Optional[str] = None,
               print_fn: Callable[[str], None] = print) -> None:
    """Append ``records`` to the run's metrics.jsonl and its W&B run.

    With ``logger`` (the training job's open :class:`~tanuki.metrics.MetricsLogger`) the records go
    through it; otherwise a logger is opened on the run directory with the run's own W&B settings
    (``logging.wandb`` of its config.yaml; ``wandb_mode`` overrides the mode), which resumes the run's
    W&B run by the id stored in the run directory, and closed again.
    """
    if logger is not None:
        for record in records:
            logger.log(record)
        return
    from tanuki.metrics import MetricsLogger

    section = (run_config(run_dir).get("logging") or {}).get("wandb") or {}
    known = {f.name for f in dataclasses.fields(WandbConfig)}
    wandb = from_dict(WandbConfig, {k: v for k, v in section.items() if k in known}, prefix="logging.wandb")
    if wandb_mode is not None:
        wandb = dataclasses.replace(wandb, mode=wandb_mode)
    own = MetricsLogger(run_dir, wandb=wandb, print_fn=print_fn)
    try:
        for record in records:
            own.log(record)
    finally:
        own.close()


# --------------------------------------------------------------------------------------------------
# Evaluate: the CLI, and a checkpoint during training
# --------------------------------------------------------------------------------------------------


@dataclass
class EvalOutcome:
    """What an evaluation produced."""

    out_dir: Path
    #: the harness's results (with ``samples``)
    results: dict
    #: the ``tanuki`` section of results.json
    info: dict
    #: the markdown table (also in results.md)
    table: str
    #: the records appended to metrics.jsonl (empty for an HF directory)
    records: list = field(default_factory=list)


def default_output(ref: ModelRef) -> Path:
    if ref.run_dir is not None:
        return ref.run_dir / "eval" / ref.name
    return ref.path / "eval"


def evaluate(cfg: EvaluateConfig, print_fn: Callable[[str], None] = print, *, logger=None,
             run_dir: Optional[str | os.PathLike] = None) -> EvalOutcome:
    """Evaluate ``cfg.model`` on ``cfg.tasks`` and record the results (see the module docstring).

    ``run_dir`` overrides the run a checkpoint is taken to belong to; ``logger`` is the training job's
    metrics logger (see :func:`log_to_run`). Every RNG (Python, NumPy, torch) is left as it was found:
    the harness seeds them, and a training job must draw the same numbers with or without evaluations.
    """
    from tanuki.checkpoint import rng_state, set_rng_state

    saved = rng_state()
    try:
        return _evaluate(cfg, print_fn, logger=logger, run_dir=run_dir)
    finally:
        set_rng_state(saved)


def _evaluate(cfg: EvaluateConfig, print_fn: Callable[[str], None], *, logger, run_dir) -> EvalOutcome:
    t0 = time.perf_counter()
    harness_tasks, benches = resolve_tasks(cfg.tasks, cfg.apply_chat_template)
    data_dir = resolve_data_dir(cfg.data_dir)
    data_files = check_task_data(benches, data_dir)  # before any model is loaded
    upstream_task_dir()  # fails early without the harness
    ref = resolve_model(cfg.model)
    if run_dir is not None and ref.checkpoint is not None:
        ref = dataclasses.replace(ref, run_dir=Path(run_dir))
    device = cfg.resolved_device()
    dtype = cfg.resolved_dtype(device)
    step = ref.step
    tokens = checkpoint_tokens(ref.run_dir, step) if ref.run_dir is not None and step is not None else None
    out_dir = Path(cfg.output) if cfg.output else default_output(ref)

    with offline(), hf_directory(ref, dtype, print_fn) as hf_dir, \
            tempfile.TemporaryDirectory(prefix="tanuki-eval-tasks-") as tmp:
        model, tokenizer = load_hf(hf_dir, device, dtype, ref)
        if cfg.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise EvalError(f"{cfg.model}: apply_chat_template=true but the tokenizer has no chat template "
                            "(tokenizer_config.json chat_template); evaluate the plain prompts or add one")
        add_bos, bos_reason = choose_bos(tokenizer, run_dir=ref.run_dir, apply_chat_template=cfg.apply_chat_template,
                                         override=cfg.add_bos_token)
        if add_bos and not tokenizer_adds_bos(tokenizer):
            print_fn(f"warning: BOS was chosen ({bos_reason}) but the tokenizer does not prepend it: "
                     "the prompts get none")
        vocab_rows, tokenizer_size = int(model.get_output_embeddings().weight.shape[0]), len(tokenizer)
        if vocab_rows > tokenizer_size:
            print_fn(f"note: the harness's softmax includes the {vocab_rows - tokenizer_size} padding rows of the "
                     f"output layer ({vocab_rows} rows, {tokenizer_size} tokens), which tanuki's loss leaves out")
        task_dir = write_task_dir(Path(tmp) / "tasks", data_dir, cache_dir=Path(tmp) / "datasets")
        print_fn(f"evaluating {ref.path} on {', '.join(harness_tasks)} ({device}, {dtype}; BOS "
                 f"{'on' if add_bos else 'off'}: {bos_reason})")
        results = run_harness(
            model, tokenizer, harness_tasks, task_dir, batch_size=cfg.batch_size, limit=cfg.harness_limit(),
            num_fewshot=cfg.num_fewshot, apply_chat_template=cfg.apply_chat_template,
            fewshot_as_multiturn=cfg.fewshot_as_multiturn, system_instruction=cfg.system_instruction,
            add_bos_token=add_bos, max_gen_toks=cfg.max_gen_toks, log_samples=cfg.log_samples,
        )
        chat_template = getattr(tokenizer, "chat_template", None) if cfg.apply_chat_template else None
        info = {
            "name": ref.name if ref.checkpoint is not None else Path(cfg.model).resolve().name,
            "model": str(cfg.model),
            "checkpoint": str(ref.checkpoint) if ref.checkpoint is not None else None,
            "run_dir": str(ref.run_dir) if ref.run_dir is not None else None,
            "step": step,
            "tokens": tokens,
            "tasks": list(cfg.tasks),
            "harness_tasks": harness_tasks,
            "data_dir": str(data_dir),
            "sample_data": data_dir.resolve() == SAMPLE_DATA_DIR.resolve(),
            "data_files": data_files,
            "add_bos_token": add_bos,
            "add_bos_token_reason": bos_reason,
            "tokenizer_adds_bos": tokenizer_adds_bos(tokenizer),
            "output_rows": vocab_rows,
            "tokenizer_size": tokenizer_size,
            "apply_chat_template": cfg.apply_chat_template,
            "chat_template_name": template_name(chat_template) if chat_template else None,
            "chat_template": chat_template,
            "fewshot_as_multiturn": cfg.fewshot_as_multiturn and cfg.apply_chat_template,
            "system_instruction": cfg.system_instruction,
            "num_fewshot": cfg.num_fewshot,
            "limit": cfg.harness_limit(),
            "batch_size": cfg.batch_size,
            "max_gen_toks": cfg.max_gen_toks,
            "device": str(device),
            "dtype": dtype,
            "lm_eval_version": lm_eval_version(),
        }
        del model
    if device.type == "cuda":  # give the memory back to a training job that called this
        import torch

        torch.cuda.empty_cache()
    info["seconds"] = round(time.perf_counter() - t0, 2)
    paths = write_results(results, info, out_dir)
    table = paths["table"].read_text(encoding="utf-8")
    print_fn(table)
    print_fn(f"results: {paths['results']}")
    records: list[dict] = []
    if ref.run_dir is not None and step is not None:
        records = metric_records(results, step, tokens)
        log_to_run(ref.run_dir, records, logger=logger, wandb_mode=cfg.wandb_mode, print_fn=print_fn)
        print_fn(f"logged {len(records)} metric record(s) to {ref.run_dir / 'metrics.jsonl'} at step {step}")
    return EvalOutcome(out_dir, results, info, table, records)


def evaluate_checkpoint(checkpoint_dir: str | os.PathLike, run_dir: str | os.PathLike, eval_cfg: EvalConfig,
                        print_fn: Callable[[str], None] = print, *, logger=None,
                        device: str = "auto") -> Optional[EvalOutcome]:
    """Benchmark a checkpoint a training job just saved; rank 0 only, returns None when ``eval_cfg`` is off.

    Exports the checkpoint to a temporary HF directory (consolidating ZeRO shards on CPU), evaluates it
    with the harness on ``device`` and records the results under ``<run_dir>/eval/<checkpoint name>/``,
    in metrics.jsonl and W&B at the checkpoint's step. Nothing here enters a collective: the other ranks
    wait at the caller's next explicit barrier. Pass the job's open ``logger`` so the records share its
    metrics.jsonl handle and W&B run (a second ``wandb.init`` in the process would not); log them before
    any record of a later step, as W&B drops steps that go back.
    """
    if not eval_cfg.enabled:
        return None
    cfg = EvaluateConfig(
        model=str(checkpoint_dir), tasks=eval_cfg.tasks, data_dir=eval_cfg.data_dir, limit=eval_cfg.limit,
        batch_size=eval_cfg.batch_size, num_fewshot=eval_cfg.num_fewshot,
        apply_chat_template=eval_cfg.apply_chat_template, device=device,
    )
    return evaluate(cfg, print_fn, logger=logger, run_dir=run_dir)


# --------------------------------------------------------------------------------------------------
# prepare: the data, in the layout the tasks read
# --------------------------------------------------------------------------------------------------


def _columns(items: Sequence[Mapping]) -> dict[str, list]:
    """A list of records as the Hub's dict of lists (``answers``: [{text, answer_start}] -> {text: [...], ...})."""
    keys: list[str] = []
    for item in items:
        keys += [k for k in item if k not in keys]
    return {k: [item.get(k) for item in items] for k in keys}


def normalize_record(task: BenchTask, record: Mapping, where: str) -> dict:
    """A source record in the upstream form: label names as ids, lists of records as dicts of lists."""
    row = dict(record)
    for key in ("answers", "ctxs"):
        if isinstance(row.get(key), list) and all(isinstance(x, Mapping) for x in row[key]):
            row[key] = _columns(row[key])
    label = row.get("label")
    if isinstance(label, str):
        names = dict(task.labels)
        if label in names:
            row["label"] = names[label]
        elif label.strip().lstrip("-").isdigit():
            row["label"] = int(label)
        else:
            raise EvalError(f"{where}: label {label!r} is none of {', '.join(names) or 'the integer ids'}")
    missing = [k for k in task.fields if k not in row]
    if missing:
        raise EvalError(f"{where}: a {task.name} record lacks {', '.join(missing)} (has {', '.join(row)})")
    return row


def _squad_records(doc: Mapping) -> Iterator[dict]:
    """SQuAD-format JSON (JGLUE's JSQuAD files) as flat JSQuAD records."""
    for article in doc.get("data", []):
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                yield {"id": qa.get("id"), "title": article.get("title", ""), "context": paragraph["context"],
                       "question": qa["question"], "answers": qa.get("answers", []),
                       "is_impossible": qa.get("is_impossible", False)}


def _read_json_records(path: Path) -> list[dict]:
    """JSON lines, a JSON array of records, or a SQuAD-format document."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("[") or stripped.startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None  # JSON lines
        if isinstance(doc, list):
            return doc
        if isinstance(doc, dict) and "data" in doc and isinstance(doc["data"], list):
            return list(_squad_records(doc))
        if isinstance(doc, dict):
            return [doc]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{number}: not a JSON record ({e.msg})") from None
    return records


def _read_parquet(paths: Sequence[Path]) -> list[dict]:
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for p in paths:
        rows += pq.read_table(p).to_pylist()
    return rows


def _from_disk(path: Path, split: Optional[str]) -> list[dict]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if split is not None:
        if split not in loaded:
            raise EvalError(f"{path}: the saved dataset has no {split!r} split (has {', '.join(loaded)})")
        loaded = loaded[split]
    return loaded.to_list()


def source_records(task: BenchTask, split: str, source: Path, *, jglue_version: str = "1.1",
                   single: bool = False) -> tuple[list[dict], str]:
    """The records of ``split`` of ``task`` in a local ``source`` folder, and where they came from.

    Looked for, in order: ``<source>/<data_name>/<split>.jsonl|.json|.parquet`` (or the Hub's
    ``<split>-*.parquet`` shards); ``<source>/<data_name>`` or ``<source>/<data_name>/<split>`` saved with
    ``save_to_disk``; ``<source>`` itself saved with ``save_to_disk`` (when one dataset is prepared,
    ``single``); a JGLUE clone's ``datasets/<name>-v<version>/<train|valid>-v<version>.json``.
    """
    folder = source / task.data_name
    tried: list[str] = []
    for ext in (".jsonl", ".json"):
        path = folder / f"{split}{ext}"
        tried.append(str(path))
        if path.is_file():
            return _read_json_records(path), str(path)
    single_file = folder / f"{split}.parquet"
    shards = [single_file] if single_file.is_file() else sorted(folder.glob(f"{split}-*.parquet"))
    tried.append(str(folder / f"{split}.parquet"))
    if shards:
        return _read_parquet(shards), ", ".join(map(str, shards))
    tried.append(f"{folder} (save_to_disk)")
    if (folder / "dataset_dict.json").is_file():
        return _from_disk(folder, split), f"{folder} [{split}]"
    if (folder / split / "state.json").is_file():
        return _from_disk(folder / split, None), str(folder / split)
    if single and (source / "dataset_dict.json").is_file():
        return _from_disk(source, split), f"{source} [{split}]"
    if task.jglue is not None:
        jsplit = "valid" if split == "validation" else split
        for base in (source / "datasets", source):
            path = base / f"{task.jglue}-v{jglue_version}" / f"{jsplit}-v{jglue_version}.json"
            tried.append(str(path))
            if path.is_file():
                return _read_json_records(path), str(path)
    raise EvalError(f"task {task.name}: no {split} split of {task.data_name} in {source}; looked for "
                    + "; ".join(tried))


def hub_records(task: BenchTask, split: str) -> tuple[list[dict], str]:
    """The records of ``split`` of ``task`` downloaded from the Hub (where the upstream task reads them)."""
    import datasets

    path, name = task.hub
    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # noqa: BLE001 (any failure of the download: say what to do instead)
        raise EvalError(f"task {task.name}: loading the {split} split of {path}" + (f" ({name})" if name else "")
                        + f" from the Hub failed: {type(e).__name__}: {e}. Pass source=<folder> with a local copy "
                        "(a save_to_disk folder, JSONL/parquet files, or a clone of the JGLUE repository)") from None
    return ds.to_list(), f"{path}" + (f"/{name}" if name else "") + f" [{split}]"


def prepare_data(tasks: Sequence[str], output: str | os.PathLike, source: Optional[str | os.PathLike] = None, *,
                 jglue_version: str = "1.1", print_fn: Callable[[str], None] = print) -> list[Path]:
    """Write ``output/<data_name>/<split>.jsonl`` (exactly the files the tasks read) for ``tasks``.

    From the Hub when ``source`` is None (run once where it is reachable), else from local copies
    (:func:`source_records`), fully offline. Records keep every source field, with label names turned
    into the ids the prompts expect and lists of records into the Hub's dicts of lists
    (:func:`normalize_record`). Each file is written whole or not at all.
    """
    _, benches = resolve_tasks(base_names(tasks), apply_chat_template=False)
    out = Path(output)
    written: list[Path] = []
    src = Path(source) if source is not None else None
    if src is not None and not src.exists():
        raise FileNotFoundError(f"{src}: no such source folder")
    with offline() if src is not None else contextlib.nullcontext():
        for task in benches:
            for split in task.splits:
                if src is None:
                    records, origin = hub_records(task, split)
                else:
                    records, origin = source_records(task, split, src, jglue_version=jglue_version,
                                                     single=len(benches) == 1)
                if not records:
                    raise EvalError(f"task {task.name}: {origin} holds no records")
                rows = [normalize_record(task, r, f"{origin} record {i}") for i, r in enumerate(records)]
                path = data_file(out, task, split)
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
                written.append(path)
                print_fn(f"{task.name}: {len(rows)} {split} records from {origin} -> {path}")
    return written


# --------------------------------------------------------------------------------------------------
# compare: several checkpoints of a run
# --------------------------------------------------------------------------------------------------


def find_results(dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """``results.json`` files: a result folder itself, or every ``eval/*/`` (or ``*/``) of a run folder."""
    found: list[Path] = []
    for d in dirs:
        p = Path(d)
        if p.is_file() and p.name == "results.json":
            found.append(p)
        elif (p / "results.json").is_file():
            found.append(p / "results.json")
        elif p.is_dir():
            inner = sorted((p / "eval").glob("*/results.json")) or sorted(p.glob("*/results.json"))
            if not inner:
                raise FileNotFoundError(f"{p}: no results.json here, nor under {p / 'eval'}/*/ "
                                        "(evaluate a checkpoint first)")
            found += inner
        else:
            raise FileNotFoundError(f"{p}: no such result folder or run directory")
    return list(dict.fromkeys(found))


def compare_results(dirs: Sequence[str | os.PathLike], output: Optional[str | os.PathLike] = None,
                    print_fn: Callable[[str], None] = print) -> tuple[str, Path, Path]:
    """A markdown table (one row per checkpoint, one column per task/metric) and a PNG of every metric
    against training tokens (the step, or the order given, when tokens are unknown). Written as
    ``compare.md`` and ``compare.png`` into ``output`` (default: the folder above the first result)."""
    files = find_results(dirs)
    points = []
    for f in files:
        doc = json.loads(f.read_text(encoding="utf-8"))
        info = doc.get("tanuki", {})
        values = {f"{r['task']}/{r['metric']}": r["value"] for r in metric_rows(doc)}
        points.append({"name": info.get("name") or f.parent.name, "step": info.get("step"),
                       "tokens": info.get("tokens"), "values": values, "file": f})
    x_key = "tokens" if all(p["tokens"] is not None for p in points) else \
        "step" if all(p["step"] is not None for p in points) else None
    if x_key is not None:
        points.sort(key=lambda p: p[x_key])
    columns = sorted({k for p in points for k in p["values"]}, key=lambda c: (_task_rank(c.split("/")[0]), c))
    lines = ["| checkpoint | step | tokens | " + " | ".join(columns) + " |",
             "|---|---:|---:|" + "---:|" * len(columns)]
    for p in points:
        step = "-" if p["step"] is None else str(p["step"])
        tokens = "-" if p["tokens"] is None else f"{p['tokens']:,}"
        cells = [p["name"], step, tokens, *(_fmt(p["values"].get(c)) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = [p[x_key] if x_key else i for i, p in enumerate(points)]
    for column in columns:
        pts = [(x, p["values"][column]) for x, p in zip(xs, points) if column in p["values"]]
        ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=column)
    ax.set_xlabel({"tokens": "training tokens", "step": "step", None: "checkpoint"}[x_key])
    if x_key == "tokens":
        from matplotlib.ticker import EngFormatter

        ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_ylabel("score")
    ax.set_title("benchmarks across checkpoints")
    ax.grid(True, alpha=0.3)
    if columns:
        ax.legend(fontsize="small")
    out = Path(output) if output else files[0].parent.parent
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / "compare.md", out / "compare.png"
    _write_atomic(md, table)
    fig.savefig(png)
    print_fn(table)
    print_fn(f"wrote {md} and {png}")
    return table, md, png


# --------------------------------------------------------------------------------------------------
# Japanese MT-Bench answers (FastChat model_answer format)
# --------------------------------------------------------------------------------------------------

#: sampling temperature per MT-Bench category (the Japanese MT-Bench setting of the model cards)
MT_BENCH_TEMPERATURE: dict[str, float] = {
    "writing": 0.5, "roleplay": 0.5,
    "extraction": 0.2, "stem": 0.2, "humanities": 0.2,
    "math": 0.1, "coding": 0.1, "reasoning": 0.1,
}
#: temperature of a category the table does not know (FastChat's default)
MT_BENCH_DEFAULT_TEMPERATURE = 0.7


@dataclass
class MTBenchAnswer:
    """One question's answer record (FastChat's ``model_answer`` line) and the prompt ids of its turns."""

    record: dict
    prompts: list[list[int]]
    temperature: float


def read_questions(path: str | os.PathLike) -> list[dict]:
    """FastChat ``question.jsonl``: ``{"question_id", "category", "turns": [str, ...]}`` per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such questions file")
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{number}: not a JSON record ({e.msg})") from None
        turns = q.get("turns") if isinstance(q, dict) else None
        well_formed = isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)
        if not well_formed or "question_id" not in q:
            raise EvalError(f"{path}:{number}: expected {{question_id, category, turns: [str, ...]}}")
        questions.append(q)
    if not questions:
        raise EvalError(f"{path}: no questions")
    return questions


def _prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def mt_bench_answers(model, tokenizer, questions: Sequence[Mapping], *, model_id: str, max_new_tokens: int = 1024,
                     seed: int = 0, eos_token_id=None,
                     print_fn: Optional[Callable[[str], None]] = None) -> list[MTBenchAnswer]:
    """Answer every turn of every question with tanuki's generation, as FastChat's ``gen_model_answer``.

    Turn t of a question is the whole conversation so far (earlier questions and this model's answers)
    rendered with the tokenizer's chat template (``apply_chat_template(messages,
    add_generation_prompt=True)``), continued by :func:`tanuki.generate.generate` with the category's
    temperature (:data:`MT_BENCH_TEMPERATURE`) and the seed ``seed + 2 * i + t``, up to EOS or
    ``max_new_tokens``. A prompt that no longer fits the context gets an empty answer (and a note).
    """
    from tanuki.chat import chat_template_override, eos_token_ids
    from tanuki.generate import generate

    chat_template_override(tokenizer, None)  # ChatError naming what to do when there is no chat template
    eos = eos_token_ids(tokenizer) if eos_token_id is None else eos_token_id
    stop = set([eos] if isinstance(eos, int) else eos)
    context = model.cfg.max_seq_len
    answers = []
    for i, q in enumerate(questions):
        temperature = MT_BENCH_TEMPERATURE.get(str(q.get("category", "")), MT_BENCH_DEFAULT_TEMPERATURE)
        messages: list[dict] = []
        turns, prompts = [], []
        for t, question in enumerate(q["turns"]):
            messages.append({"role": "user", "content": question})
            ids = _prompt_ids(tokenizer, messages)
            prompts.append(ids)
            if len(ids) >= context:
                text = ""
                if print_fn:
                    print_fn(f"question {q['question_id']} turn {t + 1}: the prompt ({len(ids)} tokens) fills the "
                             f"context ({context}); empty answer")
            else:
                out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                               eos_token_id=sorted(stop), vocab_limit=len(tokenizer), seed=seed + 2 * i + t)
                if out and out[-1] in stop:
                    out = out[:-1]
                text = tokenizer.decode(out, skip_special_tokens=True).strip()
            turns.append(text)
            messages.append({"role": "assistant", "content": text})
        record = {
            "question_id": q["question_id"],
            "answer_id": uuid.uuid4().hex[:22],
            "model_id": model_id,
            "choices": [{"index": 0, "turns": turns}],
            "tstamp": time.time(),
        }
        answers.append(MTBenchAnswer(record, prompts, temperature))
        if print_fn:
            print_fn(f"question {q['question_id']} ({q.get('category', '?')}, temperature {temperature}): "
                     f"{len(turns)} turn(s)")
    return answers


def run_mt_bench(cfg: EvaluateConfig, print_fn: Callable[[str], None] = print) -> Path:
    """``mode=mt_bench``: answers of ``cfg.model`` to ``cfg.questions`` as ``<output>/<model_id>.jsonl``
    (default output: ``<run dir>/eval/<checkpoint>/mt_bench`` or ``<model dir>/eval/mt_bench``), plus
    ``<model_id>.settings.json`` (temperatures, seed, chat template)."""
    import torch

    from tanuki.hf import import_hf

    questions = read_questions(cfg.questions)
    ref = resolve_model(cfg.model)
    device = cfg.resolved_device()
    dtype = cfg.resolved_dtype(device)
    model_id = cfg.model_id or (f"{ref.run_dir.resolve().name}-{ref.name}" if ref.run_dir is not None else ref.name)
    out_dir = Path(cfg.output) if cfg.output else default_output(ref) / "mt_bench"
    with offline(), hf_directory(ref, dtype, print_fn) as hf_dir:
        from transformers import AutoTokenizer

        check_tokenizer_files(hf_dir, ref)
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        model = import_hf(hf_dir, device=device, dtype=getattr(torch, dtype)).eval()
        from tanuki.chat import eos_token_ids

        answers = mt_bench_answers(model, tokenizer, questions, model_id=model_id, max_new_tokens=cfg.max_new_tokens,
                                   seed=cfg.seed, eos_token_id=eos_token_ids(tokenizer, hf_dir), print_fn=print_fn)
        chat_template = tokenizer.chat_template
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{model_id}.jsonl"
    _write_atomic(path, "".join(json.dumps(a.record, ensure_ascii=False) + "\n" for a in answers))
    settings = {"model": str(cfg.model), "checkpoint": str(ref.checkpoint) if ref.checkpoint else None,
                "step": ref.step, "questions": str(cfg.questions), "temperatures": MT_BENCH_TEMPERATURE,
                "default_temperature": MT_BENCH_DEFAULT_TEMPERATURE, "seed": cfg.seed,
                "max_new_tokens": cfg.max_new_tokens, "chat_template_name": template_name(chat_template),
                "chat_template": chat_template, "device": str(device), "dtype": dtype}
    _write_atomic(out_dir / f"{model_id}.settings.json", json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    print_fn(f"wrote {len(answers)} answers to {path} (FastChat model_answer format; judge them with FastChat's "
             "llm_judge, see the README, 'Japanese MT-Bench')")
    return path


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def main(cfg: EvaluateConfig, print_fn: Callable[[str], None] = print) -> int:
    """The body of ``launch/evaluate.py`` after Hydra."""
    action = cfg.action
    if action == "prepare":
        prepare_data(cfg.tasks, cfg.output, cfg.source, jglue_version=cfg.jglue_version, print_fn=print_fn)
    elif action == "tasks":
        out = write_task_dir(cfg.output, resolve_data_dir(cfg.data_dir))
        harness_tasks, _ = resolve_tasks(cfg.tasks, cfg.apply_chat_template)
        print_fn(f"wrote the task configs to {out}; e.g.\n  lm_eval --model hf --model_args pretrained=<HF dir> "
                 f"--include_path {out} --tasks {','.join(harness_tasks)}")
    elif action == "compare":
        compare_results(cfg.compare, cfg.output, print_fn=print_fn)
    elif action == "mt_bench":
        run_mt_bench(cfg, print_fn)
    else:
        evaluate(cfg, print_fn)
    return 0
