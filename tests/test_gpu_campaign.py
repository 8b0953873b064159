"""The GPU campaign script runs end to end on CPU at tiny sizes (``--smoke``), so it cannot rot between
the rare sessions that have a GPU: every step succeeds and writes its result file, and the summary
names the device and every step."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

STEPS = ("environment", "kernel correctness", "kernel benchmark", "training step", "loss memory")


@pytest.mark.slow
def test_the_campaign_smoke_run_writes_every_result(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(["bash", str(REPO / "benchmarks/gpu/run_all.sh"), "--smoke", "--out", str(out)],
                          cwd=REPO, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (out / "gpu_campaign_gpu.md").read_text()
    for name in STEPS:
        assert f"| {name} | ok |" in summary, summary
    assert "CPU" in summary  # the device is named: a smoke run is never mistaken for a GPU measurement
    for name in ("environment_gpu.md", "kernels_gpu.md", "train_step_cpu.md", "loss_memory_gpu.md"):
        assert (out / name).stat().st_size > 0, name
    assert " passed" in (out / "kernel_tests_gpu.txt").read_text()
    table = (out / "loss_memory_gpu.md").read_text()
    assert "| chunked |" in table and "| full |" in table and "| hf |" in table
    # the committed results stay untouched by a smoke run
    assert not any(Path(REPO / "benchmarks/results").glob("gpu_campaign_gpu.md"))
