"""Masked-autoencoder pretraining of any MAE-compatible hfactory encoder (sparse, as Hiera's).

Reproduces the official ``hiera`` package's ``MaskedAutoencoderHiera`` (facebookresearch/hiera
``hiera/hiera_mae.py``; Ryali et al., arXiv 2306.00989; MAE: He et al., arXiv 2111.06377) for
every spec whose components stay inside mask units (:func:`hfactory.plan.mae_verdict`):

1. ``get_random_mask``: per sample, ``int(U * (1 - mask_ratio))`` of the ``U`` mask units are
   kept (True = keep, Hiera's convention; the opposite of the original MAE's).
2. Sparse encoder (:meth:`HierarchicalEncoder.forward_intermediates` with ``mask``): masked
   pixels are zeroed before the patch embedding, masked units deleted after stage 0; every
   stage's output is the kept units ``(B, K, uh, uw, C)``.
3. Multi-scale fusion: each stage finer than the last goes through a conv with kernel = stride
   inside each unit to the last stage's width (``multi_scale_fusion_heads``) and is added to the
   last stage's output; then ``encoder_norm``, which is the encoder's own final norm
   (``encoder.norm``: timm maps Hiera MAE's ``encoder_norm`` there for fine-tuning too).
4. Decoder: ``decoder_embed``; the kept units go back into place among ``mask_token``s, the
   units become the final token grid, ``+ decoder_pos_embed``; ``decoder_depth`` global-attention
   blocks, ``decoder_norm``, ``decoder_pred`` to ``pred_stride**2 * in_chans`` pixel values per
   token (``pred_stride`` = the last stage's reduction).
5. Loss: mean squared error over the tokens of *masked* units only, against the image cut into
   ``pred_stride`` patches (values in ``(C, py, px)`` order), each normalised by its own mean and
   (unbiased) variance when ``norm_pix_loss``.

``forward(x, mask_ratio, mask) -> (loss, pred, label, mask)`` with the reference's convention:
``pred`` and ``label`` are ``(number of masked tokens in the batch, pred_stride**2 * in_chans)``,
``mask`` is the bool ``(B, U)`` keep-mask used. Weights of the package's ``mae_hiera_*`` models
convert with :func:`hfactory.convert.hiera.from_hiera_mae_state_dict`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .errors import UsageError
from .encoder import HierarchicalEncoder
from .io import load_model_dir, save_model_dir
from .layers.block import Block
from .layers.layout import units_to_grid
from .layers.posembed import resize_pos_embed
from .plan import resolve
from .spec.components import AttentionParams, LayerNormParams, MlpParams, StageContext
from .spec.io import SpecSource, load_spec
from .spec.mae import MAEGeometry, MAESpec, check_mask_ratio, mae_geometry
from .spec.model import EncoderSpec

__all__ = ["MaskedAutoencoder", "mae_spec_of", "patchify", "random_mask"]


def mae_spec_of(spec: SpecSource, decoder: Union[MAESpec, dict, None] = None) -> EncoderSpec:
    """``spec`` (path, YAML, dict, :class:`EncoderSpec`) with its ``mae`` section set: ``decoder``
    when given, else the spec's own, else :class:`MAESpec`'s defaults (the reference's)."""
    spec = load_spec(spec)
    mae = MAESpec.model_validate(decoder) if decoder is not None else (spec.mae or MAESpec())
    if spec.mae == mae:
        return spec
    return EncoderSpec.model_validate({**spec.model_dump(mode="json", exclude_none=True),
                                       "mae": mae.model_dump(mode="json")})


def random_mask(batch: int, units: int, mask_ratio: float, device=None, generator=None) -> torch.Tensor:
    """Hiera's ``get_random_mask``: bool ``(batch, units)``, True = keep, exactly
    ``int(units * (1 - mask_ratio))`` kept per row, chosen uniformly (argsort of uniform noise).

    Raises:
        ValueError: ``mask_ratio`` outside ``(0, 1)``, keeping no unit or masking none, or
            fewer than 2 units (:func:`~hfactory.spec.mae.check_mask_ratio`).
    """
    keep = check_mask_ratio(mask_ratio, units)
    noise = torch.rand(batch, units, device=device, generator=generator)
    ids_restore = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    return ids_restore < keep  # rank of each unit's noise < keep: the `keep` smallest are kept


def patchify(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, (H/size)*(W/size), C*size*size)``: patches row-major, values in
    ``(C, py, px)`` order (the reference's ``get_pixel_label_2d`` unfold order).

    Raises:
        ValueError: ``images`` not 4-D, or ``H`` or ``W`` not a multiple of ``size``.
    """
    if images.dim() != 4 or images.shape[2] % size or images.shape[3] % size:
        raise UsageError(f"patchify needs images (B, C, H, W) with H and W multiples of {size}, got shape "
                         f"{tuple(images.shape)}")
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // size, size, w // size, size).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // size) * (w // size), c * size * size)


class MaskedAutoencoder(nn.Module):
    """Sparse masked autoencoder around a :class:`HierarchicalEncoder` (module docstring).

    Args:
        encoder_spec: an MAE-compatible spec (path, YAML text, dict, :class:`EncoderSpec`); its
            ``num_classes`` is ignored (the encoder is built without a classifier).
        decoder: the :class:`MAESpec` (or dict) to use; default: the spec's ``mae`` section, else
            the reference's defaults.

    Attributes:
        spec: the encoder spec with its ``mae`` section filled in (what ``save_pretrained`` writes).
        mae_spec: the :class:`MAESpec`.
        encoder: the :class:`HierarchicalEncoder` (``num_classes=0``); ``encoder.norm`` is the MAE's
            ``encoder_norm``.
        geometry: :class:`~hfactory.spec.mae.MAEGeometry` at the spec's ``img_size``.

    The decoder's attributes are named as the reference's: ``multi_scale_fusion_heads``,
    ``decoder_embed``, ``mask_token`` ``(1, 1, D)``, ``decoder_pos_embed`` ``(1, gh, gw, D)``
    (channels-last; bicubically resized for other image sizes), ``decoder_blocks``,
    ``decoder_norm``, ``decoder_pred``.

    Raises:
        PlanError: the encoder is not MAE-compatible (its location names the first offending stage
            and component) or otherwise cannot be planned.
        pydantic.ValidationError: a bad spec or decoder section.
    """

    model_kind = "mae"  # recorded in saved weights (hfactory.models reads it back)

    def __init__(self, encoder_spec: SpecSource, decoder: Union[MAESpec, dict, None] = None):
        super().__init__()
        self.spec = mae_spec_of(encoder_spec, decoder)
        self.mae_spec = mae = self.spec.mae
        enc_spec = EncoderSpec.model_validate({**self.spec.model_dump(mode="json", exclude_none=True),
                                               "num_classes": 0})
        geo = mae_geometry(resolve(enc_spec), mae)  # refuses incompatible encoders before building them
        self.encoder = HierarchicalEncoder(enc_spec)
        self.geometry = geo
        d = mae.decoder_embedding
        self.multi_scale_fusion_heads = nn.ModuleList(
            nn.Conv2d(chs, geo.dim, kernel, stride=kernel) for _, chs, kernel in geo.fusion)
        self.fusion_stages = tuple(i for i, _, _ in geo.fusion)
        self.decoder_embed = nn.Linear(geo.dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, *geo.final_grid, d))
        ctx = StageContext(loc="mae.decoder", dim=d, grid=geo.final_grid, layout="grid",
                           num_heads=mae.decoder_num_heads, dim_head=d // mae.decoder_num_heads)
        mixer = AttentionParams().resolve(ctx)
        mlp = MlpParams(hidden_layer_multiplier=mae.decoder_mlp_ratio, activation="gelu").resolve(d, "mae.decoder")
        norm = LayerNormParams(eps=1e-6).resolve(d, "mae.decoder")
        from .builder import build_component

        self.decoder_blocks = nn.ModuleList(
            Block(d, build_component("token_mixer", mixer), build_component("feedforward", mlp),
                  build_component("norm", norm), build_component("norm", norm))
            for _ in range(mae.decoder_depth))
        self.decoder_norm = build_component("norm", norm)
        self.decoder_pred = nn.Linear(d, geo.pred_stride ** 2 * self.spec.in_chans)
        self._init_weights()
        self.encoder.set_attn_backend(self.encoder.plan.attn_backend)
        for block in self.decoder_blocks:
            block.token_mixer.backend = self.encoder.plan.attn_backend

    def _init_weights(self) -> None:
        """The reference's ``initialize_weights``: xavier-uniform Linear weights with zero biases and
        unit LayerNorms everywhere (encoder included), the patch embedding initialised like a Linear,
        mask token and decoder position embedding truncated normal (std 0.02)."""
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # the patch embedding's conv, as the reference (MAE/Hiera) initialises it: like a Linear
        conv = next((m for m in self.encoder.stages[0].downsample.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is not None:
            nn.init.xavier_uniform_(conv.weight.data.view(conv.weight.shape[0], -1))

    @property
    def stages(self) -> nn.ModuleList:
        """The encoder's stages (the units FSDP shards one by one in ``hfactory pretrain --fsdp``)."""
        return self.encoder.stages

    # -- geometry ---------------------------------------------------------------------------------
    def _geometry(self, hw: tuple[int, int]) -> MAEGeometry:
        if hw == tuple(self.encoder.plan.img_size):
            return self.geometry
        return mae_geometry(resolve(self.encoder.spec, hw), self.mae_spec)

    def num_mask_units(self, img_size: Optional[tuple[int, int]] = None) -> int:
        """Mask units per image of ``img_size`` (default: the spec's)."""
        return self.encoder.num_mask_units(img_size)

    def get_random_mask(self, x: torch.Tensor, mask_ratio: float) -> torch.Tensor:
        """A random keep-mask ``(B, U)`` for images ``x`` (see :func:`random_mask`)."""
        return random_mask(x.shape[0], self.num_mask_units(tuple(x.shape[2:])), mask_ratio, device=x.device)

    # -- forward ----------------------------------------------------------------------------------
    def forward_encoder(self, x: torch.Tensor, mask_ratio: Optional[float] = None,
                        mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(B, C, H, W)`` -> (fused, normed latent of the kept units
        ``(B, K, uh, uw, dim)`` of the last stage's unit size, the keep-mask ``(B, U)``).

        Raises:
            ValueError: an empty batch; a bad ``mask_ratio`` (see :func:`check_mask_ratio`); a
                ``mask`` of the wrong dtype, shape or device, with different kept counts per
                sample, or keeping every unit of a sample.
        """
        if x.shape[0] == 0:
            raise UsageError("the batch is empty (0 images); the MAE loss needs at least one image")
        if mask is None:
            mask = self.get_random_mask(x, self.mae_spec.mask_ratio if mask_ratio is None else mask_ratio)
        elif mask_ratio is not None:
            check_mask_ratio(mask_ratio, self.num_mask_units(tuple(x.shape[2:])))
        if (not torch.compiler.is_compiling() and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
                and mask.ndim == 2 and bool(mask.all(dim=1).any())):  # before the forward; the encoder checks the rest
            raise UsageError(f"mask keeps all {mask.shape[1]} mask units of a sample; the MAE loss is taken over "
                             "masked units, so every sample must mask at least one")
        maps = self.encoder.forward_intermediates(x, mask=mask, intermediates_only=True)
        latent = maps[-1]
        for head, i in zip(self.multi_scale_fusion_heads, self.fusion_stages):
            t = maps[i]
            b, k = t.shape[:2]
            y = head(t.flatten(0, 1).permute(0, 3, 1, 2))  # each unit: (C_i, uh_i, uw_i) -> (dim, uh, uw)
            latent = latent + y.permute(0, 2, 3, 1).unflatten(0, (b, k))
        return self.encoder.norm(latent), mask

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor, geometry: Optional[MAEGeometry] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent of the kept units and the keep-mask -> (predictions ``(B, N, pred_stride**2 * C)``
        for all ``N`` final tokens in raster order, token keep-mask ``(B, N)``). ``geometry``: that
        of the images' size (default: the spec's ``img_size``)."""
        grid = (geometry or self.geometry).final_grid
        x = self.decoder_embed(latent)  # (B, K, uh, uw, D)
        b, u = mask.shape
        uh, uw, d = x.shape[2:]
        units = self.mask_token.to(x.dtype).view(1, 1, 1, 1, d).repeat(b, u, uh, uw, 1)
        units[mask] = x.flatten(0, 1)  # kept units back in place among mask tokens
        x = units_to_grid(units, grid)
        x = x + resize_pos_embed(self.decoder_pos_embed, grid).to(x.dtype)
        x = x.flatten(1, 2)
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))
        keep = units_to_grid(mask.view(b, u, 1, 1, 1).expand(b, u, uh, uw, 1), grid).reshape(b, -1)
        return pred, keep

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, masked: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, pred of masked tokens, their labels); ``masked`` ``(B, N)`` is True for tokens
        of masked units (the ones the loss is taken over)."""
        label = patchify(x, self._geometry(tuple(x.shape[2:])).pred_stride)[masked]
        if self.mae_spec.norm_pix_loss:
            mean = label.mean(dim=-1, keepdim=True)
            var = label.var(dim=-1, keepdim=True)
            label = (label - mean) / (var + 1.0e-6) ** 0.5
        pred = pred[masked]
        return ((pred - label) ** 2).mean(), pred, label

    def forward(self, x: torch.Tensor, mask_ratio: Optional[float] = None, mask: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, pred, label, mask)`` as the reference's ``MaskedAutoencoderHiera.forward``.

        Args:
            x: images ``(B, in_chans, H, W)`` (any size the encoder's plan accepts).
            mask_ratio: fraction of mask units to hide, in ``(0, 1)``; default ``mae.mask_ratio``.
            mask: a bool keep-mask ``(B, U)`` to use instead of a random one (same count per row).

        Returns:
            ``loss`` (scalar), ``pred`` and ``label`` ``(M, pred_stride**2 * in_chans)`` for the
            ``M`` tokens of masked units in the batch, ``mask`` the keep-mask used.

        Raises:
            ValueError: ``mask_ratio`` outside ``(0, 1)``, keeping no unit or masking none; a ``mask``
                of the wrong shape / dtype / device, with different counts per row or keeping every
                unit of a row; images of the wrong shape; an empty batch.
        """
        self.encoder._check_input(x)
        latent, mask = self.forward_encoder(x, mask_ratio, mask)
        pred, keep = self.forward_decoder(latent, mask, self._geometry(tuple(x.shape[2:])))
        loss, pred, label = self.forward_loss(x, pred, ~keep)
        return loss, pred, label, mask

    # -- parameters, saving -----------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The encoder's position embeddings (``encoder.``-prefixed), ``mask_token`` and
        ``decoder_pos_embed``."""
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"mask_token", "decoder_pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the encoder's blocks in backward (the decoder is not checkpointed)."""
        self.encoder.set_grad_checkpointing(enable)

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> Path:
        """``spec.yaml`` (with its ``mae`` section) and ``model.safetensors`` (all MAE weights) in
        ``directory``, each written atomically. Returns the directory."""
        return save_model_dir(self, directory)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], map_location: str = "cpu") -> "MaskedAutoencoder":
        """Rebuild from :meth:`save_pretrained`'s directory (or a pretraining checkpoint).

        Raises:
            FileNotFoundError / ValueError: as :func:`hfactory.from_pretrained` (missing files,
                weights saved for another spec, or keys that do not fit).
        """
        return load_model_dir(directory, cls, map_location, "a MaskedAutoencoder directory")

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights (keys as a :class:`HierarchicalEncoder`'s), for fine-tuning."""
        return {k: v for k, v in self.encoder.state_dict().items()}
