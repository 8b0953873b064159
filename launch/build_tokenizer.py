"""Train a SentencePiece Unigram tokenizer (byte fallback) and write it as a Hugging Face tokenizer.

Usage:
    python launch/build_tokenizer.py input=tanuki/sample_data/corpus.jsonl output=demo_out/tokenizer vocab_size=4000
    python launch/build_tokenizer.py input='data/*.jsonl.zst' output=tok/ja-en-32k vocab_size=32000 normalization=nfkc
    python launch/build_tokenizer.py input=[ja.txt,en.txt] txt_mode=paragraph output=tok/small vocab_size=8000
    python launch/build_tokenizer.py input='raw/**/*.jsonl.gz' output=tok/65k vocab_size=65000 \
        sample_sentences=5000000 'special_tokens.user_defined=[<|user|>,<|assistant|>]'

Writes tokenizer.model (SentencePiece), tokenizer.json, tokenizer_config.json (with the Japanese
Alpaca chat template), special_tokens_map.json and report.json into `output`, then prints a summary
(compression per language, byte fallback, vocabulary, time and memory). All options:
conf/build_tokenizer.yaml.
"""

import hydra
from omegaconf import DictConfig

from tanuki.cli import user_errors
from tanuki.config import from_dict
from tanuki.textio import CorpusError
from tanuki.tokenizer import BuildTokenizerConfig, TokenizerBuildError, build_tokenizer
from tanuki.tokenizer.config import check_required


@hydra.main(config_path="../conf", config_name="build_tokenizer", version_base=None)
@user_errors(CorpusError, TokenizerBuildError)
def main(dcfg: DictConfig) -> None:
    check_required(dcfg, ("input", "output", "vocab_size"))
    build_tokenizer(from_dict(BuildTokenizerConfig, dcfg))


if __name__ == "__main__":
    main()
