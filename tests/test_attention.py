"""The one attention entry point: backends agree, the xformers path's layout and bias handling
are right (proved on CPU by substituting the op with a BMHK reference), dispatch never breaks CPU."""

import sys
import types
import warnings

import pytest
import torch

import hfactory
from hfactory.layers import attention as attn_mod
from hfactory.layers.attention import attention, attention_backend, math_attention


def qkv(b=2, h=3, m=17, n=17, d=8, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return make(b, h, m, d), make(b, h, n, d), make(b, h, n, d)


def reference(q, k, v, bias=None, scale=None):
    """softmax(q k^T * scale + bias) v in float64, written independently of the code under test."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhmd,bhnd->bhmn", q, k) * scale
    if bias is not None:
        s = s + bias.double()
    return torch.einsum("bhmn,bhnd->bhmd", torch.softmax(s, -1), v)


BIASES = {
    "none": lambda b, h, m, n: None,
    "full": lambda b, h, m, n: torch.randn(b, h, m, n),
    "per_head": lambda b, h, m, n: torch.randn(1, h, m, n),          # relative-position-bias shape
    "mask": lambda b, h, m, n: torch.zeros(b, 1, m, n).masked_fill(torch.rand(b, 1, m, n) < 0.3, float("-inf"))
    .index_fill(3, torch.tensor([0]), 0.0),                          # keep one key visible per row
}


@pytest.mark.parametrize("bias_kind", list(BIASES))
@pytest.mark.parametrize("m,n", [(17, 17), (5, 23)])
def test_sdpa_and_math_agree_with_reference(bias_kind, m, n):
    q, k, v = qkv(m=m, n=n)
    bias = BIASES[bias_kind](2, 3, m, n)
    ref = reference(q, k, v, bias).float()
    for backend in ("sdpa", "math"):
        out = attention(q, k, v, bias, backend=backend)
        assert out.shape == (2, 3, m, 8)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v, bias, backend="sdpa"), attention(q, k, v, bias, backend="math"),
                               atol=1e-5, rtol=1e-5)


def test_custom_scale():
    q, k, v = qkv()
    torch.testing.assert_close(attention(q, k, v, scale=0.3, backend="sdpa"), reference(q, k, v, scale=0.3).float(),
                               atol=1e-5, rtol=1e-5)


class FakeMemoryEfficientAttention:
    """Stands in for ``xformers.ops.memory_efficient_attention``: checks what xformers requires
    (BMHK inputs, a full-shape bias with 8-aligned strides) and computes the math in BMHK."""

    def __init__(self):
        self.calls = []

    def __call__(self, query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None, output_dtype=None):
        b, m, h, d = query.shape
        n = key.shape[1]
        assert key.shape == (b, n, h, d) and value.shape[:3] == (b, n, h)
        assert query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1
        if attn_bias is not None:
            assert attn_bias.shape == (b, h, m, n), "xformers does not broadcast a tensor bias"
            assert attn_bias.stride(-1) == 1
            assert all(s % 8 == 0 for s in attn_bias.stride()[:-1]), attn_bias.stride()
        self.calls.append((tuple(query.shape), None if attn_bias is None else tuple(attn_bias.shape)))
        scale = d ** -0.5 if scale is None else scale
        s = torch.einsum("bmhd,bnhd->bhmn", query, key) * scale       # computed in BMHK terms
        if attn_bias is not None:
            s = s + attn_bias
        return torch.einsum("bhmn,bnhd->bmhd", s.softmax(-1), value)


@pytest.mark.parametrize("bias_kind", list(BIASES))
@pytest.mark.parametrize("m,n", [(17, 13), (16, 16)])
def test_xformers_path_layout_and_bias_equal_math(bias_kind, m, n):
    q, k, v = qkv(b=2, h=3, m=m, n=n)
    bias = BIASES[bias_kind](2, 3, m, n)
    fake = FakeMemoryEfficientAttention()
    out = attn_mod._xformers_attention(q, k, v, bias, None, 0.0, fake)
    assert fake.calls == [((2, m, 3, 8), None if bias is None else (2, 3, m, n))]
    assert out.shape == (2, 3, m, 8)
    torch.testing.assert_close(out, math_attention(q, k, v, bias), atol=1e-5, rtol=1e-5)


def test_xformers_path_passes_bias_gradients():
    q, k, v = qkv(m=9, n=9)
    bias = torch.randn(1, 3, 9, 9, requires_grad=True)
    attn_mod._xformers_attention(q, k, v, bias, None, 0.0, FakeMemoryEfficientAttention()).sum().backward()
    expected = torch.autograd.grad(math_attention(q, k, v, bias).sum(), bias)[0]
    torch.testing.assert_close(bias.grad, expected, atol=1e-6, rtol=1e-5)


def test_dispatch_uses_xformers_for_cuda_tensors_only(monkeypatch):
    fake = FakeMemoryEfficientAttention()
    monkeypatch.setattr(attn_mod, "_load_xformers", lambda: fake)
    cpu = torch.zeros(1, 1, 2, 4)
    cuda_like = types.SimpleNamespace(is_cuda=True)
    assert attn_mod._pick_backend("auto", cpu) == "sdpa"
    assert attn_mod._pick_backend("auto", cuda_like) == "xformers"
    assert attn_mod._pick_backend("sdpa", cuda_like) == "sdpa"
    with attention_backend("math"):
        assert attn_mod._pick_backend("xformers", cuda_like) == "math"


def test_requested_xformers_on_cpu_falls_back_with_a_warning():
    q, k, v = qkv()
    attn_mod._warn_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="using 'sdpa'"):
        out = attention(q, k, v, backend="xformers")
    torch.testing.assert_close(out, attention(q, k, v, backend="sdpa"))


def test_missing_or_broken_xformers_never_breaks_cpu(monkeypatch):
    attn_mod._load_xformers.cache_clear()
    monkeypatch.setitem(sys.modules, "xformers", None)        # import raises ImportError
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    try:
        assert attn_mod.xformers_available() is False
        q, k, v = qkv()
        assert attention(q, k, v).shape == q.shape
    finally:
        attn_mod._load_xformers.cache_clear()


def test_xformers_with_unloadable_kernels_counts_as_unavailable(monkeypatch):
    pkg = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = FakeMemoryEfficientAttention()
    pkg.ops = ops

    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    attn_mod._load_xformers.cache_clear()
    real_import = __import__

    def warning_import(name, *a, **kw):  # warns as an xformers wheel built for another torch does
        if name.startswith("xformers"):
            warnings.warn("WARNING[XFORMERS]: xFormers can't load C++/CUDA extensions.", UserWarning)
        return real_import(name, *a, **kw)

    monkeypatch.setattr("builtins.__import__", warning_import)
    try:
        with pytest.warns(RuntimeWarning, match="compiled kernels"):
            assert attn_mod._load_xformers() is None
    finally:
        monkeypatch.undo()
        attn_mod._load_xformers.cache_clear()


def test_backend_override_and_bad_names():
    with pytest.raises(ValueError, match="valid: auto, xformers, sdpa, math"):
        with attention_backend("flash"):
            pass
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="flash")


def test_model_backends_agree_and_can_be_switched():
    model = hfactory.build_encoder({"img_size": 32, "num_classes": 5, "attn_backend": "math",
                                    "stages": [{"embedding": 32, "patch_size": 4},
                                               {"embedding": 64, "token_mixer": {"kind": "attention", "rotary": True}}]})
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert model.stages[0].blocks[0].token_mixer.backend == "math"
    ref = model(x)
    model.set_attn_backend("sdpa")
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    with attention_backend("math"):
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError):
        model.set_attn_backend("nope")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_xformers_matches_math_on_cuda_fp16():
    if not attn_mod.xformers_available():
        pytest.skip("xformers with working kernels is not installed")
    q, k, v = (t.cuda().half() for t in qkv(b=2, h=4, m=129, n=77, d=64))
    bias = torch.randn(1, 4, 129, 77, device="cuda", dtype=torch.half)
    out = attention(q, k, v, bias, backend="xformers")
    ref = math_attention(q.float(), k.float(), v.float(), bias.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
