"""Weight diffs (Stanford Alpaca / open-instruct style): publish ``tuned - raw``, recover ``raw + diff``.

A model fine-tuned from weights whose licence forbids redistribution (LLaMA, in Alpaca's case) can be
released as the per-tensor difference to those weights; whoever has the raw model adds it back.

* :func:`make_diff` writes ``diff = tuned - raw`` for every tensor, by name, as an ordinary Hugging Face
  directory: the tuned model's ``config.json`` (its dtype entry says what the diff tensors are),
  safetensors shards with an index above ``max_shard_size``, and the tuned model's other files
  (tokenizer, ``generation_config.json``, chat template). ``weight_diff.json`` beside them records what
  recovery needs and checks: each tuned tensor's dtype, shape and SHA-256, the shard layout of the tuned
  model, and the :func:`checksum` of the tuned and of the raw weights.
* :func:`recover` computes ``raw + diff``, casts each tensor back to its tuned dtype, and accepts the
  result only if every tensor's SHA-256 and the overall :func:`checksum` equal the recorded ones; a
  different raw model (another release, a re-quantised copy) fails with both raw checksums in the
  message. The output is written under a temporary name and renamed into place only when verified.

Nothing here knows a model class: tensors are matched by name, so any causal LM stored as safetensors
(Llama, Mixtral, ...) works.

Exactness. ``recover(make_diff(tuned))`` must give the tuned bits back, not nearly them. The diff is
computed in a precision with at least ``2p + 2`` significand bits for a tuned dtype with ``p``: float32
(24 bits) for bfloat16 (8) and float16 (11), float64 (53) for float32 (24). Then ``t - r`` is exact
unless the two exponents are far apart, and ``r + d`` rounds back to ``t``. Plain float32 is not enough
for float32 weights: for two independent float32 tensors about a third of ``fl(r + fl(t - r))`` differ
from ``t`` in the last bit (tests/test_weight_diff.py measures it). What no fixed precision recovers is
a tuned value far smaller than the raw one (``|t| < 2^-15 |r|`` for bfloat16 in float32: the
subtraction rounds ``t`` away), a ``-0.0`` that the sum returns as ``+0.0``, or a NaN payload. Those few
elements (a handful per million in a bfloat16 model, fewer in float32 through float64) are stored
verbatim in ``weight_diff_fixups.safetensors`` (flat index + tuned value per tensor) and written over
the sum on recovery; they are near-zero values, not a usable part of the tuned model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Mapping, Optional

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import parse_size_to_int
from safetensors.torch import load_file, save_file

from tanuki.config import ConfigError
from tanuki.fileio import open_safetensors, read_json, replacing_dir
from tanuki.hf import HFFormatError, read_hf_config, weight_files

#: the record of a weight diff, beside its config.json
MANIFEST_FILE = "weight_diff.json"
#: the elements that floating-point addition cannot give back (see the module docstring)
FIXUPS_FILE = "weight_diff_fixups.safetensors"
FORMAT = "tanuki-weight-diff"
VERSION = 1

#: files of a model directory that are weights (or their index) and are never copied as they are
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
#: safetensors dtype codes of the floating-point dtypes
_FLOAT_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_CONFIG_DTYPE_KEYS = ("torch_dtype", "dtype")
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class WeightDiffError(ValueError):
    """Two models (or a model and a diff) that do not fit together; the message names the tensor or checksum."""


@dataclass(frozen=True)
class WeightDiffConfig:
    """``conf/weight_diff.yaml``: make a weight diff, or recover a model from one."""

    #: make: write diff = tuned - raw; recover: write tuned = raw + diff
    mode: Literal["make", "recover"]
    #: the base model's Hugging Face directory (the one the diff is made against)
    raw: str
    #: the output directory (the diff for make, the recovered model for recover)
    output: str
    #: mode=make: the fine-tuned model's Hugging Face directory
    tuned: Optional[str] = None
    #: mode=recover: the diff directory written by mode=make
    diff: Optional[str] = None
    #: mode=make: shard the diff's safetensors above this size (the recovered model takes the tuned
    #: model's own sharding, recorded in the diff)
    max_shard_size: str = "5GB"
    #: replace a non-empty output directory
    overwrite: bool = False

    def __post_init__(self) -> None:
        for key in ("raw", "output"):
            if not getattr(self, key).strip():
                raise ConfigError(key, "must name a directory")
        if self.mode == "make":
            if self.tuned is None:
                raise ConfigError("tuned", "mode=make needs tuned=<the fine-tuned model's directory>")
            if self.diff is not None:
                raise ConfigError("diff", "is read by mode=recover; mode=make writes the diff to output=")
        else:
            if self.diff is None:
                raise ConfigError("diff", "mode=recover needs diff=<the directory written by mode=make>")
            if self.tuned is not None:
                raise ConfigError("tuned", "is read by mode=make; mode=recover writes the tuned model to output=")
        try:
            _check_output(self.output, [p for p in (self.raw, self.tuned, self.diff) if p is not None])
        except WeightDiffError as e:
            raise ConfigError("output", str(e)) from None
        try:
            parse_size_to_int(self.max_shard_size)
        except ValueError:
            raise ConfigError("max_shard_size", f"expected a size like 5GB or 500MB, got {self.max_shard_size!r}") from None


# --------------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes in its own dtype, little-endian, row-major (as safetensors stores them)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy()).hexdigest()


def _combine(entries: Iterable[tuple[str, str, tuple[int, ...], str]]) -> str:
    h = hashlib.sha256()
    for name, dtype, shape, digest in sorted(entries):
        h.update(f"{name}\t{dtype}\t{','.join(map(str, shape))}\t{digest}\n".encode())
    return h.hexdigest()


def checksum(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The checksum of a set of named tensors: independent of sharding, sensitive to every bit.

    SHA-256 over one line per tensor in sorted name order, ``name<TAB>dtype<TAB>shape<TAB>sha256``, where
    dtype is torch's name (``bfloat16``), shape is comma-separated and sha256 is :func:`tensor_sha256`
    of the tensor's bytes in its stored dtype. Hashing per tensor first lets a 100 GB model be
    checked shard by shard, and a mismatch be pinned on a tensor.
    """
    return _combine(
        (name, _dtype_name(t.dtype), tuple(t.shape), tensor_sha256(t)) for name, t in state_dict.items()
    )


