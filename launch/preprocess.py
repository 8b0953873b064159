"""Tokenize raw text (JSONL / txt, optionally .gz / .zst) into a Megatron indexed dataset.

Usage:
    python launch/preprocess.py input=corpus.jsonl tokenizer=demo_out/tokenizer output_prefix=data/corpus
    python launch/preprocess.py input='raw/**/*.jsonl.zst' tokenizer=tok output_prefix=data/cc workers=16
    python launch/preprocess.py input=[a.jsonl,b.txt] tokenizer=tok output_prefix=data/ab on_error=skip min_chars=20
    python launch/preprocess.py input=big.jsonl tokenizer=tok output_prefix=data/big shard_size=10000000000

Writes ``<output_prefix>.bin`` + ``<output_prefix>.idx`` (with ``shard_size``: ``<output_prefix>_00000.*``,
...), one document per record with the end-of-document token appended (``append_eos=false`` to turn it
off), then prints a summary with skipped documents by reason. All options: conf/preprocess.yaml.
"""

import hydra
from omegaconf import DictConfig

from tanuki.cli import user_errors
from tanuki.config import from_dict
from tanuki.data.config import PreprocessConfig
from tanuki.data.preprocess import PreprocessError, preprocess
from tanuki.textio import CorpusError


@hydra.main(config_path="../conf", config_name="preprocess", version_base=None)
@user_errors(CorpusError, PreprocessError, FileNotFoundError)
def main(dcfg: DictConfig) -> None:
    cfg = from_dict(PreprocessConfig, dcfg)
    summary = preprocess(cfg)
    print(summary.format())


if __name__ == "__main__":
    main()
