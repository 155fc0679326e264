"""Export an encoder as a ``torch.export`` program (``.pt2``) or ONNX, with a dynamic batch and,
where the plan allows other image sizes, a dynamic height and width.

The plan decides which image sizes a graph may accept (:func:`accepted_sizes`); the exported graph
states them as ``torch.export`` dimensions (``H = multiple * Dim``), and :func:`export_model` checks
that the traced graph really accepts them before it is saved.

Sources: PyTorch ``torch.export`` (https://pytorch.org/docs/stable/export.html: ``export``,
``Dim``, ``dynamic_shapes``, derived dimensions ``k * Dim``, the 0/1 specialisation, ``save`` /
``load``) and the ONNX exporter built on it (https://pytorch.org/docs/stable/onnx_export.html,
``torch.onnx.export(..., dynamo=True)``, which here converts the ``ExportedProgram`` itself, so the
ONNX graph has the same dynamic dimensions).

Torch-free until an export runs: :func:`accepted_sizes` imports no torch (the plan is pure
Python), so size questions and ``hfactory export --help`` (:mod:`hfactory.cli.export`) stay instant.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .errors import PlanError, UsageError
from .plan import MAX_SIZE, resolve
from .spec.model import EncoderSpec

__all__ = ["FORMATS", "DYNAMIC_OPTIONS", "SUFFIXES", "AcceptedSizes", "accepted_sizes", "stride_product",
           "ExportResult", "export_model"]

#: Export formats: a ``torch.export`` program saved with ``torch.export.save`` (``.pt2``), or ONNX.
FORMATS = ("pt2", "onnx")
#: The dynamic-dimension choices: the batch alone, or the batch and the image height and width.
DYNAMIC_OPTIONS = (("batch",), ("batch", "hw"))
#: File suffix of each format.
SUFFIXES = {"pt2": ".pt2", "onnx": ".onnx"}
#: Batch of the example input that is traced (not 1: torch.export specialises sizes 0 and 1).
_TRACE_BATCH = 2
#: How far past the plan's minimum :func:`export_model` looks for the smallest size the traced
#: graph accepts (in steps of the size multiple), before it gives up and refuses dynamic sizes.
_MAX_NARROWING_STEPS = 16
#: :func:`export_model` checks that the graph takes every size of the first N x N multiples.
_CHECK_WINDOW = 12


# ------------------------------------------------------------------------------- accepted sizes


@dataclass(frozen=True)
class AcceptedSizes:
    """The image sizes ``(H, W)`` in pixels that a spec's plan accepts, as a rule that
    ``torch.export`` dimensions can state: per axis, a multiple of ``multiple`` from ``minimum``
    to ``maximum``; or, when ``fixed`` is set, the spec's own ``img_size`` only.

    ``(h, w) in sizes`` applies the rule. ``fixed`` is ``"<spec location>: <why>"`` in the plan's
    own words (e.g. ``stages.1.downsample: 'sp_lin' has weights sized for the token grid ...``);
    ``why`` explains the multiple and the minimum with the plan's refusal of a size just off the
    rule. The rule is exact (it says yes iff :func:`hfactory.resolve` does) for every built-in
    component; where the sides interact (a lower bound on the token count of a ``seq`` stage, e.g.
    HVT's pooled lengths), ``minimum`` is the smallest box corner the plan accepts, so a few
    small, very unequal sizes the plan would take lie outside the rule.
    """

    spec_size: tuple[int, int]
    multiple: tuple[int, int]
    minimum: tuple[int, int]
    maximum: tuple[int, int]
    fixed: Optional[str] = None
    why: tuple[str, ...] = field(default=())

    def __contains__(self, hw: Sequence[int]) -> bool:
        h, w = (int(v) for v in hw)
        if self.fixed is not None:
            return (h, w) == tuple(self.spec_size)
        return all(lo <= n <= hi and n % m == 0
                   for n, m, lo, hi in zip((h, w), self.multiple, self.minimum, self.maximum))

    @property
    def dynamic(self) -> bool:
        """Whether any size other than the spec's is accepted."""
        return self.fixed is None

    def describe(self) -> str:
        """One line: ``H: multiples of 32 from 32 to 65536 px; W: ...`` or the fixed size and why."""
        if self.fixed is not None:
            return f"only {self.spec_size[0]}x{self.spec_size[1]}: {self.fixed}"
        parts = [f"{axis}: multiples of {m} from {lo} to {hi} px"
                 for axis, m, lo, hi in zip("HW", self.multiple, self.minimum, self.maximum)]
        return "; ".join(parts)


def _as_spec(obj: Any) -> EncoderSpec:
    """An :class:`EncoderSpec` from a spec, an encoder (its ``spec``), a dict, a YAML/JSON path or
    a preset name."""
    if isinstance(obj, EncoderSpec):
        return obj
    spec = getattr(obj, "spec", None)
    if isinstance(spec, EncoderSpec):
        return spec
    if isinstance(obj, (str, os.PathLike)):
        from .presets import resolve_spec_arg

        return resolve_spec_arg(str(obj))
    if isinstance(obj, dict):
        from .spec.io import load_spec

        return load_spec(obj)
    raise UsageError(f"expected an encoder spec, an encoder, a spec path or a preset name, got {type(obj).__name__}")


def stride_product(spec: EncoderSpec) -> tuple[int, int]:
    """Per axis, the least common multiple of what the plan makes the image side divisible by:
    each 2-D stage's total stride (``image / grid``; every built-in grid downsampler reduces
    exactly) and, in the ``units`` layout, that stride times the mask unit. Stages in the ``seq``
    layout have no 2-D grid and add nothing. A hint for how far to probe; the probe decides."""
    plan = resolve(spec)
    out = [1, 1]
    for s in plan.stages:
        if s.layout == "seq":
            continue
        for a in (0, 1):
            r = max(1, plan.img_size[a] // max(1, s.out_grid[a]))
            out[a] = math.lcm(out[a], r * (s.unit_size[a] if s.layout == "units" and s.unit_size else 1))
    return out[0], out[1]


def _probe_axis(spec: EncoderSpec, axis: int, limit: int) -> tuple[list[int], dict[int, PlanError]]:
    """Sides ``1..limit`` of ``axis`` (the other side at the spec's) that the plan accepts, and
    the plan's error for each side it refuses."""
    side = spec.img_hw
    ok, errors = [], {}
    for n in range(1, limit + 1):
        hw = (n, side[1]) if axis == 0 else (side[0], n)
        try:
            resolve(spec, hw)
            ok.append(n)
        except PlanError as err:
            errors[n] = err
    return ok, errors


def accepted_sizes(spec_or_model: Any) -> AcceptedSizes:
    """Which input sizes ``(H, W)`` (pixels) the plan of ``spec_or_model`` accepts, as a rule an
    exported graph can state (see :class:`AcceptedSizes`).

    The rule follows from :func:`hfactory.resolve`, which refuses every size it cannot build:

    - every grid downsampler must reduce its input exactly (``conv``, ``patch_merging``,
      ``q_pool``, the thesis poolings: ``stride`` divides the grid), so each side is a multiple
      of the stride product of the 2-D stages;
    - mask units (and Hiera's ``abs_win`` windows) must tile the grid they cut, so a side is also
      a multiple of stage 0's stride times the unit; Swin's windows do not constrain the size
      (a grid the window does not divide is padded);
    - a downsampler that declares ``fixed_grid`` (``sp_lin``, ``sp_mlp``, ``rand``, ``att0``: their
      weights are sized for the spec's token grid) makes the plan refuse every other size;
    - sides above ``hfactory.plan.MAX_SIZE`` are refused; a ``seq`` stage (HVT's 1-D pooling, greedy
      merging) needs enough tokens to pool, which raises the minimum.

    The rule is not written per component kind: it is read off the plan by resolving each side
    from 1 to a few stride products past the spec's side (the other side kept at the spec's;
    about a millisecond a size), then the smallest corner of the box is checked. The multiple is
    the greatest common divisor of the accepted sides and must explain all of them; otherwise
    the sizes are irregular, which is reported as ``fixed`` with the first refused size.

    Args:
        spec_or_model: an :class:`EncoderSpec`, an encoder (its ``spec``), a dict, a YAML/JSON path
            or a preset name.

    Returns:
        :class:`AcceptedSizes`.

    Raises:
        PlanError: the spec does not resolve at its own ``img_size``.
        UsageError: an argument that is not a spec or encoder.
    """
    spec = _as_spec(spec_or_model)
    resolve(spec)  # the spec's own size must build (raises PlanError naming what does not)
    side = spec.img_hw
    hint = stride_product(spec)
    rules, why = [], []
    for a, axis in enumerate(("height", "width")):
        limit = min(MAX_SIZE, max(side[a] + 2 * hint[a], 4 * hint[a], 64))
        ok, errors = _probe_axis(spec, a, limit)
        if ok == [side[a]]:
            # Only the spec's side: name the plan's reason at a size every stride divides.
            err = errors.get(side[a] + hint[a]) or errors.get(side[a] - hint[a]) or next(iter(errors.values()))
            return AcceptedSizes(side, (1, 1), side, side, fixed=f"{axis} fixed at {side[a]} px by {err}")
        step = math.gcd(*ok)
        expected = list(range(ok[0], limit + 1, step))
        if ok != expected:
            missing = next(n for n in expected if n not in ok)
            return AcceptedSizes(side, (1, 1), side, side, fixed=(
                f"{axis}: the plan accepts irregular sizes ({', '.join(map(str, ok[:8]))}, ...) that no multiple "
                f"and minimum describe; it refuses {missing} px: {errors[missing]}"))
        rules.append((step, ok[0]))
        if step > 1 and ok[0] + step // 2 in errors:
            why.append(f"{axis} a multiple of {step}: e.g. {ok[0] + step // 2} px is refused by "
                       f"{errors[ok[0] + step // 2]}")
        if ok[0] - step in errors:
            why.append(f"{axis} at least {ok[0]}: {ok[0] - step} px is refused by {errors[ok[0] - step]}")
    (mh, min_h), (mw, min_w) = rules
    # The sides may interact (a seq stage's token count is H*W / stride^2): walk the corner up
    # the diagonal until the plan accepts it.
    for _ in range(_MAX_NARROWING_STEPS * 4):
        try:
            resolve(spec, (min_h, min_w))
            break
        except PlanError as err:
            why.append(f"corner {min_h}x{min_w} refused by {err}")
            min_h, min_w = min_h + mh, min_w + mw
    maximum = (MAX_SIZE // mh * mh, MAX_SIZE // mw * mw)
    return AcceptedSizes(side, (mh, mw), (min_h, min_w), maximum, why=tuple(why))


# ---------------------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    """What :func:`export_model` made.

    Attributes:
        program: the ``torch.export.ExportedProgram`` (``pt2``) or ``torch.onnx.ONNXProgram``.
        format: ``"pt2"`` or ``"onnx"``.
        path: where it was saved, or None.
        dynamic: the dynamic dimensions, ``("batch",)`` or ``("batch", "hw")``.
        traced_shape: the example input shape ``(B, C, H, W)`` that was traced.
        batch: ``(min, max)`` batch of the graph (max None = unbounded).
        height, width: ``(multiple, min, max)`` in pixels of the graph's image side (multiple 0:
            static at ``min``).
        sizes: the plan's :class:`AcceptedSizes` (the graph's sizes are a subset of them).
        notes: how the graph's sizes were narrowed from the plan's, if they were.
    """

    program: Any
    format: str
    path: Optional[Path]
    dynamic: tuple[str, ...]
    traced_shape: tuple[int, int, int, int]
    batch: tuple[int, Optional[int]]
    height: tuple[int, int, int]
    width: tuple[int, int, int]
    sizes: AcceptedSizes
    notes: tuple[str, ...] = ()

    def accepts(self, hw: Sequence[int]) -> bool:
        """Whether the exported graph takes images of ``(H, W)`` pixels."""
        return all((n == lo) if m == 0 else (lo <= n <= hi and n % m == 0)
                   for n, (m, lo, hi) in zip(hw, (self.height, self.width)))

    def describe(self) -> str:
        """A few lines for the command line: file, dimensions, accepted sizes."""
        def side(name, spec):
            m, lo, hi = spec
            return f"{name} {lo}" if m == 0 else f"{name} multiples of {m} from {lo} to {hi}"

        hi = "any" if self.batch[1] is None else self.batch[1]
        lines = [f"{self.format} graph{f' -> {self.path}' if self.path else ''}",
                 f"  batch {self.batch[0]}..{hi}; {side('height', self.height)}; {side('width', self.width)} px",
                 f"  traced at {tuple(self.traced_shape)}; plan accepts {self.sizes.describe()}"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _check_format(format: str) -> str:
    if format not in FORMATS:
        raise UsageError(f"format {format!r}: valid are {', '.join(repr(f) for f in FORMATS)}")
    return format


def _check_dynamic(dynamic: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    valid = " or ".join(f"{d!r} ({'+'.join(d)})" for d in DYNAMIC_OPTIONS)
    if dynamic is None:
        return ("batch",)
    if isinstance(dynamic, str):
        dynamic = tuple(p.strip() for p in dynamic.split(",") if p.strip())
    try:
        dyn = tuple(dynamic)
    except TypeError:
        raise UsageError(f"dynamic {dynamic!r}: valid are {valid}") from None
    if dyn not in DYNAMIC_OPTIONS:
        raise UsageError(f"dynamic {dynamic!r}: valid are {valid} (command line: --dynamic batch or batch,hw)")
    return dyn


def _encoder_spec(model_or_spec: Any) -> EncoderSpec:
    """The spec of an encoder, or the spec given (as :func:`_as_spec` reads it); another module
    is refused (UsageError)."""
    from torch import nn

    from .encoder import HierarchicalEncoder

    if isinstance(model_or_spec, nn.Module) and not isinstance(model_or_spec, HierarchicalEncoder):
        raise UsageError(f"export_model exports encoders (HierarchicalEncoder), not {type(model_or_spec).__name__}; "
                         "export its encoder")
    return _as_spec(model_or_spec)


def _as_encoder(model_or_spec: Any, spec: EncoderSpec):
    """The encoder itself, or one built from ``spec`` (freshly initialised weights)."""
    from .encoder import HierarchicalEncoder, build_encoder

    return model_or_spec if isinstance(model_or_spec, HierarchicalEncoder) else build_encoder(spec)


def _refusal(module, shape) -> Optional[str]:
    """Why the exported graph ``module`` (``ExportedProgram.module()``) refuses inputs of
    ``shape``, or None when it takes them.

    The graph's input checks (the dimension ranges and the guards torch.export recorded, e.g.
    ``x.size()[2] // 4 == 56`` where a layer specialised a size) are its ``_guards_fn`` submodule
    (PyTorch 2.9+), called here on a meta tensor: no arithmetic, about a millisecond. Graphs without
    it run on fake tensors (PyTorch's ``FakeTensorMode``: shapes only; a refused shape fails at once,
    a taken one costs a symbolic forward)."""
    import torch

    guards = getattr(module, "_guards_fn", None)
    try:
        if guards is not None:
            guards(torch.empty(shape, device="meta"))
        else:
            from torch._subclasses.fake_tensor import FakeTensorMode

            with FakeTensorMode(allow_non_fake_inputs=True):
                module(torch.empty(shape))
    except Exception as err:  # noqa: BLE001 - only shape refusals count; anything else is reported
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Guard failed" in text or "Expected input" in text or "to be equal to" in text:
            return text
        warnings.warn(f"could not check the exported graph at {tuple(shape)} ({type(err).__name__}: "
                      f"{text[:200]}); not checked", stacklevel=3)
    return None


def _dims(dynamic, rules):
    """``dynamic_shapes`` for the input ``x`` from the per-axis ``rules`` ``(multiple, k_min, k_max)``."""
    from torch.export import Dim

    dims = {0: Dim("batch", min=1)}
    if "hw" in dynamic:
        for axis, name, (m, kmin, kmax) in zip((2, 3), ("height", "width"), rules):
            dims[axis] = Dim(name, min=kmin, max=kmax) if m == 1 else m * Dim(f"{name}_div{m}", min=kmin, max=kmax)
    return {"x": dims}


def export_model(model_or_spec: Any, format: str = "pt2", dynamic: Union[str, Sequence[str]] = ("batch",),
                 img_size: Optional[Union[int, Sequence[int]]] = None,
                 path: Optional[Union[str, os.PathLike]] = None, check: bool = True) -> ExportResult:
    """Export an encoder's ``forward`` (images ``(B, in_chans, H, W)`` float32 -> logits
    ``(B, num_classes)``, or pooled features ``(B, num_features)`` without classes) with
    ``torch.export.export`` and save it as ``.pt2`` (``torch.export.save``) or ONNX
    (``torch.onnx.export(exported_program, dynamo=True)``). The model is traced in eval mode on
    the CPU (its training mode is restored after); dropout and stochastic depth are not in the graph.

    Dynamic dimensions (``dynamic``):

    - ``("batch",)``: any batch >= 1; the image size is fixed at ``img_size``.
    - ``("batch", "hw")``: also the height and width, as the plan allows (:func:`accepted_sizes`):
      ``H = multiple * Dim(min, max)``. torch.export specialises sizes 0 and 1, so the graph
      needs at least 2 multiples per side (e.g. 64 px for a stride product of 32). When the traced
      graph refuses the plan's smallest sizes, the minimum is raised (at most to the traced size)
      until it takes them and the graph is exported again; the result's ``notes`` say so and name
      torch's guard. This happens for Swin V2, whose window clipped to a grid no larger than it
      is another computation (its bias MLP sees the clipped window; the graph starts where every
      stage's grid exceeds its window: 260 px for ``swinv2_tiny_window8_256``), and for Swin and
      SAM2 HieraDet, whose graphs torch.export specialises on at least 2 windows per axis in
      every stage (its reshapes guard ``windows != 1``): 256 px for ``swin_tiny_patch4_window7_224``.
      Hiera's mask units and SAM2's window padding are symbolic (any size the plan takes, from
      2 multiples).

    Args:
        model_or_spec: a :class:`~hfactory.encoder.HierarchicalEncoder` (its weights are exported),
            or a spec / dict / YAML path / preset name (built with freshly initialised weights).
        format: ``"pt2"`` or ``"onnx"``.
        dynamic: ``("batch",)`` or ``("batch", "hw")``; also ``"batch"`` / ``"batch,hw"``.
        img_size: the example image size traced, ``N`` or ``(H, W)`` pixels; with a static size
            the only size the graph takes (default: the spec's ``img_size``), with dynamic sizes
            an example inside them (default: the spec's plus one multiple per side).
        path: file to write (``.pt2`` / ``.onnx``); None keeps the program in memory only.
        check: ask the exported graph's input checks whether it takes batches 1 and 3 and, with
            dynamic sizes, every size of its first 12 x 12 multiples, a few larger ones and the
            spec's; refuse a graph that does not (milliseconds: no arithmetic runs).

    Limits (PyTorch 2.14): a ``.pt2`` graph checks the batch and size ranges and the guards it
    recorded, but not that a side is a multiple of the dimension's multiple (a 80-pixel side in a
    graph of multiples of 32 runs on the floor-divided grid); an ONNX graph checks nothing.
    :meth:`ExportResult.accepts` (or :func:`accepted_sizes`) tells which sizes are valid.

    Returns:
        :class:`ExportResult` (the program, the graph's batch and size ranges, the path).

    Raises:
        UsageError: a bad ``format`` or ``dynamic`` value (naming the valid ones); dynamic sizes for
            a spec whose plan fixes them (the message names the dimension, the spec location and
            the plan's reason), or whose traced graph does not take the sizes the plan allows
            (naming the size and torch's guard); a model that is not an encoder.
        PlanError: ``img_size`` is a size the plan refuses (names the component and what fits).
        RuntimeError: the traced graph does not take batches other than the traced one (a layer
            branching on the batch size: a bug).
    """
    import torch

    fmt = _check_format(format)
    dyn = _check_dynamic(dynamic)
    spec = _encoder_spec(model_or_spec)  # sizes are checked before anything is built
    if img_size is None:
        trace_hw = spec.img_hw
    elif isinstance(img_size, int):
        trace_hw = (img_size, img_size)
    else:
        trace_hw = tuple(int(v) for v in img_size)
        if len(trace_hw) != 2:
            raise UsageError(f"img_size {img_size!r}: give N or (H, W) pixels")
    resolve(spec, trace_hw)  # PlanError naming the component that refuses this size
    sizes = accepted_sizes(spec)
    notes: list[str] = []

    if "hw" in dyn:
        if sizes.fixed is not None:
            raise UsageError(f"dynamic height/width for {spec.name or 'this spec'}: {sizes.fixed}; export with "
                             f"dynamic=('batch',) (--dynamic batch) for {trace_hw[0]}x{trace_hw[1]} images")
        rules = []
        for a, name in enumerate(("height", "width")):
            m, lo, hi = sizes.multiple[a], sizes.minimum[a], sizes.maximum[a]
            kmin = max(-(-lo // m), 2)  # torch.export specialises 0 and 1
            if kmin * m > lo:
                notes.append(f"{name} from {kmin * m} px: torch.export specialises sizes 0 and 1, so the graph needs "
                             f"at least 2 multiples of {m}, more than the plan's minimum {lo}")
            rules.append([m, kmin, hi // m])
        if img_size is None:
            # One multiple above the spec's size: larger grids are where every block runs its general
            # branch (Swin clips a window to a grid no larger than it, and skips the shift), and a
            # layer's fast path for "the planned size" is not traced.
            trace_hw = tuple(n + r[0] for n, r in zip(trace_hw, rules))
        # Trace at that size if the dimensions include it, else at their smallest.
        trace_hw = tuple(n if n >= r[0] * r[1] else r[0] * r[1] for n, r in zip(trace_hw, rules))
    else:
        rules = [[0, trace_hw[0], trace_hw[0]], [0, trace_hw[1], trace_hw[1]]]

    shape = (_TRACE_BATCH, spec.in_chans, *trace_hw)
    model = _as_encoder(model_or_spec, spec)
    was_training = model.training
    model.eval()
    try:
        # No work-arounds needed while tracing: the layers ask torch.compiler.is_compiling() (True
        # under torch.export) before any Python test on a size (HierarchicalEncoder._check_input's
        # plan check, TokenLinear's oneDNN route), and window/unit reshapes are symbolic.
        program = _export(model, shape, dyn, rules)
        if check:
            program, more = _check_graph(model, program, shape, dyn, rules, sizes)
            notes += more
    finally:
        model.train(was_training)

    out = Path(path) if path is not None else None
    if out is not None and out.parent and not out.parent.exists():
        raise UsageError(f"{out}: the folder {out.parent} does not exist")
    if fmt == "pt2":
        result_program = program
        if out is not None:
            torch.export.save(program, str(out))
    else:
        result_program = torch.onnx.export(program, dynamo=True, input_names=["images"],
                                           output_names=["logits" if spec.num_classes else "features"],
                                           verbose=False)
        if out is not None:
            result_program.save(str(out))
    m_h, m_w = (r[0] for r in rules)
    return ExportResult(
        program=result_program, format=fmt, path=out, dynamic=dyn, traced_shape=shape, batch=(1, None),
        height=(m_h, rules[0][1] * max(m_h, 1), rules[0][2] * max(m_h, 1)),
        width=(m_w, rules[1][1] * max(m_w, 1), rules[1][2] * max(m_w, 1)),
        sizes=sizes, notes=tuple(notes))


def _export(model, shape, dyn, rules):
    import torch

    x = torch.randn(shape)
    return torch.export.export(model, (x,), dynamic_shapes=_dims(dyn, rules))


def _check_graph(model, program, shape, dyn, rules, sizes):
    """Check that ``program`` takes what its dimensions say (see :func:`export_model`'s ``check``);
    raise the minimum side (re-exporting once) when it only refuses the smallest sizes. Returns
    the program and notes."""
    notes = []
    b, c, h, w = shape
    if "hw" not in dyn:
        for batch in (1, 3):
            why = _refusal(program.module(), (batch, c, h, w))
            if why is not None:
                raise RuntimeError(f"the exported graph of {model.spec.name or 'this spec'} does not take batch "
                                   f"{batch} (torch.export specialised it: {why}); a bug in hfactory, please report it")
        return program, notes

    (mh, kh, _), (mw, kw, _) = rules
    module = program.module()
    if _refusal(module, (1, c, kh * mh, kw * mw)) is not None:
        # Swin V2-like: the smallest grids take another branch (a window clipped to the grid, whose
        # bias is another computation). Walk up, at most to the traced size (taken by construction).
        for step in range(1, max(_MAX_NARROWING_STEPS, h // mh - kh, w // mw - kw) + 1):
            if _refusal(module, (1, c, (kh + step) * mh, (kw + step) * mw)) is None:
                break
        else:
            raise UsageError(_specialised(model, (kh * mh, kw * mw), _refusal(module, (1, c, kh * mh, kw * mw)), sizes))
        notes.append(f"the traced graph takes {(kh + step) * mh}x{(kw + step) * mw} px and up, not the plan's "
                     f"{kh * mh}x{kw * mw}: for smaller sizes the model runs another graph "
                     f"(torch.export: {_refusal(module, (1, c, kh * mh, kw * mw))})")
        rules[0][1], rules[1][1] = kh + step, kw + step
        kh, kw = kh + step, kw + step
        shape = (b, c, max(h, kh * mh), max(w, kw * mw))
        program = _export(model, shape, dyn, rules)  # again, so that its dimensions say so
        module = program.module()
    # Every size of a window of the dimensions (the guards cost no arithmetic), the spec's, batch 1.
    probes = [(batch, c, (kh + i) * mh, (kw + j) * mw) for i in range(_CHECK_WINDOW) for j in range(_CHECK_WINDOW)
              for batch in ((1, 3) if i == j == 0 else (3,))]
    probes += [(1, c, h + k * mh, w + k * mw) for k in (1, 7, 31)]
    spec_hw = model.spec.img_hw
    if spec_hw[0] >= kh * mh and spec_hw[1] >= kw * mw:
        probes.append((1, c, *spec_hw))
    for probe in probes:
        why = _refusal(module, probe)
        if why is not None:
            raise UsageError(_specialised(model, probe[2:], why, sizes))
    return program, notes


def _specialised(model, hw, why, sizes) -> str:
    name = model.spec.name or "this spec"
    return (f"dynamic height/width for {name}: the plan accepts {hw[0]}x{hw[1]} ({sizes.describe()}), but the "
            f"traced graph does not: torch.export specialised a size ({why}), because a layer branches on the "
            "input size in Python; export with dynamic=('batch',) (--dynamic batch) for a fixed size, or "
            "img_size=... to trace at another size")