# --------------------------------------------------------------------------------------------------
# The arithmetic
# --------------------------------------------------------------------------------------------------


def diff_dtype(tuned_dtype: torch.dtype) -> torch.dtype:
    """The dtype the diff of a ``tuned_dtype`` tensor is computed and stored in (see the module docstring)."""
    return torch.float64 if tuned_dtype in (torch.float32, torch.float64) else torch.float32


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()])


def add_diff(raw: torch.Tensor, diff: torch.Tensor, dtype: torch.dtype,
             fixups: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """``raw + diff`` in the diff's precision, cast to ``dtype``, with the fixed-up elements written over."""
    out = (raw.to(diff.dtype) + diff).to(dtype).contiguous()
    if fixups is not None:
        index, values = fixups
        out.view(-1)[index] = values.to(dtype)
    return out


def make_tensor_diff(raw: torch.Tensor, tuned: torch.Tensor) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """``tuned - raw`` in :func:`diff_dtype` precision, and the ``(flat index, tuned value)`` of the elements
    that :func:`add_diff` would not give back bit for bit (None when there are none)."""
    work = diff_dtype(tuned.dtype)
    diff = tuned.to(work) - raw.to(work)
    bad = (_bits(add_diff(raw, diff, tuned.dtype)) != _bits(tuned.contiguous())).reshape(-1)
    if not bool(bad.any()):
        return diff, None
    index = bad.nonzero().squeeze(1)
    return diff, (index, tuned.contiguous().reshape(-1)[index].clone())


# --------------------------------------------------------------------------------------------------
# Directories of safetensors, read lazily by tensor name
# --------------------------------------------------------------------------------------------------


class _Weights:
    """The tensors of a Hugging Face directory by name, read one at a time (memory-mapped)."""

    def __init__(self, path: Path, role: str):
        self.path, self.role = path, role
        if not path.is_dir():
            raise HFFormatError(f"{role}={path}: not a directory (expected a Hugging Face model directory)")
        self.files: dict[str, list[str]] = {}  # file name -> tensor names, in file order
        self.metadata: dict[str, dict] = {}  # file name -> safetensors metadata
        self.where: dict[str, str] = {}  # tensor name -> file name
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}  # safetensors dtype code (BF16, F32, ...)
        self._handles = {}
        for f in weight_files(path):
            fh = open_safetensors(f, HFFormatError)
            self._handles[f.name] = fh
            self.metadata[f.name] = dict(fh.metadata() or {})
            self.files[f.name] = list(fh.keys())
            for name in fh.keys():
                if name in self.where:
                    raise HFFormatError(f"{path}: tensor '{name}' is stored twice ({self.where[name]} and {f.name})")
                sl = fh.get_slice(name)
                self.where[name] = f.name
                self.shapes[name] = tuple(sl.get_shape())
                self.dtypes[name] = sl.get_dtype()

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.where[name]].get_tensor(name)

    def checksum(self) -> str:
        return _combine(
            (n, _dtype_name(t.dtype), tuple(t.shape), tensor_sha256(t)) for n, t in ((n, self.get(n)) for n in self.where)
        )


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_same_tensors(a: _Weights, b: _Weights) -> None:
    """Same names, same shapes; the error names the tensors and which side lacks them."""
    only_a = [n for n in a.names() if n not in b.where]
    only_b = [n for n in b.names() if n not in a.where]
    problems = []
    if only_b:
        problems.append(f"{len(only_b)} tensors of {b.role}={b.path} are missing from {a.role}={a.path}: {_listing(only_b)}")
    if only_a:
        problems.append(f"{len(only_a)} tensors of {a.role}={a.path} are missing from {b.role}={b.path}: {_listing(only_a)}")
    if problems:
        raise WeightDiffError("; ".join(problems))
    for name in a.names():
        if a.shapes[name] != b.shapes[name]:
            raise WeightDiffError(
                f"tensor '{name}' has shape {list(a.shapes[name])} in {a.role}={a.path} but "
                f"{list(b.shapes[name])} in {b.role}={b.path} (not the same architecture)"
            )
    for w in (a, b):
        for name in w.names():
            if w.dtypes[name] not in _FLOAT_DTYPES:
                raise WeightDiffError(f"tensor '{name}' of {w.role}={w.path} is {w.dtypes[name]}, not floating point")


