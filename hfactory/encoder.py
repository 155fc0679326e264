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

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from pydantic import BaseModel, TypeAdapter
from torch import nn

from .atomic import atomic_path
from .build import Stage, build_component, build_stages
from .layers.head import ClassifierHead, make_classifier
from .layers.layout import units_to_grid
from .plan import Plan, resolve
from .spec.io import SpecSource, dump_spec, load_spec
from .spec.model import EncoderSpec

__all__ = ["HierarchicalEncoder", "build_encoder", "build_model", "from_pretrained", "load_model",
           "feature_take_indices", "spec_hash", "spec_hashes"]

WEIGHTS_NAME = "model.safetensors"
SPEC_NAME = "spec.yaml"


def spec_hash(spec: EncoderSpec) -> str:
    """SHA-256 (hex, first 16 chars) of the spec's canonical JSON: every field that differs from
    its default, components always with their ``kind``, keys sorted.

    Fields left at their defaults do not enter the hash, so a later hfactory whose spec models gain
    a field (with a default that keeps the old behaviour) still accepts the weights and
    checkpoints saved before it; writing a default value out explicitly does not change the hash
    either. Any non-default value does (architecture, lineage, name).
    """
    text = json.dumps(_canonical(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def spec_hashes(spec) -> set[str]:
    """The hashes saved files may carry for ``spec``: :func:`spec_hash`, and the one hfactory
    wrote before it hashed only non-default fields: SHA-256 of the full JSON dump, with a
    ``lineage`` in its first format (``base``, one merged ``changes``, one ``rule``), which a
    lineage read from such a file converts back to."""
    from pydantic_core import to_json

    legacy = spec.model_dump()
    lineage = getattr(spec, "lineage", None)
    if lineage is not None:
        changes = [s.changes for s in lineage.steps if s.changes is not None]
        rules = [s.rule for s in lineage.steps if s.rule is not None]
        if len(changes) <= 1 and len(rules) <= 1:
            legacy["lineage"] = {"base": lineage.base, "changes": changes[0] if changes else {},
                                 "rule": rules[0] if rules else None}
    return {spec_hash(spec), hashlib.sha256(to_json(legacy)).hexdigest()[:16]}


def _canonical(value):
    """JSON-ready value of a spec part with default-valued fields left out (``kind`` kept)."""
    if isinstance(value, BaseModel):
        out = {}
        for name, field in type(value).model_fields.items():
            item = getattr(value, name)
            if name == "kind" or field.is_required() or item != field.get_default(call_default_factory=True):
                out[name] = _canonical(item)
        return out
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return TypeAdapter(type(value)).dump_python(value, mode="json")  # enums and the like


def feature_take_indices(num_features: int, indices: Optional[Union[int, list[int], tuple[int, ...]]] = None
                         ) -> tuple[list[int], int]:
    """timm's ``feature_take_indices``: None = all, int n = last n, list = those (negatives allowed).

    Returns:
        ``(take_indices, max_index)`` with non-negative, sorted indices.

    Raises:
        ValueError: an index outside ``[-num_features, num_features)`` or ``n`` outside
            ``[1, num_features]`` (timm silently drops such indices; we refuse them).
    """
    if indices is None:
        take = list(range(num_features))
    elif isinstance(indices, int):
        if not 1 <= indices <= num_features:
            raise ValueError(f"indices={indices}: take the last n stages with 1 <= n <= {num_features}")
        take = list(range(num_features - indices, num_features))
    else:
        take = []
        for i in indices:
            if not -num_features <= i < num_features:
                raise ValueError(f"index {i} out of range for {num_features} stages; valid: "
                                 f"{-num_features}..{num_features - 1}")
            take.append(i % num_features)
        take = sorted(set(take))
    return take, max(take)


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
    """

    def __init__(self, spec: EncoderSpec, plan: Optional[Plan] = None):
        super().__init__()
        self.spec = spec
        self.plan = plan or resolve(spec)
        self.stages = build_stages(self.plan)
        self.norm = build_component("norm", self.plan.head_norm)
        self.head = ClassifierHead(self.plan.num_features, self.plan.num_classes, self.plan.global_pool,
                                   self.plan.drop_rate, self.plan.head)
        self.apply(_init_weights)
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
        if x.ndim != 4 or x.shape[1] != self.spec.in_chans:
            raise ValueError(f"expected images (B, {self.spec.in_chans}, H, W), got {tuple(x.shape)}")
        hw = tuple(x.shape[2:])
        # The plan check is Python (pydantic) that torch.compile cannot trace; compiled graphs
        # are specialised per input size anyway, and eager calls still check.
        if hw != self.plan.img_size and not torch.compiler.is_compiling():
            resolve(self.spec, hw)  # raises PlanError naming what does not fit this size

    def _final_norm_map(self, x: torch.Tensor) -> torch.Tensor:
        """Apply ``norm`` per location of a channels-last map."""
        return self.norm(x)

    def _as_grid(self, x: torch.Tensor, i: int, image_hw: tuple[int, int]) -> torch.Tensor:
        """Stage ``i``'s tokens as a ``(B, H, W, C)`` grid (units are put back in place; a ``seq``
        stage's ``(B, N, C)`` becomes the ``(B, N, 1, C)`` grid its plan records)."""
        if x.ndim == 4:
            return x
        carry = getattr(self.stages[i], "carry", None) if i < len(self.stages) else None
        if carry is not None:  # att0's clusters ride after the grid's tokens: drop them
            return carry.strip(x)
        if x.ndim == 3:
            return x.unsqueeze(2)
        # Per axis: a q_stride like (2, 1) reduces height and width differently.
        (gh, gw), (ih, iw) = self.plan.stages[i].out_grid, self.plan.img_size
        return units_to_grid(x, (image_hw[0] // (ih // gh), image_hw[1] // (iw // gw)))

    def num_mask_units(self, img_size: Optional[tuple[int, int]] = None) -> int:
        """Mask units of an image of ``img_size`` (default: the spec's), i.e. the length of a
        ``mask`` row. Raises ``ValueError`` for a spec without ``mask_unit_size``."""
        plan = self.plan if img_size is None or tuple(img_size) == self.plan.img_size else resolve(self.spec, img_size)
        if plan.mask_unit_size is None:
            raise ValueError(f"{self.spec.name or 'this spec'} has no mask_unit_size, so it has no mask units")
        (h, w), (uh, uw) = plan.stages[0].out_grid, plan.mask_unit_size
        return (h // uh) * (w // uw)

    def _check_mask(self, mask: torch.Tensor, x: torch.Tensor) -> None:
        """Raise ValueError naming what is wrong with a sparse-forward ``mask`` for images ``x``
        (the plan checks are Python that torch.compile does not trace; eager calls run them)."""
        if torch.compiler.is_compiling():
            return
        verdict = resolve(self.spec, tuple(x.shape[2:])).mae_incompatibility
        if verdict is not None:
            raise ValueError(f"a masked (sparse MAE) forward needs a spec whose components stay inside mask units; "
                             f"{self.spec.name or 'this spec'} is not MAE-compatible: {verdict}")
        units = self.num_mask_units(tuple(x.shape[2:]))
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            what = f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor (True = keep the mask unit), got {what}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but the images are on {x.device}; move it with "
                             f"mask.to({str(x.device)!r})")
        if tuple(mask.shape) != (x.shape[0], units):
            raise ValueError(f"mask must have shape (batch, mask units) = ({x.shape[0]}, {units}) for "
                             f"{x.shape[2]}x{x.shape[3]} images, got {tuple(mask.shape)}")
        kept = mask.sum(dim=1)
        if kept.numel() and (kept.min() != kept.max() or int(kept.min()) == 0):
            raise ValueError(f"mask must keep the same number (>= 1) of mask units in every sample; it keeps "
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

    def _stage(self, i: int, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Stage ``i`` on ``x``; stage 0 of a sparse forward zeroes masked pixels and drops units."""
        if mask is None:
            return self.stages[i](x)
        if i == 0:
            return self.stages[0](self._masked_stem_input(x, mask), mask)
        return self.stages[i](x)

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

        Raises:
            ValueError: a ``mask`` of the wrong shape or dtype, keeping different counts per
                sample or none, or a spec that is not MAE-compatible (``plan.mae_incompatibility``).
        """
        self._check_input(x)
        if mask is not None:
            self._check_mask(mask, x)
        image_hw = tuple(x.shape[2:])
        x = x.permute(0, 2, 3, 1)
        for i in range(len(self.stages)):
            x = self._stage(i, x, mask)
        if mask is not None:
            return self._final_norm_map(x) if self.spec.head_norm_first else x
        x = self._as_grid(x, len(self.stages) - 1, image_hw)
        if self.spec.head_norm_first:
            x = self._final_norm_map(x)
        return x.permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Final NCHW map -> logits ``(B, num_classes)`` (or pooled ``(B, num_features)`` with
        ``pre_logits=True``)."""
        x = self.head.pool(x)
        if not self.spec.head_norm_first:
            x = self.norm(x)
        x = self.head.drop(x)
        return x if pre_logits else self.head.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> logits ``(B, num_classes)``; pooled features if 0 classes."""
        return self.forward_head(self.forward_features(x))

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
            ``final`` is what ``forward_features`` returns (NCHW) when all stages ran.

        Raises:
            ValueError: bad ``output_fmt``, out-of-range ``indices`` or a bad ``mask`` (see
                ``forward_features``).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt {output_fmt!r}: valid are 'NCHW' and 'NHWC'")
        take, max_index = feature_take_indices(len(self.stages), indices)
        self._check_input(x)
        if mask is not None:
            self._check_mask(mask, x)
        image_hw = tuple(x.shape[2:])
        last = len(self.stages) - 1
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        x = x.permute(0, 2, 3, 1)
        for i in range(len(stages)):
            x = self._stage(i, x, mask)
            if mask is not None:
                if i in take:
                    intermediates.append(self._final_norm_map(x) if norm and i == last else x)
                continue
            if i in take:
                y = self._as_grid(x, i, image_hw)
                y = self._final_norm_map(y) if norm and i == last else y
                intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
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
            update["head_norm"] = {"kind": "identity"}
        if prune_head or cut_last:
            update["num_classes"] = 0
            self.head.fc = nn.Identity()
        self._set_spec(update)
        # Size-weighted pooling only follows a merging downsampler (geme/att0) that was kept.
        self.head.token_sizes = bool(self.plan.head.get("token_sizes"))
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

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New classifier for ``num_classes`` (0: pooled features); optionally a new
        ``global_pool`` (``'avg'`` or ``'max'``). Raises pydantic ``ValidationError`` on bad values."""
        update = {"num_classes": num_classes}
        if global_pool is not None:
            update["global_pool"] = global_pool
        self._set_spec(update)
        self.head.global_pool = self.spec.global_pool
        fc = make_classifier(self.num_features, num_classes, self.plan.head, self.plan.drop_rate)
        fc.apply(_init_weights)
        ref = next(self.parameters(), None)
        self.head.fc = fc.to(ref.device, ref.dtype) if ref is not None else fc

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
            raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
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


def from_pretrained(directory: Union[str, os.PathLike], map_location: str = "cpu") -> HierarchicalEncoder:
    """Rebuild an encoder from ``save_pretrained``'s directory and load its weights.

    ``map_location`` is where the weights are read to; the model's parameters stay on the CPU
    (move it with ``.to(device)``).

    Raises:
        FileNotFoundError: ``spec.yaml`` or ``model.safetensors`` is missing.
        pydantic.ValidationError / PlanError: ``spec.yaml`` is not a valid spec.
        ValueError: the weights were saved for another spec (their ``spec_hash`` metadata differs
            from ``spec.yaml``'s hash: the spec was edited after saving, or the files come from two
            saves), or they do not fit the spec; the message names the missing, unexpected and
            shape-mismatched keys.
    """
    return load_model_dir(directory, build_encoder, map_location, "a save_pretrained() directory")


def build_model(spec) -> nn.Module:
    """The model of a validated spec: a :class:`HierarchicalEncoder` for an
    :class:`~hfactory.spec.model.EncoderSpec`, an :class:`~hfactory.sft.SFTEncoder` for an
    :class:`~hfactory.spec.sft.SFTSpec` (both read by :func:`hfactory.spec.io.load_any_spec`).

    Raises:
        PlanError: the spec cannot be built (its location and what would be valid are named).
    """
    from .spec.sft import SFTSpec

    if isinstance(spec, SFTSpec):
        from .sft import SFTEncoder

        return SFTEncoder(spec)
    return HierarchicalEncoder(spec)


def load_model(directory: Union[str, os.PathLike], map_location: str = "cpu") -> nn.Module:
    """:func:`from_pretrained` for any model hfactory saves with a spec (encoders, SFT): the spec
    kind is read from ``spec.yaml``. Raises as :func:`from_pretrained`."""
    from .spec.io import load_any_spec

    return load_model_dir(directory, lambda path: build_model(load_any_spec(path)), map_location,
                          "a save_pretrained() directory")


def save_model_dir(model: nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """``model.spec`` as ``spec.yaml`` and its weights as ``model.safetensors`` (with the spec's
    hash as metadata) in ``directory``, each written atomically; shared by every model class with a
    ``spec``. Returns the directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"spec_hash": spec_hash(model.spec), "format": "pt"})
    with atomic_path(directory / SPEC_NAME) as tmp:
        tmp.write_text(dump_spec(model.spec), encoding="utf-8")
    return directory


def load_model_dir(directory: Union[str, os.PathLike], build: Callable[[Path], nn.Module], map_location: str,
                   expected: str) -> nn.Module:
    """The model ``build(directory / "spec.yaml")`` with the weights of ``model.safetensors``,
    after checking that they were saved for that spec (the ``spec_hash`` metadata, when present).

    Raises:
        FileNotFoundError: a file is missing (``expected`` says what the directory should be).
        ValueError: the weights were saved for another spec, or they do not fit it (keys named).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (SPEC_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found; expected {expected}")
    model = build(directory / SPEC_NAME)
    with safe_open(str(directory / WEIGHTS_NAME), "pt") as f:
        saved = (f.metadata() or {}).get("spec_hash")
    if saved is not None and saved not in spec_hashes(model.spec):
        raise ValueError(f"{directory / WEIGHTS_NAME} was saved for spec hash {saved}, but {directory / SPEC_NAME} "
                         f"hashes to {spec_hash(model.spec)}: the spec was changed after saving; restore it, or "
                         "build the new spec and load the weights with load_checked to convert deliberately")
    load_checked(model, load_file(str(directory / WEIGHTS_NAME), device=map_location),
                 source=str(directory / WEIGHTS_NAME))
    return model


def load_checked(model: nn.Module, state: dict, source: str = "state dict") -> None:
    """``load_state_dict(strict=True)`` that first resizes resolution-dependent tensors (position
    embeddings, relative-position tables) and lists every key and shape mismatch.

    Raises:
        ValueError: naming up to 10 missing, unexpected and shape-mismatched keys each.
    """
    from .convert.core import mismatch_report
    from .convert.resize import resize_to_model

    state = resize_to_model(state, model.state_dict(), model)
    report = mismatch_report(model.state_dict(), state)
    if report:
        raise ValueError(f"{source} does not fit this model's spec; {report}")
    model.load_state_dict(state, strict=True)
