"""SFT, the thesis repo's "Scale-Free Transformer" (iteratively refined hierarchical RAM): its
spec and its plan (pure Python, no torch; the modules are in :mod:`hfactory.sft`).

Source: leognk/HierarchicalTransformers @ 17d81f6, ``models/encoders/sft/sft.py`` and its README
("tokens at resolution level n query tokens at level n - 1 (forward pass) or n + 1 (backward
pass) to update their own representation with cross-attention"); behaviour read from
leognk/HierarchicalTransformers @ 17d81f6 (the SFT model and its ``no_rec`` configs).

Levels: level 0 is the patch embedding of the image (a grid of ``img_size / patch_size`` tokens,
width ``embedding``, plus a fixed sin-cos position embedding). Transition ``i`` (one entry of
``levels``) makes level ``i + 1``: level ``i``'s grid is cut into groups of ``group_size`` tokens,
each group gets ``queries`` learnable query tokens (shared by all groups), and level ``i + 1`` is
the grid of all groups' queries (``groups x queries`` tokens per axis) with width
``levels[i].embedding``.

- Forward step ``i -> i + 1``: ``forward_layers = [t, c]``: ``t`` self-attention blocks on each
  group of level ``i`` (this refines level ``i``), then ``c`` cross-attention blocks in which the
  group's queries attend to the group (to ``[queries; group]`` with ``attend_to_query``); the
  queries are the learnable ones the first time, afterwards level ``i + 1``'s current tokens;
  a LayerNorm + Linear widens them to level ``i + 1``'s width.
- Backward step ``i + 1 -> i``: ``backward_layers = [c, t]``: level ``i``'s tokens, grouped as in
  the forward step, cross-attend to their group's tokens of level ``i + 1`` (narrowed by
  LayerNorm + Linear to level ``i``'s width), then self-attend within the group.
- ``n_passes`` sweeps alternate: forward ``0 -> L``, backward ``L -> 0``, forward again, ...
  (the thesis's classifier uses odd ``n_passes``, all its encoder configs 1; its MAE uses 2).

The codec of transition ``i`` works at level ``i``'s width (the thesis's ``min(in_dim, out_dim)``;
widths may not shrink). Level mechanics work on grids of any number of axes (1-D sequences,
2-D images, 3-D volumes): ``img_size``, ``patch_size``, ``group_size`` and ``queries`` are ints or
tuples of the grid's rank; the image stem and the classifier are the 2-D case. The thesis pads
a grid that its groups do not divide; here the plan requires exact division and says which
sizes would work.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, ClassVar, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from ..errors import UsageError
from .base import MAX_BLOCKS, PlanError, StrictModel, refuse_huge_ints
from .components import AttentionParams, ComponentField, ComponentParams, StageContext

__all__ = ["SFTSpec", "SFTLevelSpec", "SFTPlan", "SFTLevelPlan", "SFTTransitionPlan", "resolve_sft"]

Size = Union[PositiveInt, tuple[PositiveInt, ...]]
Norm = Annotated[ComponentParams, ComponentField("norm")]
Feedforward = Annotated[ComponentParams, ComponentField("feedforward")]


class SFTLevelSpec(StrictModel):
    """Transition ``i -> i + 1`` (makes level ``i + 1``)."""

    group_size: Size = Field(..., description="tokens of level i per group, per axis (the thesis's ctx_size)")
    queries: Size = Field(..., description="query tokens per group, per axis (qry_size): level i+1's tokens per group")
    embedding: PositiveInt = Field(..., description="width of level i+1 (>= level i's width)")
    num_heads: PositiveInt = Field(..., description="heads of the codec's attention (at level i's width)")
    forward_layers: tuple[int, int] = Field((1, 1), description="[self-attention blocks on the group, "
                                            "cross-attention blocks of the queries]")
    backward_layers: Optional[tuple[int, int]] = Field(None, description="[cross-attention blocks of level i "
                                                       "to level i+1, self-attention blocks]; default: forward's "
                                                       "counts, swapped")
    attend_to_query: bool = Field(False, description="cross-attention keys/values are [queries; group] instead "
                                  "of the group only")
    feedforward: Optional[Feedforward] = Field(None, description="this transition's MLP; default: the spec's")


class SFTSpec(StrictModel):
    """An SFT encoder (see the module docstring). ``feedforward`` and ``norm`` are registry
    components (``hfactory.registry``), used by every codec block."""

    kind_title: ClassVar[str] = "an SFT spec"  # in errors that say which kind of spec a file is

    name: Optional[str] = None
    img_size: Size = 224
    in_chans: PositiveInt = 3
    patch_size: Size = 4
    embedding: PositiveInt = Field(..., description="width of level 0")
    levels: list[SFTLevelSpec] = Field(..., min_length=1)
    n_passes: PositiveInt = Field(1, description="alternating sweeps: forward, backward, forward, ...")
    num_classes: int = Field(1000, ge=0)
    feedforward: Feedforward = Field(default_factory=lambda: {"kind": "mlp", "activation": "gelu"})
    norm: Norm = Field(default_factory=lambda: {"kind": "layernorm"})
    head_norm: Norm = Field(default_factory=lambda: {"kind": "layernorm"},
                            description="norm of the pooled top level, before the classifier")
    attn_backend: str = Field("auto", pattern="^(auto|xformers|sdpa|math)$")

    @property
    def img_hw(self) -> tuple[int, int]:
        """``img_size`` as ``(H, W)`` pixels (images are the 2-D case; see :class:`SFTEncoder`).

        Raises:
            ValueError: ``img_size`` has another rank than 2.
        """
        size = self.img_size
        if isinstance(size, int):
            return (size, size)
        if len(size) != 2:
            raise UsageError(f"img_size {list(size)}: an image model needs [H, W]")
        return tuple(size)


class SFTLevelPlan(BaseModel):
    """One level: its token grid, width and reduction (image pixels per token, per axis)."""

    model_config = ConfigDict(frozen=True)

    index: int
    grid: tuple[int, ...]
    chs: int
    tokens: int
    reduction: tuple[int, ...]


class SFTTransitionPlan(BaseModel):
    """Transition ``index -> index + 1``, fully resolved; component entries are the registry
    builders' keyword arguments (``norm`` at the codec's width ``in_chs``, ``norm_out`` at
    ``out_chs``, for the projections between the widths)."""

    model_config = ConfigDict(frozen=True)

    index: int
    group_size: tuple[int, ...]
    queries: tuple[int, ...]
    groups: tuple[int, ...]
    in_chs: int
    out_chs: int
    num_heads: int
    dim_head: int
    forward_layers: tuple[int, int]
    backward_layers: tuple[int, int]
    attend_to_query: bool
    self_attention: dict
    feedforward: dict
    norm: dict
    norm_out: dict


class SFTPlan(BaseModel):
    """The resolved SFT: levels, transitions, passes, head."""

    model_config = ConfigDict(frozen=True)

    name: Optional[str]
    img_size: tuple[int, ...]
    in_chans: int
    patch_size: tuple[int, ...]
    num_classes: int
    n_passes: int
    levels: tuple[SFTLevelPlan, ...]
    transitions: tuple[SFTTransitionPlan, ...]
    head_norm: dict
    attn_backend: str

    @property
    def builds_backward(self) -> bool:
        """Backward codecs exist only when a backward sweep runs (``n_passes > 1``), as the thesis."""
        return self.n_passes > 1

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=indent)

    def __str__(self) -> str:
        lines = [f"{self.name or 'sft'}: {self.in_chans}x{'x'.join(map(str, self.img_size))} input, "
                 f"{len(self.levels)} levels, {self.n_passes} pass(es), {self.num_classes} classes"]
        for lv in self.levels:
            lines.append(f"level {lv.index}: grid {'x'.join(map(str, lv.grid))} ({lv.tokens} tokens), {lv.chs} chs")
        for t in self.transitions:
            lines.append(f"  {t.index}->{t.index + 1}: groups {'x'.join(map(str, t.groups))} of "
                         f"{'x'.join(map(str, t.group_size))} -> {'x'.join(map(str, t.queries))} queries, "
                         f"{t.num_heads} heads, forward [self {t.forward_layers[0]}, cross {t.forward_layers[1]}]"
                         + (f", backward [cross {t.backward_layers[0]}, self {t.backward_layers[1]}]"
                            if self.builds_backward else ""))
        return "\n".join(lines)


def _tuple(size: Size, rank: int, loc: str) -> tuple[int, ...]:
    if isinstance(size, int):
        return (size,) * rank
    if len(size) != rank:
        raise PlanError(loc, f"has {len(size)} axes but the input has {rank} (img_size); give {rank} values or one int")
    return tuple(size)


def resolve_sft(spec: SFTSpec) -> SFTPlan:
    """Every number of an SFT: level grids, group counts, widths, heads, component entries.

    Raises:
        PlanError: a size that does not divide (``levels.1.group_size``), widths that shrink,
            heads that do not divide a width; the message says what would be valid.
    """
    refuse_huge_ints(spec.model_dump(mode="json"))  # before any loop runs over a size
    # forward sweeps are passes 0, 2, ...; backward sweeps 1, 3, ...
    forward = sum(sum(lv.forward_layers) for lv in spec.levels)
    backward = sum(sum(lv.backward_layers or lv.forward_layers) for lv in spec.levels)
    blocks = (spec.n_passes + 1) // 2 * forward + spec.n_passes // 2 * backward
    if blocks > MAX_BLOCKS:
        raise PlanError("n_passes", f"{spec.n_passes} passes over {len(spec.levels)} levels run {blocks} attention "
                        f"blocks; at most {MAX_BLOCKS} are accepted")
    img = spec.img_size if isinstance(spec.img_size, tuple) else (spec.img_size, spec.img_size)
    rank = len(img)
    patch = _tuple(spec.patch_size, rank, "patch_size")
    for axis, (n, p) in enumerate(zip(img, patch)):
        if n % p:
            raise PlanError("patch_size", f"patch {p} does not divide img_size {n} on axis {axis}; use a divisor of {n}")
    grid = tuple(n // p for n, p in zip(img, patch))
    chs = spec.embedding
    levels = [SFTLevelPlan(index=0, grid=grid, chs=chs, tokens=math.prod(grid), reduction=patch)]
    transitions = []
    for i, lv in enumerate(spec.levels):
        loc = f"levels.{i}"
        g = _tuple(lv.group_size, rank, f"{loc}.group_size")
        q = _tuple(lv.queries, rank, f"{loc}.queries")
        for axis, (n, s) in enumerate(zip(grid, g)):
            if n % s:
                divisors = ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
                raise PlanError(f"{loc}.group_size", f"group size {s} does not divide level {i}'s grid {n} on axis "
                                f"{axis}; valid: {divisors} (the thesis pads; here groups must tile the level)")
        if lv.embedding < chs:
            raise PlanError(f"{loc}.embedding", f"level {i + 1}'s width {lv.embedding} is below level {i}'s {chs}; "
                            f"the codec runs at level {i}'s width, so widths may not shrink (use >= {chs})")
        if chs % lv.num_heads:
            divisors = ", ".join(str(d) for d in range(1, chs + 1) if chs % d == 0)
            raise PlanError(f"{loc}.num_heads", f"num_heads {lv.num_heads} does not divide level {i}'s width {chs} "
                            f"(the codec's width); valid: {divisors}")
        for name, layers in (("forward_layers", lv.forward_layers), ("backward_layers", lv.backward_layers)):
            if layers is not None and (min(layers) < 0 or layers[1 if name == "forward_layers" else 0] < 1):
                which = "cross-attention (second)" if name == "forward_layers" else "cross-attention (first)"
                raise PlanError(f"{loc}.{name}", f"{list(layers)}: counts must be >= 0 and the {which} count >= 1, "
                                "or no information moves between the levels")
        groups = tuple(n // s for n, s in zip(grid, g))
        out_grid = tuple(gr * qq for gr, qq in zip(groups, q))
        ffn = (lv.feedforward or spec.feedforward).resolve(chs, f"{loc}.feedforward")
        # the codec's self-attention is the registry's global attention on the group's tokens
        self_attention = AttentionParams(kind="attention").resolve(StageContext(
            loc=f"{loc}.self_attention", dim=chs, grid=(math.prod(g), 1), layout="seq",
            num_heads=lv.num_heads, dim_head=chs // lv.num_heads))
        backward = lv.backward_layers if lv.backward_layers is not None else (lv.forward_layers[1], lv.forward_layers[0])
        transitions.append(SFTTransitionPlan(
            index=i, group_size=g, queries=q, groups=groups, in_chs=chs, out_chs=lv.embedding,
            num_heads=lv.num_heads, dim_head=chs // lv.num_heads, forward_layers=tuple(lv.forward_layers),
            backward_layers=tuple(backward), attend_to_query=lv.attend_to_query,
            self_attention={**self_attention, "backend": spec.attn_backend}, feedforward=ffn,
            norm=spec.norm.resolve(chs, "norm"), norm_out=spec.norm.resolve(lv.embedding, "norm")))
        grid, chs = out_grid, lv.embedding
        levels.append(SFTLevelPlan(index=i + 1, grid=grid, chs=chs, tokens=math.prod(grid),
                                   reduction=tuple(n // m if n % m == 0 else round(n / m) for n, m in zip(img, grid))))
    return SFTPlan(name=spec.name, img_size=img, in_chans=spec.in_chans, patch_size=patch,
                   num_classes=spec.num_classes, n_passes=spec.n_passes, levels=tuple(levels),
                   transitions=tuple(transitions), head_norm=spec.head_norm.resolve(chs, "head_norm"),
                   attn_backend=spec.attn_backend)
