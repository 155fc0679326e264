"""What xformers 0.0.28's hierarchical factory builds, recorded by running it (for test_compat_xformers.py).

How these facts were obtained (nothing here is computed by hfactory):

1. ``pip download xformers==0.0.28 --no-deps`` (the cp311 manylinux wheel from PyPI) and unzip it.
2. Put the unzipped tree on ``PYTHONPATH`` and import ``xformers.factory`` and
   ``xformers.helpers.hierarchical_configs`` with CPU-only PyTorch (2.14). xformers warns that its
   C++/CUDA extensions cannot be loaded; the factory (``factory/model_factory.py``,
   ``factory/block_factory.py``, ``factory/block_configs.py``, ``helpers/hierarchical_configs.py``,
   ``components/{multi_head_dispatch,residual,patch_embedding}.py``,
   ``components/positional_embedding/{param,rotary}.py``, ``components/attention/{scaled_dot_product,
   pooling}.py``, ``components/feedforward/mlp.py``) is pure Python and ran unmodified, no stubs.
3. For each entry of :data:`VARIANTS`: ``get_hierarchical_configuration(layers, **kwargs)`` ->
   ``xFormer.from_config(xFormerConfig(configs))``; record ``sum(p.numel() for p in
   model.parameters())``, ``[(key, shape) for key, shape in model.state_dict().items()]`` (in
   xformers' order) and which keys are buffers. For the entries with ``"probe"``: load
   :func:`filled_state_dict` (every parameter set from a seeded generator; buffers set by xformers'
   formula), run ``model.eval()`` on :func:`probe_image` under ``torch.no_grad()`` and record the
   output's shape and the samples :func:`output_samples` takes. (``VARIANTS["metaformer"]`` also
   sets ``config.weight_init = "moco"`` as ``examples/cifar_MetaFormer.py`` did.)

The generating script is kept below (``GENERATOR``) for re-running; it is not executed by the tests.
"""

import math
import random

import torch

