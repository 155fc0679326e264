"""The one attention entry point; every attention in hfactory calls :func:`attention`.

Backends:

- ``xformers``: ``xformers.ops.memory_efficient_attention`` (BMHK layout ``[B, M, H, K]``,
  additive bias as a ``[B, H, M, N]``-shaped tensor). Used only for CUDA tensors, only when
  xformers imports with its compiled kernels (xformers has no CPU kernels), and only for calls
  :func:`xformers_unsupported_reason` accepts; anything else goes to SDPA.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (fused flash / memory-efficient
  kernels where PyTorch has them, CPU included). It broadcasts ``attn_mask`` itself, so a bias
  such as ``(1, H, M, N)`` is never copied ``B`` times.
- ``math``: explicit ``softmax(q k^T * scale + bias) v``; the reference the others are tested
  against. Its score matrix is ``B*H*M*N`` floats: quadratic memory.
- ``auto``: unbiased calls go to ``xformers`` when :func:`xformers_unsupported_reason` says it can
  run them, else to ``sdpa``; biased calls go where :data:`BIASED_CALLS_IN_AUTO` says (``sdpa``
  by default; see there).

The backend comes from the model (spec ``attn_backend``), and :func:`attention_backend` overrides
it for a block of code (``with hfactory.attention_backend("math"): ...``).

Facts about the xformers kernels used here (``xformers.ops.fmha``, read from the 0.0.35 wheel's
source and its issue tracker; summarised in ``shared/reference/xformers_ops.md``): the layout is
BMHK, not SDPA's BHMK; a tensor bias must have the full shape (no implicit broadcasting, #783),
a contiguous last dim and every other stride a multiple of 8 elements (``_check_bias_alignment``;
strides of 0 from ``expand`` pass); only the cutlass kernel takes a tensor bias, and only its
backward computes a bias gradient (``SUPPORTS_ATTN_BIAS_GRAD``), and cutlass is capped at compute
capability 9.0 (``CUDA_MAXIMUM_COMPUTE_CAPABILITY``); the kernels put heads and batch on the
CUDA grid's y and z axes, each limited to 65535 blocks, which xformers does not check
(#845, ``getBlocksGrid`` in ``kernel_forward.h`` / ``kernel_backward.h``).
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

__all__ = ["attention", "attention_backend", "xformers_available", "xformers_unsupported_reason", "BACKENDS",
           "BIASED_CALLS_IN_AUTO", "XFORMERS_GRID_LIMIT"]

BACKENDS = ("auto", "xformers", "sdpa", "math")

#: Where the ``auto`` backend sends a call that has a bias: ``"sdpa"`` or ``"xformers"``.
#:
#: ``"sdpa"`` (the default) because SDPA broadcasts ``attn_mask`` without copying it (PyTorch's
#: memory-efficient kernel reads it through zero strides), while xformers takes a tensor bias only
#: through its cutlass kernel, which xformers itself calls "not supported efficiently" (#925), and
#: a bias that requires grad has to be materialised at the full ``(B, H, M, N)`` for it (see
#: :func:`_xformers_bias`). Unbiased calls are where xformers is expected to win (Hiera's mask-unit
#: attention, global attention). Nobody has measured this on a GPU yet: ``benchmarks/gpu_check.py``
#: times biased calls on both backends ("Biased attention: xformers vs SDPA"); flip this when it
#: measures xformers faster. Read at call time, so a benchmark may set it for a run.
BIASED_CALLS_IN_AUTO: str = "sdpa"

#: The largest batch (and head count) xformers' kernels can launch: they put heads on the CUDA
#: grid's y axis and batch on its z axis (cutlass ``getBlocksGrid``: ``dim3(ceil(M / kQueriesPerBlock),
#: num_heads, num_batches)``; FlashAttention-2: ``dim3(num_m_block, b, h)``), and both axes are
#: limited to 65535 blocks. xformers does not check this (issue #845: a batch of 65536 fails with
#: "CUDA error: invalid configuration argument"); hfactory folds windows and mask units into the
#: batch, so Hiera and Swin reach it at high resolution.
XFORMERS_GRID_LIMIT = 65535

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


@functools.lru_cache(maxsize=256)
def _warn_fallback(requested: str, reason: str) -> None:
    warnings.warn(f"attention backend {requested!r} cannot run this call ({reason}); using 'sdpa'", RuntimeWarning,
                  stacklevel=3)


# --------------------------------------------------------------------------- which calls xformers runs

_XFORMERS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # cutlass; flash: 16-bit only
_CUTLASS_MAX_CAPABILITY = (9, 0)   # cutlass.FwOp/BwOp.CUDA_MAXIMUM_COMPUTE_CAPABILITY (0.0.35)
_CUTLASS_MAX_K = 65536             # cutlass.FwOp.SUPPORTED_MAX_K
_BIAS_ALIGN = 8                    # bias strides: 128 bits / element bits, 8 covers fp16/bf16 and fp32
_UNKNOWN = object()                # xformers' own check could not be asked
_xformers_verdicts: dict = {}      # memo of xformers' own check, keyed by call metadata


def _gemm_alignment(dtype: torch.dtype, capability: Optional[tuple[int, int]]) -> int:
    """Head-dim alignment cutlass needs (``cutlass._minimum_gemm_alignment``): on sm80+ 4 elements,
    and 128 bits where tensor cores are used (8 for fp16/bf16); on sm70-75 8 for 16-bit types and
    1 for fp32; 1 below sm70. An unknown capability is taken as sm80+ (the strictest rule)."""
    bits = 16 if dtype in (torch.float16, torch.bfloat16) else 32
    sm = 80 if capability is None else capability[0] * 10 + capability[1]
    tensor_cores = sm >= 80 or (sm >= 70 and bits == 16)
    align = 4 if sm >= 80 else 1
    return max(align, 128 // bits) if tensor_cores else align


def _grid_reason(q) -> Optional[str]:
    """Rule 3 of :func:`xformers_unsupported_reason`: batch and heads within the CUDA grid."""
    if q.ndim != 4:
        return None
    b, h = q.shape[0], q.shape[1]
    if b > XFORMERS_GRID_LIMIT:
        return (f"batch {b} > {XFORMERS_GRID_LIMIT} (windows/units folded into the batch): beyond the CUDA "
                f"grid's z limit of xformers' kernels (xformers #845)")
    if h > XFORMERS_GRID_LIMIT:
        return f"{h} heads > {XFORMERS_GRID_LIMIT}: beyond the CUDA grid's y limit of xformers' kernels"
    return None


def _static_reason(q, k, v, bias, needs_grad: bool, device_type: str,
                   capability: Optional[tuple[int, int]]) -> Optional[str]:
    """The rules of :func:`xformers_unsupported_reason` that need no xformers, in order."""
    if device_type != "cuda":
        return f"device={device_type}: xformers has CUDA kernels only"
    if q.dtype not in _XFORMERS_DTYPES:
        return f"dtype={q.dtype}: xformers' kernels take float32, float16 and bfloat16"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if q.dtype == torch.bfloat16 and capability is not None and capability < (8, 0):
        return f"bfloat16 needs compute capability >= 8.0, this GPU has {capability[0]}.{capability[1]}"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return "q, k, v must be 4-D (B, H, M, D)"
    if tuple(k.shape[:2]) != tuple(q.shape[:2]) or tuple(v.shape[:3]) != tuple(k.shape[:3]):
        return f"q/k/v batch or heads differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    grid = _grid_reason(q)
    if grid is not None:
        return grid
    d, dv = q.shape[-1], v.shape[-1]
    if max(d, dv) > _CUTLASS_MAX_K:
        return f"head dim {max(d, dv)} > {_CUTLASS_MAX_K}"
    align = _gemm_alignment(q.dtype, capability)
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.shape[-1] % align:
            return f"{name} head dim {t.shape[-1]} is not a multiple of {align} ({q.dtype})"
        if t.stride(-1) != 1:
            return f"{name}'s last dim is not contiguous (stride {t.stride(-1)})"
        if t.shape[1] > 1 and t.stride(1) % align:  # BMHK's stride(-2): the heads stride
            return f"{name}'s heads stride {t.stride(1)} is not a multiple of {align}"
    if bias is not None and capability is not None and capability > _CUTLASS_MAX_CAPABILITY:
        what = "a bias that requires grad" if needs_grad and bias.requires_grad else "a tensor bias"
        return (f"{what} needs xformers' cutlass kernel, which stops at compute capability 9.0; this GPU has "
                f"{capability[0]}.{capability[1]}")
    return None


def _condense(message: str) -> str:
    """xformers' multi-line "No operator found" message as one line (operators and their reasons)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    keep = [ln for ln in lines if ln.startswith("`") or not ln.startswith(("query", "key", "value", "attn_bias", "p ",
                                                                            "No operator"))]
    return "xformers refuses it: " + " ".join(keep)[:600]


