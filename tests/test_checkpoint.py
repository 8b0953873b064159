"""Checkpoint files are read safely: a ``.pt`` holding a pickle that would run code is refused, naming
the file, on export and on resume (tanuki's own readers, DeepSpeed's checkpoint engine and
``zero_to_fp32``); RNG files are plain data, and the older pickled form still loads."""

import builtins
import random
import shutil

import numpy as np
import pytest
import torch
from conftest import compose, tiny_train_overrides

from tanuki.checkpoint import CheckpointError, latest_checkpoint, load_rng_state, rng_state, set_rng_state
from tanuki.config import PretrainConfig, from_dict
from tanuki.parallel.env import DistEnv

pytestmark = pytest.mark.distributed

ENV = DistEnv(0, 1, 0, "single")


@pytest.fixture(scope="module", autouse=True)
def process_group(single_process_group):
    yield


def train(corpus, run_dir, *extra):
    from tanuki import pretrain

    cfg = from_dict(PretrainConfig, compose("pretrain", tiny_train_overrides(corpus, run_dir, *extra)))
    return pretrain.run(pretrain.prepare(cfg, ENV), ENV, run_dir.resolve(), print_fn=lambda *a, **k: None)


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    """Four-step runs with ZeRO-3 and ZeRO-0, checkpoints at steps 2 and 4."""
    out = {}
    for stage in (3, 0):
        run_dir = tmp_path_factory.mktemp(f"zero{stage}")
        train(tiny_corpus, run_dir, f"parallel.zero_stage={stage}", "train.max_steps=4")
        out[stage] = run_dir
    return out


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appears iff the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def craft(path, marker):
    """Replace ``path`` with a torch file whose pickle would create ``marker``."""
    torch.save({"module": Payload(marker), "optimizer_state_dict": Payload(marker)}, path)


def test_the_payload_is_live(tmp_path):
    """The oracle of the tests below: loaded the old way, the crafted file runs its code."""
    craft(tmp_path / "x.pt", tmp_path / "marker")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("stage,name", [
    (3, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    (3, "zero_pp_rank_0_mp_rank_00_model_states.pt"),
    (0, "mp_rank_00_model_states.pt"),
])
def test_a_crafted_file_is_refused_on_export_and_runs_nothing(runs, tmp_path, stage, name):
    from tanuki.pretrain import export_checkpoint

    run_dir = shutil.copytree(runs[stage], tmp_path / "run")
    bad = latest_checkpoint(run_dir / "checkpoints") / name
    craft(bad, tmp_path / "marker")
    with pytest.raises(CheckpointError, match="refused to load") as e:
        export_checkpoint(run_dir, tmp_path / "hf")
    assert str(bad) in str(e.value)
    assert not (tmp_path / "marker").exists()
    assert not (tmp_path / "hf").exists()


def test_zero_to_fp32_reads_safely_inside_the_context(runs, tmp_path):
    """DeepSpeed's consolidation passes weights_only=False itself; safe_torch_loads overrides it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from tanuki.fileio import safe_torch_loads

    ckpt = shutil.copytree(latest_checkpoint(runs[3] / "checkpoints"), tmp_path / "ck" / "step")
    with safe_torch_loads():
        assert get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag="step")  # genuine files load
    craft(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt", tmp_path / "marker")
    with pytest.raises(Exception, match="Weights only load failed"):
        with safe_torch_loads():
            get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag="step")
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("name", ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank00000.pt"])
@pytest.mark.parametrize("precheck", [True, False])
def test_a_crafted_file_is_refused_on_resume_and_runs_nothing(runs, tiny_corpus, tmp_path, monkeypatch, name,
                                                              precheck):
    """Checked before anything is built; and without that check (``precheck=False``) DeepSpeed's own
    loader, given tanuki's checkpoint engine, refuses it as well."""
    from tanuki import checkpoint

    if not precheck:
        monkeypatch.setattr(checkpoint, "check_checkpoint_files", lambda _: None)
    run_dir = shutil.copytree(runs[3], tmp_path / "run")
    bad = latest_checkpoint(run_dir / "checkpoints") / name
    craft(bad, tmp_path / "marker")
    with pytest.raises(CheckpointError, match="refused to load") as e:
        train(tiny_corpus, run_dir, "parallel.zero_stage=3", "train.max_steps=6")
    assert str(bad) in str(e.value)
    assert not (tmp_path / "marker").exists()
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000004"


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_files_are_plain_data_and_restore_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # a cached Gaussian is part of Python's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # no allow-list needed
    assert draws() == expected


def test_rng_files_of_the_old_pickled_format_still_load(tmp_path):
    """Before tanuki stored plain data it pickled Python's and NumPy's state objects as they are."""
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(old, tmp_path / "rng_rank00000.pt")
    expected = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_rng_state(tmp_path / "rng_rank00000.pt"))
    assert draws() == expected


