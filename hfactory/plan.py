"""resolve(spec) -> Plan: every derived number and every shape check, before any tensor exists.

The plan is the fully explicit, gap-filled configuration (what xformers'
``get_hierarchical_configuration`` produced, but checked): per stage its input and output grid,
``seq_len``, in/out channels, heads, per-block drop-path rates, and each component's resolved
keyword arguments, which the builder passes to the modules unchanged. A spec that resolves
builds and runs with these shapes; one that cannot fails here with a :class:`PlanError` naming
the spec location and what would be valid.

Gap-filling order for a stage field: the stage's own value, else ``spec.defaults``, else
:data:`LIBRARY_DEFAULTS`. Downsamplers default to MetaFormer's: a 7x7 stride-4 conv stem
(padding 2) for stage 0 and a 3x3 stride-2 conv (padding 1) for later stages
(arXiv 2111.11418, timm ``metaformer.py``).

Pure Python: no torch import, so ``hfactory summary`` is instant.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from typing import Optional

from pydantic import BaseModel, ConfigDict

from .spec.base import PlanError
from .spec.components import ComponentParams, StageContext
from .spec.model import EncoderSpec, StageDefaults, StageSpec

__all__ = ["Plan", "StagePlan", "BlockPlan", "resolve", "LIBRARY_DEFAULTS", "PlanError"]

#: Values used for a stage field that neither the stage nor ``spec.defaults`` sets.
LIBRARY_DEFAULTS = StageDefaults.model_validate({
    "depth": 1,
    "token_mixer": "attention",
    "feedforward": "mlp",
    "norm": "layernorm",
    "residual_norm_style": "pre",
    "layer_scale": False,
    "res_scale": False,
    "pos_embed": "none",
    "dim_head": 32,
})
_STEM = {"kind": "conv", "patch_size": 7, "stride": 4, "padding": 2}
_DOWNSAMPLE = {"kind": "conv", "patch_size": 3, "stride": 2, "padding": 1}


class BlockPlan(BaseModel):
    """What one block needs beyond its stage's entries: its input width and first norm (they
    differ from the stage's in a fused q-pooling block), its query-pooling stride, its
    resolved token mixer (Swin alternates shifts, Hiera's first block lags the mixer) and how
    a width-changing block widens its residual (``expand``: ``proj`` or ``max_avg``)."""

    model_config = ConfigDict(frozen=True)

    dim_in: int
    q_stride: Optional[tuple[int, int]]
    norm1: dict
    token_mixer: dict
    expand: str = "proj"


class StagePlan(BaseModel):
    """One stage, fully resolved. Grids are ``(H, W)`` in tokens; ``reduction`` is the total
    stride from the image in pixels; ``unit_size`` the mask unit in tokens (``units`` layout);
    component entries are the builders' keyword arguments (``token_mixer`` and ``norm`` are the
    stage's own; ``blocks`` holds each block's)."""

    model_config = ConfigDict(frozen=True)

    index: int
    layout: str
    unit_size: Optional[tuple[int, int]] = None
    in_grid: tuple[int, int]
    out_grid: tuple[int, int]
    seq_len: int
    in_chs: int
    out_chs: int
    reduction: int
    depth: int
    num_heads: Optional[int]
    dim_head: Optional[int]
    residual_norm_style: str
    layer_scale: Optional[float]
    res_scale: bool
    drop_path: tuple[float, ...]
    downsample: dict
    pos_embed: dict
    token_mixer: dict
    feedforward: dict
    norm: dict
    blocks: tuple[BlockPlan, ...]


class Plan(BaseModel):
    """The gap-filled hierarchical configuration of an :class:`EncoderSpec`.

    Printable (``str(plan)`` is a table), serialisable (``plan.to_json()``) and comparable.
    """

    model_config = ConfigDict(frozen=True)

    name: Optional[str]
    img_size: tuple[int, int]
    in_chans: int
    num_classes: int
    global_pool: str
    drop_rate: float
    head_norm: dict
    head_norm_first: bool
    head: dict
    attn_backend: str
    mask_unit_size: Optional[tuple[int, int]] = None
    num_features: int
    stages: tuple[StagePlan, ...]

    @property
    def num_blocks(self) -> int:
        return sum(s.depth for s in self.stages)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=indent)

    def __str__(self) -> str:
        h, w = self.img_size
        head = f"{self.name or 'encoder'}: {self.in_chans}x{h}x{w} image, {len(self.stages)} stages, " \
               f"{self.num_blocks} blocks, {self.num_classes} classes ({self.global_pool} pool)"
        cols = ["stage", "grid in -> out", "tokens", "chs", "heads", "depth", "downsample", "mixer",
                "feedforward", "drop_path"]
        rows = []
        for s in self.stages:
            rows.append([
                str(s.index), f"{s.in_grid[0]}x{s.in_grid[1]} -> {s.out_grid[0]}x{s.out_grid[1]}",
                str(s.seq_len), f"{s.in_chs}->{s.out_chs}", "-" if s.num_heads is None else str(s.num_heads),
                str(s.depth), _describe(s.downsample), _describe_mixer(s), _describe(s.feedforward),
                f"{s.drop_path[0]:.3f}-{s.drop_path[-1]:.3f}",
            ])
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        fmt = "  ".join(f"{{:<{n}}}" for n in widths)
        return "\n".join([head, fmt.format(*cols), *(fmt.format(*r) for r in rows)])


def _describe(component: dict) -> str:
    kind = component["kind"]
    if kind == "conv":
        return f"conv{component['patch_size']}/s{component['stride']}/p{component['padding']}"
    return kind


def _describe_mixer(s: StagePlan) -> str:
    """Mixer kind plus, for windowed attention, the window, the shifts of its blocks and padding."""
    m = s.token_mixer
    if "window_size" not in m:
        return _describe(m)
    shifts = "/".join(dict.fromkeys(str(b.token_mixer["shift_size"][0]) for b in s.blocks))
    pad = m.get("padded_grid")
    pad = "" if pad is None or list(pad) == list(s.out_grid) else f" pad {pad[0]}x{pad[1]}"
    return f"{m['kind']} {m['window_size'][0]}x{m['window_size'][1]} shift {shifts}{pad}"


def _pick(stage: StageSpec, defaults: StageDefaults, name: str):
    for source in (stage, defaults, LIBRARY_DEFAULTS):
        value = getattr(source, name)
        if value is not None:
            return value
    return None


def _heads(loc: str, dim: int, stage: StageSpec, defaults: StageDefaults) -> tuple[int, int]:
    """(num_heads, dim_head) from the most specific level that sets either of them."""
    for source, where in ((stage, loc), (defaults, "defaults"), (LIBRARY_DEFAULTS, loc)):
        num_heads, dim_head = source.num_heads, source.dim_head
        if num_heads is None and dim_head is None:
            continue
        divisors = ", ".join(str(d) for d in range(1, dim + 1) if dim % d == 0)
        if num_heads is not None and dim_head is not None and num_heads * dim_head != dim:
            raise PlanError(f"{where}.num_heads", f"num_heads {num_heads} x dim_head {dim_head} != embedding "
                            f"{dim} of {loc}; set only one of them")
        if num_heads is not None:
            if dim % num_heads:
                raise PlanError(f"{where}.num_heads", f"num_heads {num_heads} does not divide the embedding "
                                f"{dim} of {loc}; valid: {divisors}")
            return num_heads, dim // num_heads
        if dim % dim_head:
            what = "dim_head" if source is not LIBRARY_DEFAULTS else "the default dim_head"
            raise PlanError(f"{where}.dim_head", f"{what} {dim_head} does not divide the embedding {dim} of "
                            f"{loc}; set {loc}.num_heads (one of {divisors}) or a dim_head dividing {dim}")
        return dim // dim_head, dim_head
    raise AssertionError("LIBRARY_DEFAULTS sets dim_head")


def _check_layout(component: ComponentParams, layout: str, loc: str) -> None:
    if layout not in component.accepts:
        raise PlanError(loc, f"{component.kind!r} works on {' or '.join(sorted(component.accepts))} tokens, "
                        f"but this stage's tokens are in the {layout!r} layout")


def resolve(spec: EncoderSpec, img_size: Optional[tuple[int, int]] = None) -> Plan:
    """Gap-fill ``spec`` and derive every number; check every shape.

    Args:
        spec: a validated :class:`EncoderSpec` (see :func:`hfactory.load_spec`).
        img_size: plan for this ``(H, W)`` instead of ``spec.img_size`` (what an encoder does
            when it sees a different input size; position embeddings are then interpolated).
            ``seq_len`` values given in the spec are checked only at ``spec.img_size``.

    Returns:
        :class:`Plan`.

    Raises:
        PlanError: the spec cannot be built; ``err.loc`` is the spec path
            (e.g. ``stages.1.downsample.stride``) and the message says what would be valid.
    """
    return _resolve_cached(spec.model_dump_json(), tuple(img_size) if img_size else None)


@lru_cache(maxsize=64)
def _resolve_cached(spec_json: str, img_size: Optional[tuple[int, int]]) -> Plan:
    spec = EncoderSpec.model_validate_json(spec_json)
    return _resolve(spec, img_size or spec.img_hw)


def _resolve(spec: EncoderSpec, img_size: tuple[int, int]) -> Plan:
    grid, chs, layout, unit = tuple(img_size), spec.in_chans, "grid", None
    total = sum(_pick(s, spec.defaults, "depth") for s in spec.stages)
    rates = [spec.drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
    stages, block, prev_mixer = [], 0, None
    for i, stage in enumerate(spec.stages):
        loc = f"stages.{i}"
        dim = stage.embedding
        ds = _pick(stage, spec.defaults, "downsample")
        if ds is None:
            ds = StageSpec.model_validate({"embedding": dim, "downsample": _STEM if i == 0 else _DOWNSAMPLE}).downsample
        if i == 0 and (ds.kind == "none" or ds.fused) and chs != dim:
            raise PlanError(f"{loc}.downsample", f"stage 0 needs a patch embedding from {chs} image channels "
                            f"to embedding {dim}; use e.g. {{kind: conv, patch_size: 4}}")
        _check_layout(ds, layout, f"{loc}.downsample")
        out_grid = tuple(ds.out_grid(grid, f"{loc}.downsample"))
        if min(out_grid) < 1:
            raise PlanError(f"{loc}.downsample", f"reduces the grid {grid} to {out_grid}; use a smaller stride "
                            "or a larger img_size")
        ds_resolved = ds.resolve(chs, dim, grid, f"{loc}.downsample")
        q_stride = ds.stride_hw if ds.fused else None
        in_unit = unit
        if unit is not None:
            unit = _shrink_unit(unit, grid, out_grid, f"{loc}.downsample")
        pos = _pick(stage, spec.defaults, "pos_embed")
        # The position embedding is added right after the downsampler, before stage 0's
        # conversion to mask units, so it sees the layout the downsampler produces.
        pos_layout = ds.produces if layout == "grid" else layout
        _check_layout(pos, pos_layout, f"{loc}.pos_embed")
        if i == 0:
            layout = ds.produces
            if spec.mask_unit_size is not None:
                unit = _first_unit(spec.mask_unit_hw, out_grid)
                layout = "units"
        seq_len = out_grid[0] * out_grid[1]
        # seq_len is the user's statement about the spec's own img_size; at other input sizes
        # (an encoder running 224x160 after being specified at 224) it does not apply.
        if stage.seq_len is not None and stage.seq_len != seq_len and tuple(img_size) == spec.img_hw:
            raise PlanError(f"{loc}.seq_len", f"seq_len {stage.seq_len} does not match the derived "
                            f"{out_grid[0]}x{out_grid[1]} = {seq_len} tokens; use {seq_len} or leave it unset")

        mixer = _pick(stage, spec.defaults, "token_mixer")
        _check_layout(mixer, layout, f"{loc}.token_mixer")
        num_heads, dim_head = _heads(loc, dim, stage, spec.defaults) if mixer.uses_heads else (None, None)
        ffn, norm = (_pick(stage, spec.defaults, k) for k in ("feedforward", "norm"))
        for comp, key in ((ffn, "feedforward"), (norm, "norm")):
            _check_layout(comp, layout, f"{loc}.{key}")
        depth = _pick(stage, spec.defaults, "depth")
        ctx = StageContext(loc=f"{loc}.token_mixer", dim=dim, grid=out_grid, layout=layout,
                           num_heads=num_heads, dim_head=dim_head, unit_size=unit)
        norm_resolved = norm.resolve(dim, f"{loc}.norm")
        blocks = [BlockPlan(dim_in=dim, q_stride=None, norm1=norm_resolved, token_mixer=mixer.resolve(
            dataclasses.replace(ctx, block_index=b))) for b in range(depth)]
        if ds.fused:
            blocks[0] = _fused_first_block(ds, mixer, prev_mixer, stage, spec, loc, dim, chs, grid, in_unit,
                                           layout, q_stride)
        layer_scale = _pick(stage, spec.defaults, "layer_scale")
        stages.append(StagePlan(
            index=i, layout=layout, unit_size=unit, in_grid=grid, out_grid=out_grid, seq_len=seq_len, in_chs=chs,
            out_chs=dim, reduction=img_size[0] // out_grid[0], depth=depth, num_heads=num_heads,
            dim_head=dim_head, residual_norm_style=_pick(stage, spec.defaults, "residual_norm_style"),
            layer_scale=None if layer_scale is False else float(layer_scale),
            res_scale=_pick(stage, spec.defaults, "res_scale"),
            drop_path=tuple(rates[block:block + depth]),
            downsample=ds_resolved,
            pos_embed=pos.resolve(StageContext(f"{loc}.pos_embed", dim, out_grid, pos_layout, unit_size=unit)),
            token_mixer=mixer.resolve(ctx),
            feedforward=ffn.resolve(dim, f"{loc}.feedforward"),
            norm=norm_resolved,
            blocks=tuple(blocks),
        ))
        block += depth
        grid, chs, prev_mixer = out_grid, dim, mixer

    return Plan(
        name=spec.name, img_size=tuple(img_size), in_chans=spec.in_chans, num_classes=spec.num_classes,
        global_pool=spec.global_pool, drop_rate=spec.drop_rate,
        head_norm=spec.head_norm.resolve(chs, "head_norm"), head_norm_first=spec.head_norm_first,
        head=_resolve_head(spec, chs),
        attn_backend=spec.attn_backend, mask_unit_size=spec.mask_unit_hw, num_features=chs, stages=tuple(stages),
    )


def _resolve_head(spec: EncoderSpec, dim: int) -> dict:
    head = spec.head
    if head.kind == "linear":
        return {"kind": "linear", "bias": head.bias}
    hidden = int(head.hidden_layer_multiplier * dim)
    if hidden < 1:
        raise PlanError("head.hidden_layer_multiplier", f"{head.hidden_layer_multiplier} x width {dim} rounds to "
                        "0 hidden units; use a larger multiplier")
    return {"kind": "mlp", "hidden_features": hidden, "activation": head.activation, "bias": head.bias,
            "norm": head.norm.resolve(hidden, "head.norm")}


def _first_unit(unit: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    for axis, n, u in zip(("height", "width"), grid, unit):
        if n % u:
            raise PlanError("mask_unit_size", f"mask unit {unit[0]}x{unit[1]} does not tile stage 0's token "
                            f"grid {grid[0]}x{grid[1]} ({axis} {n}); use a divisor of {n} or change img_size")
    return tuple(unit)


def _shrink_unit(unit, grid, out_grid, loc) -> tuple[int, int]:
    """A downsampler on the units layout shrinks each unit by its stride; it must divide."""
    new = []
    for n, m, u in zip(grid, out_grid, unit):
        stride = n // m
        if u % stride:
            raise PlanError(loc, f"stride {stride} does not divide the mask unit's {u} tokens; units would "
                            f"straddle; use a stride dividing {u}")
        new.append(u // stride)
    return tuple(new)


def _fused_first_block(ds, mixer, prev_mixer, stage, spec, loc, dim, dim_in, grid, in_unit, layout, q_stride):
    """Hiera's stage-transition block: queries (and residual) pooled by q_stride, dim_in -> dim,
    and, with lag_mixer, the previous stage's token mixer."""
    if prev_mixer is None:
        raise PlanError(f"{loc}.downsample", f"{ds.kind!r} pools inside the first block, so it needs a previous "
                        "stage; stage 0 needs a patch embedding such as {kind: conv, patch_size: 4}")
    use, where = (prev_mixer, f"stages.{int(loc.split('.')[1]) - 1}.token_mixer") if ds.lag_mixer \
        else (mixer, f"{loc}.token_mixer")
    if not use.supports_q_stride:
        raise PlanError(f"{loc}.downsample", f"{ds.kind!r} needs its first block's token mixer ({use.kind!r} from "
                        f"{where}) to pool queries; use attention or mask_unit_attention there")
    _check_layout(use, layout, where)
    num_heads, dim_head = _heads(loc, dim, stage, spec.defaults)
    ctx = StageContext(loc=where, dim=dim, grid=grid, layout=layout, num_heads=num_heads, dim_head=dim_head,
                       unit_size=in_unit, dim_in=dim_in, q_stride=q_stride)
    norm1 = _pick(stage, spec.defaults, "norm").resolve(dim_in, f"{loc}.norm")
    return BlockPlan(dim_in=dim_in, q_stride=q_stride, norm1=norm1, token_mixer=use.resolve(ctx),
                     expand=getattr(ds, "expand", "proj"))
