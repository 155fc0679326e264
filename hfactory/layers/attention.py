"""The one attention entry point; every attention in hfactory calls :func:`attention`.

Backends:

- ``xformers``: ``xformers.ops.memory_efficient_attention`` (BMHK layout ``[B, M, H, K]``,
  additive bias as a full ``[B, H, M, N]`` tensor). Used only for CUDA tensors and only when
  xformers imports with its compiled kernels; xformers has no CPU kernels.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (fused flash / memory-efficient
  kernels where PyTorch has them, CPU included).
- ``math``: explicit ``softmax(q k^T * scale + bias) v``; the reference the others are tested
  against. Its score matrix is ``B*H*M*N`` floats: quadratic memory.
- ``auto``: ``xformers`` when it applies, else ``sdpa``.

The backend comes from the model (spec ``attn_backend``), and :func:`attention_backend` overrides
it for a block of code (``with hfactory.attention_backend("math"): ...``).

Facts about the xformers kernels used here (``xformers.ops.fmha``): the layout is
BMHK, not SDPA's BHMK; a tensor bias needs the full shape (no broadcasting) and its last-dim
storage padded to a multiple of 8 elements (sliced back to N); only the cutlass kernel supports
a bias that requires grad, which xformers' dispatcher picks when given such a bias.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import warnings
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from ..errors import UsageError

__all__ = ["attention", "attention_backend", "xformers_available", "BACKENDS"]

BACKENDS = ("auto", "xformers", "sdpa", "math")

_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("hfactory_attn_backend", default=None)


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Force every :func:`attention` call in this block to use backend ``name``.

    Raises:
        ValueError: ``name`` is not one of :data:`BACKENDS`.
    """
    if name not in BACKENDS:
        raise UsageError(f"unknown attention backend {name!r}; valid: {', '.join(BACKENDS)}")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


@functools.lru_cache(maxsize=1)
def _load_xformers() -> Optional[Callable]:
    """``memory_efficient_attention`` if xformers imports with working kernels, else None.

    An xformers wheel built for another torch imports but warns that it "can't load C++/CUDA
    extensions"; its ops then fail. Such an install counts as unavailable, never as an error.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import xformers.ops as xops
        if any("C++/CUDA extensions" in str(w.message) for w in caught):
            warnings.warn("xformers is installed but its compiled kernels do not load with this torch; "
                          "hfactory uses PyTorch SDPA instead", RuntimeWarning, stacklevel=2)
            return None
        return xops.memory_efficient_attention
    except Exception:  # ImportError, or any failure inside a broken install
        return None


def xformers_available() -> bool:
    """True when xformers imports with its compiled kernels (they only run on CUDA)."""
    return _load_xformers() is not None


@functools.lru_cache(maxsize=None)
def _warn_fallback(requested: str, reason: str) -> None:
    warnings.warn(f"attention backend {requested!r} unavailable ({reason}); using 'sdpa'", RuntimeWarning,
                  stacklevel=3)


def _pick_backend(requested: str, q: torch.Tensor) -> str:
    requested = _override.get() or requested
    if requested in ("sdpa", "math"):
        return requested
    if requested not in ("auto", "xformers"):
        raise UsageError(f"unknown attention backend {requested!r}; valid: {', '.join(BACKENDS)}")
    if q.is_cuda and xformers_available():
        return "xformers"
    if requested == "xformers":
        _warn_fallback("xformers", "tensors are not on CUDA" if not q.is_cuda else "xformers not importable")
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
              scale: Optional[float] = None, dropout_p: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention ``softmax(q k^T * scale + bias) v``.

    Args:
        q: ``(B, H, M, D)`` queries (SDPA layout; converted internally for xformers).
        k: ``(B, H, N, D)`` keys.
        v: ``(B, H, N, Dv)`` values.
        bias: optional additive bias broadcastable to ``(B, H, M, N)`` (e.g. a relative-position
            bias ``(1, H, M, N)`` or a mask with ``-inf``); may require grad.
        scale: defaults to ``1 / sqrt(D)``.
        dropout_p: attention dropout probability (pass 0 in eval).
        backend: ``auto`` | ``xformers`` | ``sdpa`` | ``math``; overridden by
            :func:`attention_backend`.

    Returns:
        ``(B, H, M, Dv)``.

    Backends: ``auto`` is xformers' ``memory_efficient_attention`` for CUDA tensors when xformers
    loads, else PyTorch SDPA; ``xformers`` asked for where it cannot run falls back to SDPA with a
    ``RuntimeWarning``; ``math`` is the plain reference (scores materialised).

    Raises:
        ValueError: an unknown ``backend`` (the valid ones are named).
    """
    chosen = _pick_backend(backend, q)
    if chosen == "xformers":
        return _xformers_attention(q, k, v, bias, scale, dropout_p, _load_xformers())
    if chosen == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    return math_attention(q, k, v, bias, scale=scale, dropout_p=dropout_p)


def math_attention(q, k, v, bias=None, *, scale=None, dropout_p=0.0):
    """Reference attention in plain tensor ops; same contract as :func:`attention`."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def _aligned_bias(bias: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """The bias expanded to the full ``(B, H, M, N)`` and stored with N padded to a multiple of 8.

    xformers' cutlass kernel does not broadcast (issue #783) and needs every stride but the last
    to be a multiple of 8 elements (``_check_bias_alignment``); slicing a padded buffer keeps
    the values and the gradient path while meeting both rules.
    """
    b, h, m, n = shape
    padded = -(-n // 8) * 8
    storage = bias.new_zeros((b, h, m, padded), dtype=dtype)
    storage[..., :n] = bias.to(dtype).expand(b, h, m, n)
    return storage[..., :n]


def _xformers_attention(q, k, v, bias, scale, dropout_p, op) -> torch.Tensor:
    """Call ``op`` (``memory_efficient_attention``) in its BMHK layout and return SDPA layout."""
    # (B, H, M, D) -> (B, M, H, D): a view; xformers accepts it since the last stride is 1.
    qx, kx, vx = (t.transpose(1, 2) for t in (q, k, v))
    attn_bias = None
    if bias is not None:
        attn_bias = _aligned_bias(bias, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), q.dtype)
    out = op(qx, kx, vx, attn_bias=attn_bias, p=dropout_p, scale=scale)
    return out.transpose(1, 2)
