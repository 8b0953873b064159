"""tanuki: a Japanese-first LLM training stack.

Raw text -> tokenizer -> Megatron-format dataset -> pretraining (tensor parallel + DeepSpeed ZeRO)
-> SFT -> DPO, with Hugging Face checkpoints at every stage. See README.md for the commands.
"""

__version__ = "0.1.0"