def _check_output(output: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    out = Path(output).resolve()
    for p in inputs:
        p = Path(p).resolve()
        if p == out or out in p.parents:
            raise WeightDiffError(f"{output} would replace the input directory {p}; write the output elsewhere")


def _check_replaceable(output: Path, overwrite: bool) -> None:
    if output.exists() and (not output.is_dir() or (not overwrite and any(output.iterdir()))):
        raise FileExistsError(f"{output} exists and is not empty (pass overwrite=true to replace it)")


def _copy_other_files(src: Path, dst: Path, skip: set[str]) -> list[str]:
    """Copy the non-weight top-level files (tokenizer, generation config, chat template, README, ...)."""
    copied = []
    for f in sorted(src.iterdir()):
        if (not f.is_file() or f.name in skip or f.name.startswith(".") or f.name.endswith(_WEIGHT_SUFFIXES)
                or f.name.endswith(".index.json")):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------------
# make / recover
# --------------------------------------------------------------------------------------------------


def make_diff(
    raw: str | os.PathLike,
    tuned: str | os.PathLike,
    output: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> Path:
    """Write ``tuned - raw`` (per tensor, by name) as a Hugging Face directory at ``output``.

    Both directories must hold the same tensor names with the same shapes (safetensors, one file or
    sharded with an index). The diff is sharded above ``max_shard_size`` (HF file names); the tuned
    model's own shard layout, its per-tensor dtypes and SHA-256 and the raw and tuned :func:`checksum`
    go into ``weight_diff.json``. Written under a temporary name and renamed into place when complete.
    """
    log = log or (lambda _msg: None)
    raw, tuned, output = Path(raw), Path(tuned), Path(output)
    _check_output(output, [raw, tuned])
    for role, path in (("raw", raw), ("tuned", tuned)):
        if (path / MANIFEST_FILE).is_file():
            raise WeightDiffError(f"{role}={path} is a weight diff ({MANIFEST_FILE}), not a model")
    config = read_hf_config(tuned)
    tuned_w, raw_w = _Weights(tuned, "tuned"), _Weights(raw, "raw")
    _check_same_tensors(tuned_w, raw_w)

    # The diff's shard plan from shapes alone (meta tensors), so that one shard at a time is in memory.
    order = [n for f in tuned_w.files.values() for n in f]
    tuned_dtypes = {n: _FLOAT_DTYPES[tuned_w.dtypes[n]] for n in order}
    meta = {n: torch.empty(tuned_w.shapes[n], dtype=diff_dtype(tuned_dtypes[n]), device="meta") for n in order}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)

    _check_replaceable(output, overwrite)
    with replacing_dir(output) as tmp:
        tensors, fixups, raw_entries = {}, {}, []
        for filename, names in split.filename_to_tensors.items():
            shard = {}
            for name in names:
                r, t = raw_w.get(name), tuned_w.get(name)
                d, fix = make_tensor_diff(r, t)
                shard[name] = d
                tensors[name] = {
                    "dtype": _dtype_name(t.dtype),
                    "shape": list(t.shape),
                    "sha256": tensor_sha256(t),
                    "diff_dtype": _dtype_name(d.dtype),
                    "raw_dtype": _dtype_name(r.dtype),
                    "raw_sha256": tensor_sha256(r),
                    "fixups": 0 if fix is None else int(fix[0].numel()),
                }
                raw_entries.append((name, _dtype_name(r.dtype), tuple(r.shape), tensors[name]["raw_sha256"]))
                if fix is not None:
                    fixups[f"{name}.fixup_index"], fixups[f"{name}.fixup_value"] = fix
            save_file(shard, tmp / filename, metadata={"format": "pt"})
            log(f"wrote {filename} ({len(names)} tensors)")
            del shard
        if split.is_sharded:
            index = {"metadata": {"total_size": split.metadata.get("total_size")}, "weight_map": split.tensor_to_filename}
            _write_json(tmp / "model.safetensors.index.json", index)
        if fixups:
            save_file(fixups, tmp / FIXUPS_FILE, metadata={"format": "pt"})

        tuned_index = tuned / "model.safetensors.index.json"
        stored = {_dtype_name(diff_dtype(dt)) for dt in tuned_dtypes.values()}
        diff_config_dtype = "float64" if "float64" in stored else "float32"
        config_dtypes = {k: config[k] for k in _CONFIG_DTYPE_KEYS if k in config}
        for k in config_dtypes:
            config[k] = diff_config_dtype
        _write_json(tmp / "config.json", config)
        copied = _copy_other_files(tuned, tmp, skip={"config.json", MANIFEST_FILE, FIXUPS_FILE})
        tuned_checksum = _combine((n, e["dtype"], tuple(e["shape"]), e["sha256"]) for n, e in tensors.items())
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "checksum": "sha256 over sorted lines 'name<TAB>dtype<TAB>shape<TAB>sha256(tensor bytes)' "
                        "(tanuki.weight_diff.checksum)",
            "tuned_checksum": tuned_checksum,
            "raw_checksum": _combine(raw_entries),
            "fixups": sum(e["fixups"] for e in tensors.values()),
            "config_dtypes": config_dtypes,
            "tuned_files": {f: {"metadata": tuned_w.metadata[f], "tensors": names} for f, names in tuned_w.files.items()},
            "tuned_index_metadata": json.loads(tuned_index.read_text()).get("metadata") if tuned_index.is_file() else None,
            "tensors": {n: tensors[n] for n in order},
        }
        _write_json(tmp / MANIFEST_FILE, manifest)
    log(f"diff of {len(order)} tensors written to {output} (also copied: {', '.join(copied) or 'nothing'})")
    log(f"raw checksum   {manifest['raw_checksum']}")
    log(f"tuned checksum {manifest['tuned_checksum']}")
    if manifest["fixups"]:
        log(f"{manifest['fixups']} element(s) stored exactly in {FIXUPS_FILE}: "
            "no floating-point sum gives them back (see tanuki/weight_diff.py)")
    return output


