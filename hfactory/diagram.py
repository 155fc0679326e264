"""``hfactory diagram``: the architecture of a spec as a picture, drawn from its plan.

The picture is made from :func:`hfactory.plan.resolve`'s :class:`~hfactory.plan.Plan` alone (no
module is built and torch is never imported, so it is instant): stages left to right as boxes,
each listing its token grid (``HxW``, or ``N tokens`` for a ``seq`` stage), tokens, width
(channels), depth, token mixer (:func:`~hfactory.plan.describe_mixers`), downsampler
(:func:`~hfactory.plan.describe_entry`) and per-block overrides; an arrow into every stage
labelled with its downsampler; and the token layout (grid -> mask units -> sequence, see
DESIGN.md's token-layout contract) as a coloured band above the boxes, annotated where it
changes. Drawn with matplotlib (Agg backend, patches and annotations); SVG output keeps its text
as ``<text>`` elements (``svg.fonttype: 'none'``) so it stays searchable.

Only encoder specs (with ``stages``) are drawn; SFT specs (with ``levels``) are refused with a
:class:`~hfactory.errors.UsageError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from .errors import UsageError
from .plan import Plan, StagePlan, describe_entry, describe_mixers, resolve
from .spec.model import EncoderSpec

__all__ = ["draw", "diagram_text", "stage_label", "block_overrides", "check_path", "use_matplotlib",
           "FORMATS"]

#: Output suffixes :func:`draw` writes (matplotlib's backends for them need nothing extra).
FORMATS = (".svg", ".png", ".pdf")

_LAYOUT_COLOURS = {"grid": "#dbe9f6", "units": "#fde9c9", "seq": "#e2f0d9"}
_FONT = 8.0  # points
_CHAR_IN = 0.068  # approximate width of one character at _FONT, in inches (DejaVu Sans)


def _grid_text(s: StagePlan) -> str:
    h, w = s.out_grid
    return f"{h * w} tokens (sequence)" if s.layout == "seq" else f"{h}x{w}"


def _linear_drop_path(plan: Plan) -> Optional[list[float]]:
    """The stochastic-depth schedule the plan's spec set (``rate * i / (blocks - 1)`` over all
    blocks), with ``rate`` estimated as the median over blocks, so per-block overrides stand out;
    None when every rate is 0 or there is only one block."""
    rates = [r for s in plan.stages for r in s.drop_path]
    n = len(rates)
    if n < 2:
        return None
    estimates = sorted(r * (n - 1) / i for i, r in enumerate(rates) if i > 0)
    rate = estimates[len(estimates) // 2]
    return [rate * i / (n - 1) for i in range(n)]


def block_overrides(plan: Plan, stage: StagePlan) -> list[str]:
    """The per-block differences of ``stage`` from its own entries, one phrase each: blocks whose
    token mixer is of another kind (``blocks 2,5: attention``), blocks with their own
    feedforward or norm, and blocks whose drop-path rate departs from the spec's linear schedule
    (``drop_path@3 0.200``). Empty when every block uses the stage's entries."""
    out: list[str] = []
    kind = stage.token_mixer["kind"]
    mixers: dict[str, list[int]] = {}
    for j, b in enumerate(stage.blocks):
        if b.token_mixer["kind"] != kind:
            mixers.setdefault(describe_entry("token_mixer", b.token_mixer), []).append(j)
    out += [f"blocks {','.join(map(str, js))}: {text}" for text, js in mixers.items()]
    ffn = [j for j, b in enumerate(stage.blocks) if b.feedforward is not None and b.feedforward != stage.feedforward]
    if ffn:
        out.append(f"own feedforward@{','.join(map(str, ffn))}")
    norms = [j for j, b in enumerate(stage.blocks) if b.norm2 is not None and b.norm2 != stage.norm]
    if norms:
        out.append(f"own norm@{','.join(map(str, norms))}")
    schedule = _linear_drop_path(plan)
    if schedule is not None:
        start = sum(s.depth for s in plan.stages[:stage.index])
        off = [(j, r) for j, r in enumerate(stage.drop_path) if abs(r - schedule[start + j]) > 1e-6]
        if off:
            out.append("drop_path " + ", ".join(f"@{j} {r:.3f}" for j, r in off))
    return out


