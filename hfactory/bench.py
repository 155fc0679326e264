"""``hfactory bench``: paired, interleaved timing of an hfactory model against a reference.

Method (the machine may be shared and noisy, so only ratios measured in one process and
interleaved in time are comparable):

1. Build both models in one process with real (random) weights, fp32, on one device; one input
   batch ``(batch, C, H, W)`` from a fixed seed, labels for ``--train``.
2. Warm up: ``warmup`` calls of each model.
3. ``rounds`` rounds; each round times one call of each model, alternating which goes first
   (hfactory first in even rounds, the reference first in odd ones), so slow drifts of the
   machine hit both alike.
4. Report per model the median (and min/max) seconds per call and images/s = batch / median,
   and the speed ratio = the median over rounds of (reference time / hfactory time) of the
   same round: > 1 means hfactory is faster, 1 means equal.

Inference: ``model.eval()`` under ``torch.inference_mode()``. Training (``train=True``): one
step = ``zero_grad``, forward in train mode, cross-entropy, backward (no optimizer step), as
the anchor measured. CUDA calls are synchronised before each clock read.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError

__all__ = ["BenchResult", "paired_timing", "reference_model", "bench", "format_bench"]


@dataclass
class BenchResult:
    """Seconds per call of each model (``times[name]``, one per round) and the paired ratios."""

    names: list[str]
    times: dict[str, list[float]]
    ratios: list[float]  # per round: times[names[1]] / times[names[0]]
    batch: int

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def images_per_s(self, name: str) -> float:
        return self.batch / self.median(name)

    @property
    def ratio(self) -> float:
        """Median over rounds of (second model's time / first model's time): the first model's
        speed relative to the second's (> 1: the first is faster)."""
        return statistics.median(self.ratios)


def paired_timing(calls: dict[str, Callable[[], None]], batch: int, rounds: int = 7, warmup: int = 2,
                  sync: Optional[Callable[[], None]] = None) -> BenchResult:
    """Time two (or one) zero-argument callables interleaved: warm-up, then ``rounds`` rounds
    each calling every callable once, the order reversed in odd rounds.

    Returns:
        a :class:`BenchResult` (times in seconds).

    Raises:
        UsageError (a ValueError): ``rounds < 1`` or ``warmup < 0`` or not 1-2 callables.
    """
    if rounds < 1 or warmup < 0 or not 1 <= len(calls) <= 2:
        raise UsageError(f"rounds {rounds} must be >= 1, warmup {warmup} >= 0, and 1 or 2 models")
    sync = sync or (lambda: None)
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync()
            tick = time.perf_counter()
            calls[name]()
            sync()
            times[name].append(time.perf_counter() - tick)
    ratios = [b / a for a, b in zip(times[names[0]], times[names[-1]])]
    return BenchResult(names, times, ratios, batch)


def reference_model(ref: str, num_classes: int, img_size: Optional[tuple[int, int]] = None) -> nn.Module:
    """Build the reference ``timm:<name>`` with ``pretrained=False`` and ``num_classes``.

    ``img_size`` is passed to timm only when given (models with a fixed input size need it;
    those without the argument get none).

    Raises:
        UsageError (a ValueError): ``ref`` is not ``timm:<name>``, timm is not installed, or timm
            has no such model (with close names).
    """
    if not ref.startswith("timm:") or len(ref) <= 5:
        raise UsageError(f"--vs {ref!r}: expected timm:<model name>, e.g. timm:poolformer_s12")
    name = ref[5:]
    try:
        import timm
    except ImportError:
        raise UsageError("--vs timm:... needs timm, which is not installed; pip install timm") from None
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise UsageError(f"timm has no model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    kwargs = {"pretrained": False, "num_classes": num_classes}
    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError:  # the model takes no img_size: it runs at any size
            pass
    return timm.create_model(name, **kwargs)


def _step(model: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor]) -> Callable[[], None]:
    if labels is None:
        model.eval()

        def infer():
            with torch.inference_mode():
                model(images)
        return infer
    model.train()

    def train_step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
    return train_step


