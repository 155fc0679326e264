"""SFT ("Scale-Free Transformer", the thesis repo's iteratively refined hierarchical RAM) as an
encoder: every level is kept, refined by forward and backward sweeps, and returned as features.

Spec and plan: :mod:`hfactory.spec.sft` (what each field means, the arithmetic, the sources).
The codec blocks are built from registry components: self-attention blocks are hfactory's
:class:`~hfactory.layers.block.Block` with the registry's ``attention`` token mixer, the spec's
``feedforward`` and ``norm``; cross-attention blocks use the same norm and feedforward entries
and call the one attention entry point (:func:`hfactory.layers.attention.attention`).

Example::

    from hfactory.sft import build_sft
    model = build_sft("examples/sft/digits.yaml")
    logits = model(images)                       # (B, num_classes)
    levels = model.forward_intermediates(images, intermediates_only=True)   # every level, NCHW

Initialisation follows the thesis: Xavier-uniform Linear (and stem) weights, zero biases,
queries normal with std 0.02.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .errors import UsageError
from .builder import build_component
from .layers.attention import attention
from .layers.block import Block
from .spec.base import PlanError
from .spec.io import read_spec_document
from .spec.sft import SFTPlan, SFTSpec, SFTTransitionPlan, resolve_sft

__all__ = ["SFTEncoder", "Codec", "CrossBlock", "build_sft", "load_sft_spec", "group_tokens", "ungroup_tokens",
           "sincos_pos_embed", "summarize_sft", "format_sft_summary"]


def group_tokens(x: torch.Tensor, group_size: Sequence[int]) -> torch.Tensor:
    """Cut a level ``(B, *grid, C)`` (any number of axes) into groups of ``group_size`` tokens:
    ``(B * G, prod(group_size), C)``, groups row-major over the grid, tokens row-major inside.

    Raises:
        ValueError: ``group_size`` has another number of axes than the grid, or does not divide it.
    """
    b, *grid, c = x.shape
    d = len(grid)
    if len(group_size) != d or any(s < 1 or n % s for n, s in zip(grid, group_size)):
        raise UsageError(f"group_size {tuple(group_size)} must have one positive entry per grid axis, each "
                         f"dividing the grid {tuple(grid)} (x has shape {tuple(x.shape)} = (B, *grid, C))")
    split = [b]
    for n, s in zip(grid, group_size):
        split += [n // s, s]
    x = x.reshape(*split, c)
    perm = [0, *(1 + 2 * i for i in range(d)), *(2 + 2 * i for i in range(d)), 1 + 2 * d]
    return x.permute(perm).reshape(-1, math.prod(group_size), c)


def ungroup_tokens(x: torch.Tensor, batch: int, groups: Sequence[int], group_size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`group_tokens`: ``(B * G, prod(group_size), C) -> (B, *(groups * group_size), C)``."""
    d, c = len(groups), x.shape[-1]
    x = x.reshape(batch, *groups, *group_size, c)
    perm = [0]
    for i in range(d):
        perm += [1 + i, 1 + d + i]
    return x.permute(*perm, 1 + 2 * d).reshape(batch, *(g * s for g, s in zip(groups, group_size)), c)


def sincos_pos_embed(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed sin-cos position embedding ``(*grid, dim)`` for a grid of any rank: each axis gets
    ``2 * (dim // (2 * rank))`` channels (``sin`` then ``cos`` of ``pos * temperature^(-k/f)``),
    the rest are zero (the thesis's ``get_nd_sin_posemb`` idea)."""
    rank = len(grid)
    per_axis = dim // (2 * rank)
    omega = 1.0 / temperature ** (torch.arange(per_axis, dtype=torch.float64) / max(per_axis, 1))
    coords = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid), indexing="ij")
    parts = []
    for pos in coords:
        angles = pos[..., None] * omega
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=-1) if parts else torch.zeros(*grid, 0, dtype=torch.float64)
    pad = dim - emb.shape[-1]
    if pad:
        emb = torch.cat([emb, emb.new_zeros(*grid, pad)], dim=-1)
    return emb.float()


