"""Token sizes: how many input tokens each token stands for, after merging downsamplers.

The thesis repo's merging downsamplers (``geme``, and ``att0`` with a soft or hard last
assignment; leognk/HierarchicalTransformers ``models/encoders/metaformer.py``) return, with
their tokens, a size per token. Later attention layers add ``log(size)`` of each key to the
attention scores (proportional attention, as in ToMe, arXiv 2210.09461: a token that stands for
``s`` tokens gets the weight of ``s`` copies), and the final average pool weights each token by
its size.

How the sizes travel: as data, beside the tokens, through the forward's arguments and return
values. Sizes are a float tensor ``(B, N)``, one per token of a ``(B, N, C)`` sequence (an att0
stage's ``K`` clusters, carried after the ``N`` tokens, have none); ``None`` means "the tokens
carry no sizes" (every stage before the first merge, and every model without one).

- Producers: a downsampler whose module has ``emits_token_sizes = True``
  (:class:`~hfactory.layers.thesis.GeMePool`; :class:`~hfactory.layers.thesis.Att0Pool` with an
  assignment) returns ``(tokens, sizes)`` instead of ``tokens``.
- Consumers: a module with ``takes_token_sizes = True`` is called with the sizes of its input
  tokens as a second argument, ``module(x, sizes)``: a token mixer (``Attention`` /
  ``ClusterAttention`` built with ``token_sizes=True``: the log-size key bias), a merging
  downsampler built with ``token_sizes_in=True`` (an earlier merge: sizes weight the means and
  add up) and the classifier head (``ClassifierHead.pool``: size-weighted average).
- Carriers: :class:`hfactory.builder.Stage` takes and returns ``(tokens, sizes)``: it passes
  incoming sizes to a consuming downsampler, takes new sizes from an emitting one, keeps them
  through a downsampler whose params model is ``identity`` (``none``: the tokens stay as they
  were) and drops them (``None``) after any other downsampler (new tokens). A ``Block`` forwards
  them to its mixer; blocks never change sizes. The encoder threads them from stage to stage and
  hands the last stage's to the head (``forward``), and records them on the module for a separate
  ``forward_head(forward_features(x))`` call (``HierarchicalEncoder.last_token_sizes``).

The protocol is two module attributes (instance or class level; a module without them neither
reads nor makes sizes) because a forward's signature is a property of the module, and the
builder and blocks then need no knowledge of component kinds. The plan decides where they are
true: it marks every attention layer after a size-producing downsampler (``token_sizes: true``
in its resolved entry), a merging downsampler after another (``token_sizes_in``) and the head
(``token_sizes: true`` in ``plan.head``).

Why arguments and not a global or a context variable: activation checkpointing recomputes a
block in the backward pass (possibly on autograd's device thread), and ``torch.compile`` /
``torch.export`` replay forwards; each of them sees exactly the sizes its call was given. A
consumer that gets no sizes, or sizes of another shape, raises instead of guessing.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import UsageError

__all__ = ["check_token_sizes", "key_size_bias", "size_weighted_mean"]


def check_token_sizes(sizes: Optional[torch.Tensor], batch: int, tokens: int, who: str) -> torch.Tensor:
    """``sizes`` if it is a ``(batch, tokens)`` tensor; ``who`` names the consumer in the error.

    Raises:
        UsageError (a ValueError): ``sizes`` is None or does not fit ``(batch, tokens)``.
    """
    if sizes is None:
        raise UsageError(f"{who} needs the token sizes (B, N) = ({batch}, {tokens}) of an earlier merging "
                         "downsampler, but got none; pass the sizes the downsampler returned (the encoder's "
                         "forward does; after a separate forward_features call use forward_head(x, "
                         "token_sizes=...) or the model's last_token_sizes)")
    if not isinstance(sizes, torch.Tensor) or tuple(sizes.shape) != (batch, tokens):
        shape = tuple(sizes.shape) if isinstance(sizes, torch.Tensor) else type(sizes).__name__
        raise UsageError(f"{who} got token sizes of shape {shape} for {batch} x {tokens} tokens; they must be "
                         f"({batch}, {tokens}), the sizes of these tokens (from the same forward)")
    return sizes


def key_size_bias(sizes: Optional[torch.Tensor], batch: int, tokens: int, who: str,
                  dtype: torch.dtype) -> torch.Tensor:
    """``log(size)`` of each key as an additive attention bias ``(B, 1, 1, N)`` from sizes ``(B, N)``."""
    sizes = check_token_sizes(sizes, batch, tokens, who)
    return torch.log(sizes.clamp_min(1e-10)).to(dtype)[:, None, None, :]


def size_weighted_mean(x: torch.Tensor, sizes: Optional[torch.Tensor], who: str) -> torch.Tensor:
    """Mean of an NCHW map ``(B, C, H, W)`` over H and W with each token weighted by its size
    (``sizes`` ``(B, H*W)``, tokens flattened row-major, as the ``(B, C, N, 1)`` map of a seq
    stage): ``(B, C)``."""
    b, c = x.shape[:2]
    flat = x.flatten(2)
    sizes = check_token_sizes(sizes, b, flat.shape[-1], who).to(flat.dtype)
    weights = sizes / sizes.sum(dim=1, keepdim=True)
    return (flat * weights[:, None, :]).sum(-1)
