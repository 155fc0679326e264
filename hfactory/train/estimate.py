"""Warn before a training epoch that will take minutes on the CPU (a newcomer running a
full-size preset on a laptop should hear it before waiting).

The estimate is a floor: the model's multiply-accumulates per image
(:func:`hfactory.summary.count_macs`, the summary's GMACs), times 3 for a training step (forward
plus a backward of about twice its cost, the usual rule), times the training images, plus one
forward per test image, divided by this CPU's matrix-multiply rate measured here and now. Real
layers run slower than a large matmul, so the epoch takes at least that long.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch import nn

__all__ = ["matmul_gmacs_per_s", "epoch_seconds_floor", "epoch_time_warning"]

#: Warn when the floor of one epoch (training and evaluation) is at least this many seconds.
WARN_SECONDS = 120.0


def matmul_gmacs_per_s(seconds: float = 0.2, n: int = 512) -> float:
    """This CPU's float32 matrix-multiply rate with torch's current threads, in GMAC/s: repeated
    ``n x n @ n x n`` products for about ``seconds`` (after one warm-up)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        count += 1
    return count * n ** 3 / elapsed / 1e9


def epoch_seconds_floor(gmacs_per_image: float, train_images: int, test_images: int, rate: float) -> float:
    """Seconds one epoch needs at least: ``(3 * train + test) * gmacs_per_image / rate``."""
    return (3 * train_images + test_images) * gmacs_per_image / rate


def epoch_time_warning(model: nn.Module, image: torch.Tensor, train_images: int, test_images: int,
                       rate: Optional[float] = None) -> Optional[str]:
    """A warning naming the epoch's floor when it is at least :data:`WARN_SECONDS` on this CPU,
    else None. ``image``: one ``(1, C, H, W)`` input on the CPU; ``rate`` (GMAC/s) is measured by
    :func:`matmul_gmacs_per_s` when not given."""
    from ..summary import count_macs

    gmacs = count_macs(model, image)["total"] / 1e9
    rate = matmul_gmacs_per_s() if rate is None else rate
    floor = epoch_seconds_floor(gmacs, train_images, test_images, rate)
    if floor < WARN_SECONDS:
        return None
    return (f"warning: one epoch needs at least {floor / 60:.0f} min on this CPU: {gmacs:.2f} GMACs per image "
            f"(x3 to train) over {train_images} training and {test_images} test images, at the "
            f"{rate:.0f} GMAC/s this CPU multiplies matrices (real layers run slower). Consider fewer --epochs, "
            "a smaller spec (--set stages.*.depth=1, a smaller img_size), or a GPU (--device cuda).")