#: Per variant: BasicLayerConfig keyword arguments per stage, get_hierarchical_configuration keyword
#: arguments, the image side in pixels (square) and, for "probe" variants, the forward pass recorded.
VARIANTS = {
    # The seed-004 example (xformers' documentation page "Hierarchical Transformers": "a truncated
    # version of a small Metaformer") at image_size = 224, and at 32 for the forward pass.
    "seed004_224": {
        "image_size": 224,
        "layers": [
            dict(embedding=64, attention_mechanism="scaled_dot_product", patch_size=7, stride=4, padding=2,
                 seq_len=224 * 224 // 16, feedforward="MLP"),
            dict(embedding=128, attention_mechanism="scaled_dot_product", patch_size=3, stride=2, padding=1,
                 seq_len=224 * 224 // 64, feedforward="MLP"),
            dict(embedding=320, attention_mechanism="scaled_dot_product", patch_size=3, stride=2, padding=1,
                 seq_len=224 * 224 // 256, feedforward="MLP"),
        ],
        "kwargs": dict(residual_norm_style="pre", use_rotary_embeddings=False, mlp_multiplier=4, dim_head=32),
    },
    "seed004_32": {
        "image_size": 32,
        "probe": True,
        "layers": [
            dict(embedding=64, attention_mechanism="scaled_dot_product", patch_size=7, stride=4, padding=2,
                 seq_len=32 * 32 // 16, feedforward="MLP"),
            dict(embedding=128, attention_mechanism="scaled_dot_product", patch_size=3, stride=2, padding=1,
                 seq_len=32 * 32 // 64, feedforward="MLP"),
            dict(embedding=320, attention_mechanism="scaled_dot_product", patch_size=3, stride=2, padding=1,
                 seq_len=32 * 32 // 256, feedforward="MLP"),
        ],
        "kwargs": dict(residual_norm_style="pre", use_rotary_embeddings=False, mlp_multiplier=4, dim_head=32),
    },
    # Post-norm, rotary embeddings, a repeated layer, MLP multiplier 2.
    "post_rotary_repeat": {
        "image_size": 32,
        "probe": True,
        "layers": [
            dict(embedding=32, attention_mechanism="scaled_dot_product", patch_size=7, stride=4, padding=2,
                 seq_len=64, feedforward="MLP", repeat_layer=2),
            dict(embedding=64, attention_mechanism="scaled_dot_product", patch_size=3, stride=2, padding=1,
                 seq_len=16, feedforward="MLP"),
        ],
        "kwargs": dict(residual_norm_style="post", use_rotary_embeddings=True, mlp_multiplier=2, dim_head=16),
    },
    # Pre-norm; a PoolFormer stage without norms ("skip"), repeated, then an attention stage; rotary.
    "pre_pooling_skip_then_attention": {
        "image_size": 32,
        "probe": True,
        "layers": [
            dict(embedding=32, attention_mechanism="pooling", patch_size=7, stride=4, padding=2,
                 seq_len=64, feedforward="MLP", normalization="skip", repeat_layer=2),
            dict(embedding=64, attention_mechanism="scaled_dot_product", patch_size=3, stride=2, padding=1,
                 seq_len=16, feedforward="MLP"),
        ],
        "kwargs": dict(residual_norm_style="pre", use_rotary_embeddings=True, mlp_multiplier=4, dim_head=16),
    },
    # examples/cifar_MetaFormer.py's trunk: 4 stages, rotary, 32x32 (weight_init "moco").
    "metaformer": {
        "image_size": 32,
        "weight_init": "moco",
        "layers": [
            dict(embedding=e, attention_mechanism="scaled_dot_product", patch_size=3, stride=2, padding=1,
                 seq_len=32 * 32 // 4 ** (i + 1), feedforward="MLP")
            for i, e in enumerate((64, 128, 320, 512))
        ],
        "kwargs": dict(residual_norm_style="pre", use_rotary_embeddings=True, mlp_multiplier=4, dim_head=32),
    },
}


def filled_state_dict(keys, buffers):
    """A state dict in xformers' key format: every parameter ``keys[i] = (name, shape)`` filled with
    uniform numbers from Python's ``random.Random(i)`` (Mersenne Twister, reproducible across
    platforms and versions): norm weights ``1 + U(-0.3, 0.3)``, other vectors ``U(-0.2, 0.2)``, the
    position embedding ``U(-0.5, 0.5)``, matrices ``std 1.5 / sqrt(fan_in)`` (so that attention is
    far from uniform and swapped q/k or misplaced weights show in the output); every buffer
    (rotary ``inv_freq``) with xformers' formula ``1 / 10000 ** (arange(0, d, 2) / d)``."""
    out = {}
    for i, (name, shape) in enumerate(keys):
        if name in buffers:
            d = 2 * shape[0]
            out[name] = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
            continue
        rng = random.Random(i)
        n = math.prod(shape)
        values = torch.tensor([rng.random() for _ in range(n)], dtype=torch.float64) * 2.0 - 1.0  # U(-1, 1)
        if len(shape) == 1:
            values = 1.0 + 0.3 * values if name.endswith("norm.weight") else 0.2 * values
        elif len(shape) == 3:  # position embedding (1, N, C)
            values = 0.5 * values
        else:  # Linear (out, in) or Conv2d (out, in, k, k): uniform with std 1.5 / sqrt(fan_in)
            values = values * 1.5 * math.sqrt(3.0 / math.prod(shape[1:]))
        out[name] = values.reshape(shape).float()
    return out


def probe_image(size):
    """The ``(1, 3, size, size)`` input of the recorded forward passes."""
    n = 3 * size * size
    return torch.cos(torch.arange(n, dtype=torch.float64) * 0.0173).reshape(1, 3, size, size).float()


def output_samples(y):
    """What is recorded of an output ``(1, N, C)``: its first 4 tokens' first 6 channels, each
    token's L2 norm, and the sum and mean absolute value of all of it."""
    y = y.double()
    return {
        "head": [round(v, 6) for v in y[0, :4, :6].flatten().tolist()],
        "token_norms": [round(v, 5) for v in y[0].norm(dim=-1).tolist()],
        "sum": round(y.sum().item(), 5),
        "abs_mean": round(y.abs().mean().item(), 6),
    }


GENERATOR = r'''
# PYTHONPATH=<unzipped xformers-0.0.28 wheel>:tests python gen.py > facts.txt
import contextlib, io, textwrap, warnings
warnings.simplefilter("ignore")
import torch
from xformers.factory import xFormer, xFormerConfig
from xformers.helpers.hierarchical_configs import BasicLayerConfig, get_hierarchical_configuration
from xformers028_facts import VARIANTS, filled_state_dict, output_samples, probe_image

facts = {}
for name, v in VARIANTS.items():
    with contextlib.redirect_stdout(io.StringIO()):  # the helper print()s every stage config
        configs = get_hierarchical_configuration([BasicLayerConfig(**l) for l in v["layers"]], **v["kwargs"])
    config = xFormerConfig(configs)
    if "weight_init" in v:
        config.weight_init = v["weight_init"]
    model = xFormer.from_config(config)
    sd = model.state_dict()
    buffers = sorted(k for k, _ in model.named_buffers())
    f = {"params": sum(p.numel() for p in model.parameters()),
         "keys": [(k, tuple(t.shape)) for k, t in sd.items()], "buffers": buffers}
    if v.get("probe"):
        keys = f["keys"]
        model.load_state_dict(filled_state_dict(keys, buffers), strict=True)
        for b in buffers:  # the formula reproduces xformers' own buffers exactly
            assert torch.equal(dict(model.named_buffers())[b], filled_state_dict(keys, buffers)[b])
        with torch.no_grad():
            y = model.eval()(probe_image(v["image_size"]))
        f["out_shape"] = tuple(y.shape)
        f.update(output_samples(y))
    facts[name] = f
print("FACTS = {")
for name, f in facts.items():
    print(f"    {name!r}: {{")
    for field, value in f.items():
        if field == "keys":
            print("        'keys': [")
            for key, shape in value:
                print(f"            ({key!r}, {shape!r}),")
            print("        ],")
        else:
            text = textwrap.fill(repr(value), width=110, initial_indent=" " * 8 + f"{field!r}: ",
                                 subsequent_indent=" " * 12)
            print(text + ",")
    print("    },")
print("}")
'''



# ----- Output of GENERATOR, run against the xformers 0.0.28 wheel (CPU, PyTorch 2.14.1, Python 3.11) -----

FACTS = {
    'seed004_224': {
        'params': 2134848,
        'keys': [
            ('encoders.0.pose_encoding.pos_emb', (1, 3136, 64)),
            ('encoders.0.wrap_att.layer.norm.weight', (64,)),
            ('encoders.0.wrap_att.layer.norm.bias', (64,)),
            ('encoders.0.wrap_att.layer.sublayer.in_proj_container.q_proj.weight', (64, 64)),
            ('encoders.0.wrap_att.layer.sublayer.in_proj_container.q_proj.bias', (64,)),
            ('encoders.0.wrap_att.layer.sublayer.in_proj_container.k_proj.weight', (64, 64)),
            ('encoders.0.wrap_att.layer.sublayer.in_proj_container.k_proj.bias', (64,)),
            ('encoders.0.wrap_att.layer.sublayer.in_proj_container.v_proj.weight', (64, 64)),
            ('encoders.0.wrap_att.layer.sublayer.in_proj_container.v_proj.bias', (64,)),
            ('encoders.0.wrap_att.layer.sublayer.proj.weight', (64, 64)),
            ('encoders.0.wrap_att.layer.sublayer.proj.bias', (64,)),
            ('encoders.0.wrap_ff.layer.norm.weight', (64,)),
            ('encoders.0.wrap_ff.layer.norm.bias', (64,)),
            ('encoders.0.wrap_ff.layer.sublayer.mlp.0.weight', (256, 64)),
            ('encoders.0.wrap_ff.layer.sublayer.mlp.0.bias', (256,)),
            ('encoders.0.wrap_ff.layer.sublayer.mlp.3.weight', (64, 256)),
            ('encoders.0.wrap_ff.layer.sublayer.mlp.3.bias', (64,)),
            ('encoders.0.patch_emb.1.weight', (64, 3, 7, 7)),
            ('encoders.0.patch_emb.1.bias', (64,)),
            ('encoders.1.wrap_att.layer.norm.weight', (128,)),
            ('encoders.1.wrap_att.layer.norm.bias', (128,)),
            ('encoders.1.wrap_att.layer.sublayer.in_proj_container.q_proj.weight', (128, 128)),
            ('encoders.1.wrap_att.layer.sublayer.in_proj_container.q_proj.bias', (128,)),
            ('encoders.1.wrap_att.layer.sublayer.in_proj_container.k_proj.weight', (128, 128)),
            ('encoders.1.wrap_att.layer.sublayer.in_proj_container.k_proj.bias', (128,)),
            ('encoders.1.wrap_att.layer.sublayer.in_proj_container.v_proj.weight', (128, 128)),
            ('encoders.1.wrap_att.layer.sublayer.in_proj_container.v_proj.bias', (128,)),
            ('encoders.1.wrap_att.layer.sublayer.proj.weight', (128, 128)),
            ('encoders.1.wrap_att.layer.sublayer.proj.bias', (128,)),
            ('encoders.1.wrap_ff.layer.norm.weight', (128,)),
            ('encoders.1.wrap_ff.layer.norm.bias', (128,)),
            ('encoders.1.wrap_ff.layer.sublayer.mlp.0.weight', (512, 128)),
            ('encoders.1.wrap_ff.layer.sublayer.mlp.0.bias', (512,)),
            ('encoders.1.wrap_ff.layer.sublayer.mlp.3.weight', (128, 512)),
            ('encoders.1.wrap_ff.layer.sublayer.mlp.3.bias', (128,)),
            ('encoders.1.patch_emb.1.weight', (128, 64, 3, 3)),
            ('encoders.1.patch_emb.1.bias', (128,)),
            ('encoders.2.wrap_att.layer.norm.weight', (320,)),
            ('encoders.2.wrap_att.layer.norm.bias', (320,)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.q_proj.weight', (320, 320)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.q_proj.bias', (320,)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.k_proj.weight', (320, 320)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.k_proj.bias', (320,)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.v_proj.weight', (320, 320)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.v_proj.bias', (320,)),
            ('encoders.2.wrap_att.layer.sublayer.proj.weight', (320, 320)),
            ('encoders.2.wrap_att.layer.sublayer.proj.bias', (320,)),
            ('encoders.2.wrap_ff.norm.weight', (320,)),
            ('encoders.2.wrap_ff.norm.bias', (320,)),
            ('encoders.2.wrap_ff.sublayer.layer.norm.weight', (320,)),
            ('encoders.2.wrap_ff.sublayer.layer.norm.bias', (320,)),
            ('encoders.2.wrap_ff.sublayer.layer.sublayer.mlp.0.weight', (1280, 320)),
            ('encoders.2.wrap_ff.sublayer.layer.sublayer.mlp.0.bias', (1280,)),
            ('encoders.2.wrap_ff.sublayer.layer.sublayer.mlp.3.weight', (320, 1280)),
            ('encoders.2.wrap_ff.sublayer.layer.sublayer.mlp.3.bias', (320,)),
            ('encoders.2.patch_emb.1.weight', (320, 128, 3, 3)),
            ('encoders.2.patch_emb.1.bias', (320,)),
        ],
        'buffers': [],
    },
    'seed004_32': {
        'params': 1938240,
        'keys': [
            ('encoders.0.pose_encoding.pos_emb', (1, 64, 64)),
            ('encoders.0.wrap_att.layer.norm.weight', (64,)),
            ('encoders.0.wrap_att.layer.norm.bias', (64,)),
            ('encoders.0.wrap_att.layer.sublayer.in_proj_container.q_proj.weight', (64, 64)),
            ('encoders.0.wrap_att.layer.sublayer.in_proj_container.q_proj.bias', (64,)),
            ('encoders.0.wrap_att.layer.sublayer.in_proj_container.k_proj.weight', (64, 64)),
            ('encoders.0.wrap_att.layer.sublayer.in_proj_container.k_proj.bias', (64,)),
            ('encoders.0.wrap_att.layer.sublayer.in_proj_container.v_proj.weight', (64, 64)),
            ('encoders.0.wrap_att.layer.sublayer.in_proj_container.v_proj.bias', (64,)),
            ('encoders.0.wrap_att.layer.sublayer.proj.weight', (64, 64)),
            ('encoders.0.wrap_att.layer.sublayer.proj.bias', (64,)),
            ('encoders.0.wrap_ff.layer.norm.weight', (64,)),
            ('encoders.0.wrap_ff.layer.norm.bias', (64,)),
            ('encoders.0.wrap_ff.layer.sublayer.mlp.0.weight', (256, 64)),
            ('encoders.0.wrap_ff.layer.sublayer.mlp.0.bias', (256,)),
            ('encoders.0.wrap_ff.layer.sublayer.mlp.3.weight', (64, 256)),
            ('encoders.0.wrap_ff.layer.sublayer.mlp.3.bias', (64,)),
            ('encoders.0.patch_emb.1.weight', (64, 3, 7, 7)),
            ('encoders.0.patch_emb.1.bias', (64,)),
            ('encoders.1.wrap_att.layer.norm.weight', (128,)),
            ('encoders.1.wrap_att.layer.norm.bias', (128,)),
            ('encoders.1.wrap_att.layer.sublayer.in_proj_container.q_proj.weight', (128, 128)),
            ('encoders.1.wrap_att.layer.sublayer.in_proj_container.q_proj.bias', (128,)),
            ('encoders.1.wrap_att.layer.sublayer.in_proj_container.k_proj.weight', (128, 128)),
            ('encoders.1.wrap_att.layer.sublayer.in_proj_container.k_proj.bias', (128,)),
            ('encoders.1.wrap_att.layer.sublayer.in_proj_container.v_proj.weight', (128, 128)),
            ('encoders.1.wrap_att.layer.sublayer.in_proj_container.v_proj.bias', (128,)),
            ('encoders.1.wrap_att.layer.sublayer.proj.weight', (128, 128)),
            ('encoders.1.wrap_att.layer.sublayer.proj.bias', (128,)),
            ('encoders.1.wrap_ff.layer.norm.weight', (128,)),
            ('encoders.1.wrap_ff.layer.norm.bias', (128,)),
            ('encoders.1.wrap_ff.layer.sublayer.mlp.0.weight', (512, 128)),
            ('encoders.1.wrap_ff.layer.sublayer.mlp.0.bias', (512,)),
            ('encoders.1.wrap_ff.layer.sublayer.mlp.3.weight', (128, 512)),
            ('encoders.1.wrap_ff.layer.sublayer.mlp.3.bias', (128,)),
            ('encoders.1.patch_emb.1.weight', (128, 64, 3, 3)),
            ('encoders.1.patch_emb.1.bias', (128,)),
            ('encoders.2.wrap_att.layer.norm.weight', (320,)),
            ('encoders.2.wrap_att.layer.norm.bias', (320,)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.q_proj.weight', (320, 320)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.q_proj.bias', (320,)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.k_proj.weight', (320, 320)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.k_proj.bias', (320,)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.v_proj.weight', (320, 320)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.v_proj.bias', (320,)),
            ('encoders.2.wrap_att.layer.sublayer.proj.weight', (320, 320)),
            ('encoders.2.wrap_att.layer.sublayer.proj.bias', (320,)),
            ('encoders.2.wrap_ff.norm.weight', (320,)),
            ('encoders.2.wrap_ff.norm.bias', (320,)),
            ('encoders.2.wrap_ff.sublayer.layer.norm.weight', (320,)),
            ('encoders.2.wrap_ff.sublayer.layer.norm.bias', (320,)),
            ('encoders.2.wrap_ff.sublayer.layer.sublayer.mlp.0.weight', (1280, 320)),
            ('encoders.2.wrap_ff.sublayer.layer.sublayer.mlp.0.bias', (1280,)),
            ('encoders.2.wrap_ff.sublayer.layer.sublayer.mlp.3.weight', (320, 1280)),
            ('encoders.2.wrap_ff.sublayer.layer.sublayer.mlp.3.bias', (320,)),
            ('encoders.2.patch_emb.1.weight', (320, 128, 3, 3)),
            ('encoders.2.patch_emb.1.bias', (320,)),
        ],
        'buffers': [],
        'out_shape': (1, 4, 320),
        'head': [-0.964491, -0.203, -0.441137, -1.577533, 1.091206, -0.532087, -1.801878, -0.40159, -0.162432,
            -0.511912, 1.980954, -1.645634, 0.444245, -0.149661, 0.49086, 0.52355, 0.32394, 0.146939,
            1.587469, -0.498454, -0.027469, 0.084614, -0.608664, 0.340896],
        'token_norms': [18.01429, 18.31528, 18.34537, 18.22347],
        'sum': 3.57022,
        'abs_mean': 0.792607,
    },
    'post_rotary_repeat': {
        'params': 75840,
        'keys': [
            ('encoders.0.pose_encoding.pos_emb', (1, 64, 32)),
            ('encoders.0.wrap_att.norm.weight', (32,)),
            ('encoders.0.wrap_att.norm.bias', (32,)),
            ('encoders.0.wrap_att.sublayer.layer.in_proj_container.q_proj.weight', (32, 32)),
            ('encoders.0.wrap_att.sublayer.layer.in_proj_container.q_proj.bias', (32,)),
            ('encoders.0.wrap_att.sublayer.layer.in_proj_container.k_proj.weight', (32, 32)),
            ('encoders.0.wrap_att.sublayer.layer.in_proj_container.k_proj.bias', (32,)),
            ('encoders.0.wrap_att.sublayer.layer.in_proj_container.v_proj.weight', (32, 32)),
            ('encoders.0.wrap_att.sublayer.layer.in_proj_container.v_proj.bias', (32,)),
            ('encoders.0.wrap_att.sublayer.layer.rotary_embeddings.inv_freq', (8,)),
            ('encoders.0.wrap_att.sublayer.layer.proj.weight', (32, 32)),
            ('encoders.0.wrap_att.sublayer.layer.proj.bias', (32,)),
            ('encoders.0.wrap_ff.norm.weight', (32,)),
            ('encoders.0.wrap_ff.norm.bias', (32,)),
            ('encoders.0.wrap_ff.sublayer.layer.mlp.0.weight', (64, 32)),
            ('encoders.0.wrap_ff.sublayer.layer.mlp.0.bias', (64,)),
            ('encoders.0.wrap_ff.sublayer.layer.mlp.3.weight', (32, 64)),
            ('encoders.0.wrap_ff.sublayer.layer.mlp.3.bias', (32,)),
            ('encoders.0.patch_emb.1.weight', (32, 3, 7, 7)),
            ('encoders.0.patch_emb.1.bias', (32,)),
            ('encoders.1.wrap_att.norm.weight', (32,)),
            ('encoders.1.wrap_att.norm.bias', (32,)),
            ('encoders.1.wrap_att.sublayer.layer.in_proj_container.q_proj.weight', (32, 32)),
            ('encoders.1.wrap_att.sublayer.layer.in_proj_container.q_proj.bias', (32,)),
            ('encoders.1.wrap_att.sublayer.layer.in_proj_container.k_proj.weight', (32, 32)),
            ('encoders.1.wrap_att.sublayer.layer.in_proj_container.k_proj.bias', (32,)),
            ('encoders.1.wrap_att.sublayer.layer.in_proj_container.v_proj.weight', (32, 32)),
            ('encoders.1.wrap_att.sublayer.layer.in_proj_container.v_proj.bias', (32,)),
            ('encoders.1.wrap_att.sublayer.layer.rotary_embeddings.inv_freq', (8,)),
            ('encoders.1.wrap_att.sublayer.layer.proj.weight', (32, 32)),
            ('encoders.1.wrap_att.sublayer.layer.proj.bias', (32,)),
            ('encoders.1.wrap_ff.norm.weight', (32,)),
            ('encoders.1.wrap_ff.norm.bias', (32,)),
            ('encoders.1.wrap_ff.sublayer.layer.mlp.0.weight', (64, 32)),
            ('encoders.1.wrap_ff.sublayer.layer.mlp.0.bias', (64,)),
            ('encoders.1.wrap_ff.sublayer.layer.mlp.3.weight', (32, 64)),
            ('encoders.1.wrap_ff.sublayer.layer.mlp.3.bias', (32,)),
            ('encoders.2.wrap_att.norm.weight', (64,)),
            ('encoders.2.wrap_att.norm.bias', (64,)),
            ('encoders.2.wrap_att.sublayer.layer.in_proj_container.q_proj.weight', (64, 64)),
            ('encoders.2.wrap_att.sublayer.layer.in_proj_container.q_proj.bias', (64,)),
            ('encoders.2.wrap_att.sublayer.layer.in_proj_container.k_proj.weight', (64, 64)),
            ('encoders.2.wrap_att.sublayer.layer.in_proj_container.k_proj.bias', (64,)),
            ('encoders.2.wrap_att.sublayer.layer.in_proj_container.v_proj.weight', (64, 64)),
            ('encoders.2.wrap_att.sublayer.layer.in_proj_container.v_proj.bias', (64,)),
            ('encoders.2.wrap_att.sublayer.layer.rotary_embeddings.inv_freq', (8,)),
            ('encoders.2.wrap_att.sublayer.layer.proj.weight', (64, 64)),
            ('encoders.2.wrap_att.sublayer.layer.proj.bias', (64,)),
            ('encoders.2.wrap_ff.norm.weight', (64,)),
            ('encoders.2.wrap_ff.norm.bias', (64,)),
            ('encoders.2.wrap_ff.sublayer.layer.mlp.0.weight', (128, 64)),
            ('encoders.2.wrap_ff.sublayer.layer.mlp.0.bias', (128,)),
            ('encoders.2.wrap_ff.sublayer.layer.mlp.3.weight', (64, 128)),
            ('encoders.2.wrap_ff.sublayer.layer.mlp.3.bias', (64,)),
            ('encoders.2.patch_emb.1.weight', (64, 32, 3, 3)),
            ('encoders.2.patch_emb.1.bias', (64,)),
        ],
        'buffers': ['encoders.0.wrap_att.sublayer.layer.rotary_embeddings.inv_freq',
            'encoders.1.wrap_att.sublayer.layer.rotary_embeddings.inv_freq',
            'encoders.2.wrap_att.sublayer.layer.rotary_embeddings.inv_freq'],
        'out_shape': (1, 16, 64),
        'head': [-1.290263, 0.667658, -0.079805, -0.424775, 0.633023, 0.887136, -1.502371, 0.848901, -0.01945,
            -0.508399, 0.083096, 0.899174, -1.119975, 0.805438, 0.460037, -0.713777, 0.300554, 0.795727,
            -0.52755, 0.84375, -0.678217, 0.25717, 0.200647, 0.993962],
        'token_norms': [7.47556, 7.82431, 7.72081, 7.88282, 7.49693, 7.51671, 7.49586, 7.78624, 7.66796,
            7.50105, 7.48764, 7.70629, 7.8213, 7.73748, 7.73616, 7.67886],
        'sum': -28.17603,
        'abs_mean': 0.767746,
    },
    'pre_pooling_skip_then_attention': {
        'params': 94208,
        'keys': [
            ('encoders.0.pose_encoding.pos_emb', (1, 64, 32)),
            ('encoders.0.wrap_att.layer.sublayer.rotary_embeddings.inv_freq', (8,)),
            ('encoders.0.wrap_att.layer.sublayer.proj.weight', (32, 32)),
            ('encoders.0.wrap_att.layer.sublayer.proj.bias', (32,)),
            ('encoders.0.wrap_ff.layer.sublayer.mlp.0.weight', (128, 32)),
            ('encoders.0.wrap_ff.layer.sublayer.mlp.0.bias', (128,)),
            ('encoders.0.wrap_ff.layer.sublayer.mlp.3.weight', (32, 128)),
            ('encoders.0.wrap_ff.layer.sublayer.mlp.3.bias', (32,)),
            ('encoders.0.patch_emb.1.weight', (32, 3, 7, 7)),
            ('encoders.0.patch_emb.1.bias', (32,)),
            ('encoders.1.wrap_att.layer.sublayer.rotary_embeddings.inv_freq', (8,)),
            ('encoders.1.wrap_att.layer.sublayer.proj.weight', (32, 32)),
            ('encoders.1.wrap_att.layer.sublayer.proj.bias', (32,)),
            ('encoders.1.wrap_ff.layer.sublayer.mlp.0.weight', (128, 32)),
            ('encoders.1.wrap_ff.layer.sublayer.mlp.0.bias', (128,)),
            ('encoders.1.wrap_ff.layer.sublayer.mlp.3.weight', (32, 128)),
            ('encoders.1.wrap_ff.layer.sublayer.mlp.3.bias', (32,)),
            ('encoders.2.wrap_att.layer.norm.weight', (64,)),
            ('encoders.2.wrap_att.layer.norm.bias', (64,)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.q_proj.weight', (64, 64)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.q_proj.bias', (64,)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.k_proj.weight', (64, 64)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.k_proj.bias', (64,)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.v_proj.weight', (64, 64)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.v_proj.bias', (64,)),
            ('encoders.2.wrap_att.layer.sublayer.rotary_embeddings.inv_freq', (8,)),
            ('encoders.2.wrap_att.layer.sublayer.proj.weight', (64, 64)),
            ('encoders.2.wrap_att.layer.sublayer.proj.bias', (64,)),
            ('encoders.2.wrap_ff.norm.weight', (64,)),
            ('encoders.2.wrap_ff.norm.bias', (64,)),
            ('encoders.2.wrap_ff.sublayer.layer.norm.weight', (64,)),
            ('encoders.2.wrap_ff.sublayer.layer.norm.bias', (64,)),
            ('encoders.2.wrap_ff.sublayer.layer.sublayer.mlp.0.weight', (256, 64)),
            ('encoders.2.wrap_ff.sublayer.layer.sublayer.mlp.0.bias', (256,)),
            ('encoders.2.wrap_ff.sublayer.layer.sublayer.mlp.3.weight', (64, 256)),
            ('encoders.2.wrap_ff.sublayer.layer.sublayer.mlp.3.bias', (64,)),
            ('encoders.2.patch_emb.1.weight', (64, 32, 3, 3)),
            ('encoders.2.patch_emb.1.bias', (64,)),
        ],
        'buffers': ['encoders.0.wrap_att.layer.sublayer.rotary_embeddings.inv_freq',
            'encoders.1.wrap_att.layer.sublayer.rotary_embeddings.inv_freq',
            'encoders.2.wrap_att.layer.sublayer.rotary_embeddings.inv_freq'],
        'out_shape': (1, 16, 64),
        'head': [1.276674, -0.199635, -0.454211, -0.000395, 1.114441, -0.953326, 1.458456, -0.216791,
            -1.212774, -0.495742, 1.34069, -1.053174, 1.402392, -0.276023, -1.513368, -0.402857, 1.39756,
            -0.798295, 1.550253, -0.231444, -1.474228, -0.302721, 1.421367, -0.672963],
        'token_norms': [8.14809, 8.28456, 8.3298, 8.20489, 7.90213, 8.0053, 8.09698, 8.01554, 7.86972,
            8.02046, 8.03096, 8.08678, 8.10541, 8.25131, 8.26606, 8.21651],
        'sum': -27.70727,
        'abs_mean': 0.757435,
    },
    'metaformer': {
        'params': 6570688,
        'keys': [
            ('encoders.0.pose_encoding.pos_emb', (1, 256, 64)),
            ('encoders.0.wrap_att.layer.norm.weight', (64,)),
            ('encoders.0.wrap_att.layer.norm.bias', (64,)),
            ('encoders.0.wrap_att.layer.sublayer.in_proj_container.q_proj.weight', (64, 64)),
            ('encoders.0.wrap_att.layer.sublayer.in_proj_container.q_proj.bias', (64,)),
            ('encoders.0.wrap_att.layer.sublayer.in_proj_container.k_proj.weight', (64, 64)),
            ('encoders.0.wrap_att.layer.sublayer.in_proj_container.k_proj.bias', (64,)),
            ('encoders.0.wrap_att.layer.sublayer.in_proj_container.v_proj.weight', (64, 64)),
            ('encoders.0.wrap_att.layer.sublayer.in_proj_container.v_proj.bias', (64,)),
            ('encoders.0.wrap_att.layer.sublayer.rotary_embeddings.inv_freq', (16,)),
            ('encoders.0.wrap_att.layer.sublayer.proj.weight', (64, 64)),
            ('encoders.0.wrap_att.layer.sublayer.proj.bias', (64,)),
            ('encoders.0.wrap_ff.layer.norm.weight', (64,)),
            ('encoders.0.wrap_ff.layer.norm.bias', (64,)),
            ('encoders.0.wrap_ff.layer.sublayer.mlp.0.weight', (256, 64)),
            ('encoders.0.wrap_ff.layer.sublayer.mlp.0.bias', (256,)),
            ('encoders.0.wrap_ff.layer.sublayer.mlp.3.weight', (64, 256)),
            ('encoders.0.wrap_ff.layer.sublayer.mlp.3.bias', (64,)),
            ('encoders.0.patch_emb.1.weight', (64, 3, 3, 3)),
            ('encoders.0.patch_emb.1.bias', (64,)),
            ('encoders.1.wrap_att.layer.norm.weight', (128,)),
            ('encoders.1.wrap_att.layer.norm.bias', (128,)),
            ('encoders.1.wrap_att.layer.sublayer.in_proj_container.q_proj.weight', (128, 128)),
            ('encoders.1.wrap_att.layer.sublayer.in_proj_container.q_proj.bias', (128,)),
            ('encoders.1.wrap_att.layer.sublayer.in_proj_container.k_proj.weight', (128, 128)),
            ('encoders.1.wrap_att.layer.sublayer.in_proj_container.k_proj.bias', (128,)),
            ('encoders.1.wrap_att.layer.sublayer.in_proj_container.v_proj.weight', (128, 128)),
            ('encoders.1.wrap_att.layer.sublayer.in_proj_container.v_proj.bias', (128,)),
            ('encoders.1.wrap_att.layer.sublayer.rotary_embeddings.inv_freq', (16,)),
            ('encoders.1.wrap_att.layer.sublayer.proj.weight', (128, 128)),
            ('encoders.1.wrap_att.layer.sublayer.proj.bias', (128,)),
            ('encoders.1.wrap_ff.layer.norm.weight', (128,)),
            ('encoders.1.wrap_ff.layer.norm.bias', (128,)),
            ('encoders.1.wrap_ff.layer.sublayer.mlp.0.weight', (512, 128)),
            ('encoders.1.wrap_ff.layer.sublayer.mlp.0.bias', (512,)),
            ('encoders.1.wrap_ff.layer.sublayer.mlp.3.weight', (128, 512)),
            ('encoders.1.wrap_ff.layer.sublayer.mlp.3.bias', (128,)),
            ('encoders.1.patch_emb.1.weight', (128, 64, 3, 3)),
            ('encoders.1.patch_emb.1.bias', (128,)),
            ('encoders.2.wrap_att.layer.norm.weight', (320,)),
            ('encoders.2.wrap_att.layer.norm.bias', (320,)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.q_proj.weight', (320, 320)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.q_proj.bias', (320,)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.k_proj.weight', (320, 320)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.k_proj.bias', (320,)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.v_proj.weight', (320, 320)),
            ('encoders.2.wrap_att.layer.sublayer.in_proj_container.v_proj.bias', (320,)),
            ('encoders.2.wrap_att.layer.sublayer.rotary_embeddings.inv_freq', (16,)),
            ('encoders.2.wrap_att.layer.sublayer.proj.weight', (320, 320)),
            ('encoders.2.wrap_att.layer.sublayer.proj.bias', (320,)),
            ('encoders.2.wrap_ff.layer.norm.weight', (320,)),
            ('encoders.2.wrap_ff.layer.norm.bias', (320,)),
            ('encoders.2.wrap_ff.layer.sublayer.mlp.0.weight', (1280, 320)),
            ('encoders.2.wrap_ff.layer.sublayer.mlp.0.bias', (1280,)),
            ('encoders.2.wrap_ff.layer.sublayer.mlp.3.weight', (320, 1280)),
            ('encoders.2.wrap_ff.layer.sublayer.mlp.3.bias', (320,)),
            ('encoders.2.patch_emb.1.weight', (320, 128, 3, 3)),
            ('encoders.2.patch_emb.1.bias', (320,)),
            ('encoders.3.wrap_att.layer.norm.weight', (512,)),
            ('encoders.3.wrap_att.layer.norm.bias', (512,)),
            ('encoders.3.wrap_att.layer.sublayer.in_proj_container.q_proj.weight', (512, 512)),
            ('encoders.3.wrap_att.layer.sublayer.in_proj_container.q_proj.bias', (512,)),
            ('encoders.3.wrap_att.layer.sublayer.in_proj_container.k_proj.weight', (512, 512)),
            ('encoders.3.wrap_att.layer.sublayer.in_proj_container.k_proj.bias', (512,)),
            ('encoders.3.wrap_att.layer.sublayer.in_proj_container.v_proj.weight', (512, 512)),
            ('encoders.3.wrap_att.layer.sublayer.in_proj_container.v_proj.bias', (512,)),
            ('encoders.3.wrap_att.layer.sublayer.rotary_embeddings.inv_freq', (16,)),
            ('encoders.3.wrap_att.layer.sublayer.proj.weight', (512, 512)),
            ('encoders.3.wrap_att.layer.sublayer.proj.bias', (512,)),
            ('encoders.3.wrap_ff.norm.weight', (512,)),
            ('encoders.3.wrap_ff.norm.bias', (512,)),
            ('encoders.3.wrap_ff.sublayer.layer.norm.weight', (512,)),
            ('encoders.3.wrap_ff.sublayer.layer.norm.bias', (512,)),
            ('encoders.3.wrap_ff.sublayer.layer.sublayer.mlp.0.weight', (2048, 512)),
            ('encoders.3.wrap_ff.sublayer.layer.sublayer.mlp.0.bias', (2048,)),
            ('encoders.3.wrap_ff.sublayer.layer.sublayer.mlp.3.weight', (512, 2048)),
            ('encoders.3.wrap_ff.sublayer.layer.sublayer.mlp.3.bias', (512,)),
            ('encoders.3.patch_emb.1.weight', (512, 320, 3, 3)),
            ('encoders.3.patch_emb.1.bias', (512,)),
        ],
        'buffers': ['encoders.0.wrap_att.layer.sublayer.rotary_embeddings.inv_freq',
            'encoders.1.wrap_att.layer.sublayer.rotary_embeddings.inv_freq',
            'encoders.2.wrap_att.layer.sublayer.rotary_embeddings.inv_freq',
            'encoders.3.wrap_att.layer.sublayer.rotary_embeddings.inv_freq'],
    },
}
