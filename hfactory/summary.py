"""``hfactory summary``: per-stage parameters, GMACs and activation memory of a spec, measured on
the meta device (no weights are allocated, so a 700M-parameter spec summarises in seconds).

Definitions (the same for every model, so hfactory and timm models can be compared):

- **params**: ``numel`` of the parameters a stage owns (its downsampler, position embedding and
  blocks); ``head`` is the final norm and the classifier.
- **GMACs**: multiply-accumulates of one image (batch 1, eval mode) in units of 10^9, counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` (MACs = FLOPs / 2) on meta tensors, with the
  attention forced to the explicit ``math`` backend so its two matmuls are counted. Like timm's
  published GMACs this counts convolutions and matrix
  products (``conv``, ``mm``, ``addmm``, ``bmm``, SDPA); norms, activations, pooling, softmax and
  elementwise ops are not counted. (The fused CPU SDPA kernel is missing from the counter's
  registry, so counting with ``sdpa`` would undercount; on meta tensors SDPA decomposes to the
  math path anyway.)
- **activation memory**: bytes of the distinct tensor storages that autograd saves for backward
  during one training-mode forward of ``batch`` images in the parameters' dtype (fp32 unless
  the model is cast), collected with :func:`torch.autograd.graph.saved_tensors_hooks`.
  Parameters and buffers (and views of them) are excluded; a storage saved by several ops, or
  through several views, counts once; the input images count when the first layer saves them.
  Attention with the ``auto``/``sdpa``/``xformers`` backends is counted as a fused kernel
  (it saves q, k, v, the output, the per-row log-sum-exp and any bias: O(N) memory besides the
  bias, as PyTorch's flash and memory-efficient kernels do); with the ``math`` backend the
  (B, H, N, N) probabilities are saved too. (On the CPU, PyTorch runs SDPA with a bias that
  requires grad, e.g. Swin's relative-position bias, on its math path; the estimate is the
  fused kernels' memory, as on CUDA.) Not
  counted: weights, gradients, optimizer states, temporaries freed during the forward,
  allocator overhead, and autocast copies.

Everything here is exact for the meta-device run; the real run's peak memory is higher by the
weights, gradients, optimizer states and transient buffers.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from .errors import UsageError
from .plan import describe_entry, describe_mixers

__all__ = ["summarize", "format_summary", "count_macs", "saved_activation_bytes"]

OTHER = "head"  # label of whatever runs outside the named parts (final norm, pooling, classifier)


@contextlib.contextmanager
def _label_parts(parts: dict[str, nn.Module], on_enter=None, on_exit=None) -> Iterator[list[str]]:
    """Track which named part is running: yields a stack whose top is the current label
    (:data:`OTHER` outside every part). ``on_enter(label)`` / ``on_exit(label)`` run at the
    part's forward boundaries."""
    stack = [OTHER]
    handles = []
    for label, module in parts.items():
        def pre(_module, _args, label=label):
            if on_enter:
                on_enter(label)
            stack.append(label)

        def post(_module, _args, _out, label=label):
            stack.pop()
            if on_exit:
                on_exit(label)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def count_macs(model: nn.Module, images: torch.Tensor, parts: Optional[dict[str, nn.Module]] = None
               ) -> dict[str, int]:
    """Multiply-accumulates of ``model(images)`` per part, counted by ``FlopCounterMode``.

    Works on any module (hfactory's or timm's) and any device, the meta device included. The
    model runs in eval mode under ``no_grad``; hfactory attention is forced to ``math`` so it
    is counted (see the module docstring for what is and is not counted).

    Args:
        model: the module.
        images: its input, e.g. ``(1, C, H, W)`` on the model's device.
        parts: ``{label: submodule}``; each submodule's forward is counted under its label
            (parts must not nest). Everything else is counted under ``"head"``.

    Returns:
        ``{label: MACs}`` (integers, FLOPs / 2) for every part and ``"head"``, plus ``"total"``.
    """
    from .layers.attention import attention_backend

    parts = parts or {}
    macs = {label: 0 for label in parts}
    macs[OTHER] = 0
    start: dict[str, int] = {}
    counter = FlopCounterMode(display=False)

    def enter(label):
        start[label] = counter.get_total_flops()

    def leave(label):
        macs[label] += counter.get_total_flops() - start.pop(label)

    was_training = model.training
    model.eval()
    try:
        with _label_parts(parts, enter, leave), attention_backend("math"), torch.no_grad(), counter:
            model(images)
    finally:
        model.train(was_training)
    total = counter.get_total_flops()
    macs[OTHER] = total - sum(macs[label] for label in parts)
    return {label: value // 2 for label, value in macs.items()} | {"total": total // 2}


class _FusedAttentionOnMeta(TorchFunctionMode):
    """Make ``F.scaled_dot_product_attention`` save for backward what a fused kernel saves.

    On meta tensors SDPA decomposes to its math path, whose autograd graph keeps the
    ``(B, H, M, N)`` probabilities. The fused kernels' ops (which have meta support) keep q, k,
    v, the output, the ``(B, H, M)`` log-sum-exp and the bias instead, like the kernels that
    run: the CPU flash kernel's op, or, for a bias that requires grad (a relative-position
    table), the memory-efficient kernel's op (the CUDA kernel that trains such biases; xformers'
    cutlass kernel saves the same).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        dropout_p, is_causal = kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False)
        if mask is not None and mask.requires_grad:
            mask = mask.expand(*q.shape[:-2], q.shape[-2], k.shape[-2])
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, mask, True, dropout_p, is_causal, scale=kwargs.get("scale"))[0]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p=dropout_p, is_causal=is_causal, attn_mask=mask, scale=kwargs.get("scale"))[0]


def saved_activation_bytes(model: nn.Module, images: torch.Tensor, parts: Optional[dict[str, nn.Module]] = None,
                           fused_attention: bool = True) -> dict[str, int]:
    """Bytes that autograd saves for backward in one training-mode forward, per part.

    Counts each distinct storage once (parameters and buffers excluded); see the module
    docstring for the exact definition. Run it on meta tensors to allocate nothing.

    Args:
        model: the module; it runs in train mode (dropout and drop-path active), then its mode
            is restored.
        images: the input batch, e.g. ``(B, C, H, W)``.
        parts: ``{label: submodule}`` as in :func:`count_macs`.
        fused_attention: count ``F.scaled_dot_product_attention`` as a fused kernel (O(N) saved);
            False counts whatever the call decomposes to on ``images``' device.

    Returns:
        ``{label: bytes}`` for every part and ``"head"``, plus ``"total"``.
    """
    parts = parts or {}
    state = [t.untyped_storage()._cdata for t in list(model.parameters()) + list(model.buffers())]
    seen = set(state)
    saved = {label: 0 for label in parts}
    saved[OTHER] = 0
    keep = []  # hold every saved tensor so no storage is freed (and its address reused) mid-count

    with _label_parts(parts) as stack:
        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            if storage._cdata not in seen:
                seen.add(storage._cdata)
                saved[stack[-1]] += storage.nbytes()
            keep.append(t)
            return t

        was_training = model.training
        model.train()
        try:
            mode = _FusedAttentionOnMeta() if fused_attention else contextlib.nullcontext()
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
                out = model(images)
            del out
        finally:
            model.train(was_training)
    keep.clear()
    return saved | {"total": sum(saved.values())}


def check_batch(batch) -> None:
    """Raise ValueError unless ``batch`` (images per measured forward) is an integer >= 1."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UsageError(f"--batch {batch!r}: must be an integer >= 1 (images per measured forward)")


def summarize(spec, batch: int = 1) -> dict:
    """Per-stage numbers of ``spec`` (an :class:`EncoderSpec`), measured on the meta device.

    Args:
        spec: a validated spec.
        batch: images per training forward for the activation-memory estimate (>= 1).

    Returns:
        a JSON-ready dict: ``name``, ``img_size``, ``batch``, ``stages`` (one dict per stage:
        ``index, in_grid, out_grid, tokens, in_chs, out_chs, heads, depth, mixer, downsample,
        params, gmacs, activation_bytes``), ``head`` and ``total`` (``params, gmacs,
        activation_bytes``), ``param_bytes``, ``attention_memory`` (how attention memory was counted),
        ``seconds``, ``definitions`` and ``unmeasured`` (None; or why every ``gmacs`` and
        ``activation_bytes`` is None: a layer that cannot run on the meta device).

    Raises:
        ValueError: ``batch < 1``.
        PlanError: the spec does not resolve.
    """
    from .encoder import HierarchicalEncoder
    from .plan import resolve

    check_batch(batch)
    tick = time.perf_counter()
    plan = resolve(spec)
    with torch.device("meta"):
        model = HierarchicalEncoder(spec, plan)
    h, w = plan.img_size
    parts = {f"stage{i}": stage for i, stage in enumerate(model.stages)}
    fused = plan.attn_backend != "math"
    unmeasured = None
    try:
        macs = count_macs(model, torch.empty(1, plan.in_chans, h, w, device="meta"), parts)
        saved = saved_activation_bytes(model, torch.empty(batch, plan.in_chans, h, w, device="meta"), parts, fused)
    except (RuntimeError, NotImplementedError) as err:  # an op without a meta kernel: report what we have
        unmeasured = f"the model does not run on the meta device ({type(err).__name__}: {str(err)[:300]})"
        macs = {label: None for label in [*parts, OTHER, "total"]}
        saved = dict(macs)
    dtype_bytes = {p.dtype.itemsize for p in model.parameters()} or {4}

    stages = []
    for s, stage in zip(plan.stages, model.stages):
        label = f"stage{s.index}"
        stages.append({
            "index": s.index, "in_grid": list(s.in_grid), "out_grid": list(s.out_grid), "tokens": s.seq_len,
            "in_chs": s.in_chs, "out_chs": s.out_chs, "heads": s.num_heads, "depth": s.depth,
            "mixer": describe_mixers(s),
            "downsample": describe_entry("downsample", s.downsample),
            "params": sum(p.numel() for p in stage.parameters()), "gmacs": _g(macs[label]),
            "activation_bytes": saved[label],
        })
    total_params = sum(p.numel() for p in model.parameters())
    head_params = total_params - sum(s["params"] for s in stages)
    return {
        "name": plan.name, "img_size": list(plan.img_size), "in_chans": plan.in_chans,
        "num_classes": plan.num_classes, "batch": batch, "stages": stages,
        "head": {"params": head_params, "gmacs": _g(macs[OTHER]), "activation_bytes": saved[OTHER]},
        "total": {"params": total_params, "gmacs": _g(macs["total"]), "activation_bytes": saved["total"]},
        "param_bytes": total_params * max(dtype_bytes),
        "attention_memory": "fused (q, k, v, out, logsumexp, bias saved)" if fused else "math ((B, H, N, N) probabilities saved)",
        "seconds": time.perf_counter() - tick,
        "unmeasured": unmeasured,
        # Sparse MAE pretraining (hfactory pretrain): None without mask units, else the plan's verdict
        "mae": None if plan.mask_unit_size is None else (
            "compatible" if plan.mae_compatible else f"incompatible: {plan.mae_incompatibility}"),
        "definitions": {
            "gmacs": "multiply-accumulates per image / 1e9: FlopCounterMode FLOPs / 2 on the meta device with "
                     "math attention; conv, mm, addmm, bmm and attention matmuls only (as timm)",
            "activation_bytes": f"distinct storages autograd saves for backward in one training-mode forward "
                                f"of batch {batch}, parameters and buffers excluded",
        },
    }


def _g(macs: Optional[int]) -> Optional[float]:
    return None if macs is None else macs / 1e9


def _bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _gm(gmacs: Optional[float]) -> str:
    return "-" if gmacs is None else f"{gmacs:.3f}"


def format_summary(summary: dict) -> str:
    """The table ``hfactory summary`` prints: one row per stage, then the head and the totals."""
    h, w = summary["img_size"]
    total = summary["total"]
    lines = [f"{summary['name'] or 'encoder'}: {summary['in_chans']}x{h}x{w} image, {len(summary['stages'])} "
             f"stages, {summary['num_classes']} classes"]
    cols = ["stage", "grid in -> out", "tokens", "width", "heads", "depth", "mixer", "downsample", "params",
            "GMACs", f"act. mem (batch {summary['batch']})"]
    rows = []
    for s in summary["stages"]:
        rows.append([str(s["index"]), f"{s['in_grid'][0]}x{s['in_grid'][1]} -> {s['out_grid'][0]}x{s['out_grid'][1]}",
                     str(s["tokens"]), f"{s['in_chs']}->{s['out_chs']}", "-" if s["heads"] is None else str(s["heads"]),
                     str(s["depth"]), s["mixer"], s["downsample"], _params(s["params"]), _gm(s["gmacs"]),
                     _bytes(s["activation_bytes"])])
    head = summary["head"]
    rows.append(["head", "", "", "", "", "", "", "", _params(head["params"]), _gm(head["gmacs"]),
                 _bytes(head["activation_bytes"])])
    rows.append(["total", "", "", "", "", str(sum(s["depth"] for s in summary["stages"])), "", "",
                 _params(total["params"]), _gm(total["gmacs"]), _bytes(total["activation_bytes"])])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    right = {"tokens", "params", "GMACs"} | {cols[-1]}
    fmt = "  ".join(f"{{:>{n}}}" if c in right else f"{{:<{n}}}" for c, n in zip(cols, widths))
    lines += [fmt.format(*cols), *(fmt.format(*r) for r in rows)]
    lines.append(f"params: {total['params']:,} ({_bytes(summary['param_bytes'])} of weights; training with AdamW "
                 f"holds about 4x that: weights, gradients, 2 moments)")
    lines.append(f"GMACs: per image, conv/matmul only (FlopCounterMode FLOPs / 2, as timm reports); "
                 f"act. mem: tensors saved for backward by a training forward of {summary['batch']} image(s), "
                 f"attention counted as {summary['attention_memory']}")
    if summary.get("unmeasured"):
        lines.append(f"GMACs and activation memory not measured: {summary['unmeasured']}")
    if summary.get("mae"):
        lines.append(f"sparse MAE pretraining (mask units): {summary['mae']}")
    return "\n".join(lines)
