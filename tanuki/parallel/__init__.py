"""Tensor and sequence parallelism (Megatron-style) combined with DeepSpeed ZeRO."""