def stage_label(plan: Plan, stage: StagePlan) -> str:
    """The text in ``stage``'s box, one fact per line: ``stage i``, the grid, tokens, width,
    depth, heads (for stages with attention), mixer, downsampler, then the per-block overrides."""
    lines = [f"stage {stage.index}", f"grid {_grid_text(stage)}", f"tokens {stage.seq_len}",
             f"width {stage.out_chs}", f"depth {stage.depth}"]
    if stage.num_heads:
        lines.append(f"heads {stage.num_heads}")
    lines += [f"mixer {describe_mixers(stage)}", f"downsample {describe_entry('downsample', stage.downsample)}"]
    lines += [f"override {o}" for o in block_overrides(plan, stage)]
    return "\n".join(lines)


def diagram_text(plan: Plan) -> list[str]:
    """The label of every stage box :func:`draw` draws (:func:`stage_label`), one per stage."""
    return [stage_label(plan, s) for s in plan.stages]


def _layout_notes(plan: Plan) -> list[Optional[str]]:
    """Per stage, the layout annotation drawn where the layout changes (or None)."""
    notes: list[Optional[str]] = []
    prev = "grid"
    for s in plan.stages:
        note = None
        if s.layout != prev or s.index == 0:
            if s.layout == "units" and s.unit_size:
                note = f"mask units {s.unit_size[0]}x{s.unit_size[1]}"
            elif s.layout == "seq":
                note = "sequence from here"
            elif s.index > 0:
                note = f"{s.layout} from here"
        notes.append(note)
        prev = s.layout
    return notes


