"""Shared helpers for exactness tests against reference implementations (timm, hiera)."""

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
