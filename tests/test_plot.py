"""tanuki.plot and launch/plot.py: metrics.jsonl read back exactly (resumes, partial lines, "nan"
strings), figures holding exactly the logged values, PNG files of the stated size, clear errors."""

import json
import math
import struct
import subprocess
import sys

import pytest
from conftest import REPO, compose
from matplotlib.backends.backend_agg import FigureCanvasAgg

from tanuki.config import ConfigError, from_dict
from tanuki.metrics import MetricsLogger, WandbConfig
from tanuki.plot import (
    DPI,
    FIGSIZE,
    MetricsError,
    PlotConfig,
    build_figures,
    plot_run,
    read_metrics,
    step_tokens_maps,
)


def train(step, loss, **extra):
    """A training record as the loop logs it; 1000 tokens per step."""
    return {
        "step": step,
        "tokens": 1000 * step,
        "loss": loss,
        "lr": 1e-4 * step,
        "grad_norm": 1.0,
        "tokens_per_s": 500.0 + step,
        "tflops": 10.0,
        "mfu": 0.01 * step,
        "mem_gib": 2.5,
        "skipped": 0,
        "elapsed_s": 2.0 * step,
        **extra,
    }


def val(step, val_loss):
    return {
        "step": step,
        "tokens": 1000 * step,
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
    }


def write_lines(path, lines, end="\n"):
    """Write records (dicts) and raw strings, one a line, as MetricsLogger would."""
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
    path.write_text(text + end, encoding="utf-8")
    return path


def test_resumed_run_keeps_the_later_records(tmp_path):
    # Segment 1 reaches step 4; the run resumes from a checkpoint at step 2 and recomputes 3 and 4.
    path = write_lines(
        tmp_path / "metrics.jsonl",
        [train(1, 10.0), train(2, 9.0), val(2, 8.5), train(3, 8.0), train(4, 7.0)]
        + [val(4, 7.5), train(3, 7.9), train(4, 6.9), val(4, 7.4), train(5, 6.0)],
    )
    assert read_metrics(path) == [
        train(1, 10.0),
        train(2, 9.0),
        val(2, 8.5),
        train(3, 7.9),
        train(4, 6.9),
        val(4, 7.4),
        train(5, 6.0),
    ]


def test_steps_the_resumed_run_has_not_reached_are_dropped(tmp_path):
    """Segment 1 logged up to step 6, segment 2 resumed at 4 and is at 5: step 6 belongs to the
    abandoned trajectory, so no curve splices the two."""
    path = write_lines(
        tmp_path / "metrics.jsonl",
        [train(s, 10.0 - s) for s in range(1, 7)]
        + [val(6, 4.5), train(4, 5.5), train(5, 4.5)],
    )
    expected = [
        train(1, 9.0),
        train(2, 8.0),
        train(3, 7.0),
        train(4, 5.5),
        train(5, 4.5),
    ]
    assert read_metrics(path) == expected


def test_reads_what_metrics_logger_writes(tmp_path):
    """The writer's own format (non-finite floats, a resumed run appending to the same file)."""
    quiet = {"wandb": WandbConfig(mode="disabled"), "print_fn": lambda *a, **k: None}
    first = MetricsLogger(tmp_path, **quiet)
    for s in range(1, 4):
        first.log(train(s, float("nan") if s == 2 else 3.0 / s))
    first.close()
    resumed = MetricsLogger(tmp_path, **quiet)  # from a checkpoint at step 1
    for s in range(2, 5):
        resumed.log(train(s, 2.0 / s, grad_norm=float("inf")))
    resumed.log(val(4, 0.75))
    resumed.close()
    got = read_metrics(tmp_path / "metrics.jsonl")
    expected = [train(1, 3.0)] + [
        train(s, 2.0 / s, grad_norm=math.inf) for s in (2, 3, 4)
    ]
    assert got == expected + [val(4, 0.75)]


def test_repeated_validation_step_keeps_the_later_one(tmp_path):
    other = {"step": 1, "note": "a record of another kind"}
    path = write_lines(
        tmp_path / "m.jsonl", [train(1, 3.0), val(1, 3.5), other, val(1, 3.25)]
    )
    assert read_metrics(path) == [train(1, 3.0), other, val(1, 3.25)]


