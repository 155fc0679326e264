"""MViTv2 components: pooling attention with decomposed relative positions and the residual
pooling connection, and the stage transition fused into a stage's first block (params + plan
arithmetic; no torch).

- ``token_mixer: mvit_attention``: MViTv2's pooling attention (timm ``mvitv2.MultiScaleAttention``).
  ``qkv`` projects to the stage's width; q, k and v are each pooled per head by a depth-wise conv
  (its own LayerNorm after it), q by the stage's ``q_stride`` in the first block and k/v by the
  stage's ``kv_stride`` in every block; attention adds the decomposed relative-position bias
  (``rel_pos_h``/``rel_pos_w``) and the pooled q back to its output (residual pooling).
- ``downsample: mvit_q_pool``: the stage transition, fused into the stage's first block (the
  protocol's ``fused`` downsampler, as Hiera's ``q_pool``, without the mixer lag): the block's
  attention maps the previous width to the new one and pools its queries; the residual is the
  normed input projected to the new width (a Linear, only when the width changes; else the raw
  input) and max-pooled with an overlapping ``(s+1) x (s+1)`` kernel, stride ``s``, padding
  ``(s+1) // 2`` (``first_block_expand() == "proj_overlap"``, timm's ``shortcut_pool_attn``).

Everything else of MViTv2 is generic: the 7x7/s4/p3 conv patch embedding without norm, the MLP,
pre-norm blocks, and the final LayerNorm applied to every token before the average pool
(``head_norm_first: true``).

Sources: Li et al., "MViTv2: Improved Multiscale Vision Transformers for Classification and
Detection", arXiv 2112.01526; timm ``models/mvitv2.py`` (``MultiScaleAttention``,
``MultiScaleBlock``, ``cal_rel_pos_type``). Modules in :mod:`hfactory.layers.mvit`. Importing
this module registers the components (``hfactory.spec`` does so).
"""

from __future__ import annotations

from typing import ClassVar, Literal, Union

from pydantic import Field, PositiveInt

from .. import registry
from .base import PlanError
from .protocol import DownsampleParams, StageContext, TokenMixerParams

__all__ = ["MViTAttentionParams", "MViTQPoolParams", "pooled_size", "rel_pos_length"]

Size = Union[PositiveInt, tuple[PositiveInt, PositiveInt]]


