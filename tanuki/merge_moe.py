"""Build a Mixtral-style MoE from dense models: merging (Swallow-MoE, mergekit-moe) and upcycling (Tanuki-8x8B).

``python launch/merge_moe.py base=<HF dir> experts=[<dir>,...] gate=random|hidden top_k=2 output=<dir>``
``python launch/merge_moe.py base=<HF dir> gate=upcycle n_experts=8 top_k=2 output=<dir>``

The result is a ``MixtralForCausalLM`` directory (written by :func:`tanuki.hf.export_hf`, the base's
tokenizer copied in) that transformers loads as it is and tanuki imports for further training:

* attention, embeddings, every norm and the output head come from ``base`` (a dense Llama directory);
* expert ``e`` of every layer is the MLP of the dense model ``experts[e]`` (same ``dim``, ``ffn_dim`` and
  number of layers as the base), or, with ``gate=upcycle``, a copy of the base's own MLP (sparse
  upcycling, Komatsuzaki et al. 2022), optionally plus seeded Gaussian noise of ``noise_std`` times the
  standard deviation of the weight it is added to (every copy gets its own noise);
* the router (``n_experts x dim`` per layer):

  - ``random`` / ``upcycle``: ``N(0, router_std)`` from ``seed`` (``router_std`` defaults to the base's
    ``initializer_range``), layer by layer. With ``upcycle`` and no noise every expert is the base MLP and
    the renormalised top-k weights sum to one, so the MoE computes exactly the dense model (up to
    rounding) whatever the router;
  - ``hidden`` (mergekit's ``gate_mode: hidden``): row ``e`` of layer ``l``'s router is ``m / ||m||``, with
    ``m`` the mean over expert ``e``'s prompts of the mean over each prompt's tokens of the base model's
    input to layer ``l``'s MLP (the output of the post-attention RMSNorm, which is what the router sees).
    Tokens whose hidden state resembles an expert's prompts then score that expert highest. Prompts are
    given per expert (``prompts=[[...],[...]]``) or by the name of a bundled set (:data:`PROMPT_SETS`).

Memory: the merged model is assembled in CPU memory in the output dtype before it is written; expert
models are read lazily (only their MLP tensors). ``gate=hidden`` also runs the base model on the prompts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from tanuki.config import ConfigError
from tanuki.hf import (
    HFFormatError,
    export_hf,
    import_hf,
    load_hf,
    model_config_from_hf,
    read_hf_config,
    read_hf_tensors,
)

#: Bundled prompt sets for ``gate=hidden``: a few typical inputs of the kind of text each expert is for.
PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "ja": (
        "日本の四季について、それぞれの季節の特徴を説明してください。",
        "昨日、友人と京都へ行き、お寺を見て回りました。",
        "次の文章を要約してください。人工知能の研究は近年急速に進展している。",
        "敬語の使い方について、丁寧語と尊敬語の違いを教えてください。",
        "東京から大阪までの移動には新幹線が便利です。",
    ),
    "en": (
        "Explain the causes of the French Revolution in a few paragraphs.",
        "Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Summarize the following article about climate change and renewable energy.",
        "What are the main differences between a virus and a bacterium?",
        "Dear hiring manager, I am writing to apply for the position of",
    ),
    "code": (
        "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n",
        "Write a Python function that parses a CSV file and returns a list of dictionaries.",
        "#include <stdio.h>\nint main(void) {\n    printf(\"hello\\n\");\n",
        "SELECT name, COUNT(*) FROM orders GROUP BY name ORDER BY 2 DESC;",
        "Fix the bug in this JavaScript code: const xs = [1, 2, 3]; xs.map(x => { x * 2 });",
    ),
    "math": (
        "Solve for x: 3x + 7 = 22.",
        "次の方程式を解きなさい。x^2 - 5x + 6 = 0",
        "Prove that the square root of 2 is irrational.",
        "A train travels 120 km in 1.5 hours. What is its average speed?",
        "三角形の内角の和が180度であることを証明してください。",
    ),
}


class MergeError(ValueError):
    """An input that cannot be merged; the message names the key (``experts[1]``, ``base``) and the directory."""


@dataclass(frozen=True)
class MergeMoEConfig:
    """``python launch/merge_moe.py``: see conf/merge_moe.yaml."""

    #: the dense Hugging Face Llama directory that gives attention, embeddings, norms, head and tokenizer
    base: str
    #: the MoE Hugging Face directory to write
    output: str
    #: one dense HF directory per expert (its MLPs become expert e); empty with gate=upcycle
    experts: tuple[str, ...] = ()
    #: router initialisation: random (seeded), hidden (mergekit-style, from prompts), upcycle (experts =
    #: copies of the base MLP, random router)
    gate: Literal["random", "hidden", "upcycle"] = "random"
    #: experts per token
    top_k: int = 2
    #: gate=upcycle: the number of copies of the base MLP
    n_experts: int = 0
    #: gate=upcycle: Gaussian noise added to each copy, as a multiple of each weight's standard deviation
    noise_std: float = 0.0
    #: std of the random router; null = the base's initializer_range
    router_std: Optional[float] = None
    #: gate=hidden: per expert, a list of prompts or the name of a bundled set (ja, en, code, math)
    prompts: tuple[Union[str, tuple[str, ...]], ...] = ()
    #: written to config.json: the load-balancing loss weight of further training
    router_aux_loss_coef: float = 0.001
    #: seed of the random router (and, with seed + 1, of the upcycling noise)
    seed: int = 0
    #: output dtype; auto = the base's
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    #: gate=hidden: where the base model runs (auto = cuda if available)
    device: str = "auto"
    max_shard_size: str = "5GB"
    #: replace a non-empty output directory
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.gate == "upcycle":
            if self.experts:
                raise ConfigError("experts", "gate=upcycle copies the base MLP; give n_experts=N instead of experts")
            if self.n_experts < 2:
                raise ConfigError("n_experts", f"gate=upcycle needs n_experts >= 2, got {self.n_experts}")
        else:
            if len(self.experts) < 2:
                raise ConfigError(
                    "experts", f"gate={self.gate} needs at least 2 expert models (experts=[dir1,dir2,...]), "
                    f"got {len(self.experts)}"
                )
            if self.n_experts not in (0, len(self.experts)):
                raise ConfigError("n_experts", f"{self.n_experts} differs from the {len(self.experts)} experts given")
            if self.noise_std:
                raise ConfigError("noise_std", "is only used with gate=upcycle")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError("top_k", f"must be between 1 and the number of experts ({self.num_experts}), got {self.top_k}")
        if self.noise_std < 0:
            raise ConfigError("noise_std", f"must be >= 0, got {self.noise_std}")
        if self.router_std is not None and not self.router_std > 0:
            raise ConfigError("router_std", f"must be positive, got {self.router_std}")
        if self.router_aux_loss_coef < 0:
            raise ConfigError("router_aux_loss_coef", f"must be >= 0, got {self.router_aux_loss_coef}")
        if self.gate == "hidden":
            if len(self.prompts) != self.num_experts:
                raise ConfigError(
                    "prompts", f"gate=hidden needs one prompt set per expert ({self.num_experts}), got "
                    f"{len(self.prompts)}: a list of prompts or a bundled set ({', '.join(PROMPT_SETS)}) each, "
                    "e.g. prompts=[ja,code]"
                )
            for i, p in enumerate(self.prompts):
                if isinstance(p, str) and p not in PROMPT_SETS:
                    raise ConfigError(f"prompts[{i}]", f"{p!r} is not a bundled set ({', '.join(PROMPT_SETS)})")
                if not isinstance(p, str) and not [t for t in p if t.strip()]:
                    raise ConfigError(f"prompts[{i}]", "is empty")
        elif self.prompts:
            raise ConfigError("prompts", "is only used with gate=hidden")

    @property
    def num_experts(self) -> int:
        return self.n_experts if self.gate == "upcycle" else len(self.experts)

    def prompt_lists(self) -> list[tuple[str, ...]]:
        return [PROMPT_SETS[p] if isinstance(p, str) else tuple(t for t in p if t.strip()) for p in self.prompts]


# --------------------------------------------------------------------------------------------------


def _mlp_names(layer: int, prefix: str = "mlp.") -> list[str]:
    return [f"layers.{layer}.{prefix}{w}.weight" for w in ("w_gate", "w_up", "w_down")]


def _read_dense(path: str, key: str):
    """config.json of a dense model as a ModelConfig; MergeError naming ``key`` otherwise."""
    try:
        cfg = model_config_from_hf(read_hf_config(path), source=str(Path(path) / "config.json"))
    except HFFormatError as e:
        raise MergeError(f"{key}: {e}") from None
    if cfg.n_experts:
        raise MergeError(f"{key} ({path}): is already a mixture of experts; give dense (Llama) models")
    return cfg


def hidden_gate(model, prompts: list[tuple[str, ...]], tokenizer) -> torch.Tensor:
    """Router weights ``(n_layers, n_experts, dim)`` from ``model``'s MLP inputs on each expert's prompts.

    Row ``e`` of layer ``l`` is the unit vector of the mean over the prompts of ``prompts[e]`` of the mean
    over each prompt's tokens of the input of layer ``l``'s MLP (see the module docstring).
    """
    layers = model.layers
    captured: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach().float()))
             for layer in layers]
    device = next(model.parameters()).device
    rows = []
    try:
        with torch.no_grad():
            for expert_prompts in prompts:
                per_prompt = []
                for text in expert_prompts:
                    ids = tokenizer(text)["input_ids"]
                    if not ids:
                        continue
                    captured.clear()
                    model.hidden_states(torch.tensor([ids], device=device))
                    per_prompt.append(torch.stack([h[0].mean(dim=0) for h in captured]).cpu())  # (L, dim)
                if not per_prompt:
                    raise MergeError("prompts: a prompt set has no tokens")
                rows.append(torch.stack(per_prompt).mean(dim=0))  # (L, dim)
    finally:
        for h in hooks:
            h.remove()
    gate = torch.stack(rows, dim=1)  # (L, E, dim)
    return gate / gate.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def merge_moe(cfg: MergeMoEConfig, log=print) -> Path:
    """Write the MoE that ``cfg`` describes (see the module docstring); returns the output directory."""
    base_cfg = _read_dense(cfg.base, "base")
    try:
        _, base_sd = load_hf(cfg.base)
    except HFFormatError as e:
        raise MergeError(f"base: {e}") from None
    stored = base_sd["embed.weight"].dtype
    dtype = stored if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    E, L = cfg.num_experts, base_cfg.n_layers

    # The experts' MLPs, checked against the base's shapes before anything is written.
    expert_mlps: list[dict[str, torch.Tensor]] = []
    for i, path in enumerate(cfg.experts):
        key = f"experts[{i}]"
        ecfg = _read_dense(path, key)
        for field in ("dim", "ffn_dim", "n_layers"):
            if getattr(ecfg, field) != getattr(base_cfg, field):
                raise MergeError(
                    f"{key} ({path}): {field}={getattr(ecfg, field)} differs from the base's "
                    f"{getattr(base_cfg, field)}; every expert must have the base's MLP shapes"
                )
        names = [n for layer in range(L) for n in _mlp_names(layer)]
        try:
            tensors = read_hf_tensors(path, names)
        except HFFormatError as e:
            raise MergeError(f"{key}: {e}") from None
        for n in names:
            if tensors[n].shape != base_sd[n].shape:
                raise MergeError(f"{key} ({path}): {n} has shape {tuple(tensors[n].shape)}, the base's is "
                                 f"{tuple(base_sd[n].shape)}")
        expert_mlps.append(tensors)
        log(f"expert {i}: MLPs of {path}")

    moe_cfg = dataclasses.replace(base_cfg, n_experts=E, top_k=cfg.top_k, router_aux_loss_coef=cfg.router_aux_loss_coef)

    # Router weights, (L, E, dim) fp32.
    if cfg.gate == "hidden":
        from transformers import AutoTokenizer  # lazy: transformers is slow to import, only gate=hidden needs it

        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.base)
        except (OSError, ValueError) as e:
            raise MergeError(f"base ({cfg.base}): gate=hidden needs the base's tokenizer: {e}") from None
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        run_dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        model = import_hf(cfg.base, device=device, dtype=run_dtype).eval()
        router = hidden_gate(model, cfg.prompt_lists(), tokenizer)
        del model
        log(f"router: hidden states of the base on {sum(len(p) for p in cfg.prompt_lists())} prompts")
    else:
        std = cfg.router_std if cfg.router_std is not None else base_cfg.init_std
        gen = torch.Generator().manual_seed(cfg.seed)
        router = torch.empty(L, E, base_cfg.dim).normal_(0.0, std, generator=gen)
        log(f"router: random, N(0, {std:g}), seed {cfg.seed}")

    noise_gen = torch.Generator().manual_seed(cfg.seed + 1)
    sd: dict[str, torch.Tensor] = {}
    for name, t in base_sd.items():
        if ".mlp." not in name:
            sd[name] = t.to(dtype)
    for layer in range(L):
        sd[f"layers.{layer}.mlp.router.weight"] = router[layer].to(dtype)
        for e in range(E):
            for src, dst in zip(_mlp_names(layer), _mlp_names(layer, f"mlp.experts.{e}.")):
                if cfg.gate == "upcycle":
                    w = base_sd[src]
                    if cfg.noise_std:
                        w32 = w.float()
                        noise = torch.empty(w.shape).normal_(0.0, 1.0, generator=noise_gen)
                        w = w32 + cfg.noise_std * w32.std() * noise
                    sd[dst] = w.to(dtype).clone()
                else:
                    sd[dst] = expert_mlps[e][src].to(dtype)
    del base_sd, expert_mlps

    base_json = read_hf_config(cfg.base)
    ids = {k: base_json.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    base = Path(cfg.base)
    has_tokenizer = (base / "tokenizer.json").is_file() or (base / "tokenizer.model").is_file()
    if not has_tokenizer:
        log(f"note: {base} has no tokenizer files; none copied")
    out = export_hf(sd, moe_cfg, cfg.output, dtype=dtype, max_shard_size=cfg.max_shard_size, overwrite=cfg.overwrite,
                    tokenizer_dir=base if has_tokenizer else None, **ids)
    gen_cfg = base / "generation_config.json"
    if gen_cfg.is_file():  # the base's generation defaults (eos list, sampling) carry over
        (out / "generation_config.json").write_text(json.dumps(json.loads(gen_cfg.read_text()), indent=2) + "\n")
    log(f"wrote {moe_cfg.n_experts} experts x {L} layers, top-{moe_cfg.top_k}, {cfg.gate} router, {dtype} to {out}")
    return out
