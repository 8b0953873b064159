"""Config composition and validation: every file in conf/ composes, bad values fail naming the key."""

import importlib

import pytest
from conftest import CONF, compose
from omegaconf import OmegaConf

from tanuki.config import (
    ConfigError,
    ModelConfig,
    PretrainConfig,
    from_dict,
    pad_vocab_size,
    to_dict,
)

SIZES = sorted(p.stem for p in (CONF / "size").glob("*.yaml"))

# Every primary config in conf/ -> (dataclass "module:Name", overrides needed to fill its ??? keys).
# A new file in conf/ must be registered here, so it is composed and validated by the test below.
SCHEMAS = {
    "pretrain": ("tanuki.config:PretrainConfig", []),
    "model_info": ("tanuki.info:ModelInfoConfig", []),
    "export_hf": ("tanuki.config:ExportHFConfig", ["checkpoint=a.safetensors", "output=out"]),
    "build_tokenizer": ("tanuki.tokenizer.config:BuildTokenizerConfig", ["input=a.txt", "output=tok", "vocab_size=4000"]),
    "tokenizer_report": ("tanuki.tokenizer.config:TokenizerReportConfig", ["tokenizer=tok", "input=a.txt"]),
    "preprocess": ("tanuki.data.config:PreprocessConfig", []),
    "data_info": ("tanuki.data.config:DataInfoConfig", []),
    "sft": ("tanuki.sft:SFTConfig", ["init=hf"]),
    "dpo": ("tanuki.dpo:DPOConfig", ["init=hf"]),
    "plot": ("tanuki.plot:PlotConfig", ["run.dir=runs/a"]),
    "chat": ("tanuki.chat:ChatConfig", ["model=hf"]),
    "merge_moe": ("tanuki.merge_moe:MergeMoEConfig", ["base=a", "experts=[b,c]", "output=out"]),
    "weight_diff": ("tanuki.weight_diff:WeightDiffConfig", ["mode=make", "raw=raw", "tuned=tuned", "output=out"]),
    "evaluate": ("tanuki.evaluate:EvaluateConfig", ["model=hf", "data_dir=data"]),
}


def _load_schema(ref: str):
    mod, name = ref.split(":")
    return getattr(importlib.import_module(mod), name)


def test_every_primary_config_is_registered():
    primaries = sorted(p.stem for p in CONF.glob("*.yaml"))
    assert primaries, "conf/ has no primary configs"
    missing = [p for p in primaries if p not in SCHEMAS]
    assert not missing, f"register these configs in SCHEMAS: {missing}"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_primary_config_composes_and_validates(name):
    ref, overrides = SCHEMAS[name]
    cls = _load_schema(ref)
    cfg = from_dict(cls, compose(name, overrides))
    assert cfg == from_dict(cls, to_dict(cfg)), "round trip through plain dicts must be lossless"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("stage", ["pretrain", "model_info"])
def test_every_size_composes(stage, size):
    from tanuki.info import ModelInfoConfig

    cls = PretrainConfig if stage == "pretrain" else ModelInfoConfig
    cfg = from_dict(cls, compose(stage, [f"+size={size}"]))
    assert isinstance(cfg.model, ModelConfig)


def test_default_model_is_tiny():
    default = from_dict(PretrainConfig, compose("pretrain"))
    tiny = from_dict(PretrainConfig, compose("pretrain", ["+size=tiny"]))
    assert default.model == tiny.model


def test_size_values_are_the_published_shapes():
    # ../shared model-shapes table: layers, hidden, heads, kv heads, ffn, padded vocab, context, theta
    published = {
        "1.8b": (24, 2048, 16, 16, 7168, 99584, 4096, 10000.0),
        "3.7b": (28, 3072, 24, 24, 8192, 99584, 4096, 10000.0),
        "8b": (32, 4096, 32, 8, 14336, 65024, 8192, 500000.0),
        "13b": (40, 5120, 40, 40, 13824, 99584, 4096, 10000.0),
    }
    for size, shape in published.items():
        m = from_dict(PretrainConfig, compose("pretrain", [f"+size={size}"])).model
        got = (m.n_layers, m.dim, m.n_heads, m.n_kv_heads, m.ffn_dim, m.vocab_size, m.max_seq_len, m.rope_theta)
        assert got == shape, size


