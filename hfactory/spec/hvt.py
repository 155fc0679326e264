"""HVT components: 1-D max pooling of the flattened token sequence and a learned 1-D position
embedding per pooled length (params + plan arithmetic; no torch).

Source: Pan et al., "Scalable Vision Transformers with Hierarchical Pooling" (HVT, ICCV 2021,
arXiv 2103.10619); reference code MonashAI/HVT ``models.py`` @ f32cc1c: in every block ``i`` with
``i % pool_block_width == 0`` (block 0 included), after the block's MLP, the ``(B, N, C)`` tokens
are max-pooled along N (``nn.MaxPool1d(kernel_size=3, stride=2)``, no padding) and a new learned
position embedding ``(1, N', C)`` is added. HVT has no class token and pools the tokens by their
mean for the head.

How a spec expresses "pool after block i's MLP": the pooling is the next stage's downsampler
(``max_pool_1d``) followed by that stage's ``pos_embed: learned_1d``; so HVT with pooling width
``w`` is a stage of 1 block (block 0, before its pooling), then stages of ``w`` blocks (the blocks
up to and including the next pooling one), then the rest (``hfactory/presets/hvt_*.yaml``). The
arithmetic is identical: the pooled output of block ``i`` is the input of block ``i + 1``.

Token layout (the contract in :mod:`hfactory.layers.layout`): pooling the flattened grid leaves
no 2-D structure (196 -> 97 tokens), so ``max_pool_1d`` produces the ``seq`` layout
``(B, N, C)``; the plan records a seq stage's grid as ``(N, 1)`` and refuses grid-only components
(conv downsamplers, conv/pooling mixers, window attention, 2-D position embeddings) after it.
Modules in :mod:`hfactory.layers.hvt`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from .. import registry
from .base import PlanError
from .components import DownsampleParams, PosEmbedParams, StageContext

__all__ = ["MaxPool1dParams", "LearnedPosEmbed1dParams", "pooled_length"]


def pooled_length(n: int, kernel_size: int, stride: int, padding: int) -> int:
    """Output length of ``nn.MaxPool1d(kernel_size, stride, padding)`` on ``n`` tokens
    (``floor((n + 2p - k) / s) + 1``, HVT's ``seq_len`` formula for p = 0); 0 if ``n + 2p < k``."""
    return (n + 2 * padding - kernel_size) // stride + 1 if n + 2 * padding >= kernel_size else 0


class MaxPool1dParams(DownsampleParams):
    """HVT's token pooling (arXiv 2103.10619; MonashAI/HVT ``Block.downsample``): max over windows
    of ``kernel_size`` consecutive tokens of the flattened (row-major) sequence, per channel:
    ``(B, H, W, C)`` or ``(B, N, C)`` -> ``(B, N', C)`` with
    ``N' = floor((N + 2 * padding - kernel_size) / stride) + 1`` (196 -> 97 -> 48 -> 23 -> 11 for
    kernel 3, stride 2). The width does not change. Produces the ``seq`` layout.

    Raises (plan): :class:`PlanError` when the stage's embedding differs from the previous width,
    or when the sequence is too short for one window.
    """

    kind: Literal["max_pool_1d"] = "max_pool_1d"
    kernel_size: int = Field(3, ge=1)
    stride: int = Field(2, ge=1, description="HVT hard-codes 2 (its config's pool_stride is ignored)")
    padding: int = Field(0, ge=0)
    accepts: ClassVar[frozenset] = frozenset({"grid", "seq"})
    produces: ClassVar[str] = "seq"

    def out_grid(self, in_grid, loc):
        n = in_grid[0] * in_grid[1]
        if 2 * self.padding > self.kernel_size:
            raise PlanError(f"{loc}.padding", f"padding {self.padding} is more than half the kernel "
                            f"{self.kernel_size}; use at most {self.kernel_size // 2}")
        out = pooled_length(n, self.kernel_size, self.stride, self.padding)
        if out < 1:
            raise PlanError(f"{loc}.kernel_size", f"kernel_size {self.kernel_size} is longer than the {n} tokens "
                            "it pools; use a smaller kernel, fewer pooling stages or a larger img_size")
        return (out, 1)

    def resolve(self, in_chs, out_chs, in_grid, loc):
        if in_chs != out_chs:
            raise PlanError(loc, f"max_pool_1d keeps the width {in_chs}, but the stage's embedding is {out_chs}; "
                            f"set embedding: {in_chs}")
        return {"kind": self.kind, "kernel_size": self.kernel_size, "stride": self.stride,
                "padding": self.padding}


class LearnedPosEmbed1dParams(PosEmbedParams):
    """Learned position embedding ``(1, N, C)`` over a token sequence (HVT's per-pooling
    ``pos_embed``, trunc-normal std 0.02; arXiv 2103.10619). On the ``grid`` layout it indexes the
    row-major flattened grid (HVT's stage-0 embedding). At another input size the embedding is
    linearly interpolated along N."""

    kind: Literal["learned_1d"] = "learned_1d"
    init_std: float = Field(0.02, gt=0)
    accepts: ClassVar[frozenset] = frozenset({"grid", "seq"})

    def resolve(self, ctx: StageContext) -> dict:
        return {"kind": self.kind, "dim": ctx.dim, "length": ctx.grid[0] * ctx.grid[1], "init_std": self.init_std}


registry.register("downsample", "max_pool_1d", MaxPool1dParams, "hfactory.layers.hvt:MaxPool1d", overwrite=True)
registry.register("pos_embed", "learned_1d", LearnedPosEmbed1dParams, "hfactory.layers.hvt:LearnedPosEmbed1d",
                  overwrite=True)
