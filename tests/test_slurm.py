"""The Slurm batch scripts on a real one-node Slurm cluster started here (munged, slurmctld, slurmd).

The oracle is the run directory the job leaves: the config, one metrics line per step with a finite
loss, the final checkpoint with a shard and RNG state from each of the two ranks; and, for the requeue
tests, Slurm's restart count, and a log showing the run stopped mid-way and resumed from the
checkpoint it stopped at.

The cluster needs root and Debian's slurm packages (installed here with apt-get when ``sbatch`` is
missing); elsewhere the tests are skipped with the reason. With pytest-xdist the workers share one
cluster (a file lock and a list of the workers using it); Slurm itself queues their jobs one at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SBATCH_LAUNCHER = REPO / "launch" / "slurm" / "pretrain.sbatch"
SBATCH_SRUN = REPO / "launch" / "slurm" / "pretrain_srun.sbatch"

SLURM_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# Written by tanuki tests/test_slurm.py for a one-node test cluster; safe to delete."
STATE = Path("/run/tanuki-slurm-test")  # lock file and the pids of the pytest processes using the cluster
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
RANKS = 2  # processes per job (one node, CPU ranks)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


# --------------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------------


def run(cmd, timeout=60, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check, **kw)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_from(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if alive(pid) else None


def install_slurm() -> None:
    """Install Debian's Slurm and munge packages, or skip the module saying why not."""
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        run(["apt-get", "update"], timeout=600, env=env)
        run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], timeout=900, env=env)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        tail = ((e.stderr or "") if isinstance(e.stderr, str) else "")[-1500:]
        pytest.skip(f"installing {' '.join(PACKAGES)} with apt-get failed: {tail}")
    if not shutil.which("sbatch"):
        pytest.skip("apt-get installed the Slurm packages but sbatch is still not on PATH")