def test_unknown_key_names_the_key():
    cfg = compose("pretrain", ["+model.n_layer=3"])  # a typo users make
    with pytest.raises(ConfigError) as e:
        from_dict(PretrainConfig, cfg)
    assert e.value.key == "model.n_layer"
    assert "unknown key" in str(e.value) and "n_layers" in str(e.value)


def test_bad_size_name_lists_the_choices():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as e:
        compose("pretrain", ["+size=9b"])
    assert "size/9b" in str(e.value) and "8b" in str(e.value)


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        (["model.n_kv_heads=3"], "model.n_kv_heads", "divisible by n_kv_heads"),
        (["model.n_heads=7", "model.n_kv_heads=7"], "model.n_heads", "divisible by n_heads"),
        (["model.dim=-4"], "model.dim", "positive"),
        (["model.kernels=cuda"], "model.kernels", "not one of"),
        (["model.n_layers=two"], "model.n_layers", "integer"),
        (["train.seq_len=4096"], "train.seq_len", "exceeds"),
        (["train.global_batch_size=12", "train.micro_batch_size=8"], "train.global_batch_size", "divisible"),
        (["parallel.sp=true"], "parallel.sp", "tp > 1"),
        (["parallel.tp=3"], "parallel.tp", "must divide"),
        (["parallel.zero_stage=4"], "parallel.zero_stage", "not one of"),
        (["seed=1.5"], "seed", "integer"),
    ],
)
def test_bad_values_fail_naming_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as e:
        from_dict(PretrainConfig, compose("pretrain", overrides))
    assert e.value.key == key, str(e.value)
    assert fragment in str(e.value)
    assert str(e.value).startswith(f"config key '{key}'")


def test_missing_mandatory_value_names_the_key():
    cls = _load_schema(SCHEMAS["export_hf"][0])
    with pytest.raises(ConfigError) as e:
        from_dict(cls, compose("export_hf", ["output=x"]))
    assert e.value.key == "checkpoint"


def test_configs_are_frozen():
    cfg = from_dict(PretrainConfig, compose("pretrain"))
    with pytest.raises(Exception):
        cfg.model.dim = 3  # type: ignore[misc]


def test_numeric_strings_and_ints_are_accepted_for_floats():
    m = from_dict(ModelConfig, OmegaConf.create({"rope_theta": "5e5", "init_std": 1}))
    assert m.rope_theta == 500000.0 and isinstance(m.init_std, float)


def test_pad_vocab_size_matches_megatron():
    # llm-jp tokenizer v3: 99,574 pieces -> 99,584; Tanuki: 65,000 -> 65,024
    assert pad_vocab_size(99574) == 99584
    assert pad_vocab_size(65000) == 65024
    assert pad_vocab_size(99574, tp=2) == 99584
    assert pad_vocab_size(4000) == 4096
    assert pad_vocab_size(4096) == 4096


def _differences(a, b, prefix=""):
    """Dotted keys whose values differ between two plain config dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:
                out.append(f"{key}: only in {'conf/' if k in a else 'the dataclass'}")
            else:
                out.extend(_differences(a[k], b[k], key))
        return out
    return [] if a == b else [f"{prefix}: conf/ says {a!r}, the dataclass default is {b!r}"]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_conf_values_are_the_dataclass_defaults(name):
    """The dataclasses are the one source of truth for defaults; conf/*.yaml lists every key (so it can
    be overridden on the command line and read as documentation) with exactly those values."""
    ref, overrides = SCHEMAS[name]
    cls = _load_schema(ref)
    composed = to_dict(from_dict(cls, compose(name, overrides)))
    required = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    defaults = to_dict(from_dict(cls, required))
    diffs = _differences(composed, defaults)
    assert not diffs, f"conf/{name}.yaml contradicts {ref}:\n  " + "\n  ".join(diffs)


def test_the_defaults_test_sees_a_contradiction(tmp_path):
    """The oracle of the test above: a conf value that differs from its dataclass is reported by key."""
    composed = to_dict(from_dict(PretrainConfig, compose("pretrain", ["train.lr=1e-3"])))
    assert _differences(composed, to_dict(PretrainConfig())) == [
        "train.lr: conf/ says 0.001, the dataclass default is 0.0003"
    ]