def test_non_finite_strings_are_read_as_floats(tmp_path):
    path = write_lines(
        tmp_path / "m.jsonl",
        [
            train(1, "nan", grad_norm="inf"),
            {"step": 1, "val_loss": "-inf", "note": "text"},
        ],
    )
    first, second = read_metrics(path)
    assert math.isnan(first["loss"]) and first["grad_norm"] == math.inf
    assert second == {
        "step": 1,
        "val_loss": -math.inf,
        "note": "text",
    }  # other strings stay


def test_partial_last_line_is_ignored_and_a_complete_one_kept(tmp_path):
    cut = json.dumps(train(3, 1.0))[:25]
    path = write_lines(
        tmp_path / "cut.jsonl", [train(1, 2.0), train(2, 1.5), cut], end=""
    )
    assert read_metrics(path) == [train(1, 2.0), train(2, 1.5)]
    # The same with the kill after the record but before its newline.
    path = write_lines(tmp_path / "whole.jsonl", [train(1, 2.0), train(2, 1.5)], end="")
    assert read_metrics(path) == [train(1, 2.0), train(2, 1.5)]


def test_resume_after_a_killed_write_keeps_the_appended_record(tmp_path):
    """The resumed run appends its first record to the killed run's partial line."""
    cut = json.dumps(train(4, 1.0))[:30]
    path = write_lines(
        tmp_path / "metrics.jsonl",
        [
            train(1, 3.0),
            train(2, 2.0),
            train(3, 1.5),
            cut + json.dumps(train(3, 1.4)),
            train(4, 1.2),
        ],
    )
    assert read_metrics(path) == [
        train(1, 3.0),
        train(2, 2.0),
        train(3, 1.4),
        train(4, 1.2),
    ]


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("not json", "not a JSON record"),
        ('{"step": 3, "loss": }', "not a JSON record"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"loss": 1.0}', "no integer 'step'"),
        ('{"step": "3", "loss": 1.0}', "no integer 'step'"),
    ],
)
def test_bad_line_in_the_middle_names_file_and_line(tmp_path, bad, fragment):
    path = write_lines(
        tmp_path / "metrics.jsonl", [train(1, 2.0), "", bad, train(2, 1.0)]
    )
    with pytest.raises(MetricsError) as e:
        read_metrics(path)
    assert str(e.value).startswith(f"{path}:3: ") and fragment in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl: no such file"):
        read_metrics(tmp_path / "metrics.jsonl")


def lines_by_label(ax):
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in ax.get_lines()
    }


def same(a, b):
    """Element-wise equality with NaN equal to NaN."""
    return len(a) == len(b) and all(
        x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b)
    )


RECORDS = [
    train(1, 4.0),
    train(2, 2.0),
    val(2, 2.5),
    train(3, "nan", mfu="nan"),
    train(4, 1.0),
    val(4, 1.5),
]


@pytest.fixture
def records(tmp_path):
    return read_metrics(write_lines(tmp_path / "metrics.jsonl", RECORDS))


def test_figures_plot_exactly_the_logged_values(records):
    figs = build_figures(records)
    assert list(figs) == ["loss", "lr", "throughput"]
    assert all(
        type(f.canvas) is FigureCanvasAgg for f in figs.values()
    )  # no pyplot, no display
    nan = math.nan

    loss = lines_by_label(figs["loss"].axes[0])
    assert set(loss) == {"train", "validation"}
    assert loss["train"][0] == [1, 2, 3, 4] and same(
        loss["train"][1], [4.0, 2.0, nan, 1.0]
    )
    assert loss["validation"] == ([2, 4], [2.5, 1.5])

    lr = lines_by_label(figs["lr"].axes[0])
    assert lr["lr"] == ([1, 2, 3, 4], [1e-4 * s for s in range(1, 5)])

    tokens_per_s = lines_by_label(figs["throughput"].axes[0])
    assert tokens_per_s["tokens/s"] == ([1, 2, 3, 4], [501.0, 502.0, 503.0, 504.0])
    mfu = lines_by_label(figs["throughput"].axes[1])
    assert mfu["MFU"][0] == [1, 2, 3, 4]
    assert same(mfu["MFU"][1], [100 * 0.01, 100 * 0.02, nan, 100 * 0.04])  # in percent


