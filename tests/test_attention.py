"""The one attention entry point: backends agree, the xformers path's layout and bias handling
are right (proved on CPU by substituting the op with a BMHK reference), dispatch never breaks CPU."""

import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

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
    monkeypatch.setattr(attn_mod, "xformers_unsupported_reason", lambda *a, **kw: None)  # tested below
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


# ------------------------------------------------------------------ which calls xformers can run (CPU-testable)

def meta_qkv(b=2, h=3, m=16, n=16, d=64, dv=None, dtype=torch.float16):
    """Shapes only (``meta`` tensors: nothing allocated), in SDPA layout."""
    make = lambda *s: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    return make(b, h, m, d), make(b, h, n, d), make(b, h, n, dv or d)


def why(q, k, v, bias=None, capability=(8, 0), **kw):
    """The predicate judging a CUDA call of these shapes, without a GPU and without xformers."""
    return attn_mod.xformers_unsupported_reason(q, k, v, bias, device_type="cuda", capability=capability,
                                                ask_xformers=False, **kw)


def test_predicate_accepts_what_xformers_runs():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert why(*meta_qkv(dtype=dtype)) is None
    assert why(*meta_qkv(d=32, dv=40)) is None                         # cutlass: different value dim
    assert why(*meta_qkv(b=attn_mod.XFORMERS_GRID_LIMIT, m=8, n=8)) is None
    assert why(*meta_qkv(d=12, dtype=torch.float32)) is None            # fp32 aligns to 4 on sm80+
    assert why(*meta_qkv(d=6, dtype=torch.float32), capability=(7, 0)) is None   # no tensor cores for fp32
    q, k, v = meta_qkv()
    assert why(q, k, v, torch.empty(1, 3, 16, 16, device="meta")) is None
    assert why(q, k, v, torch.empty(1, 3, 16, 16, device="meta", requires_grad=True), needs_grad=True,
               capability=(9, 0)) is None                               # cutlass up to sm90 (H100/H200)


def test_predicate_refuses_cpu_tensors_by_default():
    q, k, v = qkv()
    assert "device=cpu" in attn_mod.xformers_unsupported_reason(q, k, v)


@pytest.mark.parametrize("case,expected", [
    (lambda: meta_qkv(dtype=torch.float64), "dtype=torch.float64"),
    (lambda: (meta_qkv()[0], *meta_qkv(dtype=torch.float32)[1:]), "dtypes differ"),
    (lambda: meta_qkv(d=60), "head dim 60 is not a multiple of 8"),            # fp16: 128-bit alignment
    (lambda: meta_qkv(d=64, dv=20), "value head dim 20 is not a multiple of 8"),
    (lambda: meta_qkv(d=6, dtype=torch.float32), "head dim 6 is not a multiple of 4"),
    (lambda: meta_qkv(b=attn_mod.XFORMERS_GRID_LIMIT + 1, m=8, n=8), "batch 65536 > 65535"),
    (lambda: meta_qkv(b=1, h=70_000, m=8, n=8), "70000 heads > 65535"),
    (lambda: tuple(t.transpose(-1, -2) for t in meta_qkv(m=64, n=64)), "last dim is not contiguous"),
    (lambda: meta_qkv(d=200_000, dtype=torch.float32), "head dim 200000 > 65536"),
])
def test_predicate_refusal_reasons(case, expected):
    assert expected in why(*case())


def test_predicate_bf16_needs_ampere():
    assert "bfloat16 needs compute capability >= 8.0" in why(*meta_qkv(dtype=torch.bfloat16), capability=(7, 5))


def test_predicate_heads_stride_must_be_aligned():
    # BMHK's stride(-2) is the heads stride: from a (B, M, H*D) projection it is D, fine
    q = torch.empty(2, 16, 3 * 64, device="meta", dtype=torch.float16).reshape(2, 16, 3, 64).transpose(1, 2)
    assert why(q, q, q) is None
    odd = torch.empty(2, 16, 3, 68, device="meta", dtype=torch.float16)[..., :64].transpose(1, 2)
    assert "query's heads stride 68 is not a multiple of 8" in why(odd, odd, odd)
    assert why(*(t.float() for t in (odd, odd, odd))) is None           # fp32: 4 divides 68