class CrossBlock(nn.Module):
    """Pre-norm cross-attention block (thesis ``TransformerBlock(self_attend=False)``):
    ``x = x + proj(attention(q(norm1(x)), kv(ctx_norm(ctx))))``; ``x = x + mlp(norm2(x))``.
    ``x`` ``(B, M, C)``, ``ctx`` ``(B, N, C)`` -> ``(B, M, C)``."""

    def __init__(self, dim: int, num_heads: int, feedforward: dict, norm: dict, backend: str = "auto"):
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.norm1 = build_component("norm", norm)
        self.ctx_norm = build_component("norm", norm)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = build_component("norm", norm)
        self.mlp = build_component("feedforward", feedforward)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.to_q(self.norm1(x)))
        k, v = (self._heads(t) for t in self.to_kv(self.ctx_norm(ctx)).chunk(2, dim=-1))
        o = attention(q, k, v, backend=self.backend).transpose(1, 2).reshape(x.shape)
        x = x + self.proj(o)
        return x + self.mlp(self.norm2(x))


def _projection(norm: dict, in_chs: int, out_chs: int) -> nn.Module:
    """LayerNorm + Linear between two widths (thesis ``Codec.proj``), identity when they match."""
    if in_chs == out_chs:
        return nn.Identity()
    return nn.Sequential(build_component("norm", norm), nn.Linear(in_chs, out_chs))


