"""HierarchicalEncoder: the built model, with timm's backbone API and one behaviour for all.

timm's names and signatures (timm 1.0.31: ``forward_intermediates``, ``feature_info``, ...), but the same behaviour for
every architecture hfactory builds, where timm's models disagree:

- ``forward_features`` returns the final map as NCHW ``(B, C, H, W)``, always.
- ``forward_intermediates`` returns NCHW (or NHWC with ``output_fmt='NHWC'``) for every stage;
  a stage in the ``seq`` layout (no 2-D structure: HVT's 1-D pooling, greedy merging) returns its
  ``N`` tokens as an ``N x 1`` map ``(B, C, N, 1)``, the grid its plan records;
  ``norm=True`` applies the final norm (channel-wise) to the last stage's map; ``stop_early``
  defaults to False.
- ``feature_info`` modules are real module paths (``stages.i``).
- ``no_weight_decay`` lists every position embedding / table parameter by its full name.
- ``reset_classifier`` and ``prune_intermediate_layers`` keep ``.spec`` and ``.plan`` true, so a
  pruned or re-headed model saves and reloads.
- Sparse masked forward (MAE, :mod:`hfactory.mae`): ``forward_features(x, mask=keep)`` and
  ``forward_intermediates(x, mask=keep)`` with a bool ``(B, U)`` mask over the mask units (True =
  keep, Hiera's convention) delete the masked units after stage 0 and return the kept units'
  features in the units layout ``(B, K, uh, uw, C)``.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .errors import UsageError
from .builder import Stage, build_component, build_stages
from .features import feature_take_indices
# re-exported: hfactory.encoder was their home before hfactory.io
from .io import SPEC_NAME, WEIGHTS_NAME, load_checked, load_model_dir, save_model_dir, spec_hash, spec_hashes  # noqa: F401
from .layers.head import ClassifierHead, make_classifier
from .layers.layout import units_to_grid
from .layers.token_sizes import check_token_sizes
from .plan import Plan, resolve
from .spec.io import SpecSource, load_spec
from .spec.model import NO_NORM, EncoderSpec

__all__ = ["HierarchicalEncoder", "build_encoder", "from_pretrained"]


class HierarchicalEncoder(nn.Module):
    """An encoder built from an :class:`EncoderSpec` (see :func:`build_encoder`).

    Input images are ``(B, in_chans, H, W)`` float tensors; any ``(H, W)`` the plan accepts
    works (position embeddings are interpolated), others raise the plan's ``PlanError``.

    Attributes:
        spec: the :class:`EncoderSpec` (kept true after ``reset_classifier`` / pruning).
        plan: the resolved :class:`Plan` for ``spec.img_size``.
        stages: ``nn.ModuleList`` of ``Stage`` (``downsample``, ``pos_embed``, ``blocks``).
        norm: the final norm (before pooling if ``spec.head_norm_first``, else after).
        head: ``ClassifierHead`` (``fc`` is the classifier).
        feature_info: ``[dict(num_chs, reduction, module)]`` per stage.
        last_token_sizes: sizes ``(B, N)`` of the final tokens of the last ``forward_features`` /
            ``forward_intermediates`` call (None without merged tokens).
    """

    model_kind = "encoder"  # recorded in saved weights (hfactory.models reads it back)
    #: layout of ``forward_features`` (timm's attribute: its tests, ``features_only`` wrappers and
    #: smp read it); ``forward_intermediates`` gives NCHW by default too
    output_fmt = "NCHW"
    #: sizes ``(B, N)`` of the final tokens of the last forward_features / forward_intermediates
    #: call on this instance (None without merged tokens); forward_head falls back to them
    last_token_sizes: Optional[torch.Tensor] = None

    def __init__(self, spec: EncoderSpec, plan: Optional[Plan] = None, *,
                 device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None):
        """Build ``spec`` (with its resolved ``plan``, resolved here when None).

        ``device`` / ``dtype`` (timm's factory arguments): the parameters and buffers are created
        on ``device`` (``"meta"`` allocates nothing) and then cast to the floating ``dtype``;
        default: torch's current default device, float32.
        """
        super().__init__()
        self.spec = spec
        self.plan = plan or resolve(spec)
        with torch.device(device) if device is not None else nullcontext():
            self.stages = build_stages(self.plan)
            self.norm = build_component("norm", self.plan.head_norm)
            self.head = ClassifierHead(self.plan.num_features, self.plan.num_classes, self.plan.global_pool,
                                       self.plan.drop_rate, self.plan.head, self._head_norm())
            self.apply(_init_weights)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)  # also buffers a layer made on an explicit device
        self.set_attn_backend(self.plan.attn_backend)

    # -- timm model attributes -------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def in_chans(self) -> int:
        return self.spec.in_chans

    @property
    def num_features(self) -> int:
        return self.plan.num_features

    @property
    def head_hidden_size(self) -> int:
        return self.plan.num_features

    @property
    def feature_info(self) -> list[dict]:
        return [dict(num_chs=s.out_chs, reduction=s.reduction, module=f"stages.{s.index}") for s in self.plan.stages]

    @property
    def grad_checkpointing(self) -> bool:
        return any(s.grad_checkpointing for s in self.stages)

    # -- forward ----------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():  # shapes are proxies: no checks
            return
        if x.ndim != 4 or x.shape[1] != self.spec.in_chans:
            raise UsageError(f"expected images (B, {self.spec.in_chans}, H, W), got {tuple(x.shape)}")
        hw = tuple(x.shape[2:])
        # The plan check is Python (pydantic) that torch.compile cannot trace; compiled graphs
        # are specialised per input size anyway, and eager calls still check.
        if not torch.compiler.is_compiling() and hw != self.plan.img_size:
            resolve(self.spec, hw)  # raises PlanError naming what does not fit this size

    def _final_norm_map(self, x: torch.Tensor) -> torch.Tensor:
        """Apply ``norm`` per location of a channels-last map."""
        return self.norm(x)

    def _as_grid(self, x: torch.Tensor, i: int, image_hw: tuple[int, int]) -> torch.Tensor:
        """Stage ``i``'s tokens as a ``(B, H, W, C)`` grid (units are put back in place; a ``seq``
        stage's ``(B, N, C)`` becomes the ``(B, N, 1, C)`` grid its plan records)."""
        carry = getattr(self.stages[i], "carry", None) if i < len(self.stages) else None
        if carry is not None:  # att0's clusters ride after the grid's tokens: drop them
            return carry.strip(x)
        layout = self.plan.stages[i].layout
        if layout == "grid":
            return x
        if layout == "seq":
            return x.unsqueeze(2)
        # Per axis: a q_stride like (2, 1) reduces height and width differently.
        (gh, gw), (ih, iw) = self.plan.stages[i].out_grid, self.plan.img_size
        return units_to_grid(x, (image_hw[0] // (ih // gh), image_hw[1] // (iw // gw)))

    def num_mask_units(self, img_size: Optional[tuple[int, int]] = None) -> int:
        """Mask units of an image of ``img_size`` (default: the spec's), i.e. the length of a
        ``mask`` row. Raises ``ValueError`` for a spec without ``mask_unit_size``."""
        plan = self.plan if img_size is None or tuple(img_size) == self.plan.img_size else resolve(self.spec, img_size)
        if plan.mask_unit_size is None:
            raise UsageError(f"{self.spec.name or 'this spec'} has no mask_unit_size, so it has no mask units")
        (h, w), (uh, uw) = plan.stages[0].out_grid, plan.mask_unit_size
        return (h // uh) * (w // uw)

    def _check_mask(self, mask: torch.Tensor, x: torch.Tensor) -> None:
        """Raise ValueError naming what is wrong with a sparse-forward ``mask`` for images ``x``
        (the plan checks are Python that torch.compile does not trace; eager calls run them)."""
        if torch.compiler.is_compiling():
            return
        verdict = resolve(self.spec, tuple(x.shape[2:])).mae_incompatibility
        if verdict is not None:
            raise UsageError(f"a masked (sparse MAE) forward needs a spec whose components stay inside mask units; "
                             f"{self.spec.name or 'this spec'} is not MAE-compatible: {verdict}")
        units = self.num_mask_units(tuple(x.shape[2:]))
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            what = f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise UsageError(f"mask must be a bool tensor (True = keep the mask unit), got {what}")
        if mask.device != x.device:
            raise UsageError(f"mask is on {mask.device} but the images are on {x.device}; move it with "
                             f"mask.to({str(x.device)!r})")
        if tuple(mask.shape) != (x.shape[0], units):
            raise UsageError(f"mask must have shape (batch, mask units) = ({x.shape[0]}, {units}) for "
                             f"{x.shape[2]}x{x.shape[3]} images, got {tuple(mask.shape)}")
        kept = mask.sum(dim=1)
        if kept.numel() and (kept.min() != kept.max() or int(kept.min()) == 0):
            raise UsageError(f"mask must keep the same number (>= 1) of mask units in every sample; it keeps "
                             f"{kept.tolist()}")

    def _masked_stem_input(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Zero the pixels of dropped units in channels-last images ``(B, H, W, C)``, so that an
        overlapping patch embedding cannot carry them into kept tokens (Hiera's do_masked_conv)."""
        b, h, w, _ = x.shape
        plan = resolve(self.spec, (h, w)) if (h, w) != self.plan.img_size else self.plan
        (gh, gw), (uh, uw) = plan.stages[0].out_grid, plan.mask_unit_size
        nh, nw = gh // uh, gw // uw
        m = mask.view(b, nh, 1, nw, 1, 1).expand(b, nh, h // nh, nw, w // nw, 1).reshape(b, h, w, 1)
        return x * m.to(x.dtype)

    def _stage(self, i: int, x: torch.Tensor, sizes: Optional[torch.Tensor], mask: Optional[torch.Tensor]
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Stage ``i`` on ``x`` and the token sizes ``(B, N)`` of ``x`` (None: no sizes) -> its tokens
        and their sizes (:mod:`hfactory.layers.token_sizes`); stage 0 of a sparse forward zeroes
        masked pixels and drops units."""
        if mask is not None and i == 0:
            return self.stages[0](self._masked_stem_input(x, mask), sizes, keep=mask)
        return self.stages[i](x, sizes)

    def _forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor]
                          ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`forward_features` and the final tokens' sizes ``(B, N)`` (None: no sizes), the
        sizes travelling with the tokens from stage to stage; records nothing."""
        self._check_input(x)
        if mask is not None:
            self._check_mask(mask, x)
        image_hw = x.shape[2:]
        x, sizes = x.permute(0, 2, 3, 1), None
        for i in range(len(self.stages)):
            x, sizes = self._stage(i, x, sizes, mask)
        if mask is not None:
            return (self._final_norm_map(x) if self.spec.head_norm_first else x), sizes
        x = self._as_grid(x, len(self.stages) - 1, image_hw)
        if self.spec.head_norm_first:
            x = self._final_norm_map(x)
        return x.permute(0, 3, 1, 2), sizes

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, in_chans, H, W)`` images -> final map ``(B, num_features, H/r, W/r)`` (NCHW),
        normed if ``spec.head_norm_first``.

        With ``mask`` (bool ``(B, U)`` over the mask units, row-major; True = keep; the same number
        ``K >= 1`` kept in every sample), the sparse forward of MAE pretraining: masked pixels are
        zeroed before the patch embedding, the masked units are deleted after stage 0 (not zeroed:
        later stages cost what ``K`` units cost, global attention runs over the kept tokens only),
        and the result is the kept units' final features in the units layout
        ``(B, K, uh, uw, num_features)`` (units in ascending index order; ``(uh, uw)`` is the last
        stage's ``unit_size``).

        The final tokens' sizes after a merging downsampler (``plan.head["token_sizes"]``; see
        :mod:`hfactory.layers.token_sizes`) are not returned: they are recorded on this module
        instance as ``last_token_sizes`` (``(B, N)`` for the ``N = H/r * W/r`` tokens of the map,
        row-major; None when the tokens carry no sizes), for a :meth:`forward_head` call on this
        result. The attribute holds the tensor (and its autograd graph) until the next call.

        Raises:
            ValueError: a ``mask`` of the wrong shape or dtype, keeping different counts per
                sample or none, or a spec that is not MAE-compatible (``plan.mae_incompatibility``).
        """
        x, self.last_token_sizes = self._forward_features(x, mask)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False,
                     token_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final NCHW map -> logits ``(B, num_classes)`` (or pooled ``(B, num_features)`` with
        ``pre_logits=True``); with ``global_pool=''`` the map keeps its grid: ``(B, num_classes, H, W)``
        (or ``(B, num_features, H, W)``).

        After a merging downsampler (``plan.head["token_sizes"]``) the average pool weights each
        token by its size: ``token_sizes`` ``(B, H*W)``, or when None the sizes recorded by the
        last :meth:`forward_features` (or :meth:`forward_intermediates`) call on this module,
        ``last_token_sizes``; so call ``forward_head`` on the map of that call. Other pools
        (``max``, or tokens without sizes) ignore ``token_sizes``.

        Raises:
            ValueError (``UsageError``): the head needs sizes and they are missing or not
                ``(B, H*W)`` for ``x``.
        """
        if self.head.needs_token_sizes:
            given = token_sizes is not None
            sizes = token_sizes if given else self.last_token_sizes
            where = "token_sizes" if given else "the sizes recorded by the last forward_features call"
            token_sizes = check_token_sizes(sizes, x.shape[0], x.shape[2] * x.shape[3],
                                            f"forward_head's size-weighted average pool ({where})")
        x = self.head.pool(x, token_sizes)
        if self.head.global_pool == "":  # no pooling: norm and classifier act per position of the map
            x = x.permute(0, 2, 3, 1)
            x = self.head.drop(x if self.spec.head_norm_first else self._final_norm_map(x))
            return (x if pre_logits else self.head.fc(x)).permute(0, 3, 1, 2)
        if not self.spec.head_norm_first:
            x = self.norm(x)
        x = self.head.drop(x)
        return x if pre_logits else self.head.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> logits ``(B, num_classes)``; pooled features if 0 classes.
        Token sizes go straight from the last stage to the head (nothing is recorded)."""
        x, sizes = self._forward_features(x, None)
        return self.forward_head(x, token_sizes=sizes)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, list[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, mask: Optional[torch.Tensor] = None):
        """timm's ``forward_intermediates``: per-stage maps.

        Args:
            x: ``(B, in_chans, H, W)`` images.
            indices: stages to return: None = all, int n = last n, list = those (negative ok).
            norm: apply the final norm to the last stage's map (when it is returned).
            stop_early: skip stages after the last requested one.
            output_fmt: ``'NCHW'`` or ``'NHWC'``.
            intermediates_only: return only the list.
            mask: bool ``(B, U)`` keep-mask of the sparse MAE forward (see ``forward_features``);
                every stage's map is then the kept units ``(B, K, uh_i, uw_i, C_i)``, whatever
                ``output_fmt`` says, and ``final`` is ``forward_features(x, mask)``.

        Returns:
            ``list[Tensor]`` if ``intermediates_only`` else ``(final, list[Tensor])`` where
            ``final`` is what ``forward_features`` returns (NCHW) when all stages ran. Token sizes
            are not returned; as ``forward_features`` does, the call records the final tokens'
            sizes in ``last_token_sizes`` (None unless all stages ran), for ``forward_head(final)``.

        Raises:
            ValueError: bad ``output_fmt``, out-of-range ``indices`` or a bad ``mask`` (see
                ``forward_features``).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise UsageError(f"output_fmt {output_fmt!r}: valid are 'NCHW' and 'NHWC'")
        take, max_index = feature_take_indices(len(self.stages), indices)
        self._check_input(x)
        if mask is not None:
            self._check_mask(mask, x)
        image_hw = tuple(x.shape[2:])
        last = len(self.stages) - 1
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        x, sizes = x.permute(0, 2, 3, 1), None
        for i in range(len(stages)):
            x, sizes = self._stage(i, x, sizes, mask)
            if mask is not None:
                if i in take:
                    intermediates.append(self._final_norm_map(x) if norm and i == last else x)
                continue
            if i in take:
                y = self._as_grid(x, i, image_hw)
                y = self._final_norm_map(y) if norm and i == last else y
                intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        # the sizes of this call's final tokens (a later forward_head must not see older ones)
        self.last_token_sizes = sizes if len(stages) == len(self.stages) else None
        if intermediates_only:
            return intermediates
        if mask is not None:
            normed = self.spec.head_norm_first and len(stages) == len(self.stages)
            return (self._final_norm_map(x) if normed else x), intermediates
        x = self._as_grid(x, len(stages) - 1, image_hw)
        if self.spec.head_norm_first and len(stages) == len(self.stages):
            x = self._final_norm_map(x)
        return x.permute(0, 3, 1, 2), intermediates

    # -- timm model API -----------------------------------------------------------------------
    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop stages after the last of ``indices``, the classifier (``prune_head``) and the final
        norm (``prune_norm``); ``spec`` and ``plan`` are updated to the pruned model.

        The final norm and classifier are sized for the last stage, so when that stage is pruned
        they go too, whatever the flags. Returns the kept indices.
        """
        take, max_index = feature_take_indices(len(self.stages), indices)
        cut_last = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        update = {"stages": [s.model_dump(mode="json", exclude_none=True) for s in self.spec.stages[: max_index + 1]]}
        if prune_norm or cut_last:
            self.norm = nn.Identity()
            update["head_norm"] = dict(NO_NORM)
        if prune_head or cut_last:
            update["num_classes"] = 0
            self.head.fc = nn.Identity()
        self._set_spec(update)
        # Size-weighted pooling only follows a merging downsampler (geme/att0) that was kept.
        self.head.takes_token_sizes = bool(self.plan.head.get("token_sizes"))
        if getattr(self.stages[-1], "carry", None) is not None:
            # The cut removed the att0 stage these clusters were made for: rebuild the last stage as
            # the new plan has it (plain attention, no clusters) with its weights. The tokens never
            # attended to the clusters, so the kept stages compute exactly what they did.
            old, new = self.stages[-1], Stage(self.plan.stages[-1])
            kept = new.state_dict()
            new.load_state_dict({k: v for k, v in old.state_dict().items() if k in kept}, strict=True)
            ref = next(old.parameters())
            new = new.to(device=ref.device, dtype=ref.dtype).train(old.training)  # the state the stage had
            new.grad_checkpointing = old.grad_checkpointing
            frozen = {n for n, q in old.named_parameters() if not q.requires_grad}
            for n, q in new.named_parameters():
                q.requires_grad_(n not in frozen)
            self.stages[-1] = new
        return take

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None,
                         device: Optional[Union[str, torch.device]] = None,
                         dtype: Optional[torch.dtype] = None) -> None:
        """New classifier ``head.fc`` for ``num_classes`` (0: ``nn.Identity``, ``forward`` then gives
        pooled features ``(B, num_features)``); optionally a new ``global_pool`` (``'avg'``, ``'max'``,
        or ``''`` for none: ``forward`` then returns the normed ``(B, C, H, W)`` map, classified per
        position into ``(B, num_classes, H, W)`` when ``num_classes > 0``; None keeps the current
        one). ``spec`` and ``plan`` follow.

        The classifier is created on ``device`` with ``dtype``, by default those of the model's
        first parameter (timm's ``get_device_dtype`` rule, so a model on ``meta`` or in float64 gets
        a head there), in the head's train/eval mode; its parameters are new and trainable (a frozen
        backbone keeps its ``requires_grad=False``).

        Raises:
            pydantic.ValidationError: ``num_classes < 0`` or a ``global_pool`` the spec does not
                allow; the model is then unchanged.
        """
        update = {"num_classes": num_classes}
        if global_pool is not None:
            update["global_pool"] = global_pool
        self._set_spec(update)
        self.head.global_pool = self.spec.global_pool
        ref = next(self.parameters(), None)  # timm.layers.get_device_dtype: explicit values win
        device = device if device is not None or ref is None else ref.device
        dtype = dtype if dtype is not None or ref is None else ref.dtype
        with torch.device(device) if device is not None else nullcontext():
            fc = make_classifier(self.num_features, num_classes, self.plan.head, self.plan.drop_rate,
                                 self._head_norm())
            fc.apply(_init_weights)
        if dtype is not None:
            fc = fc.to(dtype=dtype)
        self.head.fc = fc.train(self.head.training)

    def _head_norm(self) -> Optional[nn.Module]:
        """The classifier's own norm (an ``mlp`` head's), built from the plan; None without one."""
        norm = self.plan.head.get("norm")
        return build_component("norm", norm) if norm is not None else None

    def _set_spec(self, update: dict) -> None:
        """Replace top-level spec fields (JSON-like values), revalidate and re-plan."""
        self.spec = EncoderSpec.model_validate({**self.spec.model_dump(mode="json", exclude_none=True), **update})
        self.plan = resolve(self.spec)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def set_attn_backend(self, backend: str) -> None:
        """Use ``backend`` (``auto``/``xformers``/``sdpa``/``math``) in every attention module."""
        from .layers.attention import BACKENDS

        if backend not in BACKENDS:
            raise UsageError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
        for module in self.modules():
            if hasattr(module, "backend") and isinstance(getattr(module, "backend"), str):
                module.backend = backend

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Full names of parameters that must not be weight-decayed beyond timm's automatic rule
        (1-D params and biases): position embeddings and similar tables, declared by each module's
        ``_no_weight_decay`` attribute."""
        return {f"{prefix}.{pname}" if prefix else pname
                for prefix, module in self.named_modules()
                for pname in getattr(module, "_no_weight_decay", ())}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm ``group_matcher``: regexes grouping parameters by stem / stage / block (for
        layer-wise learning-rate decay)."""
        return dict(
            stem=r"^stages\.0\.(?:downsample|pos_embed)",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.(?:downsample|pos_embed)", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    # -- save / load --------------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, os.PathLike]) -> Path:
        """Write ``spec.yaml`` and ``model.safetensors`` into ``directory`` (created if needed),
        each atomically (written to a temporary file, then renamed). Returns the directory."""
        return save_model_dir(self, directory)


def _init_weights(module: nn.Module) -> None:
    """timm's MetaFormer/ViT init: truncated normal (std 0.02) for Linear and Conv2d weights,
    zero biases; norms keep ones/zeros."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_encoder(spec: SpecSource, **overrides) -> HierarchicalEncoder:
    """Validate, resolve and build an encoder.

    Args:
        spec: path, YAML text, dict or :class:`EncoderSpec`.
        **overrides: top-level spec fields to replace (e.g. ``num_classes=10``,
            ``img_size=(256, 192)``).

    Raises:
        pydantic.ValidationError / PlanError / ValueError: see :func:`hfactory.load_spec` and
            :func:`hfactory.resolve`; nothing is built then.
    """
    spec = load_spec(spec)
    if overrides:
        spec = EncoderSpec.model_validate({**spec.model_dump(mode="json", exclude_none=True), **overrides})
    return HierarchicalEncoder(spec)


def from_pretrained(directory: Union[str, os.PathLike], map_location: str = "cpu", *, revision: Optional[str] = None,
                    cache_dir: Optional[Union[str, os.PathLike]] = None) -> HierarchicalEncoder:
    """Rebuild an encoder from ``save_pretrained``'s directory, or from a Hugging Face Hub model
    repository ``"hf-hub:org/name[@revision]"`` holding the same files (written by
    :func:`hfactory.pretrained.push_to_hub`), and load its weights.

    A Hub repository is read through ``huggingface_hub``'s download and cache
    (:func:`hfactory.hub.download_model_dir`): ``cache_dir`` (default ``HF_HUB_CACHE``), and with
    ``HF_HUB_OFFLINE=1`` the cache alone. ``revision`` pins a branch, tag or commit.

    ``map_location`` is where the weights are read to; the model's parameters stay on the CPU
    (move it with ``.to(device)``).

    Raises:
        FileNotFoundError: ``spec.yaml`` or ``model.safetensors`` is missing (locally, on the Hub, or
            in the cache when offline).
        pydantic.ValidationError / PlanError: ``spec.yaml`` is not a valid spec.
        ValueError: the weights were saved for another spec (their ``spec_hash`` metadata differs
            from ``spec.yaml``'s hash: the spec was edited after saving, or the files come from two
            saves), or they do not fit the spec; the message names the missing, unexpected and
            shape-mismatched keys.
    """
    from .hub import download_model_dir, is_hub_source

    if is_hub_source(directory):
        directory = download_model_dir(directory, revision=revision, cache_dir=cache_dir)
    elif revision is not None:
        raise UsageError(f"revision={revision!r} applies to hf-hub: sources, not to the directory {directory}")
    return load_model_dir(directory, build_encoder, map_location, "a save_pretrained() directory")
