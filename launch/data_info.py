"""Describe tokenized datasets and the blend a training run would draw from them.

Usage:
    python launch/data_info.py data.prefixes=[demo_out/data/sample] tokenizer=demo_out/tokenizer
    python launch/data_info.py data.prefixes=[data/ja_cc,data/ja_wiki,data/en] data.weights=[0.6,0.1,0.3] \
        seq_len=4096 train_tokens=1e12
    python launch/data_info.py data.prefixes=[data/ja_wiki] data.valid_fraction=0.01 samples=0

Prints documents and tokens per prefix (and per split), each prefix's share of the blend, the epochs
over each prefix that ``train_tokens`` training tokens need, and the first samples of the blend,
decoded with ``tokenizer`` when given. All options: conf/data_info.yaml.
"""

import hydra
from omegaconf import DictConfig

from tanuki.cli import user_errors
from tanuki.config import from_dict
from tanuki.data.config import DataInfoConfig
from tanuki.data.info import data_report, format_data_report


@hydra.main(config_path="../conf", config_name="data_info", version_base=None)
@user_errors(FileNotFoundError)
def main(dcfg: DictConfig) -> None:
    cfg = from_dict(DataInfoConfig, dcfg)
    print(format_data_report(data_report(cfg)))


if __name__ == "__main__":
    main()
