"""``hfactory sweep``: many variants of one spec, measured from the plan on the meta device.

A grid maps keys to value lists; every combination is a variant. Keys are spec paths (as
:func:`hfactory.spec.variants.with_changes` takes them, ``*`` for every stage) or the scaling
rule's shorthands ``depth_scale``, ``embedding_scale`` and ``pooling_stages`` (:class:`ScalingRule`'s
``depth_multiplier``, ``width_multiplier`` and ``pooling_stages``); the rule is applied first, then
the paths.

Per-stage numbers (parameters, GMACs, activation memory; definitions in :mod:`hfactory.summary`)
are cached by the stage's resolved plan and input shape, so a sweep that changes one stage
measures only that stage again: 100 MetaFormer variants take seconds.

:func:`bench_rows` adds a rough CPU speed per variant and :func:`plot_sweep` draws the variants
(parameters against GMACs, the Pareto front of :func:`pareto_front`) with matplotlib.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .errors import OverrideError, UsageError
from .plan import Plan, resolve
from .spec.io import dump_spec, load_yaml
from .spec.model import EncoderSpec
from .spec.variants import _yaml_reason, scale

__all__ = ["expand_grid", "sweep", "parse_grid", "format_sweep", "RULE_KEYS", "pareto_front", "bench_rows",
           "plot_sweep", "PLOT_FORMATS"]

RULE_KEYS = {"depth_scale": "depth_multiplier", "embedding_scale": "width_multiplier",
             "pooling_stages": "pooling_stages"}


def parse_grid(text: str) -> tuple[str, list]:
    """``"stages.2.depth=6,9,12"`` -> ``("stages.2.depth", [6, 9, 12])``; values are YAML, so
    ``window_size=[7,7],[8,8]`` gives two lists.

    Raises:
        UsageError (a ValueError): no ``=``, values that are not YAML, or no values.
    """
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise UsageError(f"--grid {text!r}: expected PATH=V1,V2,..., e.g. stages.2.depth=6,9,12")
    try:
        values = load_yaml(f"[{raw}]") if raw.strip() else []
    except ValueError as err:
        raise UsageError(f"--grid {path.strip()}: values {raw!r} are not a comma-separated list of YAML values "
                         f"({_yaml_reason(err)}); e.g. {path.strip()}=6,9,12 or window_size=[7,7],[8,8]") from None
    if not values:
        raise UsageError(f"--grid {path.strip()}: no values; give at least one, e.g. {path.strip()}=1,2")
    return path.strip(), [float(v) if isinstance(v, str) and _number(v) else v for v in values]


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _slug(value: Any) -> str:
    """A file-name-safe spelling of a grid value: ``[7, 7]`` -> ``7_7``, ``-1`` -> ``-1``."""
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", str(value)).strip("_") or "x"


def _key_slug(key: str) -> str:
    """``stages.2.depth`` -> ``s2.depth``; ``stages.*.x`` -> ``sall.x``; other keys unchanged."""
    return re.sub(r"^stages\.(\d+|\*)\.", lambda m: f"s{'all' if m.group(1) == '*' else m.group(1)}.", key)


def expand_grid(spec: EncoderSpec, grid: Mapping[str, list]) -> list[tuple[str, EncoderSpec]]:
    """Every combination of ``grid`` applied to ``spec``: ``[(variant name, spec)]``.

    Raises:
        OverrideError / pydantic.ValidationError / PlanError: a key or value that does not apply,
            named as for a single override.
    """
    for key, values in grid.items():
        if not values:
            raise OverrideError(key, "no values in the grid; give at least one")
    keys = list(grid)
    base = spec.name or "variant"
    out, taken = [], set()
    for combo in itertools.product(*(grid[k] for k in keys)):
        rule = {RULE_KEYS[k]: v for k, v in zip(keys, combo) if k in RULE_KEYS}
        paths = {k: v for k, v in zip(keys, combo) if k not in RULE_KEYS}
        name = "-".join([base] + [f"{_key_slug(k)}{_slug(v)}" for k, v in zip(keys, combo)])
        if name in taken:  # values that spell alike (e.g. "a b" and "a_b"): keep every variant's file
            name = next(f"{name}-{k}" for k in itertools.count(2) if f"{name}-{k}" not in taken)
        taken.add(name)
        variant = scale(spec, rule) if rule else spec
        variant = variant.with_changes({**paths, "name": name})  # the rename is a recorded step too
        resolve(variant)
        out.append((name, variant))
    return out


def _couples_stages(plan: Plan) -> bool:
    """Whether a stage depends on more than the previous stage's tokens, so stages cannot be
    measured one by one: att0's clusters ride from one stage into the next (``carry``), and
    token sizes of geme/att0 reach later attention layers and the head."""
    def sized(entry) -> bool:
        return isinstance(entry, dict) and bool(entry.get("token_sizes") or entry.get("token_sizes_in"))

    return bool(plan.head.get("token_sizes")) or any(
        s.carry is not None or sized(s.downsample) or sized(s.token_mixer)
        or any(sized(b.token_mixer) for b in s.blocks) for s in plan.stages)


def _stage_input(plan: Plan, i: int, batch: int) -> Optional[torch.Tensor]:
    """The meta tensor stage ``i`` receives (channels-last), from the plan; None if unknown."""
    if i == 0:
        return torch.empty(batch, *plan.img_size, plan.in_chans, device="meta")
    prev = plan.stages[i - 1]
    if prev.layout == "grid":
        return torch.empty(batch, *prev.out_grid, prev.out_chs, device="meta")
    if prev.layout == "units" and prev.unit_size:
        (h, w), (uh, uw) = prev.out_grid, prev.unit_size
        return torch.empty(batch, (h // uh) * (w // uw), uh, uw, prev.out_chs, device="meta")
    return None


class _Head(torch.nn.Module):
    """The encoder after its stages: final map (grid or units) -> logits."""

    def __init__(self, model, last: int, image_hw):
        super().__init__()
        self.model, self.last, self.image_hw = model, last, image_hw

    def forward(self, x):
        x = self.model._as_grid(x, self.last, self.image_hw)
        if self.model.spec.head_norm_first:
            x = self.model.norm(x)
        return self.model.forward_head(x.permute(0, 3, 1, 2))


def sweep(spec: EncoderSpec, grid: Mapping[str, list], batch: int = 1) -> list[dict]:
    """Measure every variant of ``grid`` (see :func:`expand_grid`): one row per variant with
    ``name``, ``params``, ``gmacs``, ``activation_bytes`` (for ``batch`` images) and ``tokens``
    per stage, and the variant's ``spec``. Stages are measured one by one on the meta device and
    cached, so variants sharing a stage share its cost; the sums equal :func:`summarize` of each
    whole variant (a test checks presets of every family).

    Raises:
        UsageError (a ValueError): ``batch`` < 1; a bad grid (see :func:`expand_grid`).
        OverrideError / pydantic.ValidationError / PlanError: a variant that is not a valid spec.
    """
    from .encoder import HierarchicalEncoder
    from .summary import check_batch, count_macs, saved_activation_bytes, summarize

    check_batch(batch)

    cache: dict[str, tuple[int, int, int]] = {}
    rows = []
    for name, variant in expand_grid(spec, grid):
        plan = resolve(variant)
        with torch.device("meta"):
            model = HierarchicalEncoder(variant, plan)
        numbers, fallback = [], _couples_stages(plan)
        fused = plan.attn_backend != "math"
        for i, (sp, stage) in enumerate(zip(plan.stages, model.stages)):
            if fallback:
                break
            x1, xb = _stage_input(plan, i, 1), _stage_input(plan, i, batch)
            if x1 is None:
                fallback = True
                break
            key = f"{sp.model_dump_json()}|{tuple(x1.shape)}|{batch}|{fused}"
            if key not in cache:
                # after stage 0 the input requires grad, as in training: weight-free first ops
                # (HVT's 1-D max pooling) save their input for backward only then
                cache[key] = (sum(p.numel() for p in stage.parameters()), count_macs(stage, x1)["total"],
                              saved_activation_bytes(stage, xb.requires_grad_(i > 0), fused_attention=fused)["total"])
            numbers.append(cache[key])
        if fallback:  # a layout the sweep cannot feed stage by stage: measure the whole model
            summary = summarize(variant, batch=batch)
            params, gmacs, act = (summary["total"][k] for k in ("params", "gmacs", "activation_bytes"))
        else:
            last = len(plan.stages) - 1
            h, w = plan.img_size
            head_key = f"head|{plan.model_dump_json(include={'num_features', 'num_classes', 'head', 'head_norm'})}|" \
                       f"{plan.head_norm_first}|{plan.stages[last].out_grid}|{batch}"
            if head_key not in cache:
                head = _Head(model, last, (h, w))
                x1, xb = _stage_input_after(plan, 1), _stage_input_after(plan, batch)
                own = sum(p.numel() for p in model.parameters()) - sum(p.numel() for s in model.stages
                                                                       for p in s.parameters())
                cache[head_key] = (own, count_macs(head, x1)["total"],
                                   saved_activation_bytes(head, xb.requires_grad_(), fused_attention=fused)["total"])
            numbers.append(cache[head_key])
            params, macs, act = (sum(n[j] for n in numbers) for j in range(3))
            gmacs = macs / 1e9
        rows.append({"name": name, "params": params, "gmacs": gmacs, "activation_bytes": act,
                     "tokens": [s.seq_len for s in plan.stages], "spec": variant})
    return rows


def _stage_input_after(plan: Plan, batch: int) -> torch.Tensor:
    """The final stage's output, as the head receives it."""
    last = plan.stages[-1]
    if last.layout == "units" and last.unit_size:
        (h, w), (uh, uw) = last.out_grid, last.unit_size
        return torch.empty(batch, (h // uh) * (w // uw), uh, uw, last.out_chs, device="meta")
    if last.layout == "seq":  # (B, N, C) tokens; the plan records their grid as (N, 1)
        return torch.empty(batch, last.out_grid[0] * last.out_grid[1], last.out_chs, device="meta")
    return torch.empty(batch, *last.out_grid, last.out_chs, device="meta")


def format_sweep(rows: list[dict]) -> str:
    """The rows as a text table (with an images/s column when :func:`bench_rows` timed them)."""
    from .summary import _bytes

    cols = ["name", "params", "GMACs", "activations", "tokens per stage"]
    body = [[r["name"], f"{r['params'] / 1e6:.2f}M", f"{r['gmacs']:.3f}" if r["gmacs"] is not None else "-",
             _bytes(r["activation_bytes"]), "/".join(map(str, r["tokens"]))] for r in rows]
    if rows and all("images_per_s" in r for r in rows):  # bench_rows measured them
        cols.append("images/s")
        for b, r in zip(body, rows):
            b.append(f"{r['images_per_s']:.1f}")
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{n}}}" for n in widths)
    return "\n".join([fmt.format(*cols), *(fmt.format(*b) for b in body)])