def _ask_xformers(q, k, v, bias, dropout_p: float, scale, needs_grad: bool):
    """xformers' own dispatcher on this call (``fmha.Inputs`` + ``dispatch._dispatch_fw`` /
    ``_dispatch_bw``, which run every operator's ``not_supported_reasons``): None when some
    operator runs it, its refusal as one line, or :data:`_UNKNOWN` when xformers' private API
    could not be asked (it moves between releases). The bias is probed with a meta tensor of the
    layout :func:`_xformers_bias` produces, so nothing is allocated; verdicts are memoised by the
    call's metadata."""
    key = (str(q.device), q.dtype, tuple(q.shape), q.stride(), tuple(k.shape), k.stride(), tuple(v.shape),
           v.stride(), None if bias is None else bool(bias.requires_grad), dropout_p > 0, scale is None,
           needs_grad, torch.are_deterministic_algorithms_enabled())
    if key in _xformers_verdicts:
        return _xformers_verdicts[key]
    try:
        from xformers.ops import fmha
        from xformers.ops.fmha import dispatch
    except Exception:
        return _UNKNOWN
    qx, kx, vx = (t.transpose(1, 2) for t in (q, k, v))
    probe = None
    if bias is not None:
        b, h, m, n = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        base = torch.empty((b, h, m, -(-n // _BIAS_ALIGN) * _BIAS_ALIGN), device="meta", dtype=q.dtype,
                           requires_grad=bool(bias.requires_grad))
        probe = base[..., :n]
    try:
        inp = fmha.Inputs(query=qx, key=kx, value=vx, attn_bias=probe, p=dropout_p, scale=scale)
        dispatch._dispatch_fw(inp, needs_grad)
        if needs_grad:
            try:
                dispatch._dispatch_bw(inp, None)
            except TypeError:  # releases before the varlen_lse_packed argument
                dispatch._dispatch_bw(inp)
        verdict = None
    except NotImplementedError as e:
        verdict = _condense(str(e))
    except Exception:
        return _UNKNOWN
    if len(_xformers_verdicts) > 4096:
        _xformers_verdicts.clear()
    _xformers_verdicts[key] = verdict
    return verdict


def xformers_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0, *,
                                scale: Optional[float] = None, needs_grad: Optional[bool] = None,
                                device_type: Optional[str] = None,
                                capability: Optional[tuple[int, int]] = None,
                                ask_xformers: bool = True) -> Optional[str]:
    """Why xformers' ``memory_efficient_attention`` cannot run this call; None when it can.

    A pure predicate on the call's metadata (device, dtype, shapes, strides, ``requires_grad``):
    it reads no tensor values and never launches a kernel. :func:`attention`'s ``auto`` backend
    sends a call to xformers only when this is None; ``xformers`` asked for explicitly falls back
    to SDPA with a ``RuntimeWarning`` naming the reason.

    Args:
        q: ``(B, H, M, D)`` queries, SDPA layout (as :func:`attention` takes them).
        k: ``(B, H, N, D)`` keys.
        v: ``(B, H, N, Dv)`` values.
        bias: the additive bias :func:`attention` was given (any shape broadcastable to
            ``(B, H, M, N)``), or None. Only its presence and ``requires_grad`` matter: it reaches
            xformers re-laid-out by :func:`_xformers_bias`.
        dropout_p: attention dropout probability.
        scale: the softmax scale (None: ``1/sqrt(D)``).
        needs_grad: whether a backward will follow; default: grad mode is on and one of
            ``q, k, v, bias`` requires grad.
        device_type: the device to judge for (default ``q.device.type``). Passing ``"cuda"`` with
            CPU tensors judges a CUDA call from its metadata alone (how the CPU tests use it).
        capability: the GPU's compute capability ``(major, minor)``; default: the capability of
            ``q``'s CUDA device, or unknown (None) for tensors not on CUDA, in which case the
            strictest rule (sm80+) is used for alignment and the capability rules are skipped.
        ask_xformers: also ask xformers' own dispatcher, when the tensors are on CUDA, xformers
            loads and no ``torch.compile`` trace is running.

    Returns:
        None, or one line saying why not.

    Rules, in order (sources: xformers 0.0.35 ``xformers/ops/fmha/{common,cutlass,flash,
    dispatch}.py``, ``csrc/attention/cuda/fmha/kernel_{forward,backward}.h`` of 0.0.22 for the
    grid, issues #783, #845, #925; ``shared/reference/xformers_ops.md``):

    1. Device: CUDA only (``SUPPORTED_DEVICES = {"cuda"}``; there are no CPU kernels).
    2. Dtype: float32, float16, bfloat16 (cutlass's ``SUPPORTED_DTYPES``; flash takes only the
       16-bit ones), the same for q, k and v; bfloat16 needs compute capability >= 8.0.
    3. Batch and heads: ``B <= 65535`` and ``H <= 65535`` (:data:`XFORMERS_GRID_LIMIT`). This one
       is always checked here, because xformers' own check does not know it.
    4. Head dims ``D`` and ``Dv``: at most 65536 (cutlass ``SUPPORTED_MAX_K``) and multiples of
       cutlass's GEMM alignment (8 for fp16/bf16 and 4 for fp32 on sm80+,
       ``_minimum_gemm_alignment``); last dim contiguous and the heads stride aligned the same
       way (``check_lastdim_alignment_stride1``).
    5. A tensor bias (and a bias that requires grad: ``SUPPORTS_ATTN_BIAS_GRAD`` is cutlass's
       backward alone; flash rejects tensor biases) needs cutlass, which xformers caps at compute
       capability 9.0 (``CUDA_MAXIMUM_COMPUTE_CAPABILITY``).

    When ``ask_xformers`` holds and xformers can be asked, rules 3 and then xformers' own verdict
    (every operator's ``not_supported_reasons`` through its dispatcher, forward and, with
    ``needs_grad``, backward; memoised per call shape) replace rules 1, 2, 4 and 5; if xformers'
    private API cannot be called, the static rules stand.

    Raises:
        Nothing for odd inputs: a call xformers cannot run is a reason, not an error.
    """
    device_type = device_type or q.device.type
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, bias))
    real_cuda = q.device.type == "cuda" and device_type == "cuda"
    if capability is None and real_cuda:
        capability = torch.cuda.get_device_capability(q.device)
    if ask_xformers and real_cuda and not _compiling() and xformers_available():
        grid = _grid_reason(q)
        if grid is not None:
            return grid
        verdict = _ask_xformers(q, k, v, bias, dropout_p, scale, needs_grad)
        if verdict is not _UNKNOWN:
            return verdict
    return _static_reason(q, k, v, bias, needs_grad, device_type, capability)


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # very old torch
        return False


