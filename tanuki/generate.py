"""Text generation with a KV cache: greedy decoding and temperature / nucleus (top-p) sampling.

Small on purpose: enough to look at a trained model (``launch/chat.py``, the demo) and to check that
an exported model decodes the same tokens in transformers. Serving belongs to vLLM, which loads the
exported Hugging Face directory.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from tanuki.model import Transformer


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next token ids ``(B,)`` from last-position logits ``(B, V)``.

    ``temperature == 0`` is greedy (argmax). Otherwise logits are divided by the temperature and, with
    ``top_p < 1``, restricted to the smallest set of tokens whose probability mass reaches ``top_p``
    (Holtzman et al. 2019); the most likely token is always kept.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # mass *before* each token: a token is kept while the mass before it is below top_p
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: Sequence[int] | torch.Tensor,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: Optional[int | Sequence[int]] = None,
    vocab_limit: Optional[int] = None,
    seed: Optional[int] = None,
    on_token: Optional[Callable[[int], None]] = None,
) -> list[int]:
    """Continue one prompt (a list of token ids) and return the new token ids.

    Decoding stops after ``max_new_tokens`` or at an id in ``eos_token_id`` (which is included in the
    result). ``vocab_limit`` keeps the padded embedding rows beyond the tokenizer's vocabulary from
    being chosen. ``on_token`` is called with every new id as soon as it is chosen (for streaming).
    """
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompt, dtype=torch.long, device=device).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("generate: the prompt is empty")
    if ids.shape[1] + max_new_tokens > model.cfg.max_seq_len:
        max_new_tokens = max(0, model.cfg.max_seq_len - ids.shape[1])
    stop = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)

    was_training = model.training
    model.eval()
    cache = model.new_cache()
    out: list[int] = []
    try:
        logits = model(ids, cache=cache)[:, -1]
        for _ in range(max_new_tokens):
            if vocab_limit is not None:
                logits = logits[:, :vocab_limit]
            nxt = sample_next(logits, temperature=temperature, top_p=top_p, generator=gen)
            token = int(nxt.item())
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token in stop:
                break
            logits = model(nxt.view(1, 1), cache=cache)[:, -1]
    finally:
        model.train(was_training)
    return out