def write_variants(rows: list[dict], out: Path) -> list[Path]:
    """Write each variant's YAML (with its lineage) into ``out``; returns the paths."""
    from .atomic import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in rows:
        path = out / f"{r['name']}.yaml"
        with atomic_path(path) as tmp:
            tmp.write_text(dump_spec(r["spec"]), encoding="utf-8")
        paths.append(path)
    return paths


#: Suffixes :func:`plot_sweep` writes.
PLOT_FORMATS = (".svg", ".png", ".pdf")


def pareto_front(points, minimize=(True, True)) -> list[int]:
    """Indices (ascending) of the points no other point dominates. Point ``a`` dominates ``b``
    when it is at least as good on every coordinate and strictly better on one; "good" is
    smaller where ``minimize[k]`` is True, larger where False. Equal points do not dominate
    each other, so duplicates on the front are all kept.

    Args:
        points: a sequence of equal-length coordinate tuples (e.g. ``(params, gmacs)``).
        minimize: per coordinate, whether smaller is better.

    Raises:
        UsageError: a point whose length differs from ``minimize``'s.
    """
    sign = [1 if m else -1 for m in minimize]
    keyed = []
    for i, p in enumerate(points):
        if len(p) != len(sign):
            raise UsageError(f"pareto_front: point {i} has {len(p)} coordinates; minimize has {len(sign)}")
        keyed.append(tuple(s * v for s, v in zip(sign, p)))

    def dominates(a, b) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return [i for i, p in enumerate(keyed) if not any(dominates(q, p) for q in keyed)]


