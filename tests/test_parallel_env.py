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


HUNG_RANK = """
import os, sys, time
import torch
from tanuki.parallel.env import DistEnv, init_distributed
rank = int(sys.argv[1])
init_distributed(DistEnv(rank, 2, rank, "torchrun/deepspeed"), "gloo", timeout_s=float(sys.argv[2]))
if rank == 1:
    time.sleep(120)  # alive but hung: never joins the collective
t0 = time.monotonic()
try:
    torch.distributed.all_reduce(torch.ones(1))
except Exception as e:
    print(f"failed after {time.monotonic() - t0:.1f}s: {type(e).__name__}", flush=True)
    os._exit(3)
"""


def test_parallel_timeout_s_bounds_the_wait_for_a_hung_rank(tmp_path):
    """``parallel.timeout_s`` reaches the process group: a collective with a hung peer fails after it."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import REPO

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "hung.py"
    script.write_text(HUNG_RANK)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "4"], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        out, _ = procs[0].communicate(timeout=90)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 3, out
    waited = float(out.split("failed after ")[1].split("s:")[0])
    assert 3.5 <= waited < 30, out


def test_timeout_s_is_a_checked_config_key():
    from conftest import compose

    from tanuki.config import ConfigError, PretrainConfig, from_dict

    assert from_dict(PretrainConfig, compose("pretrain", ["parallel.timeout_s=90"])).parallel.timeout_s == 90
    with pytest.raises(ConfigError, match="parallel.timeout_s"):
        from_dict(PretrainConfig, compose("pretrain", ["parallel.timeout_s=0"]))