def _hw(v: Size) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def pooled_size(n: int, kernel: int, stride: int) -> int:
    """Tokens left on one axis of ``n`` by a pooling of ``kernel``, ``stride`` and padding
    ``kernel // 2`` (MViTv2's q/k/v pooling): ``(n + 2 * (kernel // 2) - kernel) // stride + 1``."""
    return (n + 2 * (kernel // 2) - kernel) // stride + 1


def rel_pos_length(q: int, k: int) -> int:
    """Rows of one axis' relative-position table for ``q`` query and ``k`` key positions on that
    axis: ``2 * max(q, k) - 1`` (timm ``MultiScaleAttention``'s ``rel_sp_dim`` for square grids)."""
    return 2 * max(q, k) - 1


class MViTAttentionParams(TokenMixerParams):
    """MViTv2 pooling attention (arXiv 2112.01526; timm ``mvitv2.MultiScaleAttention`` with
    ``mode='conv'``/``'max'``/``'avg'``, parameter names ``qkv``, ``proj``, ``pool_{q,k,v}``,
    ``norm_{q,k,v}``, ``rel_pos_h``, ``rel_pos_w``) on the grid ``(B, H, W, C_in) -> (B, H', W', C)``.

    ``qkv`` maps ``C_in`` (the previous width in a stage's first block, else the stage's) to three
    ``heads x dim_head`` tensors; each of q, k, v is pooled per head on the grid: ``pool: conv`` a
    depth-wise ``kernel`` conv shared by the heads (no bias) then its LayerNorm over ``dim_head``
    (``norm_eps``), ``max``/``avg`` a pooling without norm; padding ``kernel // 2``. q is pooled by
    the block's ``q_stride`` (the stage's first block, from ``mvit_q_pool``; else 1), k and v by
    ``kv_stride``; a pooling with kernel 1 and stride 1 is skipped. With ``rel_pos`` the scores
    get the decomposed relative-position bias ``q . rel_pos_h[dh] + q . rel_pos_w[dw]`` (timm
    ``cal_rel_pos_type``, offsets stretched when q and k grids differ); with
    ``residual_pooling`` the pooled q is added to the attention output before ``proj``.

    The plan entry carries the block's input ``grid``, the pooled ``q_grid`` and ``kv_grid`` and
    ``rel_pos_size`` ``[Lh, Lw]`` (table rows, ``2 * max(q, kv) - 1`` per axis, sized for the
    spec's ``img_size``; the module resizes them linearly for another input grid, as timm's
    ``checkpoint_filter_fn`` does on load).

    Raises (plan): ``PlanError`` at ``token_mixer.kernel_q`` when the query pooling would not
    leave the ``grid / q_stride`` tokens the block's residual has (an even kernel), and at
    ``token_mixer.kv_stride`` when it is larger than the grid.
    """

    kind: Literal["mvit_attention"] = "mvit_attention"
    pool: Literal["conv", "max", "avg"] = Field("conv", description="how q, k and v are pooled: conv = "
                                                 "depth-wise conv + LayerNorm (MViTv2), max / avg = pooling")
    kernel_q: Size = Field(3, description="kernel of the query pooling (padding kernel // 2)")
    kernel_kv: Size = Field(3, description="kernel of the key/value pooling (padding kernel // 2)")
    kv_stride: Size = Field(1, description="stride of the key/value pooling; mvitv2_tiny: 4, 2, 1, 1 "
                            "(timm's adaptive stride_kv)")
    rel_pos: bool = Field(True, description="decomposed relative-position bias (timm rel_pos_type='spatial')")
    residual_pooling: bool = Field(True, description="add the pooled queries to the attention output")
    qkv_bias: bool = True
    norm_eps: float = Field(1e-6, gt=0, description="eps of the LayerNorms after the conv poolings")
    attn_drop: float = Field(0.0, ge=0, lt=1)
    uses_heads: ClassVar[bool] = True
    supports_q_stride: ClassVar[bool] = True
    accepts: ClassVar[frozenset] = frozenset({"grid"})

    def resolve(self, ctx: StageContext) -> dict:
        grid = tuple(ctx.grid)
        q_stride = tuple(ctx.q_stride) if ctx.q_stride else (1, 1)
        kq, kkv, skv = _hw(self.kernel_q), _hw(self.kernel_kv), _hw(self.kv_stride)
        q_grid = tuple(pooled_size(n, k, s) for n, k, s in zip(grid, kq, q_stride))
        want = tuple(n // s for n, s in zip(grid, q_stride))
        if q_grid != want:
            raise PlanError(f"{ctx.loc}.kernel_q", f"pooling the {grid[0]}x{grid[1]} queries with kernel "
                            f"{kq[0]}x{kq[1]} (padding kernel // 2) and stride {q_stride[0]}x{q_stride[1]} leaves "
                            f"{q_grid[0]}x{q_grid[1]} tokens, not the residual's {want[0]}x{want[1]}; use an odd "
                            "kernel_q (3 in MViTv2)")
        for axis, n, s in zip(("height", "width"), grid, skv):
            if s > n:
                raise PlanError(f"{ctx.loc}.kv_stride", f"kv_stride {s} is larger than the token {axis} {n}; "
                                f"use a kv_stride <= {n}")
        kv_grid = tuple(pooled_size(n, k, s) for n, k, s in zip(grid, kkv, skv))
        out = super().resolve(ctx)
        out.update(kernel_q=list(kq), kernel_kv=list(kkv), kv_stride=list(skv), grid=list(grid),
                   q_grid=list(q_grid), kv_grid=list(kv_grid),
                   rel_pos_size=[rel_pos_length(q, k) for q, k in zip(q_grid, kv_grid)])
        return out

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        return (f"its {entry['kernel_kv'][0]}x{entry['kernel_kv'][1]} key/value pooling and global attention with "
                "relative positions read the full grid, so it has no per-mask-unit form")

    @classmethod
    def describe(cls, entry, blocks=()):
        """``mvit_attention kv/4`` plus `` q/2`` when the block pools its queries."""
        s = entry["kv_stride"]
        text = f"{entry['kind']} kv/{s[0]}" if s[0] == s[1] else f"{entry['kind']} kv/{s[0]}x{s[1]}"
        if entry.get("q_stride") and tuple(entry["q_stride"]) != (1, 1):
            text += f" q/{entry['q_stride'][0]}"
        return text


class MViTQPoolParams(DownsampleParams):
    """MViTv2's stage transition (arXiv 2112.01526; timm ``mvitv2.MultiScaleBlock`` with
    ``stride_q > 1`` and ``expand_attn=True``), fused into the stage's first block: its
    ``mvit_attention`` maps the previous width to the stage's and pools the queries by
    ``q_stride``; its residual is ``maxpool(proj(norm1(x)))`` (``proj`` = timm's
    ``shortcut_proj_attn``, only when the width changes; else ``maxpool(x)``), the max-pool of
    kernel ``s + 1`` (``s`` when 1), stride ``s``, padding ``kernel // 2``. No weights of its own.

    Raises (plan): ``PlanError`` at ``downsample.q_stride`` when the stride does not divide the
    token grid, or is odd and above 1 (the overlapping ``s + 1`` kernel would then leave
    ``grid / s + 1`` tokens).
    """

    kind: Literal["mvit_q_pool"] = "mvit_q_pool"
    q_stride: Size = Field(2, description="query and residual pooling stride of the stage's first block")
    fused: ClassVar[bool] = True
    accepts: ClassVar[frozenset] = frozenset({"grid"})

    def out_grid(self, in_grid, loc):
        stride = _hw(self.q_stride)
        for axis, n, s in zip(("height", "width"), in_grid, stride):
            if s > 1 and s % 2:
                raise PlanError(f"{loc}.q_stride", f"q_stride {s} is odd: the residual's overlapping {s + 1}x{s + 1} "
                                f"max-pool would leave {n // s + 1} tokens on the {axis}, the attention {n // s}; "
                                "use 1 or an even stride")
            if n % s:
                raise PlanError(f"{loc}.q_stride", f"q_stride {s} does not divide the token {axis} {n}; use a "
                                f"divisor of {n}")
        return (in_grid[0] // stride[0], in_grid[1] // stride[1])

    def resolve(self, in_chs, out_chs, in_grid, loc):
        return {"kind": self.kind, "q_stride": list(_hw(self.q_stride))}

    def first_block_q_stride(self) -> tuple[int, int]:
        return _hw(self.q_stride)

    def first_block_expand(self) -> str:
        return "proj_overlap"

    @classmethod
    def describe(cls, entry, blocks=()):
        s = entry["q_stride"]
        return f"{entry['kind']}/{s[0]}" if s[0] == s[1] else f"{entry['kind']}/{s[0]}x{s[1]}"


registry.register("token_mixer", "mvit_attention", MViTAttentionParams, "hfactory.layers.mvit:MViTAttention",
                  overwrite=True)
registry.register("downsample", "mvit_q_pool", MViTQPoolParams, "hfactory.layers.downsample:Fused", overwrite=True)
