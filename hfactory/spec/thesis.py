"""The downsamplers of the thesis repo's downsampling study (params + plan arithmetic; no torch).

Source: leognk/HierarchicalTransformers @ 17d81f6 (master's thesis, Okatani lab, Tohoku
University), ``models/encoders/metaformer.py`` ``create_pooling``. Every entry maps a grid ``(B, H, W, C_in)`` to a
coarser set of ``C_out`` tokens and can start any grid stage (``downsample: {kind: ...}``):

========== =====================================================================================
kind       computation
========== =====================================================================================
conv       hfactory's ``conv`` with ``pre_norm`` (LN without bias, then Conv2d k, s, p) is the
           thesis's ``conv``; ``examples/caformer_s18_downsamplers.yaml`` spells it out
avg / max  LN -> 1x1 conv (channel projection, bias) -> AvgPool2d / MaxPool2d (k, s, p)
sp_lin     LN -> Linear over the token axis (N_in -> N_out, no bias) -> LN -> Linear over
           channels (no bias)
sp_mlp     the same with an MLP over the token axis (N_in -> N_out -> N_out, StarReLU, no bias)
rand       sp_lin with the token-axis projection frozen at its random init
rand_conv  LN -> Conv2d (k, s, p) frozen at its random init
geme       greedy merging (GreedyMerging in the thesis; "GeMe"): see :class:`GeMeParams`
att0       Attention0Pooling: see :class:`Att0Params`
========== =====================================================================================

The thesis halves the grid at every downsampler (``sizes[i] = size0 // 2**i``); here ``stride``
(default 2) gives the reduction, and the plan requires it to divide the grid exactly (so
``feature_info`` reductions are true), as for hfactory's ``conv``. The thesis's kernel defaults
are its "mix" configs (k3 s2 p1); its "sep" configs are k2 s2 p0.

Modules in :mod:`hfactory.layers.thesis`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import Field

from .. import registry
from .base import PlanError
from .components import (AttentionParams, ComponentField, ComponentParams, DownsampleParams, NormField,
                         StageContext, conv_out_len, padding_advice)

__all__ = ["KernelPoolParams", "AvgPoolDownsampleParams", "MaxPoolDownsampleParams", "RandConvParams",
           "SpatialLinearParams", "SpatialMlpParams", "RandSpatialParams", "GeMeParams", "Att0Params",
           "ClusterAttentionParams"]


def _ln():
    # LayerNormWithoutBias(eps=1e-6), the thesis's norm everywhere in its MetaFormer
    return {"kind": "layernorm", "eps": 1e-6, "bias": False}


def exact_reduction(in_grid: tuple[int, int], stride: int, loc: str, what: str = "stride") -> tuple[int, int]:
    """``in_grid // stride`` per axis; PlanError when the stride does not divide the grid."""
    for axis, n in zip(("height", "width"), in_grid):
        if n % stride:
            raise PlanError(f"{loc}.{what}", f"{what} {stride} does not divide the token {axis} {n}; use a divisor "
                            f"of {n}, or an img_size that gives a multiple of {stride} here")
    return (in_grid[0] // stride, in_grid[1] // stride)


class KernelPoolParams(DownsampleParams):
    """Base of the thesis's kernel poolings (``KernelPooling``): pre-norm over the input channels,
    then a strided window operation; ``(B, H, W, C_in) -> (B, H/stride, W/stride, C_out)``."""

    kernel_size: int = Field(3, ge=1)
    stride: int = Field(2, ge=1)
    padding: int = Field(1, ge=0)
    norm: NormField = Field(default_factory=_ln, description="pre-norm over the input channels")
    method: ClassVar[str] = "conv"
    frozen: ClassVar[bool] = False

    def out_grid(self, in_grid, loc):
        k, s, p = self.kernel_size, self.stride, self.padding
        out = exact_reduction(in_grid, s, loc)
        for axis, n in zip(("height", "width"), in_grid):
            got = conv_out_len(n, k, s, p)
            if got != n // s:
                raise PlanError(f"{loc}.padding", f"kernel_size {k}, stride {s}, padding {p} map {axis} {n} to "
                                f"{got}, not {n // s}; {padding_advice(n, k, s)}")
        return out

    def resolve(self, in_chs, out_chs, in_grid, loc):
        return {"kind": self.kind, "method": self.method, "frozen": self.frozen, "in_chs": in_chs,
                "out_chs": out_chs, "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "norm": self.norm.resolve(in_chs, f"{loc}.norm")}

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        # a token-wise norm (and 1x1 conv), then a k x k window op
        k, s, p = entry["kernel_size"], entry["stride"], entry["padding"]
        if k != s or p:
            return (f"{entry['kind']} {k}x{k}/s{s}/p{p} reads neighbouring tokens across mask-unit borders; a "
                    "unit-local one has kernel_size = stride and padding 0")
        return None


class AvgPoolDownsampleParams(KernelPoolParams):
    """Thesis ``avg``: LN -> 1x1 conv ``C_in -> C_out`` (with bias) -> ``AvgPool2d(k, s, p)``
    (``count_include_pad`` true, PyTorch's default, as the thesis)."""

    kind: Literal["avg"] = "avg"
    method: ClassVar[str] = "avg"
    count_include_pad: bool = True

    def resolve(self, in_chs, out_chs, in_grid, loc):
        return {**super().resolve(in_chs, out_chs, in_grid, loc), "count_include_pad": self.count_include_pad}


class MaxPoolDownsampleParams(KernelPoolParams):
    """Thesis ``max``: LN -> 1x1 conv ``C_in -> C_out`` (with bias) -> ``MaxPool2d(k, s, p)``."""

    kind: Literal["max"] = "max"
    method: ClassVar[str] = "max"


class RandConvParams(KernelPoolParams):
    """Thesis ``rand_conv``: LN -> ``Conv2d(C_in, C_out, k, s, p)`` whose weight and bias are
    frozen (``requires_grad=False``) at their random init; the norm still learns."""

    kind: Literal["rand_conv"] = "rand_conv"
    frozen: ClassVar[bool] = True


class SpatialLinearParams(DownsampleParams):
    """Thesis ``sp_lin`` (``SpatialMLPPooling(use_mlp=False)``): LN -> ``Linear(N_in, N_out,
    bias=False)`` over the token axis -> LN -> ``Linear(C_in, C_out, bias=False)``;
    ``(B, H, W, C_in) -> (B, H/stride, W/stride, C_out)``.

    Its weights are sized for ``N_in = H * W`` tokens, so a model built at one ``img_size`` runs
    only at that size (``fixed_grid``: the plan refuses other input sizes with a PlanError).
    """

    kind: Literal["sp_lin"] = "sp_lin"
    stride: int = Field(2, ge=1, description="grid reduction per axis (N_out = N_in / stride^2)")
    norm: NormField = Field(default_factory=_ln, description="norm over channels, before and after the token map")
    frozen: ClassVar[bool] = False
    use_mlp: ClassVar[bool] = False
    fixed_grid: ClassVar[bool] = True  # the token-axis Linear is sized N_in -> N_out

    def out_grid(self, in_grid, loc):
        return exact_reduction(in_grid, self.stride, loc)

    def resolve(self, in_chs, out_chs, in_grid, loc):
        out = self.out_grid(in_grid, loc)
        return {"kind": self.kind, "use_mlp": self.use_mlp, "frozen": self.frozen, "in_chs": in_chs,
                "out_chs": out_chs, "in_grid": list(in_grid), "out_grid": list(out),
                "norm": self.norm.resolve(in_chs, f"{loc}.norm")}


class SpatialMlpParams(SpatialLinearParams):
    """Thesis ``sp_mlp``: ``sp_lin`` with ``MLP(N_in, ratio=N_out/N_in, out=N_out)`` over the token
    axis: ``Linear(N_in, N_out) -> StarReLU -> Linear(N_out, N_out)``, no biases."""

    kind: Literal["sp_mlp"] = "sp_mlp"
    use_mlp: ClassVar[bool] = True


class RandSpatialParams(SpatialLinearParams):
    """Thesis ``rand``: ``sp_lin`` whose token-axis projection is frozen at its random init."""

    kind: Literal["rand"] = "rand"
    frozen: ClassVar[bool] = True


class GeMeParams(DownsampleParams):
    """Thesis ``geme`` (``GeMePooling`` with ``GreedyMerging``; "GeMe" most plausibly Greedy
    Merging, not generalized-mean pooling): ``LN -> to_kv Linear(C_in, 2 C_in, no bias)``; the
    ``N_in`` tokens are merged into ``N_out = N_in // stride^2`` groups by greedy merging on the
    cosine similarity of their keys (over all token pairs, not windows); each output is the mean
    of its group's values, then ``LN -> Linear(C_in, C_out, no bias)``.

    Produces the ``seq`` layout ``(B, N_out, C_out)``: groups are not spatially ordered (here:
    ordered by their first token in raster order). Also produces token sizes (group member counts,
    or sums of the incoming sizes when tokens already had sizes), which every later attention
    layer uses as a ``log(size)`` key bias and the final average pool as weights
    (:mod:`hfactory.layers.token_sizes`). The merge algorithm is in
    :class:`hfactory.layers.thesis.GreedyMerging`. The key projection gets no gradient: the merge
    decisions are discrete (as in the thesis).
    """

    kind: Literal["geme"] = "geme"
    stride: int = Field(2, ge=1, description="N_out = N_in // stride^2 groups ((H / stride) * (W / stride) on "
                        "a grid the stride divides)")
    norm: NormField = Field(default_factory=_ln, description="norm before to_kv and before the projection")
    accepts: ClassVar[frozenset] = frozenset({"grid", "seq"})
    produces: ClassVar[str] = "seq"
    emits_token_sizes: ClassVar[bool] = True

    def out_grid(self, in_grid, loc):
        n_in = in_grid[0] * in_grid[1]
        n_out = n_in // self.stride ** 2
        if n_out < 1:
            raise PlanError(f"{loc}.stride", f"merging {n_in} tokens into {n_in} // {self.stride}^2 groups leaves "
                            "none; use a smaller stride")
        return (n_out, 1)

    def resolve(self, in_chs, out_chs, in_grid, loc):
        n_out = self.out_grid(in_grid, loc)[0]
        return {"kind": self.kind, "in_chs": in_chs, "out_chs": out_chs, "in_tokens": in_grid[0] * in_grid[1],
                "out_tokens": n_out, "norm": self.norm.resolve(in_chs, f"{loc}.norm")}


Assignment = Optional[Literal["soft", "hard"]]


class Att0Params(DownsampleParams):
    """Thesis ``att0`` (``Attention0Pooling``): clusters prepared during the whole previous stage,
    then aggregated. ``(B, H, W, C_in) -> (B, H/stride, W/stride, C_out)``.

    1. At the start of the previous stage, ``K = 2 * (H/stride) * (W/stride)`` cluster tokens are
       made: learnable ``(K, C_in)`` (``clusters_init: null``, normal std 0.02), or by a
       downsampler ``C_in -> 2 C_in`` on the grid (``clusters_init: {kind: conv, ...}``), two
       clusters per output cell. They travel after the grid's tokens, ``(B, H*W + K, C_in)``.
    2. Every block of that stage (its token mixer must be ``attention``; the plan turns it into
       ``cluster_attention``) updates them: queries from tokens and clusters, keys and values from
       the tokens only (tokens never attend to clusters); cluster rows use ``assignment``: null =
       softmax over tokens; ``soft`` = softmax over the clusters, renormalised over the tokens
       (+1e-5); ``hard`` = the straight-through hardmax over the clusters, renormalised. Clusters
       share the block's residuals, norms and MLP with the tokens.
    3. This downsampler: ``LN`` of tokens and clusters, attention aggregation (queries = clusters,
       keys/values = tokens, ``dim_head`` 32, own ``to_q``/``to_kv``/``to_out``, no biases) with
       ``last_assignment``, ``clusters * res_scale + aggregated``, pairs of clusters concatenated
       ``(n', 2C) -> LN -> Linear(2 C_in, C_out, no bias)``.

    With a ``soft`` or ``hard`` last assignment it also produces token sizes (assignment mass per
    cluster, averaged over heads, summed per pair), used by later attention layers as a log-size
    key bias and by the final average pool as weights (:mod:`hfactory.layers.token_sizes`).
    Layout: with learnable clusters the outputs have no spatial order (``seq`` layout,
    ``(B, N', C_out)``); with a pooling ``clusters_init`` output ``(i, j)`` comes from the pooled
    cell ``(i, j)``, so the ``grid`` layout is kept. The cluster count is fixed by the grid at the
    spec's ``img_size`` (``fixed_grid``: the plan refuses other input sizes with a PlanError).
    """

    kind: Literal["att0"] = "att0"
    stride: int = Field(2, ge=1, description="grid reduction per axis (the thesis halves the grid)")
    clusters_init: Optional[Annotated[ComponentParams, ComponentField("downsample")]] = Field(
        None, description="null: learnable clusters; or a downsampler (e.g. {kind: conv, patch_size: 3, stride: 2, "
        "padding: 1, pre_norm: true, norm: layernorm}) mapping the grid to 2 clusters per output cell")
    assignment: Assignment = Field(None, description="cluster rows in the previous stage's attention")
    last_assignment: Assignment = Field(None, description="assignment of the final aggregation")
    dim_head: int = Field(32, ge=1, description="head width of the final aggregation")
    res_scale: bool = Field(True, description="learned per-channel scale (init 1) on the clusters' residual")
    norm: NormField = Field(default_factory=_ln, description="norm of tokens and clusters (C_in), and of pairs (2 C_in)")
    accepts: ClassVar[frozenset] = frozenset({"grid"})
    prepares_previous_stage: ClassVar[bool] = True
    # entries holding components: the norms of the pool, and the clusters' downsampler (carry entry)
    nested: ClassVar[dict] = {"norm": "norm", "pair_norm": "norm", "init": "downsample"}
    fixed_grid: ClassVar[bool] = True  # K = 2 * (H/stride) * (W/stride) clusters at the spec's img_size

    @property
    def produces(self) -> str:  # type: ignore[override]
        return "seq" if self.clusters_init is None else "grid"

    @property
    def emits_token_sizes(self) -> bool:
        return self.last_assignment is not None

    def out_grid(self, in_grid, loc):
        h, w = exact_reduction(in_grid, self.stride, loc)
        return (h * w, 1) if self.clusters_init is None else (h, w)

    def resolve(self, in_chs, out_chs, in_grid, loc):
        h, w = exact_reduction(in_grid, self.stride, loc)
        if in_chs % self.dim_head:
            raise PlanError(f"{loc}.dim_head", f"dim_head {self.dim_head} does not divide the width {in_chs}; use a "
                            f"divisor of {in_chs}")
        return {"kind": self.kind, "role": "pool", "in_chs": in_chs, "out_chs": out_chs, "in_grid": list(in_grid),
                "out_grid": [h, w], "num_heads": in_chs // self.dim_head, "last_assignment": self.last_assignment,
                "res_scale": self.res_scale, "grid_out": self.clusters_init is not None,
                "norm": self.norm.resolve(in_chs, f"{loc}.norm"),
                "pair_norm": self.norm.resolve(2 * in_chs, f"{loc}.norm")}

    def prepare_previous_stage(self, stage: Any, prev_loc: str, loc: str) -> Any:
        """The previous stage's plan with clusters: a ``carry`` entry (how the clusters are made and
        appended) and its attention blocks turned into ``cluster_attention``. ``stage`` is a
        :class:`hfactory.plan.StagePlan` (returned updated, not changed in place)."""
        if stage.layout != "grid":
            raise PlanError(loc, f"att0 carries clusters through the previous stage's blocks, which needs grid tokens; "
                            f"{prev_loc} is in the {stage.layout!r} layout")
        grid, dim = tuple(stage.out_grid), stage.out_chs
        h, w = exact_reduction(grid, self.stride, loc)
        clusters = 2 * h * w
        init = None
        if self.clusters_init is not None:
            where = f"{loc}.clusters_init"
            # what the component is decides first: a stride hint is no use for one that cannot work
            init_ds = self.clusters_init
            if init_ds.emits_token_sizes or init_ds.fused or init_ds.prepares_previous_stage \
                    or init_ds.identity or init_ds.produces != "grid":
                raise PlanError(where, f"{self.clusters_init.kind!r} cannot make clusters (they must be a grid of "
                                "cells); use a grid downsampler such as conv, avg or max")
            got = tuple(self.clusters_init.out_grid(grid, where))
            if got != (h, w):
                raise PlanError(where, f"maps the {grid[0]}x{grid[1]} grid to {got[0]}x{got[1]}, but att0 needs "
                                f"{h}x{w} cells (2 clusters each); use stride {self.stride}")
            init = self.clusters_init.resolve(dim, 2 * dim, grid, where)
        blocks = []
        for b_i, block in enumerate(stage.blocks):
            mixer = block.token_mixer
            if mixer.get("kind") != "attention" or mixer.get("q_stride") or mixer.get("rotary"):
                raise PlanError(f"{prev_loc}.token_mixer", f"att0 at {loc} updates its clusters in every block of "
                                f"{prev_loc}, which needs global attention there (block {b_i} has "
                                f"{mixer.get('kind')!r}); use token_mixer: attention (no rotary) in {prev_loc}")
            blocks.append(block.model_copy(update={"token_mixer": {
                **mixer, "kind": "cluster_attention", "num_clusters": clusters, "assignment": self.assignment}}))
        carry = {"kind": self.kind, "role": "clusters", "dim": dim, "grid": list(grid), "num_clusters": clusters,
                 "init": init}
        return stage.model_copy(update={"blocks": tuple(blocks), "carry": carry, "token_mixer": {
            **stage.token_mixer, "kind": "cluster_attention", "num_clusters": clusters, "assignment": self.assignment}})


class ClusterAttentionParams(AttentionParams):
    """Global attention whose last ``num_clusters`` tokens are att0 clusters (keys and values come
    from the other tokens only; cluster rows use the att0 ``assignment``). The plan writes it
    into the stage before an ``att0`` downsampler; in a spec, write ``attention`` there."""

    kind: Literal["cluster_attention"] = "cluster_attention"
    accepts: ClassVar[frozenset] = frozenset({"grid", "seq"})

    def resolve(self, ctx: StageContext) -> dict:
        raise PlanError(ctx.loc, "cluster_attention is set by the plan in the stage before an att0 downsampler; "
                        "write token_mixer: attention there and downsample: att0 in the next stage")


_ENTRIES = [
    (AvgPoolDownsampleParams, "KernelPool"),
    (MaxPoolDownsampleParams, "KernelPool"),
    (RandConvParams, "KernelPool"),
    (SpatialLinearParams, "SpatialPool"),
    (SpatialMlpParams, "SpatialPool"),
    (RandSpatialParams, "SpatialPool"),
    (GeMeParams, "GeMePool"),
    (Att0Params, "att0"),
]
for _params, _builder in _ENTRIES:
    _kind = _params.model_fields["kind"].default
    registry.register("downsample", _kind, _params, f"hfactory.layers.thesis:{_builder}", overwrite=True)
registry.register("token_mixer", "cluster_attention", ClusterAttentionParams, "hfactory.layers.thesis:ClusterAttention",
                  overwrite=True)
