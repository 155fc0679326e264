"""Token sizes: how many input tokens each token stands for, after merging downsamplers.

The thesis repo's merging downsamplers (``geme``, and ``att0`` with a soft or hard last
assignment; leognk/HierarchicalTransformers ``models/encoders/metaformer.py``) return, with
their tokens, a size per token. Later attention layers add ``log(size)`` of each key to the
attention scores (proportional attention, as in ToMe, arXiv 2210.09461: a token that stands for
``s`` tokens gets the weight of ``s`` copies), and the final average pool weights each token by
its size.

How the sizes travel: the token tensor stays one tensor (the blocks, norms and MLPs never see
sizes), and the sizes go beside it in a context variable, like the attention-backend override.
The plan decides who uses them: it marks every attention layer after a size-producing
downsampler (``token_sizes: true`` in its resolved entry) and the head (``token_sizes: true`` in
``plan.head``); the producer sets them during the same forward, before any of those run. A
consumer that finds none, or sizes of another shape, raises instead of guessing.

Limits of this design: two forwards of size-producing models interleaved in one thread (not
sequential) would see each other's sizes; activation checkpointing recomputes in the backward
pass and reads the sizes of the latest forward (correct for forward-then-backward; where the
backward runs in another thread, as autograd's device threads may, the context is not there and
consumers raise instead of guessing).
"""

from __future__ import annotations

import contextvars
from typing import Optional

import torch

__all__ = ["set_token_sizes", "get_token_sizes", "key_size_bias", "size_weighted_mean"]

_SIZES: contextvars.ContextVar[Optional[torch.Tensor]] = contextvars.ContextVar("hfactory_token_sizes",
                                                                                 default=None)


def set_token_sizes(sizes: Optional[torch.Tensor]) -> None:
    """Record the sizes ``(B, N)`` of the tokens a downsampler just produced (None: no sizes)."""
    _SIZES.set(sizes)


def get_token_sizes(batch: int, tokens: int, who: str) -> torch.Tensor:
    """The current sizes ``(B, N)``; ``who`` names the consumer in the error.

    Raises:
        RuntimeError: no sizes were recorded in this context, or they do not fit ``(batch, tokens)``.
    """
    sizes = _SIZES.get()
    if sizes is None:
        raise RuntimeError(f"{who} needs the token sizes of an earlier merging downsampler (geme/att0), but none "
                           "were recorded in this context; run the whole encoder forward in this thread (with "
                           "activation checkpointing on CUDA the backward thread cannot see them)")
    if tuple(sizes.shape) != (batch, tokens):
        raise RuntimeError(f"{who} got token sizes of shape {tuple(sizes.shape)} for {batch} x {tokens} tokens; "
                           "they belong to another forward (call forward_head right after forward_features)")
    return sizes


def key_size_bias(batch: int, tokens: int, who: str, dtype: torch.dtype) -> torch.Tensor:
    """``log(size)`` of each key as an additive attention bias ``(B, 1, 1, N)``."""
    sizes = get_token_sizes(batch, tokens, who)
    return torch.log(sizes.clamp_min(1e-10)).to(dtype)[:, None, None, :]


def size_weighted_mean(x: torch.Tensor, who: str) -> torch.Tensor:
    """Mean of an NCHW map ``(B, C, H, W)`` over H and W with each token weighted by its size
    (tokens flattened row-major, as the ``(B, C, N, 1)`` map of a seq stage): ``(B, C)``."""
    b, c = x.shape[:2]
    flat = x.flatten(2)
    sizes = get_token_sizes(b, flat.shape[-1], who).to(flat.dtype)
    weights = sizes / sizes.sum(dim=1, keepdim=True)
    return (flat * weights[:, None, :]).sum(-1)
