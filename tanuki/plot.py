"""Training curves as PNG files, drawn from a run's ``metrics.jsonl`` (no W&B account needed).

:func:`tanuki.metrics.read_metrics` turns the file :class:`tanuki.metrics.MetricsLogger` writes into one
clean history:

- A resumed run appends to the same file and recomputes the steps after its checkpoint, so a training
  record whose step is not after the previous training record's starts a new segment: every earlier
  record (training or validation) at or after that step is dropped. For a step logged twice this is
  "the later record wins"; steps the killed segment logged past the checkpoint but the resumed one has
  not reached yet are dropped too, so no curve splices two trajectories.
- A run killed while writing leaves a partial last line: it is ignored. If the run was resumed, the
  next record was appended to that partial line; the record is kept and the fragment dropped.
- Non-finite numbers are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``: they are read
  back as floats.

:func:`build_figures` draws ``loss`` (train and validation loss against the step, consumed tokens on
a second x-axis), ``lr`` and ``throughput`` (tokens/s and MFU); :func:`plot_run` writes them as
``loss.png``, ``lr.png`` and ``throughput.png``. The figures are drawn on matplotlib's Agg canvas
without pyplot, so no display and no global backend state are involved.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FormatStrFormatter

from tanuki.config import ConfigError
from tanuki.metrics import MetricsError, is_train, read_metrics

__all__ = ["MetricsError", "PlotConfig", "build_figures", "plot_run", "read_metrics"]

#: pixel size of every PNG (FIGSIZE inches at DPI)
FIGSIZE = (10.0, 5.0)
DPI = 100


@dataclass(frozen=True)
class PlotRunConfig:
    """``run``: the run to plot."""

    #: the run directory (the one holding metrics.jsonl)
    dir: str

    def __post_init__(self) -> None:
        if not self.dir.strip():
            raise ConfigError("run.dir", "must not be empty")


@dataclass(frozen=True)
class PlotConfig:
    """``python launch/plot.py run.dir=<run dir>``: see conf/plot.yaml."""

    run: PlotRunConfig
    #: directory for the PNGs; null = <run dir>/plots
    out: str | None = None
    #: EMA factor of the smoothed train-loss curve, in [0, 1): 0 = no smoothing, 0.9 = heavy
    smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.smoothing < 1.0):
            raise ConfigError("smoothing", f"must be in [0, 1), got {self.smoothing}")


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``key`` over the records that have it; non-finite values become NaN (a
    gap in the line)."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            steps.append(r["step"])
            values.append(float(v) if math.isfinite(v) else math.nan)
    return steps, values


def ema(values: list[float], smoothing: float) -> list[float]:
    """Exponential moving average ``m_t = smoothing * m_{t-1} + (1 - smoothing) * x_t``, started at
    the first finite value; NaN values stay NaN and leave the average unchanged."""
    out, m = [], None
    for x in values:
        if math.isnan(x):
            out.append(math.nan)
            continue
        m = x if m is None else smoothing * m + (1.0 - smoothing) * x
        out.append(m)
    return out


def _linear(x, xp: list[float], fp: list[float]):
    """Piecewise-linear map through (xp, fp), continued linearly beyond the ends (axis margins)."""
    x = np.asarray(x, dtype=float)
    y = np.interp(x, xp, fp)
    lo = (fp[1] - fp[0]) / (xp[1] - xp[0])
    hi = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    y = np.where(x < xp[0], fp[0] + (x - xp[0]) * lo, y)
    return np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * hi, y)


def step_tokens_maps(records: list[dict]) -> tuple[Callable, Callable] | None:
    """Maps from step to consumed tokens and back, through the training records' ``tokens``.

    Piecewise linear between logged steps and continued linearly beyond them; None unless at least
    two steps are logged with tokens growing with the step.
    """
    points = sorted(
        {
            r["step"]: r["tokens"] for r in records if is_train(r) and "tokens" in r
        }.items()
    )
    steps = [float(s) for s, _ in points]
    tokens = [float(t) for _, t in points]
    if len(points) < 2 or any(b <= a for a, b in itertools.pairwise(tokens)):
        return None
    return (lambda s: _linear(s, steps, tokens)), (lambda t: _linear(t, tokens, steps))


def add_tokens_axis(ax: Axes, records: list[dict]) -> Axes | None:
    """A top x-axis reading the step axis in consumed tokens (see :func:`step_tokens_maps`)."""
    maps = step_tokens_maps(records)
    if maps is None:
        return None
    top = ax.secondary_xaxis("top", functions=maps)
    top.set_xlabel("tokens")
    top.xaxis.set_major_formatter(EngFormatter())
    return top


def _new_figure(rows: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    return fig, list(axes)


def _loss_figure(records: list[dict], smoothing: float, title: str) -> Figure:
    fig, (ax,) = _new_figure()
    steps, loss = series(records, "loss")
    if smoothing > 0:
        ax.plot(steps, loss, color="C0", alpha=0.3, linewidth=1, label="train")
        ax.plot(
            steps, ema(loss, smoothing), color="C0", label=f"train (EMA {smoothing:g})"
        )
    else:
        ax.plot(steps, loss, color="C0", label="train")
    val_steps, val_loss = series(records, "val_loss")
    if val_steps:
        ax.plot(
            val_steps,
            val_loss,
            color="C1",
            marker="o",
            markersize=4,
            label="validation",
        )
    ax.set_ylabel("loss")
    ax.legend()
    add_tokens_axis(ax, records)
    fig.suptitle(f"{title}: loss")
    return fig


def _lr_figure(records: list[dict], title: str) -> Figure:
    fig, (ax,) = _new_figure()
    ax.plot(*series(records, "lr"), color="C2", label="lr")
    ax.set_ylabel("learning rate")
    # Plain 3.0e-04 labels: an offset text ("1e-4") would collide with the tokens axis.
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.1e"))
    add_tokens_axis(ax, records)
    fig.suptitle(f"{title}: learning rate")
    return fig


def _throughput_figure(records: list[dict], title: str) -> Figure:
    fig, (top, bottom) = _new_figure(rows=2)
    top.plot(*series(records, "tokens_per_s"), color="C3", label="tokens/s")
    top.set_ylabel("tokens/s")
    steps, mfu = series(records, "mfu")
    bottom.plot(steps, [100.0 * m for m in mfu], color="C4", label="MFU")
    bottom.set_ylabel("MFU (%)")
    add_tokens_axis(top, records)
    fig.suptitle(f"{title}: throughput")
    return fig


def build_figures(
    records: list[dict], smoothing: float = 0.0, title: str = "run"
) -> dict[str, Figure]:
    """The figures ``loss``, ``lr`` and ``throughput`` of :func:`read_metrics`'s records.

    Every line holds exactly the logged values (x = step); only the EMA line of the loss is derived.
    """
    if not any(is_train(r) for r in records):
        raise MetricsError("no training records (records with 'loss')")
    return {
        "loss": _loss_figure(records, smoothing, title),
        "lr": _lr_figure(records, title),
        "throughput": _throughput_figure(records, title),
    }


def plot_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    smoothing: float = 0.0,
) -> list[Path]:
    """Write ``loss.png``, ``lr.png`` and ``throughput.png`` for a run; return their paths.

    ``out_dir`` defaults to ``<run_dir>/plots``. Raises FileNotFoundError for a missing run directory
    or metrics.jsonl and :class:`MetricsError` for unreadable or training-free metrics.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    metrics = run_dir / "metrics.jsonl"
    records = read_metrics(metrics)
    if not any(is_train(r) for r in records):
        raise MetricsError(f"{metrics}: no training records (records with 'loss')")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = build_figures(records, smoothing, title=run_dir.resolve().name)
    paths = []
    for name, fig in figures.items():
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=DPI)
        paths.append(path)
    return paths
