"""HierarchicalEncoder: the built model, with timm's backbone API and one behaviour for all.

timm's names and signatures (``shared/reference/timm_anchor.md``), but the same behaviour for
every architecture hfactory builds, where timm's models disagree:

- ``forward_features`` returns the final map as NCHW ``(B, C, H, W)``, always.
- ``forward_intermediates`` returns NCHW (or NHWC with ``output_fmt='NHWC'``) for every stage;
  ``norm=True`` applies the final norm (channel-wise) to the last stage's map; ``stop_early``
  defaults to False.
- ``feature_info`` modules are real module paths (``stages.i``).
- ``no_weight_decay`` lists every position embedding / table parameter by its full name.
- ``reset_classifier`` and ``prune_intermediate_layers`` keep ``.spec`` and ``.plan`` true, so a
  pruned or re-headed model saves and reloads.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .atomic import atomic_path
from .build import build_component, build_stages
from .layers.head import ClassifierHead, make_classifier
from .layers.layout import units_to_grid
from .plan import Plan, resolve
from .spec.io import SpecSource, dump_spec, load_spec
from .spec.model import EncoderSpec

__all__ = ["HierarchicalEncoder", "build_encoder", "from_pretrained", "feature_take_indices", "spec_hash"]

WEIGHTS_NAME = "model.safetensors"
SPEC_NAME = "spec.yaml"


def spec_hash(spec: EncoderSpec) -> str:
    """SHA-256 (hex, first 16 chars) of the spec's canonical JSON."""
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]


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
        """Stage ``i``'s tokens as a ``(B, H, W, C)`` grid (units are put back in place)."""
        if x.ndim == 4:
            return x
        r = self.plan.stages[i].reduction
        return units_to_grid(x, (image_hw[0] // r, image_hw[1] // r))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` images -> final map ``(B, num_features, H/r, W/r)`` (NCHW),
        normed if ``spec.head_norm_first``."""
        self._check_input(x)
        image_hw = tuple(x.shape[2:])
        x = x.permute(0, 2, 3, 1)
        for stage in self.stages:
            x = stage(x)
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
                              intermediates_only: bool = False):
        """timm's ``forward_intermediates``: per-stage maps.

        Args:
            x: ``(B, in_chans, H, W)`` images.
            indices: stages to return: None = all, int n = last n, list = those (negative ok).
            norm: apply the final norm to the last stage's map (when it is returned).
            stop_early: skip stages after the last requested one.
            output_fmt: ``'NCHW'`` or ``'NHWC'``.
            intermediates_only: return only the list.

        Returns:
            ``list[Tensor]`` if ``intermediates_only`` else ``(final, list[Tensor])`` where
            ``final`` is what ``forward_features`` returns (NCHW) when all stages ran.

        Raises:
            ValueError: bad ``output_fmt`` or out-of-range ``indices``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt {output_fmt!r}: valid are 'NCHW' and 'NHWC'")
        take, max_index = feature_take_indices(len(self.stages), indices)
        self._check_input(x)
        image_hw = tuple(x.shape[2:])
        x = x.permute(0, 2, 3, 1)
        last = len(self.stages) - 1
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                y = self._as_grid(x, i, image_hw)
                y = self._final_norm_map(y) if norm and i == last else y
                intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
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
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"spec_hash": spec_hash(self.spec), "format": "pt"})
        with atomic_path(directory / SPEC_NAME) as tmp:
            tmp.write_text(dump_spec(self.spec), encoding="utf-8")
        return directory


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

    Raises:
        FileNotFoundError: ``spec.yaml`` or ``model.safetensors`` is missing.
        ValueError: the weights do not fit the spec; the message names the missing, unexpected
            and shape-mismatched keys.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (SPEC_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found; expected a save_pretrained() directory")
    model = build_encoder(directory / SPEC_NAME)
    state = load_file(str(directory / WEIGHTS_NAME), device=map_location)
    load_checked(model, state, source=str(directory / WEIGHTS_NAME))
    return model


def load_checked(model: nn.Module, state: dict, source: str = "state dict") -> None:
    """``load_state_dict(strict=True)`` that first resizes resolution-dependent tensors (position
    embeddings, relative-position tables) and lists every key and shape mismatch.

    Raises:
        ValueError: naming up to 10 missing, unexpected and shape-mismatched keys each.
    """
    from .convert.core import mismatch_report
    from .convert.resize import resize_to_model

    state = resize_to_model(state, model.state_dict())
    report = mismatch_report(model.state_dict(), state)
    if report:
        raise ValueError(f"{source} does not fit this model's spec; {report}")
    model.load_state_dict(state, strict=True)
