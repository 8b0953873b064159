"""``launch/pretrain.py`` as users start it: one process, 2 ranks under the ``deepspeed`` launcher and
under ``torchrun`` (ZeRO-3 over gloo on CPU), a SIGKILL mid-run and a resume, the offline W&B run,
bad input, and ``launch/export_hf.py`` on a run directory."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, tiny_train_overrides
from wandb_reader import find_wandb_files, read_wandb_history

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BIN = Path(sys.executable).parent
# One thread per rank: the same arithmetic in every process, and no oversubscription of 2 cores.
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_PROCID",
            "SLURM_NTASKS", "TANUKI_RUN_DIR"):
    ENV.pop(var, None)


def metrics(run_dir) -> dict[int, dict]:
    """Training records of metrics.jsonl by step (a resumed run re-logs steps: the later one wins)."""
    rows = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            rows[r["step"]] = r
    return rows


def launch(cmd, run_dir, timeout=240, check=True):
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def pretrain_cmd(corpus, run_dir, *extra):
    return ["launch/pretrain.py", *tiny_train_overrides(corpus, run_dir, *extra)]


@pytest.fixture(scope="module")
def single(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    launch([sys.executable, *pretrain_cmd(tiny_corpus, run_dir)], run_dir)
    return run_dir


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_two_ranks_zero3_match_one_process(tiny_corpus, single, tmp_path, launcher):
    port = str(free_port())
    if launcher == "deepspeed":
        cmd = [BIN / "deepspeed", "--num_gpus", "2", "--master_port", port]
    else:
        cmd = [BIN / "torchrun", "--nproc-per-node", "2", "--master-port", port]
    proc = launch([*cmd, *pretrain_cmd(tiny_corpus, tmp_path)], tmp_path)
    assert "on 2 rank(s)" in proc.stdout and "8 = 2 x 2 ranks x 2 accumulation" in proc.stdout
    one, two = metrics(single), metrics(tmp_path)
    assert sorted(two) == sorted(one) == [1, 2, 3, 4, 5, 6]
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=2e-5), step
    state = json.loads((tmp_path / "checkpoints/step_00000006/tanuki_state.json").read_text())
    assert state["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints/step_00000006").glob("rng_rank*")) == [
        "rng_rank00000.pt", "rng_rank00001.pt"]


def test_sigkill_then_resume_equals_the_uninterrupted_run_and_wandb_matches(tiny_corpus, single, tmp_path):
    cmd = [sys.executable, *pretrain_cmd(tiny_corpus, tmp_path, "logging.wandb.mode=offline", "logging.wandb.project=t")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    try:
        # step 3 is logged after the checkpoint of step 2 is complete
        while not (tmp_path / "metrics.jsonl").exists() or 3 not in metrics(tmp_path):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = max(metrics(tmp_path))
    assert killed_at < 6, "the run finished before it could be killed"

    out = launch(cmd, tmp_path).stdout
    assert "resumed from" in out
    resumed, reference = metrics(tmp_path), metrics(single)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert [resumed[s]["loss"] for s in range(1, 7)] == [reference[s]["loss"] for s in range(1, 7)]  # bitwise
    assert [resumed[s]["grad_norm"] for s in range(1, 7)] == [reference[s]["grad_norm"] for s in range(1, 7)]

    # W&B: two offline segments of one run (same id), holding the same series as metrics.jsonl.
    files = find_wandb_files(tmp_path)
    assert len(files) == 2
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert all(f.parent.name.endswith(run_id) for f in files)
    rows = {}
    for f in files:
        for r in read_wandb_history(f, wait_for_exit=20 if f == files[-1] else 0):
            if "loss" in r:
                rows[r["step"]] = r
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for s in rows:
        for key in ("loss", "lr", "tokens", "grad_norm"):
            assert rows[s][key] == resumed[s][key], (s, key)


def test_bad_input_fails_fast_naming_the_key(tiny_corpus, tmp_path):
    proc = launch([sys.executable, *pretrain_cmd(tiny_corpus, tmp_path, f"data.prefixes=[{tmp_path}/missing]")],
                  tmp_path, check=False)
    assert proc.returncode == 2
    assert "data.prefixes[0]" in proc.stderr and "missing" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_export_cli_on_a_run_dir(single, tmp_path):
    from transformers import AutoModelForCausalLM

    proc = launch([sys.executable, "launch/export_hf.py", f"checkpoint={single}", f"output={tmp_path}/hf"], tmp_path)
    assert "step_00000006" in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.num_hidden_layers == 2
    assert (tmp_path / "hf/tokenizer.json").is_file() and (tmp_path / "hf/tokenizer_config.json").is_file()


CRAFT = """
import builtins, sys, torch
class Payload:
    def __reduce__(self):
        return builtins.open, (sys.argv[2], "w")
torch.save({"optimizer_state_dict": Payload()}, sys.argv[1])
"""


def test_export_cli_refuses_a_crafted_checkpoint_file_in_one_line(single, tmp_path):
    import shutil

    run_dir = shutil.copytree(single, tmp_path / "run")
    bad = run_dir / "checkpoints/step_00000006/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    subprocess.run([sys.executable, "-c", CRAFT, str(bad), str(tmp_path / "marker")], check=True)
    proc = launch([sys.executable, "launch/export_hf.py", f"checkpoint={run_dir}", f"output={tmp_path}/hf"], tmp_path,
                  check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"error: {bad}: refused to load" in proc.stderr
    assert f"previous complete checkpoint is {run_dir / 'checkpoints/step_00000004'}" in proc.stderr
    assert not (tmp_path / "marker").exists() and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_sigkill_of_one_rank_ends_every_rank_then_resume_continues(tiny_corpus, single, tmp_path, launcher):
    """A rank killed mid-run (OOM killer, a lost node): every other rank ends within 60 s, the launcher
    names the dead rank, and the same command resumes from the last complete checkpoint."""
    import psutil

    port = str(free_port())
    if launcher == "deepspeed":
        cmd = [BIN / "deepspeed", "--num_gpus", "2", "--master_port", port]
    else:
        cmd = [BIN / "torchrun", "--nproc-per-node", "2", "--master-port", port]
    cmd = [*cmd, *pretrain_cmd(tiny_corpus, tmp_path, "parallel.timeout_s=30")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    ranks: list = []
    try:
        while not (tmp_path / "metrics.jsonl").exists() or 3 not in metrics(tmp_path):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.05)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "launch/pretrain.py" in " ".join(p.cmdline())]
        victim = next(p for p in ranks if p.environ().get("RANK") == "1")
        victim.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        ended = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ended < 60
    gone, alive = psutil.wait_procs(ranks, timeout=5)
    assert not alive, f"ranks still running: {alive}"
    assert proc.returncode != 0
    if launcher == "torchrun":
        assert "rank      : 1 (local_rank: 1)" in out or "rank: 1" in out, out[-3000:]
    else:
        assert "--local_rank=1" in out and "exits with return code = -9" in out, out[-3000:]
    assert max(metrics(tmp_path)) < 6, "the run finished before it could be killed"

    resumed = launch(cmd, tmp_path).stdout
    assert "resumed from" in resumed
    two, one = metrics(tmp_path), metrics(single)
    assert sorted(two) == [1, 2, 3, 4, 5, 6]
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=2e-5), step