def node_line() -> str:
    """This machine as a Slurm node: the topology from ``slurmd -C``, memory a little below the total.

    Asking for more memory or CPUs than the machine has would leave the node drained.
    """
    fields = dict(re.findall(r"(\w+)=(\S+)", run(["slurmd", "-C"]).stdout.splitlines()[0]))
    memory = int(int(fields["RealMemory"]) * 0.9)
    topology = " ".join(f"{k}={fields[k]}" for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore") if k in fields)
    return f"NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 {topology} RealMemory={memory} State=UNKNOWN"


def write_config() -> None:
    if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text(errors="replace"):
        pytest.skip(f"{SLURM_CONF} exists and was not written by this test: not replacing a real cluster's configuration")
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text(
        f"""{MARKER}
ClusterName=tanukitest
SlurmctldHost=localhost
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
ReturnToService=2
MinJobAge=600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MailProg=/bin/true
{node_line()}
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
    )


def start_munge() -> None:
    munge_pid = Path("/run/munge/munged.pid")
    if pid_from(munge_pid):
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        run(["mungekey", "--create", "--keyfile", str(key)])
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
    (STATE / "munged-started").write_text("1")


def stop_daemons() -> None:
    """Stop slurmctld and slurmd (and munged when this test started it), each by its pid file."""
    pids = [pid for p in ("/run/slurm/slurmctld.pid", "/run/slurm/slurmd.pid") if (pid := pid_from(Path(p)))]
    if pids:
        run(["scontrol", "shutdown"], check=False, timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    if (STATE / "munged-started").exists():
        if pid := pid_from(Path("/run/munge/munged.pid")):
            os.kill(pid, signal.SIGTERM)
        (STATE / "munged-started").unlink()


def node_state() -> str:
    out = run(["sinfo", "-h", "-N", "-o", "%t"], check=False, timeout=10)
    return out.stdout.strip() if out.returncode == 0 else f"sinfo failed: {out.stderr.strip()}"


def start_cluster() -> None:
    try:
        _start_cluster()
    except subprocess.CalledProcessError as e:
        logs = "".join(tail(Path(f"/var/log/slurm/{d}.log"), 1500) for d in ("slurmctld", "slurmd"))
        stop_daemons()
        pytest.fail(f"starting the Slurm test cluster: {' '.join(map(str, e.cmd))} failed: {e.stderr}\n{logs}")


def _start_cluster() -> None:
    write_config()
    for d in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm", "/run/slurm"):
        Path(d).mkdir(parents=True, exist_ok=True)
    for d in ("/var/spool/slurmctld", "/var/log/slurm"):
        shutil.chown(d, "slurm", "slurm")
    start_munge()
    # -c: a cold start, forgetting jobs left in the state directory by an earlier, interrupted run.
    run(["/usr/sbin/slurmctld", "-c"])
    run(["/usr/sbin/slurmd", "-c", "-N", "localhost"])
    deadline = time.monotonic() + 60
    while (state := node_state()) != "idle":
        if time.monotonic() > deadline:
            logs = "".join(tail(Path(f"/var/log/slurm/{d}.log"), 1500) for d in ("slurmctld", "slurmd"))
            stop_daemons()
            pytest.fail(f"the Slurm node did not become idle (state {state!r}); logs:\n{logs}")
        time.sleep(0.3)


@contextlib.contextmanager
def cluster_lock():
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def users(add: int | None = None, remove: int | None = None) -> list[int]:
    """The live pytest processes using the cluster, after adding or removing one (under the lock)."""
    path = STATE / "users"
    pids = [int(p) for p in path.read_text().split()] if path.exists() else []
    pids = [p for p in pids if alive(p) and p != remove]
    if add is not None:
        pids.append(add)
    path.write_text(" ".join(map(str, pids)))
    return pids


@pytest.fixture(scope="module")
def slurm_cluster():
    if not sys.platform.startswith("linux"):
        pytest.skip("the Slurm test cluster needs Linux")
    if (os.cpu_count() or 1) < RANKS:
        pytest.skip(f"the Slurm tests run {RANKS} ranks and need {RANKS} CPUs")
    if os.geteuid() != 0:
        pytest.skip("starting the Slurm test cluster needs root")
    with cluster_lock():
        install_slurm()
        if not users():
            # Nobody uses a running cluster: left over from an interrupted run, so start afresh.
            stop_daemons()
            start_cluster()
        users(add=os.getpid())
    try:
        yield
    finally:
        with cluster_lock():
            if not users(remove=os.getpid()):
                stop_daemons()


# --------------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------------


def tail(path: Path, n: int = 4000) -> str:
    try:
        return f"--- {path} ---\n{path.read_text(errors='replace')[-n:]}\n"
    except OSError:
        return f"--- {path}: missing ---\n"


def job_info(job_id: str) -> dict[str, str]:
    out = run(["scontrol", "-o", "show", "job", job_id], check=False, timeout=10)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout)) if out.returncode == 0 else {}


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def wait_job(job_id: str, timeout: float, until=lambda info: info.get("JobState") in TERMINAL, logs: Path | None = None) -> dict[str, str]:
    """Poll the job until ``until(info)`` holds; past ``timeout`` seconds, cancel it and fail."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job_id)
        if until(info):
            return info
        if time.monotonic() > deadline:
            run(["scancel", job_id], check=False)
            raise AssertionError(f"job {job_id} timed out after {timeout:.0f} s: {info}\n{tail(logs) if logs else ''}")
        time.sleep(0.2)


def submit(script: Path, run_dir: Path, overrides: list[str], sbatch_args: list[str], **env_vars: str) -> tuple[str, Path]:
    """Submit ``script`` from the repository root as the user would, with this interpreter as PYTHON."""
    out = run_dir.parent / f"{run_dir.name}.slurm.out"
    # A clean launcher environment: sbatch exports the submitting shell's variables into the job, and a
    # rendezvous address left by an in-process test (MASTER_PORT of its own process group) would be taken.
    launch_vars = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TANUKI_RUN_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PYTEST_")) and k not in launch_vars}
    env.update(PYTHON=sys.executable, TANUKI_RUN_DIR=str(run_dir), **env_vars)
    res = run(["sbatch", "--parsable", f"--output={out}", *sbatch_args, str(script), *overrides], cwd=REPO, env=env, check=False)
    assert res.returncode == 0, f"sbatch failed: {res.stderr}"
    return res.stdout.strip().split(";")[0], out


def diagnostics(run_dir: Path, out: Path) -> str:
    return tail(out) + tail(run_dir / "train.log")


def check_finished_run(run_dir: Path, out: Path, info: dict[str, str], steps: int) -> list[dict]:
    """The job completed, and the run directory holds a complete two-rank run of ``steps`` steps."""
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", f"{info}\n{diagnostics(run_dir, out)}"
    assert (run_dir / "config.yaml").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert sorted({r["step"] for r in records}) == list(range(1, steps + 1)), diagnostics(run_dir, out)
    for r in records:
        assert {"step", "loss", "lr", "tokens"} <= set(r)
        assert math.isfinite(r["loss"]), r
    final = f"step_{steps:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == final
    checkpoint = run_dir / "checkpoints" / final
    state = json.loads((checkpoint / "tanuki_state.json").read_text())
    assert state["step"] == steps and state["world_size"] == RANKS
    # Each rank writes its own RNG state and ZeRO shard: both ranks ran to the end.
    for rank in range(RANKS):
        assert (checkpoint / f"rng_rank{rank:05d}.pt").is_file()
        assert list(checkpoint.glob(f"zero_pp_rank_{rank}_*model_states.pt")), sorted(p.name for p in checkpoint.iterdir())
    assert f"on {RANKS} rank(s)" in (run_dir / "train.log").read_text()
    return records


# --------------------------------------------------------------------------------------------------
# Data: a small tokenizer and a tokenized prefix, built once
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    import io

    from tanuki.data.config import PreprocessConfig
    from tanuki.data.preprocess import preprocess
    from tanuki.tokenizer import BuildTokenizerConfig, build_tokenizer, sample_data_path

    tmp = tmp_path_factory.mktemp("slurm_data")
    # character_coverage below the default: the sample corpus needs ~1,270 pieces to cover every character.
    build_tokenizer(
        BuildTokenizerConfig(
            input=str(sample_data_path()), output=str(tmp / "tok"), vocab_size=1000, character_coverage=0.98,
            progress=False, threads=1, report_documents=50,
        ),
        log=io.StringIO(),
    )
    preprocess(PreprocessConfig(input=str(sample_data_path()), tokenizer=str(tmp / "tok"), output_prefix=str(tmp / "sample"), progress=False))
    return {"prefix": str(tmp / "sample"), "tokenizer": str(tmp / "tok")}


def tiny_overrides(data: dict[str, str], max_steps: int = 4) -> list[str]:
    return [
        f"data.prefixes=[{data['prefix']}]", f"tokenizer.path={data['tokenizer']}", f"train.max_steps={max_steps}",
        "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=8", "model.n_layers=2", "model.dim=64",
        "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128", "checkpoint.every=2", "logging.every=1",
        "logging.wandb.mode=disabled", "parallel.zero_stage=3",
    ]


# One node, two CPU ranks, no GPUs. The scripts ask for 8 GPUs per node; --gpus-per-node=0 undoes that.
LAUNCHER_JOB = ["--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={RANKS}"]
SRUN_JOB = ["--nodes=1", "--gpus-per-node=0", f"--ntasks-per-node={RANKS}"]
JOB_TIMEOUT = 300  # seconds; generous because the jobs of two pytest-xdist workers queue behind each other


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_pretrain_sbatch_deepspeed_launcher(slurm_cluster, tiny_data, tmp_path):
    # DeepSpeed's launcher runs on CPU: with a hostfile it does not count accelerators, and --num_gpus
    # sets the ranks per node.
    run_dir = tmp_path / "run"
    job, out = submit(SBATCH_LAUNCHER, run_dir, tiny_overrides(tiny_data), LAUNCHER_JOB, GPUS_PER_NODE=str(RANKS))
    info = wait_job(job, JOB_TIMEOUT, logs=out)
    check_finished_run(run_dir, out, info, steps=4)
    assert "[torchrun/deepspeed]" in (run_dir / "train.log").read_text()
    log = out.read_text()
    assert "deepspeed.launcher.launch" in log, diagnostics(run_dir, out)
    assert (run_dir / "hostfile").read_text() == f"localhost slots={RANKS}\n"
    assert info["Restarts"] == "0"


def wait_for_checkpoint(job: str, run_dir: Path, out: Path, step: int) -> None:
    latest = run_dir / "checkpoints" / "latest"

    def written(info: dict[str, str]) -> bool:
        if info.get("JobState") in TERMINAL:
            raise AssertionError(f"the job ended before its checkpoint at step {step}: {info}\n{diagnostics(run_dir, out)}")
        name = latest.read_text().strip() if latest.is_file() else ""
        return name.startswith("step_") and int(name[5:]) >= step

    wait_job(job, JOB_TIMEOUT, until=written, logs=out)


def release_requeued(job: str, run_dir: Path, out: Path) -> None:
    """Wait until the job is back in the queue, then let it start at once.

    Slurm holds a requeued job back for about two minutes (its BeginTime); nothing here needs that.
    """
    info = wait_job(job, 120, until=lambda i: i.get("JobState") == "PENDING" or i.get("JobState") in TERMINAL, logs=out)
    assert info.get("JobState") == "PENDING" and info.get("Restarts") == "1", f"{info}\n{diagnostics(run_dir, out)}"
    run(["scontrol", "update", f"jobid={job}", "StartTime=now"])


def check_resumed(run_dir: Path, out: Path, job: str, steps: int) -> int:
    """The run stopped mid-way, and the requeued job resumed it from a checkpoint; returns that step."""
    log = (run_dir / "train.log").read_text()
    resumed = re.search(r"resumed from \S+step_(\d+) at step (\d+)", log)
    assert resumed, diagnostics(run_dir, out)
    assert 2 <= int(resumed[2]) < steps and int(resumed[1]) == int(resumed[2]), log
    job_log = out.read_text()
    assert f"job {job} (restart 0)" in job_log and f"job {job} (restart 1)" in job_log, job_log
    return int(resumed[2])


def test_pretrain_srun_sbatch_survives_scontrol_requeue(slurm_cluster, tiny_data, tmp_path):
    """The srun-per-rank script; requeued by hand mid-run, the job comes back into its run dir and resumes."""
    steps = 8  # the requeue comes after step 2; the steps after it leave time for it to land mid-run
    run_dir = tmp_path / "run"
    job, out = submit(SBATCH_SRUN, run_dir, tiny_overrides(tiny_data, max_steps=steps), SRUN_JOB)
    wait_for_checkpoint(job, run_dir, out, step=2)
    run(["scontrol", "requeue", job])
    release_requeued(job, run_dir, out)
    info = wait_job(job, JOB_TIMEOUT, logs=out)
    check_finished_run(run_dir, out, info, steps=steps)
    # launch/pretrain.py took its rank and world size from SLURM_PROCID / SLURM_NTASKS.
    assert f"on {RANKS} rank(s) [srun]" in (run_dir / "train.log").read_text()
    assert info["Restarts"] == "1"
    check_resumed(run_dir, out, job, steps)
    # The SIGTERM of Slurm's own requeue was not taken for an early warning: no second requeue.
    assert "requeueing" not in out.read_text(), out.read_text()


def test_pretrain_sbatch_requeues_itself_before_time_limit(slurm_cluster, tiny_data, tmp_path):
    """SIGUSR1 before the time limit: the ranks checkpoint and stop, the job requeues itself and resumes.

    The signal is the one ``#SBATCH --signal=B:USR1@300`` makes Slurm send, delivered now with scancel.
    This job uses torchrun, whose workers the per-node task reaches through the process tree. The run
    is long enough (24 steps) that the signal lands mid-run however fast the machine is.
    """
    steps = 24
    run_dir = tmp_path / "run"
    job, out = submit(SBATCH_LAUNCHER, run_dir, tiny_overrides(tiny_data, max_steps=steps), LAUNCHER_JOB,
                      GPUS_PER_NODE=str(RANKS), LAUNCHER="torchrun")
    wait_for_checkpoint(job, run_dir, out, step=2)
    run(["scancel", "--batch", "--signal=USR1", job])
    release_requeued(job, run_dir, out)
    info = wait_job(job, JOB_TIMEOUT, logs=out)
    check_finished_run(run_dir, out, info, steps=steps)
    assert info["Restarts"] == "1"
    resumed_at = check_resumed(run_dir, out, job, steps)
    # A clean stop: the ranks finished their step and checkpointed it, so no step ran twice.
    log = (run_dir / "train.log").read_text()
    assert f"step {resumed_at}/{steps} | stop requested by a signal" in log, log
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    job_log = out.read_text()
    assert "SIGUSR1: asking the ranks to checkpoint and stop" in job_log and "SIGUSR1: requeueing" in job_log, job_log