def test_smoothed_loss_is_the_ema(records):
    figs = build_figures(records, smoothing=0.75)
    loss = lines_by_label(figs["loss"].axes[0])
    assert same(loss["train"][1], [4.0, 2.0, math.nan, 1.0])  # the raw curve stays
    # m1 = 4; m2 = 0.75 * 4 + 0.25 * 2 = 3.5; NaN skipped; m4 = 0.75 * 3.5 + 0.25 * 1 = 2.875
    assert same(loss["train (EMA 0.75)"][1], [4.0, 3.5, math.nan, 2.875])


def test_tokens_axis_maps_steps_to_consumed_tokens(records):
    to_tokens, to_steps = step_tokens_maps(records)
    # Steps beyond the logged ones on both sides: the axis margins.
    steps = [0.0, 1.0, 2.5, 4.0, 6.0]
    assert list(to_tokens(steps)) == [0.0, 1000.0, 2500.0, 4000.0, 6000.0]
    assert list(to_steps(to_tokens(steps))) == steps
    loss_axes = build_figures(records)["loss"].axes[0]
    assert [a.get_xlabel() for a in loss_axes.child_axes] == ["tokens"]
    # Too few points, or tokens not growing with the step: no axis.
    assert step_tokens_maps(records[:1]) is None
    assert step_tokens_maps([train(1, 1.0), train(2, 1.0, tokens=1000)]) is None


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_run_writes_the_pngs(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", RECORDS)
    paths = plot_run(tmp_path)
    assert paths == [
        tmp_path / "plots" / f"{n}.png" for n in ("loss", "lr", "throughput")
    ]
    for path in paths:
        assert png_size(path) == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)
    other = plot_run(tmp_path, tmp_path / "elsewhere", smoothing=0.9)
    assert [p.parent for p in other] == [tmp_path / "elsewhere"] * 3


def test_plot_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory .* does not exist"):
        plot_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="metrics.jsonl: no such file"):
        plot_run(tmp_path)
    write_lines(tmp_path / "metrics.jsonl", [val(2, 2.5)])
    with pytest.raises(MetricsError, match="metrics.jsonl: no training records"):
        plot_run(tmp_path)
    assert not (tmp_path / "plots").exists()


def test_config_defaults_and_checks():
    cfg = from_dict(PlotConfig, compose("plot", ["run.dir=runs/a"]))
    assert (cfg.run.dir, cfg.out, cfg.smoothing) == ("runs/a", None, 0.0)
    for overrides, key in [
        ([], "run.dir"),
        (["run.dir=runs/a", "smoothing=1.0"], "smoothing"),
    ]:
        with pytest.raises(ConfigError) as e:
            from_dict(PlotConfig, compose("plot", overrides))
        assert e.value.key == key


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "launch/plot.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_prints_the_paths(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", RECORDS)
    result = run_cli(f"run.dir={tmp_path}", "smoothing=0.5")
    assert result.returncode == 0, result.stderr
    names = ("loss", "lr", "throughput")
    assert result.stdout.split() == [
        str(tmp_path / "plots" / f"{n}.png") for n in names
    ]
    # Hydra writes no outputs/ or log files.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "plots"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("no run dir given", "config key 'run.dir': is required"),
        ("missing run dir", "does not exist"),
        ("bad line", "metrics.jsonl:2: not a JSON record"),
    ],
)
def test_cli_errors_exit_2(tmp_path, case, message):
    write_lines(tmp_path / "metrics.jsonl", [train(1, 1.0), "{oops", train(2, 1.0)])
    args = {
        "no run dir given": [],
        "missing run dir": [f"run.dir={tmp_path / 'missing'}"],
        "bad line": [f"run.dir={tmp_path}"],
    }[case]
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr
