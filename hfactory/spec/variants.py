"""Variants of a spec: overrides by path, scaling rules, and the lineage every variant records.

Overrides address spec fields by dotted path (``stages.2.depth``, ``stages.*.token_mixer.kind``,
``defaults.norm.eps``, ``drop_path_rate``); ``*`` addresses every stage. A path is checked
against the spec's models (not only against what the YAML happens to spell out), so a typo or an
index out of range fails with the path and the valid keys; the changed spec is then validated
(located pydantic errors) and planned (:class:`PlanError`) exactly like a hand-written one.

Scaling rules derive a family from one spec by per-stage depth and width multipliers, with widths
rounded to a multiple of the head dimension (or a given divisor), as the named sizes of MetaFormer
(S/M/B), Swin (T/S/B/L) and Hiera (T/S/B/B+/L/H) relate to each other, and by the number of
pooling stages of a constant-width token-pooling ViT (HVT's "more pooling stages" table:
HVT-S-0 ... HVT-S-4, arXiv 2103.10619).

No torch here.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal, Mapping, Optional, Union

from pydantic import Field

from ..errors import OverrideError, UsageError
from .base import StrictModel
from .model import EncoderSpec, Lineage
from .overrides import record_step

__all__ = ["with_changes", "scale", "replay_lineage", "ScalingRule", "Lineage", "OverrideError", "parse_assignment",
           "pooling_split"]

#: Fields holding a component, by the slot they are looked up in.
def with_changes(spec: EncoderSpec, changes: Mapping[str, Any], *, record: bool = True) -> EncoderSpec:
    """A copy of ``spec`` with the values at the given dotted paths replaced (the same as
    :meth:`EncoderSpec.with_changes`, which documents the arguments and errors)."""
    return spec.with_changes(changes, record=record)


def replay_lineage(spec: EncoderSpec, base: Optional[EncoderSpec] = None) -> EncoderSpec:
    """Rebuild ``spec`` from its lineage: the base (default: the preset named ``lineage.base``)
    with the recorded steps applied in order. The result equals ``spec``, name included
    (``scale(..., name=...)`` and sweep variants record their names as steps), which a test
    checks for chains of changes, rules and renames.

    Raises:
        ValueError: ``spec`` has no lineage, or no ``base`` is given and ``lineage.base`` is not a
            preset name.
    """
    if spec.lineage is None:
        raise UsageError(f"{spec.name or 'this spec'} has no lineage (it was not derived with with_changes/scale)")
    if base is None:
        from ..presets import list_models, load_preset

        if spec.lineage.base not in list_models():
            raise UsageError(f"lineage.base {spec.lineage.base!r} is not a preset; pass the base spec")
        base = load_preset(spec.lineage.base)
    out = base
    for step in spec.lineage.steps:
        out = with_changes(out, step.changes) if step.changes is not None else scale(out, step.rule)
    return out


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"stages.2.depth=9"`` -> ``("stages.2.depth", 9)``; the value is parsed as YAML (safely),
    so ``true``, ``[7, 7]`` and ``{kind: pooling}`` work, and number-like strings (``1e-5``)
    become floats.

    Raises:
        ValueError: no ``=`` in ``text``, or a value that is not valid YAML.
    """
    from .io import load_yaml

    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise UsageError(f"{text!r}: expected PATH=VALUE, e.g. stages.2.depth=9")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except ValueError as err:
        raise UsageError(f"--set {path.strip()}: value {raw!r} is not valid YAML ({_yaml_reason(err)}); "
                         "e.g. 9, 0.2, true, [7, 7] or {kind: pooling}") from None
    if isinstance(value, str):
        # YAML 1.1 reads 1e-5 (no dot) as a string; on a command line it means a number.
        try:
            value = float(value)
        except ValueError:
            pass
    return path.strip(), value


def _yaml_reason(err: Exception) -> str:
    """The first line of a YAML error from :func:`~hfactory.spec.io.load_yaml`, for a message
    about a command-line value (where "spec YAML" would mislead)."""
    return str(err).splitlines()[0].removeprefix("invalid spec YAML: ")


class ScalingRule(StrictModel):
    """Derive a size of a family from a base spec.

    ``depth_multiplier`` and ``width_multiplier`` are one number or one per stage; depths round
    to the nearest integer (at least 1); widths round to the nearest multiple of
    ``width_divisor`` (default: the stage's head dimension with ``heads: keep_dim_head``, else 8);
    halves round up everywhere (4.5 blocks -> 5).
    ``heads``: ``keep_dim_head`` (heads follow the width: MetaFormer, Swin) or ``keep_num_heads``
    (the head count stays, times ``head_multiplier``: Hiera's B+/L/H).

    ``pooling_stages`` (after the multipliers) re-splits the blocks of a constant-width spec the
    way HVT places its pooling (MonashAI/HVT ``models.py``: pool after block ``i`` when
    ``i % pool_block_width == 0``, block 0 included): with ``T`` blocks and ``n`` poolings,
    ``w = ceil(T / n)`` and the stages are ``[1] + [w] * (n - 1) + [T - 1 - w * (n - 1)]``, each
    pooled stage opening with the pooling downsampler and a new position embedding (HVT-S-2:
    ``[1, 6, 5]``); ``0`` gives one stage of ``T`` blocks (HVT-S-0). The pooled stages copy the
    base's stage 1 (``seq_len`` dropped: the plan recomputes it), or, when the base has a single
    stage, get ``pooling`` as downsampler (default HVT's ``max_pool_1d``, kernel 3, stride 2) and
    a ``learned_1d`` position embedding; ``pooling`` also replaces a copied stage's downsampler.
    """

    depth_multiplier: Union[float, list[float]] = Field(1.0, description="per-stage or global")
    width_multiplier: Union[float, list[float]] = Field(1.0, description="per-stage or global")
    width_divisor: Optional[int] = Field(None, ge=1)
    heads: Literal["keep_dim_head", "keep_num_heads"] = "keep_dim_head"
    head_multiplier: float = Field(1.0, gt=0)
    pooling_stages: Optional[int] = Field(None, ge=0, description="HVT: number of token-pooling stages")
    pooling: Optional[dict[str, Any]] = Field(None, description="downsampler of the pooled stages "
                                               "(default: the base's, else max_pool_1d k3 s2)")

    def per_stage(self, value, n: int, field: str) -> list[float]:
        values = value if isinstance(value, list) else [value] * n
        if len(values) != n:
            raise OverrideError(field, f"{len(values)} values for {n} stages; give one number or one per stage")
        if any(v <= 0 for v in values):
            raise OverrideError(field, "multipliers must be > 0")
        return [float(v) for v in values]


def scale(spec: EncoderSpec, rule: Union[ScalingRule, Mapping[str, Any]], name: Optional[str] = None) -> EncoderSpec:
    """Apply a :class:`ScalingRule` to ``spec`` and return the new spec (lineage recorded).

    Each stage gets explicit ``embedding``, ``depth`` and, where its mixer uses heads,
    ``num_heads``.

    Raises:
        OverrideError: multipliers of the wrong length or <= 0, a width that rounds to 0, heads
            that no longer divide the width (the path and the numbers are named).
        PlanError: the scaled spec does not plan.
    """
    from ..plan import resolve

    rule = rule if isinstance(rule, ScalingRule) else ScalingRule.model_validate(rule)
    plan = resolve(spec)
    n = len(spec.stages)
    depth_m = rule.per_stage(rule.depth_multiplier, n, "depth_multiplier")
    width_m = rule.per_stage(rule.width_multiplier, n, "width_multiplier")
    data = spec.model_dump(mode="json", exclude_none=True)
    for i, (stage, sp) in enumerate(zip(data["stages"], plan.stages)):
        stage["depth"] = max(1, _round_half_up(sp.depth * depth_m[i]))
        if sp.num_heads is not None and rule.heads == "keep_num_heads":
            heads = max(1, _round_half_up(sp.num_heads * rule.head_multiplier))
            divisor = rule.width_divisor or heads
        else:
            heads = None
            divisor = rule.width_divisor or sp.dim_head or 8
        width = _round_half_up(sp.out_chs * width_m[i] / divisor) * divisor
        if width < 1:
            raise OverrideError(f"stages.{i}.embedding", f"{sp.out_chs} x {width_m[i]} rounds to 0 at a multiple of "
                                f"{divisor}; use a larger width_multiplier or a smaller width_divisor")
        stage["embedding"] = width
        if sp.num_heads is not None:
            if heads is None:
                if width % sp.dim_head:
                    raise OverrideError(f"stages.{i}.embedding", f"width {width} is not a multiple of the head "
                                        f"dimension {sp.dim_head}; set width_divisor to {sp.dim_head}")
                heads = width // sp.dim_head
            if width % heads:
                raise OverrideError(f"stages.{i}.num_heads", f"{heads} heads do not divide width {width}; "
                                    f"set width_divisor to a multiple of {heads}")
            stage["num_heads"] = heads
            stage.pop("dim_head", None)
    if rule.pooling_stages is not None:
        data["stages"] = _pooled_stages(data["stages"], rule.pooling_stages, rule.pooling)
    elif rule.pooling is not None:
        raise OverrideError("pooling", "is the downsampler of the stages that pooling_stages makes; set "
                            "pooling_stages too (or change stages.*.downsample with with_changes)")
    record_step(data, spec, {"rule": rule.model_dump(mode="json", exclude_defaults=True)})
    if name is not None:  # recorded as a step, so replay_lineage gives the same name
        data["name"] = name
        record_step(data, spec, {"changes": {"name": name}})
    scaled = EncoderSpec.model_validate(data)
    resolve(scaled)
    return scaled


