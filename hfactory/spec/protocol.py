"""The component protocol: everything the core (plan, builder, encoder, summary, MAE) may ask a
component, declared on its params model, with defaults on the base classes here.

The core never tests a component's kind name. It asks the params class of an entry (found in the
registry by slot and kind) or the params instance while planning:

============================= ===================================================================
declaration                   meaning (default)
============================= ===================================================================
``slot``                      the StageSpec field it fills (set by the slot bases below)
``accepts``                   token layouts it runs on (``grid``)
``produces``                  (downsamplers) the layout it leaves (``grid``)
``fused``                     (downsamplers) no module of its own; the stage's first block does
                              the work, with ``q_stride`` (False)
``identity``                  it leaves the tokens as they are (False): no new tokens, no new width
``prepares_previous_stage``   (downsamplers) it rewrites the previous stage's plan through
                              ``prepare_previous_stage`` (att0's clusters) (False)
``emits_token_sizes``         (downsamplers) its tokens carry sizes, merged-token counts (False)
``fixed_grid``                (downsamplers) its weights are sized for the grid of the spec's
                              ``img_size``; the plan refuses other input sizes (False)
``nested``                    entry keys holding nested components, key -> slot (downsamplers:
                              ``{"norm": "norm"}``); they must pass the same unit checks
``first_block_q_stride()``    (fused downsamplers) the first block's query stride (None)
``first_block_lags_mixer()``  (fused downsamplers) the first block keeps the previous stage's
                              token mixer (False)
``first_block_expand()``      (fused downsamplers) how the first block widens its residual
                              (``"proj"``)
``crosses_units(entry, ...)`` why the resolved ``entry`` would read tokens across mask-unit
                              borders, or None (see :meth:`ComponentParams.crosses_units`)
``describe(entry, ...)``      the short name plans and summaries print (the kind)
============================= ===================================================================

A component registered by a user (:func:`hfactory.registry.register`) overrides any of these on its
params model and gets exactly the powers a built-in has. Pure Python: no torch, no registry (the
registry imports this module to check that params fit their slot).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

from .base import StrictModel

__all__ = ["StageContext", "ComponentParams", "TokenMixerParams", "DownsampleParams", "FeedforwardParams",
           "NormParams", "PosEmbedParams", "SLOT_BASES"]


@dataclass(frozen=True)
class StageContext:
    """What the plan knows about a stage when a component resolves itself (pure numbers).

    ``grid`` is the token grid ``(H, W)`` the component sees, ``dim`` the channel width,
    ``loc`` the dotted spec path of the component (for errors). ``unit_size`` is the mask-unit
    size in tokens (``units`` layout). For the first block of a stage whose downsampler is fused
    into it (Hiera's q-pooling), ``dim_in`` is the previous width, ``q_stride`` the query pooling
    stride and ``grid``/``unit_size`` are those before pooling. ``block_index`` counts blocks
    within the stage (Swin alternates shifted windows with it). ``token_sizes``: the tokens carry
    sizes from an earlier merging downsampler, which attention uses as a log-size key bias
    (:mod:`hfactory.layers.token_sizes`).
    """

    loc: str
    dim: int
    grid: tuple[int, int]
    layout: str = "grid"
    num_heads: Optional[int] = None
    dim_head: Optional[int] = None
    unit_size: Optional[tuple[int, int]] = None
    dim_in: Optional[int] = None
    q_stride: Optional[tuple[int, int]] = None
    block_index: int = 0
    token_sizes: bool = False


class ComponentParams(StrictModel):
    """Base of every component's params; subclasses set ``kind: Literal[name] = name``."""

    kind: str
    slot: ClassVar[str] = ""
    accepts: ClassVar[frozenset] = frozenset({"grid"})
    #: entry keys that hold nested components (key -> slot); the core checks them like the component
    nested: ClassVar[dict] = {}

    def options(self) -> dict[str, Any]:
        """The params as plain values (nested components resolved by the caller)."""
        return {k: getattr(self, k) for k in type(self).model_fields if k != "kind"}

    @classmethod
    def crosses_units(cls, entry: dict, unit: Optional[tuple[int, int]] = None,
                      grid: Optional[tuple[int, int]] = None) -> Optional[str]:
        """Why the resolved ``entry`` (this component's plan entry) would mix tokens of different
        mask units, or use positions that dropping units changes; None when it is token-wise,
        unit-local or a position-free set operation over the tokens (the rule in
        :mod:`hfactory.plan`, above ``mae_verdict``).

        ``unit`` and ``grid`` (tokens ``(h, w)``) are given when known, for checks that depend on
        the unit size. Nested components (:attr:`nested`) are checked by the caller. The default:
        a component that accepts the ``units`` layout declares per-unit or set semantics
        (compatible); any other has no per-unit form.
        """
        if "units" in cls.accepts:
            return None
        return f"{entry['kind']!r} works on {' or '.join(sorted(cls.accepts))} tokens and has no per-mask-unit form"

    @classmethod
    def describe(cls, entry: dict, blocks: Sequence[dict] = ()) -> str:
        """The short name of a resolved ``entry`` in plan and summary tables (default: its kind).
        ``blocks``: for a stage's token mixer, the entries of each of its blocks (they may differ,
        e.g. Swin's alternating shifts)."""
        return entry["kind"]


class NormParams(ComponentParams):
    """Normalisation over the channel dimension of a channels-last tensor."""

    slot: ClassVar[str] = "norm"
    accepts: ClassVar[frozenset] = frozenset({"grid", "units", "seq"})

    def resolve(self, dim: int, loc: str) -> dict:
        return {"kind": self.kind, "dim": dim, **self.options()}


class TokenMixerParams(ComponentParams):
    """Token mixer of a block: maps tokens ``(B, ..., h, w, C)`` to the same shape.

    Mixers with ``supports_q_stride`` can also be the first block of a q-pooling stage (Hiera):
    they then map ``C = dim_in`` channels to ``dim`` and pool their queries by ``q_stride``.
    """

    slot: ClassVar[str] = "token_mixer"
    uses_heads: ClassVar[bool] = False
    supports_q_stride: ClassVar[bool] = False

    def resolve(self, ctx: StageContext) -> dict:
        out = {"kind": self.kind, "dim": ctx.dim, **self.options()}
        if self.uses_heads:
            out.update(num_heads=ctx.num_heads, dim_head=ctx.dim_head)
        if self.supports_q_stride:
            out.update(dim_in=ctx.dim_in or ctx.dim, q_stride=list(ctx.q_stride) if ctx.q_stride else None)
        return out


class DownsampleParams(ComponentParams):
    """Start of a stage: maps ``in_chs`` channels on ``in_grid`` to ``out_chs`` on a coarser grid.

    ``fused`` downsamplers build no module of their own: the stage's first block does the work
    (Hiera's q-pooling block); ``q_stride`` then gives the pooling stride. The other
    declarations are explained in the module docstring.
    """

    slot: ClassVar[str] = "downsample"
    produces: ClassVar[str] = "grid"
    fused: ClassVar[bool] = False
    identity: ClassVar[bool] = False
    prepares_previous_stage: ClassVar[bool] = False
    emits_token_sizes: ClassVar[bool] = False
    fixed_grid: ClassVar[bool] = False
    nested: ClassVar[dict] = {"norm": "norm"}

    def out_grid(self, in_grid: tuple[int, int], loc: str) -> tuple[int, int]:
        raise NotImplementedError(f"{type(self).__name__} must define out_grid(in_grid, loc)")

    def resolve(self, in_chs: int, out_chs: int, in_grid: tuple[int, int], loc: str) -> dict:
        return {"kind": self.kind, "in_chs": in_chs, "out_chs": out_chs, **self.options()}

    def first_block_q_stride(self) -> Optional[tuple[int, int]]:
        """For a ``fused`` downsampler: the stride ``(sh, sw)`` by which the first block pools its
        queries and residual."""
        return None

    def first_block_lags_mixer(self) -> bool:
        """For a ``fused`` downsampler: whether the first block still uses the previous stage's
        token mixer (Hiera: "mask unit attention lags by one block")."""
        return False

    def first_block_expand(self) -> str:
        """For a ``fused`` downsampler: how the stage's first block widens its residual, ``proj``
        (a Linear of the normed input) or ``max_avg`` (concat of max- and avg-pooled input)."""
        return "proj"

    def prepare_previous_stage(self, stage: Any, prev_loc: str, loc: str) -> Any:
        """For ``prepares_previous_stage`` downsamplers: the previous stage's plan
        (:class:`hfactory.plan.StagePlan`) rewritten for this downsampler, returned as a copy."""
        return stage


class FeedforwardParams(ComponentParams):
    """Channel MLP of a block: ``(..., C) -> (..., C)``."""

    slot: ClassVar[str] = "feedforward"
    accepts: ClassVar[frozenset] = frozenset({"grid", "units", "seq"})

    def resolve(self, dim: int, loc: str) -> dict:
        return {"kind": self.kind, "dim": dim, **self.options()}


class PosEmbedParams(ComponentParams):
    """Position embedding added to the stage's tokens right after its downsampler."""

    slot: ClassVar[str] = "pos_embed"

    def resolve(self, ctx: StageContext) -> dict:
        return {"kind": self.kind, "dim": ctx.dim, "grid": list(ctx.grid), **self.options()}

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        # Checked only after stage 0 (stage 0's embedding is added before the grid is cut into units).
        return (f"a {entry['kind']!r} position embedding after stage 0 is laid on the full grid; add position "
                "embeddings in stage 0, before the mask units")


SLOT_BASES = {
    "token_mixer": TokenMixerParams,
    "downsample": DownsampleParams,
    "feedforward": FeedforwardParams,
    "norm": NormParams,
    "pos_embed": PosEmbedParams,
}