class Codec(nn.Module):
    """Transition ``i -> i + 1`` of an SFT (thesis ``Codec`` with ``TwoStepCodec``), at level
    ``i``'s width ``C``; resolved numbers from :class:`~hfactory.spec.sft.SFTTransitionPlan`.

    - :meth:`forward_step`: ``fwd_self`` blocks on each group of level ``i``, then the group's
      queries (``query`` the first time, else level ``i + 1`` narrowed by ``down``) pass the
      ``fwd_cross`` blocks (attending to the group, or to ``[queries; group]``); ``up`` widens
      them into level ``i + 1``. Returns both refined levels.
    - :meth:`backward_step` (built when ``backward``): level ``i``'s groups pass ``bwd_cross``
      (attending to their group of level ``i + 1`` narrowed by ``down``) and ``bwd_self``.
    """

    def __init__(self, plan: SFTTransitionPlan, backward: bool):
        super().__init__()
        self.group_size, self.queries, self.groups = plan.group_size, plan.queries, plan.groups
        self.attend_to_query = plan.attend_to_query
        c, backend = plan.in_chs, plan.self_attention.get("backend", "auto")

        def self_block():
            return Block(c, build_component("token_mixer", plan.self_attention),
                         build_component("feedforward", plan.feedforward), build_component("norm", plan.norm),
                         build_component("norm", plan.norm))

        def cross_block():
            return CrossBlock(c, plan.num_heads, plan.feedforward, plan.norm, backend)

        t, x = plan.forward_layers
        self.fwd_self = nn.ModuleList(self_block() for _ in range(t))
        self.query = nn.Parameter(torch.zeros(math.prod(plan.queries), c))
        nn.init.normal_(self.query, std=0.02)
        self.fwd_cross = nn.ModuleList(cross_block() for _ in range(x))
        self.up = _projection(plan.norm, c, plan.out_chs)
        self.backward = backward
        if backward:
            x, t = plan.backward_layers
            self.down = _projection(plan.norm_out, plan.out_chs, c)
            self.bwd_cross = nn.ModuleList(cross_block() for _ in range(x))
            self.bwd_self = nn.ModuleList(self_block() for _ in range(t))

    def _groups_of(self, fine: torch.Tensor) -> tuple[int, ...]:
        return tuple(n // s for n, s in zip(fine.shape[1:-1], self.group_size))

    def forward_step(self, fine: torch.Tensor, coarse: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``fine`` ``(B, *grid_i, C_i)``, ``coarse`` ``(B, *grid_i+1, C_i+1)`` or None (first sweep)
        -> refined ``(fine, coarse)``."""
        b, groups = fine.shape[0], self._groups_of(fine)
        ctx = group_tokens(fine, self.group_size)
        for blk in self.fwd_self:
            ctx = blk(ctx)
        if coarse is None:
            q = self.query.repeat(ctx.shape[0], 1, 1)  # a copy: a no-grad view of a parameter upsets hooks
        else:
            q = self.down(group_tokens(coarse, self.queries))
        kv = torch.cat([q, ctx], dim=1) if self.attend_to_query else ctx
        for blk in self.fwd_cross:
            q = blk(q, kv)
        return ungroup_tokens(ctx, b, groups, self.group_size), ungroup_tokens(self.up(q), b, groups, self.queries)

    def backward_step(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Refine ``fine`` ``(B, *grid_i, C_i)`` from ``coarse`` ``(B, *grid_i+1, C_i+1)``."""
        b, groups = fine.shape[0], self._groups_of(fine)
        x = group_tokens(fine, self.group_size)
        ctx = self.down(group_tokens(coarse, self.queries))
        kv = torch.cat([x, ctx], dim=1) if self.attend_to_query else ctx
        for blk in self.bwd_cross:
            x = blk(x, kv)
        for blk in self.bwd_self:
            x = blk(x)
        return ungroup_tokens(x, b, groups, self.group_size)


class SFTEncoder(nn.Module):
    """An SFT built from an :class:`~hfactory.spec.sft.SFTSpec`: images ``(B, C, H, W)`` ->
    levels ``(B, C_i, H_i, W_i)`` (every level is a feature map) and logits.

    The backbone API is :class:`~hfactory.encoder.HierarchicalEncoder`'s (timm 1.0.31's names and
    signatures; the levels play the part of the stages): ``forward_features``, ``forward_head``,
    ``forward_intermediates``, ``prune_intermediate_layers``, ``reset_classifier``,
    ``get_classifier``, ``set_grad_checkpointing``, ``no_weight_decay``, ``group_matcher``,
    ``feature_info``, ``num_features``, ``save_pretrained``. ``reset_classifier`` and
    ``prune_intermediate_layers`` keep ``spec`` and ``plan`` true, so the changed model saves and
    reloads. Where the SFT differs from a stack of stages (every level is refined by the codecs
    above it over the passes), the method's docstring says so.

    Attributes: ``spec``, ``plan``, ``stem`` (patch embedding conv), ``codecs`` (one
    :class:`Codec` per transition), ``norm`` and ``head`` (pooled top level -> classes),
    ``grad_checkpointing`` (see :meth:`set_grad_checkpointing`).
    """

    model_kind = "sft"  # recorded in saved weights (hfactory.models reads it back)

    def __init__(self, spec: SFTSpec, plan: Optional[SFTPlan] = None):
        super().__init__()
        self.spec, self.plan = spec, plan or resolve_sft(spec)
        if len(self.plan.img_size) != 2:
            raise PlanError("img_size", "the SFT image stem and head are 2-D; the level mechanics (group_tokens, "
                            "Codec) work on grids of any rank but need another stem")
        c0 = self.plan.levels[0].chs
        self.stem = nn.Conv2d(self.plan.in_chans, c0, self.plan.patch_size, self.plan.patch_size)
        self.codecs = nn.ModuleList(Codec(t, self.plan.builds_backward) for t in self.plan.transitions)
        self.norm = build_component("norm", self.plan.head_norm)
        top = self.plan.levels[-1].chs
        self.head = nn.Linear(top, self.plan.num_classes) if self.plan.num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        self._pos_cache: dict = {}
        self.grad_checkpointing = False

    # -- timm model attributes -------------------------------------------------------------
    @property
    def num_features(self) -> int:
        """Width of the top level (what ``forward_head(pre_logits=True)`` returns per image)."""
        return self.plan.levels[-1].chs

    @property
    def head_hidden_size(self) -> int:
        return self.num_features

    @property
    def num_classes(self) -> int:
        return self.plan.num_classes

    @property
    def in_chans(self) -> int:
        return self.plan.in_chans

    def save_pretrained(self, directory: Union[str, os.PathLike]):
        """``spec.yaml`` and ``model.safetensors`` (spec hash in its metadata), written atomically;
        :func:`hfactory.models.load` (and ``hfactory eval``) rebuild it. Returns the directory."""
        from .io import save_model_dir

        return save_model_dir(self, directory)

    @property
    def feature_info(self) -> list[dict]:
        """timm-style, one entry per level (``num_chs``, ``reduction``). ``module`` is a label,
        ``levels.<i>``, not a module path as in :class:`~hfactory.encoder.HierarchicalEncoder`:
        a level is refined by several codecs over the passes, so no one module outputs it; take
        the levels with :meth:`forward_intermediates`."""
        return [dict(num_chs=lv.chs, reduction=lv.reduction[0], module=f"levels.{lv.index}") for lv in self.plan.levels]

    def _pos(self, grid: tuple[int, ...], dim: int, ref: torch.Tensor) -> torch.Tensor:
        key = (grid, dim, ref.device, ref.dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_pos_embed(grid, dim).to(ref.device, ref.dtype)
        return self._pos_cache[key]

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images ``(B, in_chans, H, W)`` -> every level after ``n_passes`` sweeps, channels-last
        ``(B, *grid_i, C_i)``, level 0 first.

        Raises:
            UsageError (a ValueError): ``x`` is not ``(B, in_chans, H, W)``.
            PlanError: an input size the patch or group sizes do not divide.
        """
        return self._run_steps(x, self._steps())

    def _steps(self) -> list[tuple[bool, int]]:
        """The codec steps of the ``n_passes`` sweeps in run order: ``(True, i)`` is transition
        ``i``'s forward step (it writes levels ``i`` and ``i + 1``), ``(False, i)`` its backward
        step (it writes level ``i``); forward sweeps run ``0 -> L``, backward sweeps ``L -> 0``."""
        n, steps = len(self.codecs), []
        for p in range(self.plan.n_passes):
            steps += [(True, i) for i in range(n)] if p % 2 == 0 else [(False, i) for i in reversed(range(n))]
        return steps

    def _steps_until_final(self, take: list[int]) -> list[tuple[bool, int]]:
        """The steps up to the last one that writes a level of ``take``: after them those levels
        hold the values of a full run (``stop_early``)."""
        steps, last = self._steps(), {}
        for s, (forward, i) in enumerate(steps):
            last[i] = s
            if forward:
                last[i + 1] = s
        return steps[: max(last[i] for i in take) + 1]

    def _run_steps(self, x: torch.Tensor, steps: list[tuple[bool, int]]) -> list[Optional[torch.Tensor]]:
        """The stem, then ``steps`` (see :meth:`_steps`); returns the levels as the steps left them
        (channels-last; None for a level no step reached). With ``grad_checkpointing`` (and
        autograd on), each step runs under ``torch.utils.checkpoint`` (non-reentrant)."""
        if x.ndim != 4 or x.shape[1] != self.plan.in_chans:
            raise UsageError(f"expected images (B, {self.plan.in_chans}, H, W), got {tuple(x.shape)}")
        if tuple(x.shape[2:]) != self.plan.img_size and not torch.compiler.is_compiling():
            resolve_sft(self.spec.model_copy(update={"img_size": tuple(x.shape[2:])}))  # raises what does not fit
        h = self.stem(x).permute(0, 2, 3, 1)
        levels: list[Optional[torch.Tensor]] = [h + self._pos(tuple(h.shape[1:3]), h.shape[-1], h)]
        levels += [None] * len(self.codecs)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for forward, i in steps:
            codec = self.codecs[i]
            step = codec.forward_step if forward else codec.backward_step
            args = (levels[i], levels[i + 1])  # the first forward step of a transition gets coarse=None
            out = torch.utils.checkpoint.checkpoint(step, *args, use_reentrant=False) if recompute else step(*args)
            if forward:
                levels[i], levels[i + 1] = out
            else:
                levels[i] = out
        return levels

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, list[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's ``forward_intermediates`` (timm 1.0.31, the signature of its hierarchical models):
        the levels as feature maps, as :meth:`HierarchicalEncoder.forward_intermediates
        <hfactory.encoder.HierarchicalEncoder.forward_intermediates>` returns its stages.

        Args:
            x: images ``(B, in_chans, H, W)``.
            indices: levels to return: None = all, int n = the last n, list = those (negatives ok).
            norm: apply ``norm`` (the head norm, per token) to the top level's map when it is returned.
            stop_early: stop the sweeps as soon as every requested level has its final value (the
                returned maps are those of a full run). A level is final after the last codec step
                that writes it: with one pass, level ``i`` after transition ``i``'s forward step
                (level ``L`` after ``L - 1``'s), so the transitions above the last requested level
                do not run; with more passes only the steps after that are saved (a backward sweep
                rewrites every level below the top, so asking for level 0 runs everything).
            output_fmt: ``'NCHW'`` or ``'NHWC'``.
            intermediates_only: return only the list.

        Returns:
            ``list[Tensor]`` (one ``(B, C_i, H_i, W_i)`` map per requested level, or
            ``(B, H_i, W_i, C_i)`` with NHWC, in level order) if ``intermediates_only``, else
            ``(final, list)``: ``final`` is the top level ``(B, C_L, H_L, W_L)``, not normed (what
            :meth:`forward_features` returns), or with ``stop_early`` the last requested level
            (timm returns the output of the last stage that ran).

        Raises:
            UsageError (a ValueError): a bad ``output_fmt``, out-of-range ``indices``, images
                that are not ``(B, in_chans, H, W)``.
            PlanError: an input size the patch or group sizes do not divide.
        """
        from .features import feature_take_indices

        if output_fmt not in ("NCHW", "NHWC"):
            raise UsageError(f"output_fmt {output_fmt!r}: valid are 'NCHW' and 'NHWC'")
        take, max_index = feature_take_indices(len(self.plan.levels), indices)
        levels = self._run_steps(x, self._steps_until_final(take) if stop_early else self._steps())
        out = []
        for i in take:
            y = self.norm(levels[i]) if norm and i == len(levels) - 1 else levels[i]
            out.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return out
        return levels[max_index if stop_early else -1].permute(0, 3, 1, 2), out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the top level ``(B, C_L, H_L, W_L)``."""
        return self.forward_levels(x)[-1].permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Top level NCHW ``(B, C_L, H_L, W_L)`` -> mean over tokens (the thesis's pooling) ->
        ``norm`` -> ``head``: logits ``(B, num_classes)``, or the pooled, normed features
        ``(B, num_features)`` with ``pre_logits=True`` (or 0 classes)."""
        x = self.norm(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> logits ``(B, num_classes)``; pooled features if 0 classes."""
        return self.forward_head(self.forward_features(x))

    # -- timm model API -----------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Full names of the parameters not to weight-decay beyond timm's automatic rule (1-D
        parameters and biases): each codec's learnable queries ``codecs.<i>.query`` ``(Q, C_i)``,
        which play the part of position embeddings (the level-0 position embedding is a fixed
        sin-cos buffer, not a parameter)."""
        return {n for n, _ in self.named_parameters() if n.endswith(".query")}

    def get_classifier(self) -> nn.Module:
        """The classifier: ``head``, an ``nn.Linear(num_features, num_classes)``, or
        ``nn.Identity`` with 0 classes."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's ``reset_classifier``: a new ``head`` for ``num_classes`` (0: ``forward`` returns
        the pooled, normed top level ``(B, num_features)``), initialised as at build
        (Xavier-uniform weight, zero bias) on the model's device and dtype. ``spec.num_classes``
        and ``plan`` follow, so the re-headed model saves and reloads.

        Args:
            num_classes: classes of the new head, ``>= 0``.
            global_pool: None (keep) or ``'avg'``: the SFT pools by the mean over the top level's
                tokens (the thesis's classifier), the one pooling its spec has.

        Raises:
            UsageError (a ValueError): another ``global_pool``.
            pydantic.ValidationError: a bad ``num_classes`` (negative, not an int); the model is
                unchanged then.
        """
        if global_pool not in (None, "avg"):
            raise UsageError(f"global_pool {global_pool!r}: an SFT pools by the mean over the top level's tokens "
                             "(the thesis's classifier); valid: None (keep) or 'avg'")
        self._set_spec({"num_classes": num_classes})
        ref = self.stem.weight
        head = nn.Linear(self.num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()
        head.apply(_init_weights)
        self.head = head.to(device=ref.device, dtype=ref.dtype).train(self.training)

    def _set_spec(self, update: dict) -> None:
        """Replace top-level spec fields (JSON-like values), revalidate and re-plan (as
        :class:`~hfactory.encoder.HierarchicalEncoder` does)."""
        self.spec = SFTSpec.model_validate({**self.spec.model_dump(mode="json", exclude_none=True), **update})
        self.plan = resolve_sft(self.spec)

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's ``prune_intermediate_layers``: drop what the levels ``indices`` (as in
        :meth:`forward_intermediates`) do not need, the classifier (``prune_head``) and the head
        norm (``prune_norm``). ``spec`` and ``plan`` become the pruned model's (fewer ``levels``,
        ``num_classes: 0``, ``head_norm: identity``), so it saves and reloads, and
        ``forward_intermediates(x, indices=<the returned list>)`` returns what it did before.

        An SFT's levels are not a stack of stages: codecs above a level refine it, so only what
        leaves the requested levels' values unchanged is dropped (the last requested level ``m``):

        - ``n_passes == 1``: the transitions above ``m`` go, and transition ``m`` too when it has no
          self-attention blocks (``forward_layers[0] == 0``); when it has some, they refine level
          ``m``, so it stays and so does level ``m + 1`` (the model then has ``m + 2`` levels,
          one more than timm's stage models keep). At least one transition stays (a spec has one).
        - ``n_passes > 1``: the backward sweeps carry every level into the ones below it, so no
          transition goes; only the head and norm are pruned (as the flags say).

        When the top level goes, the head norm and the classifier, sized for it, go too whatever
        the flags (as :meth:`HierarchicalEncoder.prune_intermediate_layers
        <hfactory.encoder.HierarchicalEncoder.prune_intermediate_layers>`).

        Returns:
            the requested level indices, non-negative and sorted (timm's ``take_indices``).

        Raises:
            UsageError (a ValueError): an index out of range (``hfactory.features.feature_take_indices``).
        """
        from .features import feature_take_indices

        take, max_index = feature_take_indices(len(self.plan.levels), indices)
        n = len(self.codecs)
        if self.plan.n_passes > 1 or max_index == n:
            keep = n
        else:
            keep = max(1, max_index + (1 if self.plan.transitions[max_index].forward_layers[0] > 0 else 0))
        update: dict = {}
        if keep < n:
            self.codecs = self.codecs[:keep]
            update["levels"] = [lv.model_dump(mode="json", exclude_none=True) for lv in self.spec.levels[:keep]]
        if prune_norm or keep < n:
            self.norm = nn.Identity()
            update["head_norm"] = {"kind": "identity"}
        if prune_head or keep < n:
            self.head = nn.Identity()
            update["num_classes"] = 0
        if update:
            self._set_spec(update)
        return take

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's ``set_grad_checkpointing``: with ``enable``, each codec step (one transition's
        forward or backward step: its self- and cross-attention blocks and projections) is
        recomputed in backward instead of storing its activations (``torch.utils.checkpoint``,
        ``use_reentrant=False``); only the levels between steps are kept. Gradients are unchanged.
        The step, not the block, is the unit because the levels are what a step hands on; a step
        with many blocks (the thesis's base config has one with 16) recomputes them all at once."""
        self.grad_checkpointing = bool(enable)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's ``group_matcher``: regexes over parameter names grouping them by depth, for
        layer-wise learning-rate decay (``timm.optim.param_groups_layer_decay``).

        ``stem`` is the patch embedding. ``blocks``: coarse, one group per transition's codec
        (``codecs.<i>``); fine, within each codec its parts in the order a forward then backward
        sweep first uses them (``fwd_self``, ``query``, ``fwd_cross``, ``up``, ``down``,
        ``bwd_cross``, ``bwd_self``), then the head norm, merged into the last group (timm's
        ``(99999,)``). The regexes are disjoint. As in timm and
        :class:`~hfactory.encoder.HierarchicalEncoder`, the classifier ``head`` (and, coarse,
        ``norm``) match none: timm puts unmatched parameters in the last group.
        """
        parts = ("fwd_self", "query", "fwd_cross", "up", "down", "bwd_cross", "bwd_self")
        return dict(
            stem=r"^stem\.",
            blocks=r"^codecs\.(\d+)\." if coarse else [
                *((rf"^codecs\.(\d+)\.{part}(?:\.|$)", (k,)) for k, part in enumerate(parts)),
                (r"^norm\.", (99999,)),
            ],
        )


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):  # patchify stem initialised like a Linear (thesis)
        nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def summarize_sft(spec: SFTSpec, batch: int = 1) -> dict:
    """What ``hfactory summary`` prints for an SFT spec, measured on the meta device as for
    encoders (:func:`hfactory.summary.summarize`: GMACs per image, activation bytes saved for
    backward by a training forward of ``batch`` images).

    Returns:
        a JSON-ready dict: ``name``, ``img_size``, ``in_chans``, ``num_classes``, ``n_passes``,
        ``batch``, ``levels`` (``index, grid, tokens, width, reduction``), ``transitions``
        (``index`` i -> i+1, ``group_size, queries, heads, params, gmacs, activation_bytes``),
        ``stem`` and ``head`` (params, gmacs, activation_bytes; the head part also holds the
        position embeddings' additions), ``total``.

    Raises:
        ValueError: ``batch < 1``; PlanError: the spec does not plan.
    """
    from .summary import OTHER, check_batch, count_macs, saved_activation_bytes

    check_batch(batch)
    plan = resolve_sft(spec)
    with torch.device("meta"):
        model = SFTEncoder(spec, plan)
    # A codec runs through forward_step / backward_step, not its own __call__, so its cost is
    # collected from the submodules it calls (blocks and projections), labelled "codec<i>:<name>".
    parts = {"stem": model.stem}
    for i, codec in enumerate(model.codecs):
        for name, child in codec.named_children():
            items = child.named_children() if isinstance(child, nn.ModuleList) else [("", child)]
            parts.update({f"codec{i}:{name}{'.' + j if j else ''}": m for j, m in items})
    fused = plan.attn_backend != "math"
    macs = count_macs(model, torch.empty(1, plan.in_chans, *plan.img_size, device="meta"), parts)
    saved = saved_activation_bytes(model, torch.empty(batch, plan.in_chans, *plan.img_size, device="meta"), parts,
                                   fused)
    for table in (macs, saved):
        for i in range(len(model.codecs)):
            table[f"codec{i}"] = sum(v for k, v in table.items() if k.startswith(f"codec{i}:"))

    def part(label: str, module: Optional[nn.Module]) -> dict:
        params = sum(p.numel() for p in module.parameters()) if module is not None else None
        return {"params": params, "gmacs": macs[label] / 1e9, "activation_bytes": saved[label]}

    total = sum(p.numel() for p in model.parameters())
    head = part(OTHER, None)
    head["params"] = total - sum(p.numel() for m in (model.stem, *model.codecs) for p in m.parameters())
    return {
        "name": plan.name, "img_size": list(plan.img_size), "in_chans": plan.in_chans,
        "num_classes": plan.num_classes, "n_passes": plan.n_passes, "batch": batch,
        "levels": [{"index": lv.index, "grid": list(lv.grid), "tokens": lv.tokens, "width": lv.chs,
                    "reduction": list(lv.reduction)} for lv in plan.levels],
        "transitions": [{"index": t.index, "group_size": list(t.group_size), "queries": list(t.queries),
                         "heads": t.num_heads, **part(f"codec{t.index}", model.codecs[t.index])}
                        for t in plan.transitions],
        "stem": part("stem", model.stem), "head": head,
        "total": {"params": total, "gmacs": macs["total"] / 1e9, "activation_bytes": saved["total"]},
    }


def format_sft_summary(summary: dict) -> str:
    """The text table of :func:`summarize_sft`: levels, then the stem, each transition's codec
    (forward and, with ``n_passes > 1``, backward steps; its cost summed over the passes) and the head."""
    from .summary import _bytes, _gm, _params

    size = "x".join(map(str, summary["img_size"]))
    lines = [f"{summary['name'] or 'sft'}: {summary['in_chans']}x{size} image, {len(summary['levels'])} levels, "
             f"{summary['n_passes']} pass(es), {summary['num_classes']} classes",
             "level  grid      tokens  width  pixels per token"]
    for lv in summary["levels"]:
        lines.append(f"{lv['index']:>5}  {'x'.join(map(str, lv['grid'])):<8}  {lv['tokens']:>6}  {lv['width']:>5}  "
                     f"{'x'.join(map(str, lv['reduction']))}")
    rows = [("stem", "", summary["stem"])]
    rows += [(f"codec {t['index']}->{t['index'] + 1}", f"groups of {'x'.join(map(str, t['group_size']))} -> "
              f"{'x'.join(map(str, t['queries']))} queries, {t['heads']} heads", t) for t in summary["transitions"]]
    rows += [("head", "", summary["head"]), ("total", "", summary["total"])]
    act = f"act. mem (batch {summary['batch']})"
    lines.append(f"{'part':<12}  {'':<40}  {'params':>8}  {'GMACs':>7}  {act:>18}")
    for name, what, r in rows:
        lines.append(f"{name:<12}  {what:<40}  {_params(r['params']):>8}  {_gm(r['gmacs']):>7}  "
                     f"{_bytes(r['activation_bytes']):>18}")
    lines.append("GMACs: per image, conv/matmul only (FlopCounterMode FLOPs / 2); act. mem: tensors saved for "
                 "backward by a training forward")
    return "\n".join(lines)


def load_sft_spec(source: Union[str, os.PathLike, dict, SFTSpec]) -> SFTSpec:
    """An :class:`SFTSpec` from a path, YAML text, a dict or a spec, read as encoder specs are
    (:func:`hfactory.spec.io.read_spec_document`: size limit, safe YAML).

    Raises:
        pydantic.ValidationError: a wrong field, located; FileNotFoundError / ValueError: see
            ``read_spec_document``.
    """
    if isinstance(source, SFTSpec):
        return source
    return SFTSpec.model_validate(read_spec_document(source, required="'embedding' and 'levels'"))


def build_sft(source: Union[str, os.PathLike, dict, SFTSpec], **overrides) -> SFTEncoder:
    """Validate, plan and build an SFT (``overrides`` replace top-level spec fields)."""
    spec = load_sft_spec(source)
    if overrides:
        spec = SFTSpec.model_validate({**spec.model_dump(mode="json", exclude_none=True), **overrides})
    return SFTEncoder(spec)
