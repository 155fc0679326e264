"""TokenLinear's oneDNN route is opt-in (issue 15): off by default, switched per model by
hfactory.optimize, equal to F.linear either way, and never taken where it is slow or untraceable."""

import pytest
import torch
import torch.nn.functional as F

import hfactory
from hfactory.layers import layout
from hfactory.layers.layout import TokenLinear


def calls_conv(module, x, monkeypatch) -> bool:
    seen = []
    real = F.conv2d
    monkeypatch.setattr(layout.F, "conv2d", lambda *a, **k: seen.append(1) or real(*a, **k))
    module(x)
    return bool(seen)


def test_default_is_plain_linear(monkeypatch):
    lin = TokenLinear(64, 32)
    assert lin.onednn is False
    assert not calls_conv(lin, torch.randn(2, 20, 20, 64), monkeypatch)


@pytest.mark.skipif(not layout._ONEDNN_DTYPES, reason="PyTorch built without oneDNN")
def test_optimize_switches_every_projection_and_keeps_outputs(monkeypatch):
    spec = hfactory.load_preset("caformer_s18").with_changes({"stages.*.depth": 1, "img_size": 64})
    torch.manual_seed(0)
    model = hfactory.build_encoder(spec).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        assert hfactory.optimize(model) is model
        linears = [m for m in model.modules() if isinstance(m, TokenLinear)]
        assert linears and all(m.onednn for m in linears)
        torch.testing.assert_close(model(x), plain, rtol=1e-5, atol=1e-5)
    assert calls_conv(linears[0], torch.randn(2, 40, 40, linears[0].in_features), monkeypatch)
    hfactory.optimize(model, onednn_linear=False)
    assert not any(m.onednn for m in linears)


def test_opted_in_route_skips_slow_or_untraceable_cases(monkeypatch):
    lin = TokenLinear(64, 32)
    lin.onednn = True
    assert not calls_conv(lin, torch.randn(2, 4, 64), monkeypatch)  # 512 elements: below the oneDNN floor
    assert not calls_conv(lin, torch.randn(400, 64), monkeypatch)  # 2-D
    assert not calls_conv(lin.double(), torch.randn(2, 20, 20, 64, dtype=torch.float64), monkeypatch)  # dtype
    lin.float()
    assert calls_conv(lin, torch.randn(2, 20, 20, 64), monkeypatch)  # the route itself, eager
