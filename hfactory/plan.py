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
import math
from functools import lru_cache
from typing import Optional

from pydantic import BaseModel, ConfigDict

from . import registry
from .errors import PlanError
from .spec.base import MAX_BLOCKS, MAX_SIZE, refuse_huge_ints
from .spec.model import LIBRARY_DEFAULTS, EncoderSpec, StageDefaults, StageSpec, default_downsample
from .spec.protocol import ComponentParams, StageContext

__all__ = ["Plan", "StagePlan", "BlockPlan", "resolve", "LIBRARY_DEFAULTS", "PlanError", "mae_verdict",
           "crosses_units", "describe_entry", "describe_mixers", "MAX_SIZE", "MAX_BLOCKS"]

# Advice for a stage 0 without a patch embedding: the library's stem with a 4x4 patch.
_STEM_ADVICE = "{" + ", ".join(f"{k}: {v}" for k, v in {**default_downsample(0, as_dict=True), "patch_size": 4,
                                                         "stride": 4, "padding": 0}.items()) + "}"


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
    #: a per-block override's feedforward and second norm (None: the stage's)
    feedforward: Optional[dict] = None
    norm2: Optional[dict] = None


class StagePlan(BaseModel):
    """One stage, fully resolved. Grids are ``(H, W)`` in tokens; ``reduction`` is the total
    stride from the image in pixels; in the ``seq`` layout (no 2-D structure, e.g. after HVT's 1-D
    pooling) the grid is ``(N, 1)`` and ``reduction`` is ``round(sqrt(image pixels / N))``;
    ``unit_size`` the mask unit in tokens (``units`` layout);
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
    #: The stage's output norm after its blocks (PVTv2's per-stage norm), or None.
    out_norm: Optional[dict] = None
    #: Extra tokens the blocks carry after the grid's (att0's clusters, made by the next stage's
    #: downsampler's plan): the builder's entry, or None. The stage then outputs
    #: ``(B, H*W + K, C)``; intermediates strip the K carried tokens.
    carry: Optional[dict] = None


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

    @property
    def mae_incompatibility(self) -> Optional[str]:
        """Why sparse MAE cannot run this plan (``"<spec location>: <reason>"``, naming the first
        offending stage and component), or None; see :func:`mae_verdict` for the rule."""
        return mae_verdict(self)

    @property
    def mae_compatible(self) -> bool:
        """True when sparse masked-autoencoder pretraining can drop mask units (:func:`mae_verdict`)."""
        return mae_verdict(self) is None

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
                str(s.depth), describe_entry("downsample", s.downsample),
                describe_mixers(s),
                describe_entry("feedforward", s.feedforward),
                f"{s.drop_path[0]:.3f}-{s.drop_path[-1]:.3f}",
            ])
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        fmt = "  ".join(f"{{:<{n}}}" for n in widths)
        return "\n".join([head, fmt.format(*cols), *(fmt.format(*r) for r in rows)])


def describe_entry(slot: str, entry: dict, blocks=()) -> str:
    """The short name of a resolved component ``entry`` of ``slot`` in plan and summary tables, as
    its params model describes it (``conv7/s4/p2``, ``pooling3``, ``window_attention 7x7 shift
    0/3``); ``blocks``: for a stage's token mixer, its blocks' entries."""
    return registry.get(slot, entry["kind"]).params.describe(entry, blocks)


def describe_mixers(stage: StagePlan) -> str:
    """The token mixers of a stage: the stage's own (described with the blocks that use its kind),
    then each other kind a per-block override put in, with its blocks: ``window_attention 14x14
    shift 0 + attention@2,5``."""
    kind = stage.token_mixer["kind"]
    own = [b.token_mixer for b in stage.blocks if b.token_mixer["kind"] == kind]
    text = describe_entry("token_mixer", stage.token_mixer, own)
    others: dict[str, list[int]] = {}
    for j, b in enumerate(stage.blocks):
        if b.token_mixer["kind"] != kind:
            others.setdefault(b.token_mixer["kind"], []).append(j)
    return text + "".join(f" + {k}@{','.join(map(str, js))}" for k, js in others.items())


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


def _block_overrides(stage: StageSpec, depth: int, loc: str) -> dict[int, tuple[dict, dict]]:
    """Block index -> (the values ``stage.blocks`` overrides there, the spec location that set each),
    later overrides winning. Only blocks something overrides appear."""
    out: dict[int, tuple[dict, dict]] = {}
    for j, override in enumerate(stage.blocks or ()):
        where = f"{loc}.blocks.{j}"
        for b in override.selects(depth, where):
            values, sources = out.setdefault(b, ({}, {}))
            for key in ("token_mixer", "feedforward", "norm", "drop_path"):
                value = getattr(override, key)
                if value is not None:
                    values[key], sources[key] = value, where
    return out


def _registered(slot: str, accepts: Optional[str] = None, **declared) -> str:
    """Registered names of ``slot`` that accept the layout ``accepts`` and have the ``declared``
    class values (for "use one of ..." advice; the registry, not this module, knows them)."""
    names = []
    for name in registry.names(slot):
        params = registry.get(slot, name).params
        if (accepts is None or accepts in params.accepts) and all(getattr(params, k) == v for k, v in declared.items()):
            names.append(name)
    return ", ".join(names)


def _check_layout(component: ComponentParams, layout: str, loc: str, seq_from: Optional[str] = None) -> None:
    if layout == "units" and "units" not in component.accepts and "grid" in component.accepts:
        return  # may run inside each mask unit; _in_units decides once the component is resolved
    if layout not in component.accepts:
        why = ""
        if layout == "seq" and seq_from:
            why = (f" (a flat sequence without 2-D structure since {seq_from}; only components that accept "
                   f"seq tokens can follow it; {component.slot} components that do: "
                   f"{_registered(component.slot, 'seq')})")
        raise PlanError(loc, f"{component.kind!r} works on {' or '.join(sorted(component.accepts))} tokens, "
                        f"but this stage's tokens are in the {layout!r} layout{why}")


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
    _check_bounds(spec, tuple(img_size) if img_size else spec.img_hw)  # first: the cache key is JSON
    return _resolve_cached(spec.model_dump_json(), tuple(img_size) if img_size else None)


@lru_cache(maxsize=64)
def _resolve_cached(spec_json: str, img_size: Optional[tuple[int, int]]) -> Plan:
    spec = EncoderSpec.model_validate_json(spec_json)
    return _resolve(spec, img_size or spec.img_hw)


def _check_bounds(spec: EncoderSpec, img_size: tuple[int, int]) -> None:
    """Refuse sizes no model needs before anything loops over them or allocates them: every
    integer the spec sets at most :data:`MAX_SIZE` (``seq_len``, a token count, at most its square),
    every image side too, and at most :data:`MAX_BLOCKS` blocks in all."""
    refuse_huge_ints(spec.model_dump(mode="json"))
    if max(img_size) > MAX_SIZE:
        raise PlanError("img_size", f"{img_size[0]}x{img_size[1]} pixels: sides above {MAX_SIZE} are refused")
    total = 0
    for i, stage in enumerate(spec.stages):
        total += _pick(stage, spec.defaults, "depth")
        if total > MAX_BLOCKS:
            where = f"stages.{i}.depth" if stage.depth is not None or spec.defaults.depth is None else "defaults.depth"
            raise PlanError(where, f"stages 0-{i} have {total} blocks; a plan has at most {MAX_BLOCKS}")


def _resolve(spec: EncoderSpec, img_size: tuple[int, int]) -> Plan:
    grid, chs, layout, unit = tuple(img_size), spec.in_chans, "grid", None
    total = sum(_pick(s, spec.defaults, "depth") for s in spec.stages)
    rates = [spec.drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
    stages, block, prev_mixer, seq_from, sizes_from = [], 0, None, None, None
    for i, stage in enumerate(spec.stages):
        loc = f"stages.{i}"
        dim = stage.embedding
        ds = _pick(stage, spec.defaults, "downsample")
        if ds is None:
            ds = default_downsample(i)
        if i == 0 and (ds.identity or ds.fused) and chs != dim:
            raise PlanError(f"{loc}.downsample", f"stage 0 needs a patch embedding from {chs} image channels "
                            f"to embedding {dim}; use e.g. {_STEM_ADVICE}")
        _check_layout(ds, layout, f"{loc}.downsample", seq_from)
        if ds.fixed_grid and tuple(img_size) != spec.img_hw:
            sh, sw = spec.img_hw
            raise PlanError(f"{loc}.downsample", f"{ds.kind!r} has weights sized for the token grid at the spec's "
                            f"img_size, so the model runs only on {sh}x{sw} images, not {img_size[0]}x{img_size[1]}; "
                            "resize the images, or build the model at that img_size (create_model(..., img_size=...))"
                            " and train it there")
        if ds.prepares_previous_stage:  # e.g. att0: clusters travel through the previous stage
            if not stages:
                raise PlanError(f"{loc}.downsample", f"{ds.kind!r} prepares clusters in the previous stage's blocks, "
                                "so it cannot start stage 0; use it from stage 1 on")
            stages[-1] = ds.prepare_previous_stage(stages[-1], f"stages.{i - 1}", f"{loc}.downsample")
        if ds.produces == "seq" and layout != "seq":  # e.g. HVT's 1-D pooling: no 2-D grid after it
            seq_from = f"{loc}.downsample ({ds.kind})"
        out_grid = tuple(ds.out_grid(grid, f"{loc}.downsample"))
        if min(out_grid) < 1:
            raise PlanError(f"{loc}.downsample", f"reduces the grid {grid} to {out_grid}; use a smaller stride "
                            "or a larger img_size")
        ds_resolved = ds.resolve(chs, dim, grid, f"{loc}.downsample")
        if ds.emits_token_sizes:  # merged tokens (geme, att0) carry sizes from here on
            ds_resolved = {**ds_resolved, "token_sizes_in": sizes_from is not None}
            sizes_from = f"{loc}.downsample"
        elif not ds.identity:
            sizes_from = None  # any other downsampler makes new tokens, without sizes
        q_stride = ds.first_block_q_stride() if ds.fused else None
        in_unit = unit
        if unit is not None:
            ds_resolved = _in_units("downsample", ds, ds_resolved, f"{loc}.downsample", layout, in_unit, grid)
            unit = _shrink_unit(unit, grid, out_grid, f"{loc}.downsample")
        pos = _pick(stage, spec.defaults, "pos_embed")
        # The position embedding is added right after the downsampler, before stage 0's
        # conversion to mask units, so it sees the layout the downsampler produces.
        pos_layout = ds.produces if layout == "grid" else layout
        _check_layout(pos, pos_layout, f"{loc}.pos_embed", seq_from)
        if i == 0 or ds.produces == "seq":
            layout = ds.produces
            if i == 0 and spec.mask_unit_size is not None:
                unit = _first_unit(spec.mask_unit_hw, out_grid)
                layout = "units"
        seq_len = out_grid[0] * out_grid[1]
        # seq_len is the user's statement about the spec's own img_size; at other input sizes
        # (an encoder running 224x160 after being specified at 224) it does not apply.
        if stage.seq_len is not None and stage.seq_len != seq_len and tuple(img_size) == spec.img_hw:
            raise PlanError(f"{loc}.seq_len", f"seq_len {stage.seq_len} does not match the derived "
                            f"{out_grid[0]}x{out_grid[1]} = {seq_len} tokens; use {seq_len} or leave it unset")

        mixer = _pick(stage, spec.defaults, "token_mixer")
        _check_layout(mixer, layout, f"{loc}.token_mixer", seq_from)
        ffn, norm = (_pick(stage, spec.defaults, k) for k in ("feedforward", "norm"))
        for comp, key in ((ffn, "feedforward"), (norm, "norm")):
            _check_layout(comp, layout, f"{loc}.{key}", seq_from)
        depth = _pick(stage, spec.defaults, "depth")
        per_block = _block_overrides(stage, depth, loc)
        for b, (o, where) in per_block.items():
            for key in ("token_mixer", "feedforward", "norm"):
                if o.get(key) is not None:
                    _check_layout(o[key], layout, f"{where[key]}.{key}", seq_from)
        uses_heads = mixer.uses_heads or any(o.get("token_mixer") is not None and o["token_mixer"].uses_heads
                                             for o, _ in per_block.values())
        num_heads, dim_head = _heads(loc, dim, stage, spec.defaults) if uses_heads else (None, None)
        ctx = StageContext(loc=f"{loc}.token_mixer", dim=dim, grid=out_grid, layout=layout,
                           num_heads=num_heads, dim_head=dim_head, unit_size=unit,
                           token_sizes=sizes_from is not None)
        norm_resolved = _in_units("norm", norm, norm.resolve(dim, f"{loc}.norm"), f"{loc}.norm", layout, unit,
                                  out_grid)
        blocks = []
        for b in range(depth):
            o, where = per_block.get(b, ({}, {}))
            block_mixer = o.get("token_mixer") or mixer
            mixer_loc = f"{where['token_mixer']}.token_mixer" if "token_mixer" in o else f"{loc}.token_mixer"
            bp = BlockPlan(dim_in=dim, q_stride=None, norm1=norm_resolved, token_mixer=_mixer_entry(
                block_mixer, dataclasses.replace(ctx, loc=mixer_loc, block_index=b)))
            if b == 0 and ds.fused:
                bp = _fused_first_block(ds, mixer, prev_mixer, stage, spec, loc, dim, chs, grid, in_unit, layout,
                                           q_stride, override=(o.get("token_mixer"), mixer_loc))
            update = {}
            if "norm" in o:  # both of the block's norms (its first one at its input width)
                n_loc = f"{where['norm']}.norm"
                update["norm1"] = _in_units("norm", o["norm"], o["norm"].resolve(bp.dim_in, n_loc), n_loc, layout,
                                            unit, out_grid)
                update["norm2"] = _in_units("norm", o["norm"], o["norm"].resolve(dim, n_loc), n_loc, layout, unit,
                                            out_grid)
            if "feedforward" in o:
                f_loc = f"{where['feedforward']}.feedforward"
                update["feedforward"] = _in_units("feedforward", o["feedforward"], o["feedforward"].resolve(dim, f_loc),
                                                  f_loc, layout, unit, out_grid)
            blocks.append(bp.model_copy(update=update) if update else bp)
        style = _pick(stage, spec.defaults, "residual_norm_style")
        if ds.fused and style != "pre":
            where = f"{loc}.residual_norm_style" if stage.residual_norm_style else "defaults.residual_norm_style"
            raise PlanError(where, f"{ds.kind!r} at {loc}.downsample fuses the stage transition into the first "
                            "block, which is pre-norm only (its residual is the projection of the normed input); "
                            f"use residual_norm_style: pre in {loc}, or a downsampler with its own module")
        layer_scale = _pick(stage, spec.defaults, "layer_scale")
        out_norm = _pick(stage, spec.defaults, "out_norm")
        if out_norm is not None:
            _check_layout(out_norm, layout, f"{loc}.out_norm", seq_from)
            out_norm = _in_units("norm", out_norm, out_norm.resolve(dim, f"{loc}.out_norm"), f"{loc}.out_norm",
                                 layout, unit, out_grid)
        stages.append(StagePlan(
            index=i, layout=layout, unit_size=unit, in_grid=grid, out_grid=out_grid, seq_len=seq_len, in_chs=chs,
            out_chs=dim, reduction=_reduction(img_size, out_grid, layout), depth=depth, num_heads=num_heads,
            dim_head=dim_head, residual_norm_style=style,
            layer_scale=None if layer_scale is False else float(layer_scale),
            res_scale=_pick(stage, spec.defaults, "res_scale"),
            drop_path=tuple(per_block.get(b, ({}, {}))[0].get("drop_path", rates[block + b]) for b in range(depth)),
            downsample=ds_resolved,
            pos_embed=_in_units("pos_embed", pos, pos.resolve(StageContext(
                f"{loc}.pos_embed", dim, out_grid, pos_layout, unit_size=unit)), f"{loc}.pos_embed", pos_layout,
                unit, out_grid),
            token_mixer=_mixer_entry(mixer, ctx),
            feedforward=_in_units("feedforward", ffn, ffn.resolve(dim, f"{loc}.feedforward"), f"{loc}.feedforward",
                                  layout, unit, out_grid),
            norm=norm_resolved,
            blocks=tuple(blocks),
            out_norm=out_norm,
        ))
        block += depth
        grid, chs, prev_mixer = out_grid, dim, mixer

    plan = Plan(
        name=spec.name, img_size=tuple(img_size), in_chans=spec.in_chans, num_classes=spec.num_classes,
        global_pool=spec.global_pool, drop_rate=spec.drop_rate,
        head_norm=spec.head_norm.resolve(chs, "head_norm"), head_norm_first=spec.head_norm_first,
        # token_sizes: the final tokens carry sizes (an average pool weights them by size)
        head={**spec.head.resolve(chs), **({"token_sizes": True} if sizes_from else {})},
        attn_backend=spec.attn_backend, mask_unit_size=spec.mask_unit_hw, num_features=chs, stages=tuple(stages),
    )
    _check_group_sizes(plan)
    return plan


def _check_group_sizes(plan: Plan) -> None:
    """A group norm normalises each group of ``dim / num_groups`` channels x positions values of a
    sample; a group of one value comes out as the norm's bias alone (torch refuses it in training
    at batch size 1). Refuse that wherever a norm sees a single position: a 1x1 grid, the pooled
    vector (the final norm after pooling, the MLP head's norm)."""
    def check(entry, positions, loc):
        if entry and entry.get("num_groups") and entry["dim"] // entry["num_groups"] * positions < 2:
            raise PlanError(f"{loc}.num_groups", f"num_groups {entry['num_groups']} splits the {entry['dim']} "
                            f"channels into groups of one value at {positions} position(s), which normalise to "
                            f"zero; use fewer groups (1 = one group)")

    for s in plan.stages:
        loc, cells_in, cells_out = f"stages.{s.index}", s.in_grid[0] * s.in_grid[1], s.out_grid[0] * s.out_grid[1]
        check(s.norm, cells_out, f"{loc}.norm")
        for b in s.blocks:
            check(b.norm1, cells_in if b.q_stride else cells_out, f"{loc}.norm")
            check(b.norm2, cells_out, f"{loc}.norm")
        check(s.out_norm, cells_out, f"{loc}.out_norm")
        ds_norm = s.downsample.get("norm")
        check(ds_norm, cells_in if s.downsample.get("pre_norm") else cells_out, f"{loc}.downsample.norm")
    last = plan.stages[-1].out_grid
    check(plan.head_norm, last[0] * last[1] if plan.head_norm_first else 1, "head_norm")
    if plan.num_classes > 0:
        check(plan.head.get("norm"), 1, "head.norm")


def _reduction(img_size: tuple[int, int], grid: tuple[int, int], layout: str) -> int:
    """Pixels per token along an axis; for a ``seq`` stage (no 2-D grid; its plan grid is
    ``(N, 1)``) the side of the square image area per token, ``round(sqrt(H * W / N))``."""
    if layout == "seq":
        return max(1, round(math.sqrt(img_size[0] * img_size[1] / (grid[0] * grid[1]))))
    return img_size[0] // grid[0]


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
        if m < 1 or n % m:  # not a whole-stride reduction of this axis (e.g. a 1-D pooling to a sequence)
            raise PlanError(loc, f"maps the token grid {grid[0]}x{grid[1]} to {out_grid[0]}x{out_grid[1]}, which "
                            f"does not shrink each mask unit by a whole stride; use a grid downsampler here")
        stride = n // m
        if u % stride:
            raise PlanError(loc, f"stride {stride} does not divide the mask unit's {u} tokens; units would "
                            f"straddle; use a stride dividing {u}")
        new.append(u // stride)
    return tuple(new)


def _fused_first_block(ds, mixer, prev_mixer, stage, spec, loc, dim, dim_in, grid, in_unit, layout, q_stride,
                       override=(None, None)):
    """Hiera's stage-transition block: queries (and residual) pooled by q_stride, dim_in -> dim,
    and, with lag_mixer, the previous stage's token mixer; a per-block override of block 0's
    mixer (``override``: component, location) takes precedence over both."""
    if prev_mixer is None:
        raise PlanError(f"{loc}.downsample", f"{ds.kind!r} pools inside the first block, so it needs a previous "
                        f"stage; stage 0 needs a patch embedding such as {_STEM_ADVICE}")
    if override[0] is not None:
        use, where = override
    elif ds.first_block_lags_mixer():
        use, where = prev_mixer, f"stages.{int(loc.split('.')[1]) - 1}.token_mixer"
    else:
        use, where = mixer, f"{loc}.token_mixer"
    if not use.supports_q_stride:
        raise PlanError(f"{loc}.downsample", f"{ds.kind!r} needs its first block's token mixer ({use.kind!r} from "
                        f"{where}) to pool queries; use one that can there: "
                        f"{_registered('token_mixer', layout, supports_q_stride=True)}")
    _check_layout(use, layout, where)
    num_heads, dim_head = _heads(loc, dim, stage, spec.defaults)
    ctx = StageContext(loc=where, dim=dim, grid=grid, layout=layout, num_heads=num_heads, dim_head=dim_head,
                       unit_size=in_unit, dim_in=dim_in, q_stride=q_stride)
    norm1 = _pick(stage, spec.defaults, "norm").resolve(dim_in, f"{loc}.norm")
    return BlockPlan(dim_in=dim_in, q_stride=q_stride, norm1=norm1, token_mixer=use.resolve(ctx),
                     expand=ds.first_block_expand())


# ------------------------------------------------------------------------ mask units and MAE
#
# The rule (Hiera, arXiv 2306.00989: sparse MAE keeps a subset of the mask units): the sparse
# encoder deletes the masked mask units after stage 0's patch embedding and runs every later
# component on the kept units only. That is exact -- each kept token is a function of the
# visible image alone, whichever units were dropped -- when every component from the units
# onward is one of:
#
# 1. token-wise: norms over channels (layernorm), MLPs, identity, no downsampling;
# 2. unit-local: it reads only tokens of the same mask unit -- mask-unit attention, window
#    attention whose (unshifted) windows tile the unit, q-pooling and non-overlapping strided
#    ops (conv with patch_size = stride and no padding, patch merging) whose stride divides the
#    unit (the plan already refuses strides that do not divide it);
# 3. a set operation over all kept tokens without positional terms: global attention. Dropped
#    units are simply absent from the set; this is ViT-MAE's encoder and Hiera's stages 3-4,
#    and it is exact at any stage (attending globally early costs more, but is not wrong).
#
# Everything else mixes a kept token with its spatial neighbours in other units, whose values
# the sparse encoder does not have: overlapping convolutions and poolings after stage 0 (3x3
# conv downsampling, PoolFormer pooling, ConvFormer's depthwise conv), Swin's shifted windows and
# windows larger than the unit, statistics over the whole map (groupnorm), position embeddings
# laid on the full grid after stage 0, 1-D pooling over the flattened sequence (HVT), and rotary
# embeddings, whose positions are indices in the flattened sequence and shift when units drop.
# Stage 0's patch embedding acts on pixels before units exist: an overlapping kernel there is
# fine because the sparse forward zeroes the masked pixels first (Hiera's do_masked_conv).

def _mixer_entry(mixer: ComponentParams, ctx: StageContext) -> dict:
    """A block's token mixer entry: resolved on the stage grid, or, for a grid mixer in the units
    layout that stays inside units, resolved on one unit as its grid (``per_unit``)."""
    full = mixer.resolve(ctx)
    if ctx.layout != "units" or "units" in mixer.accepts:
        return full
    one_unit = mixer.resolve(dataclasses.replace(ctx, grid=tuple(ctx.unit_size), layout="grid"))
    return _in_units("token_mixer", mixer, full, ctx.loc, ctx.layout, ctx.unit_size, ctx.grid, one_unit)


def _in_units(slot: str, component: ComponentParams, entry: dict, loc: str, layout: str,
              unit: Optional[tuple[int, int]], grid: tuple[int, int], unit_entry: Optional[dict] = None) -> dict:
    """A component in the ``units`` layout: its entry as resolved when it accepts units; for a
    grid component that reads only tokens of its own mask unit (:func:`crosses_units`), the entry
    with ``per_unit: True`` (the builder runs it on each unit as a separate grid, which gives the
    same result as on the whole grid); otherwise a :class:`PlanError` saying why not."""
    if layout != "units" or "units" in component.accepts:
        return entry
    reason = crosses_units(slot, entry, unit, grid)
    if reason is not None:
        raise PlanError(loc, f"{component.kind!r} works on {' or '.join(sorted(component.accepts))} tokens, but "
                        f"this stage's tokens are in the 'units' layout (mask units of {unit[0]}x{unit[1]}), and "
                        f"it cannot run inside each unit: {reason}")
    return {**(entry if unit_entry is None else unit_entry), "per_unit": True}


def crosses_units(slot: str, entry: dict, unit: Optional[tuple[int, int]] = None,
                  grid: Optional[tuple[int, int]] = None) -> Optional[str]:
    """Why the resolved component ``entry`` of ``slot`` would mix tokens across mask-unit borders
    (or use positions that dropping units changes), or None when it is token-wise, unit-local or
    a position-free set operation (the rule above :func:`_mixer_entry`). Its params model answers
    (``crosses_units``, see :mod:`hfactory.spec.protocol`), and so do the components nested in
    it (a downsampler's own norm runs on the same tokens, so it must stay in units too). ``unit``
    and ``grid`` (tokens) enable the checks that depend on the unit size."""
    params = registry.get(slot, entry["kind"]).params
    for key, nested_slot in params.nested.items():
        nested = entry.get(key)
        if isinstance(nested, dict) and "kind" in nested:
            reason = crosses_units(nested_slot, nested, unit, grid)
            if reason is not None:
                return f"its {key}: {reason}"
    return params.crosses_units(entry, unit, grid)


def mae_verdict(plan: Plan) -> Optional[str]:
    """Can sparse MAE pretraining drop masked units of ``plan``'s tokens? None when it can, else
    ``"<spec location>: <reason>"`` naming the first offending stage and component.

    The rule (comment above :func:`_mixer_entry`): from stage 0's mask units on, every component
    must be token-wise, unit-local, or global attention without rotary positions; stage 0's
    downsampler and position embedding run before the units exist (masked pixels are zeroed
    before the patch embedding). A plan without ``mask_unit_size`` is incompatible (there are no
    units to drop); its verdict names the first component that would cross units if there were,
    else the missing ``mask_unit_size``.
    """
    for s in plan.stages:
        loc = f"stages.{s.index}"
        unit = s.unit_size if s.layout == "units" else None
        grid = s.out_grid
        checks = [] if s.index == 0 else [("downsample", s.downsample, f"{loc}.downsample", ""),
                                         ("pos_embed", s.pos_embed, f"{loc}.pos_embed", "")]
        for j, b in enumerate(s.blocks):
            block = f"(block {j}) " if s.depth > 1 else ""  # in the message: the location stays a spec path
            checks += [("norm", b.norm1, f"{loc}.norm", ""),
                       ("token_mixer", b.token_mixer, f"{loc}.token_mixer", block)]
            checks += [(slot, entry, f"{loc}.{slot}", block) for slot, entry in
                       (("feedforward", b.feedforward), ("norm", b.norm2)) if entry is not None]
        checks += [("feedforward", s.feedforward, f"{loc}.feedforward", ""), ("norm", s.norm, f"{loc}.norm", "")]
        if s.out_norm is not None:
            checks.append(("norm", s.out_norm, f"{loc}.out_norm", ""))
        for slot, entry, where, block in checks:
            if entry.get("per_unit"):
                continue  # resolve() checked it on the whole grid before cutting it to one unit
            reason = crosses_units(slot, entry, unit, grid if unit is not None else None)
            if reason is not None:
                return f"{where}: {block}{entry['kind']} -- {reason}"
    if plan.mask_unit_size is None:
        return ("mask_unit_size: not set, so the tokens are never cut into mask units that MAE could drop; set "
                "mask_unit_size (e.g. 8 tokens = 32x32 pixels at patch stride 4)")
    return None