def test_predicate_bias_needs_cutlass():
    q, k, v = meta_qkv()
    frozen = torch.empty(1, 3, 16, 16, device="meta")
    learned = torch.empty(1, 3, 16, 16, device="meta", requires_grad=True)
    assert "a tensor bias needs xformers' cutlass kernel" in why(q, k, v, frozen, capability=(10, 0))
    assert "a bias that requires grad needs xformers' cutlass" in why(q, k, v, learned, needs_grad=True,
                                                                       capability=(10, 0))
    assert why(q, k, v, None, capability=(10, 0)) is None   # unbiased calls have flash kernels there


def test_predicate_reads_no_values():
    # a Hiera-at-1024 sized call: judged from metadata (meta tensors hold no data)
    q, k, v = meta_qkv(b=4 * 4096 * 16, h=1, m=16, n=16, d=96)
    assert "batch 262144 > 65535" in why(q, k, v)


def install_fake_xformers(monkeypatch, dispatch_fw, dispatch_bw=None):
    """``xformers.ops.fmha`` with ``Inputs`` and a ``dispatch`` module whose functions are given."""
    fmha = types.ModuleType("xformers.ops.fmha")
    dispatch = types.ModuleType("xformers.ops.fmha.dispatch")
    fmha.Inputs = lambda **kw: types.SimpleNamespace(**kw)
    fmha.dispatch = dispatch
    dispatch._dispatch_fw = dispatch_fw
    dispatch._dispatch_bw = dispatch_bw or (lambda inp, varlen: None)
    ops = types.ModuleType("xformers.ops")
    ops.fmha = fmha
    pkg = types.ModuleType("xformers")
    pkg.ops = ops
    for name, mod in (("xformers", pkg), ("xformers.ops", ops), ("xformers.ops.fmha", fmha),
                      ("xformers.ops.fmha.dispatch", dispatch)):
        monkeypatch.setitem(sys.modules, name, mod)
    attn_mod._xformers_verdicts.clear()


def test_xformers_own_check_is_asked_with_bmhk_inputs_and_an_unallocated_aligned_bias(monkeypatch):
    seen = []

    def dispatch_fw(inp, needs_gradient):
        seen.append((tuple(inp.query.shape), inp.attn_bias, needs_gradient))
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n"
                                  "     query       : shape=(2, 16, 3, 64) (torch.float16)\n"
                                  "`cutlassF-pt` is not supported because:\n    operator wasn't built\n")

    install_fake_xformers(monkeypatch, dispatch_fw)
    q, k, v = meta_qkv(n=13)
    bias = torch.empty(1, 3, 16, 13, device="meta")
    reason = attn_mod._ask_xformers(q, k, v, bias, 0.0, None, False)
    assert reason.startswith("xformers refuses it:") and "cutlassF-pt" in reason and "wasn't built" in reason
    (shape, probe, needs), = seen
    assert shape == (2, 16, 3, 64) and not needs                              # BMHK
    assert probe.device.type == "meta" and probe.shape == (2, 3, 16, 13)     # full shape, nothing allocated
    assert attn_mod._bias_strides_ok(probe)                                   # the layout _xformers_bias makes
    assert attn_mod._ask_xformers(q, k, v, bias, 0.0, None, False) == reason and len(seen) == 1  # memoised
    attn_mod._xformers_verdicts.clear()


def test_xformers_own_check_backward_and_api_drift(monkeypatch):
    calls = []
    install_fake_xformers(monkeypatch, lambda inp, g: calls.append("fw"),
                          lambda inp, varlen: calls.append("bw"))
    q, k, v = meta_qkv()
    assert attn_mod._ask_xformers(q, k, v, None, 0.0, None, True) is None and calls == ["fw", "bw"]

    def moved(inp, g):
        raise AttributeError("private API moved")

    install_fake_xformers(monkeypatch, moved)
    assert attn_mod._ask_xformers(q, k, v, None, 0.0, None, False) is attn_mod._UNKNOWN  # static rules stand
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    attn_mod._xformers_verdicts.clear()
    assert attn_mod._ask_xformers(q, k, v, None, 0.0, None, False) is attn_mod._UNKNOWN
    attn_mod._xformers_verdicts.clear()


