"""Stage plumbing: one run per run directory (the ``.lock`` of :func:`tanuki.stage.lock_run_dir`)."""

import fcntl
import os
import subprocess
import sys

import pytest
from conftest import compose, tiny_train_overrides

from tanuki.config import PretrainConfig, from_dict
from tanuki.parallel.env import DistEnv
from tanuki.stage import LOCK_FILE, RunDirLocked, lock_run_dir

pytestmark = pytest.mark.distributed

ENV = DistEnv(0, 1, 0, "single")


@pytest.fixture(scope="module", autouse=True)
def process_group(single_process_group):
    yield


def test_a_second_run_on_a_locked_run_dir_fails_at_once_and_writes_nothing(tiny_corpus, tmp_path):
    from tanuki import pretrain

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # The oracle is the kernel's flock: another open file description holding it is another run.
    with open(run_dir / LOCK_FILE, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on node7 since 2026-01-01 00:00:00\n")
        held.flush()
        cfg = from_dict(PretrainConfig, compose("pretrain", tiny_train_overrides(tiny_corpus, run_dir)))
        with pytest.raises(RunDirLocked) as e:
            pretrain.main(cfg, ENV)
        assert str(run_dir) in str(e.value) and "pid 4242 on node7" in str(e.value)
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]
    # released: the directory can be taken, and the holder is recorded in the file
    with lock_run_dir(run_dir, ENV):
        text = (run_dir / LOCK_FILE).read_text()
        assert f"pid {os.getpid()} " in text
        with pytest.raises(RunDirLocked, match=f"pid {os.getpid()} "):
            with lock_run_dir(run_dir, ENV):
                pass


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from tanuki.parallel.env import DistEnv\nfrom tanuki.stage import lock_run_dir\n"
         f"with lock_run_dir(Path({str(run_dir)!r}), DistEnv(0, 1, 0, 'single')):\n"
         "    print('locked', flush=True)\n    time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=f"pid {holder.pid} "):
            with lock_run_dir(run_dir, ENV):
                pass
    finally:
        holder.kill()
        holder.wait()
    with lock_run_dir(run_dir, ENV):
        pass


def test_a_dataset_with_ids_beyond_the_tokenizer_fails_at_start_up_naming_prefix_and_tokenizer(tiny_corpus, tmp_path):
    """Such a dataset was noticed only at the first forward, as a bare IndexError in the embedding."""
    import numpy as np

    from tanuki import pretrain
    from tanuki.config import ConfigError
    from tanuki.data.indexed import IndexedDatasetWriter

    prefix = tmp_path / "other"
    w = IndexedDatasetWriter(f"{prefix}.bin", f"{prefix}.idx", np.uint16)
    w.add_document(np.array([5, 1279, 1280, 40000]))  # 1280 ids: 0..1279; made by a 50k tokenizer
    w.finish()
    for key in ("data.prefixes", "data.valid_prefixes"):
        over = (f"data.prefixes=[{tiny_corpus['prefix']},{prefix}]" if key == "data.prefixes" else
                f"data.valid_prefixes=[{prefix}]")
        cfg = from_dict(PretrainConfig, compose("pretrain", tiny_train_overrides(tiny_corpus, tmp_path / "run", over)))
        with pytest.raises(ConfigError, match=rf"{key}\[\d\].*'{prefix}' holds token id 40000.*"
                                               rf"{tiny_corpus['tokenizer']} has 1280 ids"):
            pretrain.prepare(cfg, ENV)
    assert not (tmp_path / "run").exists()


def lock_on_rank(rank, world, run_dir):
    from pathlib import Path

    try:
        with lock_run_dir(Path(run_dir), DistEnv(rank, world, rank, "torchrun/deepspeed")):
            return "ran"
    except RunDirLocked as e:
        return str(e)


def test_every_rank_stops_when_rank_0_finds_the_run_dir_locked(tmp_path):
    """Only rank 0 takes the lock; the others learn the outcome from it, so no rank trains alone."""
    from dist_helpers import run_ranks

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / LOCK_FILE, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on node7 since then\n")
        held.flush()
        results = run_ranks(lock_on_rank, 2, str(run_dir))
    assert all("in use by another run (pid 4242 on node7" in r for r in results), results
    assert run_ranks(lock_on_rank, 2, str(run_dir)) == ["ran", "ran"]


def test_a_run_dir_that_cannot_be_written_is_named_before_anything_runs(tmp_path, monkeypatch):
    import errno

    from tanuki import stage
    from tanuki.fileio import WriteError

    def read_only(*args, **kwargs):  # what a read-only mount gives (chmod does not stop root)
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "run" / LOCK_FILE))

    monkeypatch.setattr(stage.os, "open", read_only)
    with pytest.raises(WriteError, match=rf"the run directory {tmp_path / 'run'} failed .*read-only \(EROFS\)"):
        with lock_run_dir(tmp_path / "run", ENV):
            pytest.fail("ran")