def test_nested_safe_loading_keeps_the_allow_list(tmp_path):
    """load_pt inside safe_torch_loads (tanuki's checkpoint engine inside DeepSpeed's load) must not drop
    the allow-list the enclosing context set (torch keeps it in one global set)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from tanuki.fileio import load_pt, safe_torch_loads

    torch.save({"scaler": LossScaler(1.0)}, tmp_path / "a.pt")
    with safe_torch_loads():
        load_pt(tmp_path / "a.pt")
        assert isinstance(torch.load(tmp_path / "a.pt", weights_only=False)["scaler"], LossScaler)
    assert LossScaler not in torch.serialization.get_safe_globals()


# --------------------------------------------------------------------------------------------------
# Damaged files and full disks
# --------------------------------------------------------------------------------------------------


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("stage,name", [(3, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                        (0, "mp_rank_00_model_states.pt")])
def test_a_truncated_file_on_export_is_named_with_the_previous_checkpoint(runs, tmp_path, stage, name):
    from tanuki.pretrain import export_checkpoint

    run_dir = shutil.copytree(runs[stage], tmp_path / "run")
    bad = run_dir / "checkpoints" / "step_00000004" / name
    truncate(bad)
    with pytest.raises(CheckpointError) as e:
        export_checkpoint(run_dir, tmp_path / "hf")
    msg = str(e.value)
    assert f"{bad}: damaged or truncated" in msg
    assert f"previous complete checkpoint is {run_dir / 'checkpoints' / 'step_00000002'}" in msg
    assert not (tmp_path / "hf").exists()


def test_a_truncated_file_on_resume_fails_before_anything_is_built(runs, tiny_corpus, tmp_path):
    run_dir = shutil.copytree(runs[3], tmp_path / "run")
    bad = run_dir / "checkpoints" / "step_00000004" / "rng_rank00000.pt"
    truncate(bad, 0.3)
    with pytest.raises(CheckpointError) as e:
        train(tiny_corpus, run_dir, "parallel.zero_stage=3", "train.max_steps=6")
    prev = run_dir / "checkpoints" / "step_00000002"
    assert f"{bad}: damaged or truncated" in str(e.value) and f"resume from it with resume={prev}" in str(e.value)
    # the advice works
    result = train(tiny_corpus, run_dir, "parallel.zero_stage=3", "train.max_steps=6", f"resume={prev}")
    assert result.step == 6


def test_export_says_which_step_it_used_when_the_newest_is_incomplete(runs, tmp_path):
    from tanuki.pretrain import export_checkpoint

    run_dir = shutil.copytree(runs[3], tmp_path / "run")
    (run_dir / "checkpoints" / "step_00000004" / "tanuki_state.json").unlink()
    (run_dir / "checkpoints" / "step_00000006.partial").mkdir()
    notes = []
    export_checkpoint(run_dir, tmp_path / "hf", log=notes.append)
    assert len(notes) == 1
    assert "using step_00000002" in notes[0]
    assert "step_00000004 (no tanuki_state.json: its save did not finish)" in notes[0]
    assert "step_00000006.partial (a save in progress or interrupted)" in notes[0]
    with pytest.raises(CheckpointError, match="step_00000004: not a complete tanuki checkpoint"):
        export_checkpoint(run_dir / "checkpoints" / "step_00000004", tmp_path / "hf2")


def test_a_full_disk_during_a_checkpoint_save_names_the_last_complete_one(tiny_corpus, tmp_path, monkeypatch):
    import errno

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from tanuki.checkpoint import is_complete
    from tanuki.fileio import WriteError

    real = TorchCheckpointEngine.save

    def save(self, state_dict, path):
        if "step_00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(self, state_dict, path)

    monkeypatch.setattr(TorchCheckpointEngine, "save", save)
    with pytest.raises(WriteError) as e:
        train(tiny_corpus, tmp_path, "parallel.zero_stage=3", "train.max_steps=4")
    msg = str(e.value)
    assert "step_00000004.partial" in msg and "the disk is full (ENOSPC)" in msg
    assert f"the last complete checkpoint is {tmp_path.resolve() / 'checkpoints' / 'step_00000002'}" in msg
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000002"
    assert not any(is_complete(p) for p in (tmp_path / "checkpoints").glob("step_00000004*"))
