"""Shared helpers of the tests: exactness against reference implementations (timm, hiera), and
small specs used by several test modules."""

import torch


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a random value so outputs are far from zero (issue 4's protocol):
    norm weights near 1, everything else normal with std 0.05 (within 0.02-0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4, what: str = "") -> float:
    """max|out - ref| <= rel * max|ref|; returns the measured ratio."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} vs reference {tuple(ref.shape)}"
    scale = ref.abs().max().item()
    diff = (out - ref).abs().max().item()
    assert scale > 1e-3, f"{what}: reference output is ~0 ({scale}); randomize weights first"
    assert diff <= rel * scale, f"{what}: max|diff| {diff:.3g} > {rel} * max|ref| {scale:.3g}"
    return diff / scale


#: A two-stage MAE-compatible spec on 16x16 grey images (4x4 mask units of 2x2 tokens), small
#: enough to pretrain for a few steps in a test (test_mae, test_distributed).
TINY_MAE = """\
name: tiny_mae
img_size: 16
in_chans: 1
num_classes: 10
mask_unit_size: 2
defaults:
  dim_head: 8
  feedforward: {kind: mlp, hidden_layer_multiplier: 2}
  downsample: {kind: q_pool}
stages:
  - {embedding: 16, depth: 1, token_mixer: mask_unit_attention, pos_embed: learned,
     downsample: {kind: conv, patch_size: 2, stride: 2}}
  - {embedding: 32, depth: 1, token_mixer: attention}
mae: {decoder_embedding: 16, decoder_depth: 1, decoder_num_heads: 2, mask_ratio: 0.5}
"""


def write_image_folder(root, labels=("a", "b"), sizes=(("train", 6), ("val", 2)), base=None, seed: int = 0):
    """An ImageFolder tree ``root/<split>/<label>/<i>.png`` of 20x20 RGB images: ``sizes`` images
    per label and split; pixels uniform in ``[0, 255)``, or ``base[label] + [0, 30)`` when
    ``base`` maps labels to brightness (classes a model can tell apart)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    for split, n in sizes:
        for label in labels:
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                if base is None:
                    pixels = torch.randint(0, 255, (20, 20, 3), generator=gen)
                else:
                    pixels = base[label] + torch.randint(0, 30, (20, 20, 3), generator=gen)
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{i}.png")
