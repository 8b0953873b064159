"""Draw a run's training curves as PNG files from its metrics.jsonl (no W&B account needed).

Usage:
    python launch/plot.py run.dir=runs/pretrain-20250101-120000
    python launch/plot.py run.dir=runs/slurm-1234 smoothing=0.9
    python launch/plot.py run.dir=runs/slurm-1234 out=/tmp/plots

Writes loss.png (train and validation loss against the step, tokens on the top axis), lr.png and
throughput.png (tokens/s and MFU) into <run dir>/plots (or ``out``) and prints their paths. A resumed
run's repeated steps and a killed run's partial last line are handled (see tanuki/plot.py). All
options: conf/plot.yaml.
"""

import hydra
from omegaconf import DictConfig

from tanuki.cli import user_errors
from tanuki.config import from_dict
from tanuki.plot import MetricsError, PlotConfig, plot_run


@hydra.main(config_path="../conf", config_name="plot", version_base=None)
@user_errors(FileNotFoundError, MetricsError)
def main(dcfg: DictConfig) -> None:
    cfg = from_dict(PlotConfig, dcfg)
    for path in plot_run(cfg.run.dir, cfg.out, smoothing=cfg.smoothing):
        print(path)


if __name__ == "__main__":
    main()
