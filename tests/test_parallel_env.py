"""Launcher environments: deepspeed's --local_rank, torchrun/deepspeed variables, srun's SLURM variables,
and the one run directory all ranks agree on."""

import pytest

from tanuki.parallel.env import DistEnv, dist_env, resolve_run_dir, strip_local_rank

VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID",
        "TANUKI_RUN_DIR")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for v in VARS:
        monkeypatch.delenv(v, raising=False)


@pytest.mark.parametrize(
    "argv, rest, local",
    [
        (["x.py", "--local_rank=3", "a=1"], ["x.py", "a=1"], "3"),
        (["x.py", "a=1", "--local_rank", "2"], ["x.py", "a=1"], "2"),
        (["x.py", "--local-rank=1"], ["x.py"], "1"),
        (["x.py", "a=1"], ["x.py", "a=1"], None),
    ],
)
def test_strip_local_rank(monkeypatch, argv, rest, local):
    import os

    assert strip_local_rank(argv) == rest
    assert os.environ.get("LOCAL_RANK") == local


def test_plain_process_is_a_single_rank():
    assert dist_env() == DistEnv(0, 1, 0, "single")


def test_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_env() == DistEnv(5, 16, 1, "torchrun/deepspeed")


def test_srun_variables_are_mapped_for_torch(monkeypatch):
    import os

    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert dist_env() == DistEnv(3, 8, 3, "srun")
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "8", "3")


def test_one_task_batch_job_running_a_launcher_is_not_srun(monkeypatch):
    # the sbatch script runs `deepspeed`/`torchrun` as the one task of a node: they set RANK themselves
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert dist_env().launcher == "single"


def test_bad_integer_names_the_variable(monkeypatch):
    monkeypatch.setenv("RANK", "zero")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK"):
        dist_env()


def test_run_dir_precedence(monkeypatch):
    env = DistEnv(0, 1, 0, "single")
    assert str(resolve_run_dir("runs/mine", "pretrain", env)) == "runs/mine"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert str(resolve_run_dir(None, "pretrain", env)) == "runs/slurm-4242"  # a requeued job keeps its id
    monkeypatch.setenv("TANUKI_RUN_DIR", "/data/run7")
    assert str(resolve_run_dir(None, "pretrain", env)) == "/data/run7"
    monkeypatch.delenv("TANUKI_RUN_DIR")
    monkeypatch.delenv("SLURM_JOB_ID")
    name = resolve_run_dir(None, "pretrain", env).name
    assert name.startswith("pretrain-") and len(name) == len("pretrain-20260101-000000")