# ------------------------------------------------------------------ the auto policy and bias layout

class LooksCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA, to drive the dispatch without a GPU."""

    @property
    def is_cuda(self):
        return True


def looks_cuda(t):
    return torch.Tensor._make_subclass(LooksCuda, t, t.requires_grad)


@pytest.fixture
def spies(monkeypatch):
    """Fake xformers (always accepted) and a spy on SDPA; yields (xformers fake, sdpa calls)."""
    fake = FakeMemoryEfficientAttention()
    monkeypatch.setattr(attn_mod, "_load_xformers", lambda: fake)
    monkeypatch.setattr(attn_mod, "xformers_unsupported_reason", lambda *a, **kw: None)
    sdpa_calls = []
    real_sdpa = attn_mod.F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, **kw):
        sdpa_calls.append(attn_mask)
        return real_sdpa(q.as_subclass(torch.Tensor), k.as_subclass(torch.Tensor), v.as_subclass(torch.Tensor),
                         attn_mask=None if attn_mask is None else attn_mask.as_subclass(torch.Tensor), **kw)

    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention", sdpa)
    return fake, sdpa_calls


def test_auto_sends_biased_calls_to_sdpa_without_copying_the_bias(spies):
    fake, sdpa_calls = spies
    assert attn_mod.BIASED_CALLS_IN_AUTO == "sdpa"
    q, k, v = (looks_cuda(t) for t in qkv(b=4, h=3, m=16, n=16))
    bias = looks_cuda(torch.randn(1, 3, 16, 16))
    out = attention(q, k, v, bias)
    assert fake.calls == [] and len(sdpa_calls) == 1
    assert sdpa_calls[0] is bias                                       # passed as is: no (B, H, M, N) copy
    torch.testing.assert_close(out.as_subclass(torch.Tensor),
                               math_attention(*(t.as_subclass(torch.Tensor) for t in (q, k, v, bias))),
                               atol=1e-5, rtol=1e-5)
    attention(q, k, v)                                                 # unbiased: xformers
    assert len(fake.calls) == 1 and len(sdpa_calls) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # explicit xformers + bias: no fallback
        attention(q, k, v, bias, backend="xformers")
    assert len(fake.calls) == 2 and fake.calls[-1][1] == (4, 3, 16, 16)


def test_policy_can_send_biased_calls_to_xformers(spies, monkeypatch):
    fake, sdpa_calls = spies
    monkeypatch.setattr(attn_mod, "BIASED_CALLS_IN_AUTO", "xformers")
    q, k, v = (looks_cuda(t) for t in qkv(b=4, h=3, m=16, n=16))
    attention(q, k, v, looks_cuda(torch.randn(1, 3, 16, 16)))
    assert len(fake.calls) == 1 and sdpa_calls == []


def test_auto_uses_sdpa_when_the_predicate_refuses(monkeypatch):
    monkeypatch.setattr(attn_mod, "_load_xformers", lambda: FakeMemoryEfficientAttention())
    monkeypatch.setattr(attn_mod, "xformers_unsupported_reason", lambda *a, **kw: "batch 70000 > 65535")
    cuda_like = types.SimpleNamespace(is_cuda=True)
    assert attn_mod._pick_backend("auto", cuda_like) == "sdpa"
    attn_mod._warn_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match=r"cannot run this call \(batch 70000 > 65535\); using 'sdpa'"):
        assert attn_mod._pick_backend("xformers", cuda_like) == "sdpa"


def test_xformers_bias_is_not_materialised_per_batch():
    b, h, m = 64, 3, 16
    per_head = torch.randn(1, h, m, 16)                                 # N multiple of 8: used as is
    out = attn_mod._xformers_bias(per_head, (b, h, m, 16), torch.float32)
    assert out.shape == (b, h, m, 16) and out.stride(0) == 0 and out.data_ptr() == per_head.data_ptr()
    assert attn_mod._bias_strides_ok(out)

    odd = torch.randn(1, h, m, 13)                                      # N = 13: padded copy at its own size
    out = attn_mod._xformers_bias(odd, (b, h, m, 13), torch.float16)
    assert out.shape == (b, h, m, 13) and out.dtype == torch.float16 and attn_mod._bias_strides_ok(out)
    assert out.untyped_storage().nbytes() == h * m * 16 * 2             # not b * h * m * 16
    torch.testing.assert_close(out.float(), odd.half().float().expand(b, h, m, 13))

    mask = torch.randn(b, 1, m, 13)                                     # shift-mask-like: broadcast over heads
    out = attn_mod._xformers_bias(mask, (b, h, m, 13), torch.float32)
    assert out.stride(1) == 0 and out.untyped_storage().nbytes() == b * m * 16 * 4
    torch.testing.assert_close(out, mask.expand(b, h, m, 13))

    along_n = torch.randn(m, 1)                                         # broadcast along N: N materialised
    out = attn_mod._xformers_bias(along_n, (b, h, m, 13), torch.float32)
    assert out.stride(-1) == 1 and attn_mod._bias_strides_ok(out)
    torch.testing.assert_close(out, along_n.expand(b, h, m, 13))


def test_xformers_bias_that_requires_grad_is_full_and_differentiable():
    bias = torch.randn(1, 3, 9, 9, requires_grad=True)
    out = attn_mod._xformers_bias(bias, (2, 3, 9, 9), torch.float32)
    assert out.shape == (2, 3, 9, 9) and out.stride(0) != 0 and attn_mod._bias_strides_ok(out)
    out.sum().backward()
    torch.testing.assert_close(bias.grad, torch.full_like(bias, 2.0))


# ------------------------------------------------------------------ benchmarks/gpu_check.py

GPU_CHECK = __import__("pathlib").Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def run_gpu_check(*args, env_extra=None):
    import os
    import subprocess
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(GPU_CHECK), *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=GPU_CHECK.parent.parent)


def test_gpu_check_help():
    r = run_gpu_check("--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--out", "--quick", "--presets"):
        assert flag in r.stdout


def test_gpu_check_without_cuda_skips_with_exit_0(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = tmp_path / "gpu.md"
    r = run_gpu_check("--quick", "--out", str(out), env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr
    assert "no CUDA device" in r.stdout + r.stderr
    assert not out.exists()


# ------------------------------------------------------------------ on a GPU

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_handles_a_batch_beyond_the_grid_and_biases():
    q, k, v = (torch.randn(attn_mod.XFORMERS_GRID_LIMIT + 1, 1, 8, 64, device="cuda", dtype=torch.half)
               for _ in range(3))
    assert "batch 65536" in attn_mod.xformers_unsupported_reason(q, k, v)
    torch.testing.assert_close(attention(q, k, v).float(), math_attention(q.float(), k.float(), v.float()),
                               atol=2e-3, rtol=2e-3)
    q, k, v = (t.cuda().half() for t in qkv(b=4, h=4, m=49, n=49, d=32))
    bias = torch.randn(1, 4, 49, 49, device="cuda", dtype=torch.half)
    torch.testing.assert_close(attention(q, k, v, bias).float(),
                               math_attention(q.float(), k.float(), v.float(), bias.float()), atol=2e-3, rtol=2e-3)


def test_cpu_bias_that_needs_a_gradient_runs_plain_math():
    """On the CPU, ``auto`` sends a biased call whose bias requires grad (a learned relative-position
    bias in training) to ``math`` (SDPA has no fused CPU kernel for it and its fallback adds a
    safe-softmax pass); eval, no_grad and fixed biases keep SDPA. Values and gradients equal SDPA's."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g, requires_grad=True) for _ in range(3))
    learned = torch.randn(1, 3, 9, 9, generator=g, requires_grad=True)
    assert attn_mod._pick_backend("auto", q, k, v, learned) == "math"
    assert attn_mod._pick_backend("auto", q, k, v, learned.detach()) == "sdpa"
    with torch.no_grad():
        assert attn_mod._pick_backend("auto", q, k, v, learned) == "sdpa"
    out = attn_mod.attention(q, k, v, learned)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=learned)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, learned))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v, learned))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