def bench(spec, vs: Optional[str] = None, batch: int = 8, img_size: Optional[tuple[int, int]] = None,
          train: bool = False, rounds: int = 7, warmup: int = 2, device: str = "cpu") -> dict:
    """Time ``spec``'s model (and ``vs``'s) as described in the module docstring.

    Args:
        spec: an :class:`EncoderSpec`; built with ``img_size`` when given.
        vs: ``"timm:<name>"`` or None (time hfactory alone).
        batch: images per call.
        img_size: ``(H, W)`` of the input (default: the spec's).
        train: time forward + backward steps instead of inference.
        rounds, warmup: see :func:`paired_timing` (``rounds >= 5`` recommended).
        device: torch device.

    Returns:
        a JSON-ready dict: ``mode``, ``batch``, ``img_size``, ``threads``, ``device``, per model
        ``{name: {"params", "median_s", "min_s", "max_s", "images_per_s", "times_s"}}`` under
        ``models``, and (with ``vs``) ``ratio`` = hfactory speed / reference speed (paired
        median; > 1: hfactory faster).

    Raises:
        UsageError (a ValueError): bad arguments or reference (see :func:`reference_model`), or a
            reference model that cannot run this input size; PlanError: the spec does not fit
            ``img_size``. (hfactory's own model failing on an input its plan accepted is a bug,
            raised as it is.)
    """
    from .encoder import build_encoder
    from .summary import check_batch

    check_batch(batch)
    overrides = {"img_size": list(img_size)} if img_size is not None else {}
    torch.manual_seed(0)
    dev = torch.device(device)
    models = {"hfactory": build_encoder(spec, **overrides)}
    hw = tuple(models["hfactory"].plan.img_size)
    if vs is not None:
        models[vs] = reference_model(vs, spec.num_classes, hw if img_size is not None else None)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, spec.in_chans, *hw, generator=gen).to(dev)
    labels = torch.randint(0, max(1, spec.num_classes), (batch,), generator=gen).to(dev) if train else None
    calls = {}
    for name, model in models.items():
        model.to(dev)
        try:
            with torch.no_grad():
                model.eval()(images[:1])  # fail here, with the model named, not mid-timing
        except Exception as err:
            if name == "hfactory":  # its plan accepted this size, so a failure is ours to fix
                raise
            # a reference model may take fixed sizes only (--img-size is the user's choice)
            raise UsageError(f"{name} cannot run a {tuple(images.shape[1:])} input: {err}") from None
        calls[name] = _step(model, images, labels)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    result = paired_timing(calls, batch, rounds, warmup, sync)
    out = {
        "mode": "train (forward + backward)" if train else "inference", "batch": batch, "img_size": list(hw),
        "threads": torch.get_num_threads(), "device": str(dev), "rounds": rounds, "warmup": warmup, "models": {},
    }
    for name, model in models.items():
        t = result.times[name]
        out["models"][name] = {"params": sum(p.numel() for p in model.parameters()), "median_s": result.median(name),
                               "min_s": min(t), "max_s": max(t), "images_per_s": result.images_per_s(name),
                               "times_s": t}
    if vs is not None:
        out["ratio"] = result.ratio
    return out


def format_bench(result: dict) -> str:
    """Human-readable lines of :func:`bench`'s result."""
    h, w = result["img_size"]
    lines = [f"{result['mode']}, batch {result['batch']}, {h}x{w}, {result['threads']} threads, {result['device']}, "
             f"median of {result['rounds']} interleaved rounds after {result['warmup']} warm-up"]
    for name, m in result["models"].items():
        lines.append(f"  {name:<28} {m['images_per_s']:9.2f} img/s  {m['median_s'] * 1e3:9.1f} ms/call "
                     f"({m['min_s'] * 1e3:.1f}-{m['max_s'] * 1e3:.1f})  {m['params']:,} params")
    if "ratio" in result:
        ref = [n for n in result["models"] if n != "hfactory"][0]
        lines.append(f"  speed ratio hfactory/{ref.split(':', 1)[1]}: {result['ratio']:.3f} "
                     f"(paired median of reference time / hfactory time; > 1: hfactory faster)")
    return "\n".join(lines)