def _round_half_up(x: float) -> int:
    """Nearest integer, halves up (Python's ``round`` sends halves to the even neighbour, which
    would scale 96 x 2.5 to 192 at divisor 32 while 192 x 2.5 goes to 480: an uneven family)."""
    return math.floor(x + 0.5)


#: HVT's token pooling (MonashAI/HVT ``models.py``): ``nn.MaxPool1d(3, stride=2)`` then a new
#: learned position embedding of the pooled length.
_HVT_POOLING = {"kind": "max_pool_1d", "kernel_size": 3, "stride": 2}


def pooling_split(total: int, n: int) -> list[int]:
    """Stage depths for ``n`` HVT poolings over ``total`` blocks (see :class:`ScalingRule`):
    ``pooling_split(12, 3) == [1, 4, 4, 3]`` (pools after blocks 0, 4, 8).

    Raises:
        OverrideError: no pooling width ``w`` gives ``n`` poolings with at least one block after
            the last one (the achievable counts are named).
    """
    if n == 0:
        return [total]

    def split(w: int) -> Optional[list[int]]:
        pools = -(-total // w)  # blocks 0, w, 2w, ... below total
        last = total - 1 - w * (pools - 1)
        return [1] + [w] * (pools - 1) + [last] if last >= 1 else None

    # The smallest width giving n poolings is HVT's choice (12 blocks: 1 -> 12, 2 -> 6, 3 -> 4, 4 -> 3).
    for w in range(-(-total // n), total + 1):
        depths = split(w)
        if depths is not None and len(depths) - 1 == n:
            return depths
        if -(-total // w) < n:
            break
    valid = sorted({0} | {len(d) - 1 for d in map(split, range(1, total + 1)) if d})
    raise OverrideError("pooling_stages", f"{n} poolings cannot be placed every w blocks from block 0 over "
                        f"{total} blocks with a block after the last pooling; achievable: "
                        f"{', '.join(map(str, valid))}")


def _pooled_stages(stages: list[dict], n: int, pooling: Optional[dict]) -> list[dict]:
    """The stage list of :class:`ScalingRule`'s ``pooling_stages`` (stage dicts as dumped)."""
    widths = [s["embedding"] for s in stages]
    if len(set(widths)) != 1:
        raise OverrideError("pooling_stages", f"re-splits the blocks of a constant-width spec (HVT, a ViT); "
                            f"the stages have widths {widths}")
    depths = pooling_split(sum(s["depth"] for s in stages), n)
    if len(stages) > 1:
        template = {k: v for k, v in stages[1].items() if k != "seq_len"}
    else:
        template = {"embedding": widths[0], "downsample": _HVT_POOLING, "pos_embed": {"kind": "learned_1d"}}
        template.update({k: stages[0][k] for k in ("num_heads", "dim_head") if k in stages[0]})
    if pooling is not None:
        template["downsample"] = pooling
    return [{**stages[0], "depth": depths[0]}] + [{**copy.deepcopy(template), "depth": d} for d in depths[1:]]