def use_matplotlib():
    """matplotlib with the Agg backend (files only, no display), imported on first use.

    Raises:
        UsageError: matplotlib is not installed (``pip install 'hfactory[plot]'``).
    """
    try:
        import matplotlib
    except ImportError:
        raise UsageError("drawing needs matplotlib, which is not installed; pip install 'hfactory[plot]' "
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    return matplotlib


def _as_plan(spec_or_plan) -> Plan:
    if isinstance(spec_or_plan, Plan):
        return spec_or_plan
    if isinstance(spec_or_plan, EncoderSpec):
        return resolve(spec_or_plan)
    raise UsageError(f"diagram draws encoder specs (with 'stages') or their plans, not a "
                     f"{type(spec_or_plan).__name__}; SFT specs (with 'levels') are not supported")


def check_path(path: Union[str, Path]) -> Path:
    """``path`` as a :class:`Path` if its suffix is one of :data:`FORMATS`.

    Raises:
        UsageError: another suffix (the message names the valid ones).
    """
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise UsageError(f"--out {str(path)!r}: the suffix {path.suffix or '(none)'!r} is not a diagram format; "
                         f"use one of {', '.join(FORMATS)}")
    return path


def draw(spec_or_plan: Union[EncoderSpec, Plan], path: Union[str, Path, None] = None):
    """Draw the architecture of an encoder spec (or its plan) and optionally save it.

    Stages are boxes left to right (sizes in inches scale with the text, 8 pt); an arrow enters
    each stage labelled with its downsampler (from an ``image CxHxW`` box for stage 0); a band
    above the boxes is coloured by token layout (grid blue, mask units orange, sequence green)
    and annotated where the layout changes (``mask units 8x8``, ``sequence from here``).

    Args:
        spec_or_plan: an :class:`EncoderSpec` (resolved here) or a :class:`Plan`.
        path: where to write the figure; the suffix (``.svg``, ``.png``, ``.pdf``) picks the
            format. None: only return the figure.

    Returns:
        the ``matplotlib.figure.Figure`` (close it with ``matplotlib.pyplot.close(fig)``).

    Raises:
        UsageError: an SFT spec or other object (only encoder specs are drawn), a ``path``
            with another suffix than :data:`FORMATS`, or matplotlib not installed.
        PlanError: the spec does not resolve.
    """
    plan = _as_plan(spec_or_plan)
    if path is not None:
        path = check_path(path)
    matplotlib = use_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

    labels = diagram_text(plan)
    line_h = _FONT * 1.45 / 72  # inches per text line
    widths = [max(len(line) for line in lab.split("\n")) * _CHAR_IN + 0.3 for lab in labels]
    heights = [lab.count("\n") * line_h + line_h + 0.3 for lab in labels]
    box_h = max(heights)
    ds_texts = [describe_entry("downsample", s.downsample) for s in plan.stages]
    gaps = [max(1.0, len(t) * _CHAR_IN + 0.3) for t in ds_texts]
    h, w = plan.img_size
    img_text = f"image\n{plan.in_chans}x{h}x{w}"
    img_w = 1.1
    band_h, margin = 0.35, 0.3
    total_w = margin * 2 + img_w + sum(gaps) + sum(widths)
    total_h = margin * 2 + box_h + band_h + 1.25

    fig = Figure(figsize=(total_w, total_h))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, total_w)
    ax.set_ylim(0, total_h)
    ax.axis("off")
    y0 = margin + 0.4
    ax.text(margin, total_h - 0.12, f"{plan.name or 'encoder'}: {len(plan.stages)} stages, "
            f"{plan.num_blocks} blocks, {plan.num_classes} classes", fontsize=_FONT + 2, va="top", ha="left")

    ax.add_patch(FancyBboxPatch((margin, y0 + box_h / 2 - 0.35), img_w, 0.7, boxstyle="round,pad=0.02",
                                fc="#eeeeee", ec="#555555"))
    ax.text(margin + img_w / 2, y0 + box_h / 2, img_text, ha="center", va="center", fontsize=_FONT)
    x = margin + img_w
    notes = _layout_notes(plan)
    for s, label, bw, gap, ds, note in zip(plan.stages, labels, widths, gaps, ds_texts, notes):
        mid = y0 + box_h / 2
        ax.add_patch(FancyArrowPatch((x + 0.05, mid), (x + gap - 0.05, mid), arrowstyle="-|>", mutation_scale=12,
                                     color="#333333"))
        ax.annotate(ds, (x + gap / 2, mid), xytext=(0, 4), textcoords="offset points", ha="center", va="bottom",
                    fontsize=_FONT - 1, color="#333333")
        x += gap
        colour = _LAYOUT_COLOURS.get(s.layout, "#eeeeee")
        ax.add_patch(FancyBboxPatch((x, y0), bw, box_h, boxstyle="round,pad=0.02", fc="white", ec="#333333"))
        next_gap = gaps[s.index + 1] if s.index + 1 < len(gaps) else 0.0  # the band runs on to the next box
        ax.add_patch(Rectangle((x, y0 + box_h + 0.08), bw + next_gap, band_h, fc=colour, ec="none"))
        ax.text(x + 0.15, y0 + box_h - 0.15, label, ha="left", va="top", fontsize=_FONT, linespacing=1.45)
        band = f"units {s.unit_size[0]}x{s.unit_size[1]}" if s.layout == "units" and s.unit_size else s.layout
        ax.text(x + 0.08, y0 + box_h + 0.08 + band_h / 2, band, ha="left", va="center", fontsize=_FONT - 1,
                color="#555555")
        if note is not None:
            ax.annotate(note, (x, y0 + box_h + 0.08 + band_h), xytext=(x + 0.1, y0 + box_h + band_h + 0.45),
                        fontsize=_FONT, ha="left", va="center", fontweight="bold",
                        arrowprops={"arrowstyle": "->", "color": "#aa5500"})
        x += bw
    if path is not None:
        with matplotlib.rc_context({"svg.fonttype": "none"}):
            fig.savefig(path)
    return fig
