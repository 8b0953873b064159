"""Measure any Hugging Face tokenizer on your own text: the report of launch/build_tokenizer.py.

Usage:
    python launch/tokenizer_report.py tokenizer=demo_out/tokenizer input=tanuki/sample_data/corpus.jsonl
    python launch/tokenizer_report.py tokenizer=path/to/llm-jp-tokenizer input='heldout/*.jsonl' output=llmjp.json
    python launch/tokenizer_report.py tokenizer=tok/65k input=heldout.txt txt_mode=paragraph max_documents=20000

Prints characters and bytes per token per language (ja, en, code: from the JSONL `lang` field or
detected), the share of byte-fallback tokens, unknown tokens and vocabulary statistics; with
`output=...` also writes them as JSON. All options: conf/tokenizer_report.yaml.
"""

import itertools
import json

import hydra
from omegaconf import DictConfig
from tqdm import tqdm

from tanuki.cli import user_errors
from tanuki.config import from_dict
from tanuki.textio import CorpusError, iter_documents
from tanuki.tokenizer import TokenizerReportConfig, format_summary, report_for_directory
from tanuki.tokenizer.config import check_required


@hydra.main(config_path="../conf", config_name="tokenizer_report", version_base=None)
@user_errors(CorpusError, FileNotFoundError, ValueError)
def main(dcfg: DictConfig) -> None:
    check_required(dcfg, ("tokenizer", "input"))
    cfg = from_dict(TokenizerReportConfig, dcfg)
    docs = iter_documents(cfg.inputs, text_key=cfg.text_key, txt_mode=cfg.txt_mode, on_error=cfg.on_error,
                          lang_key=cfg.lang_key or None)
    if cfg.max_documents:
        docs = itertools.islice(docs, cfg.max_documents)
    with tqdm(desc="encoding", unit="B", unit_scale=True, disable=not cfg.progress) as bar:
        report = report_for_directory(cfg.tokenizer, docs, cfg.pad_to_multiple_of, on_batch=bar.update)
    print(format_summary(report))
    if cfg.output:
        with open(cfg.output, "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=2)
            f.write("\n")
        print(f"report written to {cfg.output}")


if __name__ == "__main__":
    main()