def _pick_backend(requested: str, q: torch.Tensor, k: Optional[torch.Tensor] = None,
                  v: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                  dropout_p: float = 0.0, scale: Optional[float] = None) -> str:
    """The backend that runs this call (see :func:`attention`); ``k``/``v`` default to ``q``."""
    requested = _override.get() or requested
    if requested in ("sdpa", "math"):
        return requested
    if requested not in ("auto", "xformers"):
        raise UsageError(f"unknown attention backend {requested!r}; valid: {', '.join(BACKENDS)}")
    if requested == "auto" and bias is not None and BIASED_CALLS_IN_AUTO != "xformers":
        if not q.is_cuda and bias.requires_grad and torch.is_grad_enabled():
            # PyTorch's CPU SDPA has no fused kernel for a bias that needs a gradient and falls
            # back to its own math path, whose safe softmax adds an isneginf/all/where pass over
            # the scores: ~3% of a Swin-T training step (RESULTS.md, "Presets vs timm"). The plain
            # math below is the same computation without it (hfactory's biases leave no row fully
            # masked, so the safe softmax's zero rows never arise).
            return "math"
        return "sdpa"
    if not q.is_cuda:
        reason = "tensors are not on CUDA"
    elif not xformers_available():
        reason = "xformers not importable"
    else:
        reason = xformers_unsupported_reason(q, q if k is None else k, q if v is None else v, bias, dropout_p,
                                             scale=scale)
    if reason is None:
        return "xformers"
    if requested == "xformers":
        _warn_fallback("xformers", reason)
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

    Backends: ``auto`` sends an unbiased call to xformers' ``memory_efficient_attention`` when
    the tensors are on CUDA, xformers loads and :func:`xformers_unsupported_reason` finds nothing
    against it, and everything else to PyTorch SDPA; a biased call goes to
    :data:`BIASED_CALLS_IN_AUTO` (SDPA, which broadcasts the bias without copying it; if that
    policy says xformers, the same predicate applies), except on the CPU with a bias that
    requires grad under autograd, which runs ``math`` (SDPA would take its slower math fallback).
    ``xformers`` asked for where it cannot run falls back to SDPA with a ``RuntimeWarning`` naming the reason; with a bias it re-lays the bias
    out as :func:`_xformers_bias` describes. ``math`` is the plain reference (scores materialised).

    Raises:
        ValueError: an unknown ``backend`` (the valid ones are named).
    """
    chosen = _pick_backend(backend, q, k, v, bias, dropout_p, scale)
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


def _bias_strides_ok(t: torch.Tensor) -> bool:
    """xformers' tensor-bias layout rule: last dim contiguous, every other stride a multiple of
    8 elements (``_check_bias_alignment``; 0 from ``expand`` qualifies)."""
    return t.stride(-1) == 1 and all(s % _BIAS_ALIGN == 0 for s in t.stride()[:-1])


def _xformers_bias(bias: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """``bias`` as xformers' cutlass kernel takes it: shape ``(B, H, M, N)``, ``dtype``, strides
    that :func:`_bias_strides_ok` accepts. Materialises only what the kernel requires:

    - No copy when the bias, broadcast by ``expand`` (zero strides), already has that layout
      (e.g. a ``(1, H, M, N)`` bias with N a multiple of 8, cast to ``dtype``).
    - A copy of the bias *at its own size* with the last dim padded to a multiple of 8 and
      sliced back to N (the padding hint of ``_check_bias_alignment``), then ``expand``-ed:
      ``(1, H, M, N)`` costs ``H*M*N_padded`` elements, never ``B`` times that.
    - A bias that requires grad is copied at the full ``(B, H, M, N_padded)``: cutlass's backward
      checks the bias's shape (``BwOp.not_supported_reasons``) and writes a full-shape bias
      gradient anyway, and a zero-stride bias through its backward is not verified on a GPU
      here; autograd sums the gradient back to the bias's own shape.

    The slices keep the values and the gradient path. Raises nothing of its own (a bias that does
    not broadcast to ``shape`` raises PyTorch's ``RuntimeError`` from ``expand``).
    """
    b, h, m, n = shape
    t = bias.to(dtype)
    while t.ndim < 4:
        t = t.unsqueeze(0)
    padded_n = -(-n // _BIAS_ALIGN) * _BIAS_ALIGN
    if t.requires_grad:
        storage = t.new_zeros((b, h, m, padded_n))
        storage[..., :n] = t.expand(b, h, m, n)
        return storage[..., :n]
    full = t.expand(b, h, m, n)
    if _bias_strides_ok(full):
        return full
    own = t.expand(*t.shape[:-1], n)  # a bias broadcast along N gets its N materialised (stride 1 needed)
    storage = t.new_zeros((*own.shape[:-1], padded_n))
    storage[..., :n] = own
    return storage[..., :n].expand(b, h, m, n)


def _aligned_bias(bias: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """Compatibility name of :func:`_xformers_bias` (earlier releases always copied to the full shape)."""
    return _xformers_bias(bias, shape, dtype)


def _xformers_attention(q, k, v, bias, scale, dropout_p, op) -> torch.Tensor:
    """Call ``op`` (``memory_efficient_attention``) in its BMHK layout and return SDPA layout."""
    # (B, H, M, D) -> (B, M, H, D): a view; xformers accepts it since the last stride is 1.
    qx, kx, vx = (t.transpose(1, 2) for t in (q, k, v))
    attn_bias = None
    if bias is not None:
        attn_bias = _xformers_bias(bias, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), q.dtype)
    out = op(qx, kx, vx, attn_bias=attn_bias, p=dropout_p, scale=scale)
    return out.transpose(1, 2)