def read_manifest(diff: str | os.PathLike) -> dict:
    """The ``weight_diff.json`` of a diff directory (checked to be one)."""
    path = Path(diff) / MANIFEST_FILE
    if not Path(diff).is_dir():
        raise HFFormatError(f"diff={diff}: not a directory")
    if not path.is_file():
        raise HFFormatError(f"{path}: missing (not a weight diff written by launch/weight_diff.py mode=make)")
    manifest = read_json(path, HFFormatError)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise HFFormatError(f"{path}: not a {FORMAT} version {VERSION} record")
    return manifest


def _load_fixups(diff: Path, manifest: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if not manifest["fixups"]:
        return {}
    path = diff / FIXUPS_FILE
    if not path.is_file():
        raise HFFormatError(f"{path}: missing ({MANIFEST_FILE} records {manifest['fixups']} fixed-up elements)")
    flat = load_file(str(path))
    out = {}
    for name, entry in manifest["tensors"].items():
        if entry["fixups"]:
            index, values = flat[f"{name}.fixup_index"], flat[f"{name}.fixup_value"]
            numel = 1
            for s in entry["shape"]:
                numel *= s
            if index.numel() != entry["fixups"] or values.shape != index.shape or (index.numel() and int(index.max()) >= numel):
                raise HFFormatError(f"{path}: the fixups of '{name}' do not fit the tensor")
            out[name] = (index, values)
    return out


def recover(
    raw: str | os.PathLike,
    diff: str | os.PathLike,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> Path:
    """Write the tuned model ``raw + diff`` at ``output``, verified against the checksums in the diff.

    Each tensor is ``raw + diff`` in the diff's precision, cast to the tuned dtype recorded for it, in
    the tuned model's own shard files. A tensor whose SHA-256 differs from the recorded one stops the
    recovery with :class:`WeightDiffError` (the raw model is almost certainly another one: both raw
    checksums are in the message) and nothing is left at ``output``.
    """
    log = log or (lambda _msg: None)
    raw, diff, output = Path(raw), Path(diff), Path(output)
    _check_output(output, [raw, diff])
    manifest = read_manifest(diff)
    if (raw / MANIFEST_FILE).is_file():
        raise WeightDiffError(f"raw={raw} is a weight diff ({MANIFEST_FILE}), not a model: pass it as diff=")
    config = read_hf_config(diff)
    diff_w, raw_w = _Weights(diff, "diff"), _Weights(raw, "raw")
    recorded = manifest["tensors"]
    if set(diff_w.names()) != set(recorded):
        raise HFFormatError(f"{diff}: its safetensors do not hold the tensors {MANIFEST_FILE} lists (incomplete copy?)")
    _check_same_tensors(diff_w, raw_w)
    fixups = _load_fixups(diff, manifest)

    def wrong_raw(name: str) -> WeightDiffError:
        actual = raw_w.checksum()
        same = actual == manifest["raw_checksum"]
        hint = ("the raw model has the recorded checksum, so the diff itself is damaged" if same else
                "the raw model is probably not the one the diff was made against")
        return WeightDiffError(
            f"recovered tensor '{name}' does not match the tuned model's checksum: {hint} "
            f"(raw checksum expected {manifest['raw_checksum']}, got {actual} for raw={raw}); "
            f"nothing was written to {output}"
        )

    _check_replaceable(output, overwrite)
    with replacing_dir(output) as tmp:
        entries, raw_entries = [], []
        for filename, record in manifest["tuned_files"].items():
            names, shard = record["tensors"], {}
            for name in names:
                entry = recorded[name]
                r = raw_w.get(name)
                raw_entries.append((name, _dtype_name(r.dtype), tuple(r.shape), tensor_sha256(r)))
                t = add_diff(r, diff_w.get(name), getattr(torch, entry["dtype"]), fixups.get(name))
                digest = tensor_sha256(t)
                if digest != entry["sha256"]:
                    raise wrong_raw(name)
                entries.append((name, _dtype_name(t.dtype), tuple(t.shape), digest))
                shard[name] = t
            save_file(shard, tmp / filename, metadata=record["metadata"] or None)
            log(f"wrote {filename} ({len(names)} tensors)")
            del shard
        if _combine(entries) != manifest["tuned_checksum"]:
            raise wrong_raw(entries[0][0] if entries else "?")
        if manifest["tuned_index_metadata"] is not None:
            weight_map = {n: f for f, record in manifest["tuned_files"].items() for n in record["tensors"]}
            index = {"metadata": manifest["tuned_index_metadata"], "weight_map": weight_map}
            _write_json(tmp / "model.safetensors.index.json", index)
        config.update(manifest["config_dtypes"])  # the tuned model's own dtype entries
        _write_json(tmp / "config.json", config)
        _copy_other_files(diff, tmp, skip={"config.json", MANIFEST_FILE, FIXUPS_FILE})
    if _combine(raw_entries) != manifest["raw_checksum"]:
        log(f"note: raw={raw} differs from the raw model the diff was made against (same values in another "
            "dtype or sharding?), but every recovered tensor matches the tuned model")
    log(f"recovered {len(entries)} tensors to {output}; tuned checksum verified: {manifest['tuned_checksum']}")
    return output