def bench_rows(rows: list[dict], repeats: int = 3) -> list[dict]:
    """Add ``images_per_s`` to each sweep row: the variant built on the CPU (random weights, eval
    mode, no grad) runs one warm-up forward and ``repeats`` timed forwards of one image at its
    ``img_size``; the speed is 1 / the fastest time (the least disturbed by other work on the
    machine). A rough, unpaired figure for comparing the variants of one sweep on one machine
    (paired benchmarks: ``hfactory bench``).

    Raises:
        UsageError: ``repeats`` < 1.
    """
    import time

    from .encoder import build_encoder

    if repeats < 1:
        raise UsageError(f"repeats {repeats}: give at least 1")
    out = []
    for r in rows:
        model = build_encoder(r["spec"]).eval()
        plan = resolve(r["spec"])
        x = torch.randn(1, plan.in_chans, *plan.img_size)
        times = []
        with torch.inference_mode():
            model(x)
            for _ in range(repeats):
                t = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t)
        out.append({**r, "images_per_s": 1.0 / min(times)})
        del model
    return out


def plot_sweep(rows: list[dict], path) -> Path:
    """Plot the sweep's variants and write the figure to ``path`` (suffix .svg, .png or .pdf).

    x: parameters (millions); y: GMACs per image. Points on the Pareto front of (params, GMACs),
    both minimised, are circled and joined. When the rows carry ``images_per_s`` (from
    :func:`bench_rows`) the points are coloured by it (colour bar in images/s) and a second
    panel shows params (x) against images/s (y) with the front of fewest params and most
    images/s. Each point is labelled with its variant's grid part of the name.

    Raises:
        UsageError: ``path`` with another suffix than :data:`PLOT_FORMATS`; no rows; matplotlib
            not installed.
    """
    path = Path(path)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise UsageError(f"--plot {str(path)!r}: the suffix {path.suffix or '(none)'!r} is not a plot format; use "
                         f"one of {', '.join(PLOT_FORMATS)}")
    if not rows:
        raise UsageError("plot_sweep: no variants to plot")
    from .diagram import use_matplotlib

    matplotlib = use_matplotlib()
    from matplotlib.figure import Figure

    speed = all(r.get("images_per_s") is not None for r in rows)
    params = [r["params"] / 1e6 for r in rows]
    gmacs = [r["gmacs"] for r in rows]
    names = [_short_name(r["name"]) for r in rows]
    fig = Figure(figsize=(12 if speed else 7, 5), layout="constrained")
    axes = fig.subplots(1, 2) if speed else [fig.subplots(1, 1)]

    def panel(ax, ys, ylabel, minimize_y, colours):
        front = pareto_front(list(zip(params, ys)), (True, minimize_y))
        kw = {"c": colours, "cmap": "viridis"} if colours is not None else {"color": "tab:blue"}
        sc = ax.scatter(params, ys, s=30, zorder=3, **kw)
        order = sorted(front, key=lambda i: params[i])
        ax.plot([params[i] for i in order], [ys[i] for i in order], "--", color="tab:red", lw=1, zorder=2,
                label="Pareto front")
        ax.scatter([params[i] for i in front], [ys[i] for i in front], s=120, facecolors="none",
                   edgecolors="tab:red", zorder=4)
        for x, y, n in zip(params, ys, names):
            ax.annotate(n, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7)
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        return sc

    speeds = [r["images_per_s"] for r in rows] if speed else None
    sc = panel(axes[0], gmacs, "GMACs per image", True, speeds)
    if speed:
        fig.colorbar(sc, ax=axes[0], label="images/s (CPU, batch 1)")
        panel(axes[1], speeds, "images/s (CPU, batch 1)", False, None)
    fig.suptitle(f"sweep of {len(rows)} variants")
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(path)
    return path


def _short_name(name: str) -> str:
    """A variant's name without the base spec's name (the grid values only)."""
    head, sep, tail = name.partition("-")
    return tail if sep else name
