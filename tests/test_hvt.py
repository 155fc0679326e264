"""HVT (arXiv 2103.10619) from a spec: the presets against the README table (parameters and
multiply-accumulates), the outputs against an independent plain-torch HVT written from the paper
and the reference code's description (pool after the block's MLP, new position embedding per
pooled length, no class token, norm + mean head), the seq layout in the plan and the backbone API,
and a short digits run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hfactory import PlanError, load_spec, resolve
from hfactory.encoder import build_encoder
from hfactory.presets import load_preset
from hfactory.summary import count_macs

# MonashAI/HVT README: name -> (params in M, "FLOPs" in G). Its FLOPs are ptflops MACs plus the
# attention hook's 2*B*N*N*C (q@k and attn@v), i.e. multiply-accumulates.
README = {
    "hvt_ti_1": (5.74, 0.64),
    "hvt_s_0": (22.05, 4.57),
    "hvt_s_1": (22.09, 2.40),
    "hvt_s_2": (22.11, 1.94),
    "hvt_s_3": (22.11, 1.62),
    "hvt_s_4": (22.12, 1.39),  # Scale HVT-Ti-4
}


@pytest.mark.parametrize("name", sorted(README))
def test_preset_params_and_macs_match_readme(name):
    params_m, gmacs = README[name]
    with torch.device("meta"):
        model = build_encoder(load_preset(name))
        n = sum(p.numel() for p in model.parameters())
        macs = count_macs(model, torch.empty(1, 3, 224, 224))["total"]
    assert abs(n / 1e6 - params_m) / params_m < 0.005, (name, n)
    assert abs(macs / 1e9 - gmacs) / gmacs < 0.05, (name, macs)


def test_preset_token_counts_and_pooling_blocks():
    # README / models.py: 196 -> 97 -> 48 -> 23 -> 11 for scale-hvt-ti-4 (pool_block_width 3: after
    # blocks 0, 3, 6, 9). A stage = the blocks up to and including a pooling block.
    plan = resolve(load_preset("hvt_s_4"))
    assert [s.seq_len for s in plan.stages] == [196, 97, 48, 23, 11]
    assert [s.depth for s in plan.stages] == [1, 3, 3, 3, 2]
    assert [s.layout for s in plan.stages] == ["grid", "seq", "seq", "seq", "seq"]
    pooled_after = [sum(s.depth for s in plan.stages[: i + 1]) - 1 for i in range(len(plan.stages) - 1)]
    assert pooled_after == [0, 3, 6, 9]
    assert [s.out_grid for s in plan.stages[1:]] == [(97, 1), (48, 1), (23, 1), (11, 1)]
    assert [resolve(load_preset(n)).num_blocks for n in README] == [12] * 6
    assert [s.depth for s in resolve(load_preset("hvt_s_3")).stages] == [1, 4, 4, 3]  # pools after 0, 4, 8
    # drop path: linear over the 12 blocks, as HVT's torch.linspace(0, 0.1, 12)
    rates = [r for s in plan.stages for r in s.drop_path]
    assert rates == pytest.approx([0.1 * i / 11 for i in range(12)])


# ------------------------------------------------------------------ independent reference model


class RefHVT(nn.Module):
    """A plain HVT written from the paper's description (not hfactory code): patchify conv,
    ``x + pos``, blocks (pre-norm attention + GELU MLP), and in block ``i`` with
    ``i % width == 0`` a MaxPool1d(3, 2) over the token axis after the MLP and a new position
    embedding; LayerNorm then mean over tokens, Linear head."""

    def __init__(self, img, patch, dim, heads, depth, width, num_classes, in_chans=3):
        super().__init__()
        self.heads = heads
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, patch)
        n = (img // patch) ** 2
        self.pos_embed = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        self.blocks = nn.ModuleList()
        for i in range(depth):
            b = nn.Module()
            b.norm1, b.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            b.qkv, b.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            b.fc1, b.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
            b.pool = i % width == 0
            if b.pool:
                n = math.floor((n - 3) / 2 + 1)
                b.pos_embed = nn.Parameter(torch.randn(1, n, dim) * 0.02)
            self.blocks.append(b)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        for b in self.blocks:
            B, N, C = x.shape
            q, k, v = b.qkv(b.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            a = ((q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5).softmax(-1)
            x = x + b.proj((a @ v).transpose(1, 2).reshape(B, N, C))
            x = x + b.fc2(F.gelu(b.fc1(b.norm2(x))))
            if b.pool:
                x = F.max_pool1d(x.transpose(1, 2), 3, 2).transpose(1, 2) + b.pos_embed
        return self.head(self.norm(x).mean(1))


def tiny_spec(width: int, img: int = 64, patch: int = 8, dim: int = 32, heads: int = 2, depth: int = 6,
              num_classes: int = 10, in_chans: int = 3):
    """The hvt preset's spec structure at a tiny size (how the presets were written)."""
    spec = load_preset("hvt_s_4").model_dump(mode="json", exclude_none=True)
    pools = [i for i in range(depth) if i % width == 0]
    bounds = [p + 1 for p in pools] + [depth]
    assert (depth - 1) % width, "a pooling after the last block is not expressible"
    depths = [1] + [b - a for a, b in zip(bounds, bounds[1:])]
    stages = [{"embedding": dim, "depth": d} for d in depths]
    stages[0].update(downsample={"kind": "conv", "patch_size": patch}, pos_embed="learned")
    spec.update(img_size=img, num_classes=num_classes, in_chans=in_chans, stages=stages, drop_path_rate=0.0)
    spec["defaults"]["num_heads"] = heads
    return load_spec(spec)


def load_ref_into(ours, ref):
    """Map the reference's weights onto the hfactory model (block i -> its stage and index)."""
    state = {"stages.0.downsample.conv.weight": ref.patch_embed.weight,
             "stages.0.downsample.conv.bias": ref.patch_embed.bias,
             "stages.0.pos_embed.pos_embed": ref.pos_embed.reshape(1, *ours.plan.stages[0].out_grid, -1),
             "norm.weight": ref.norm.weight, "norm.bias": ref.norm.bias,
             "head.fc.weight": ref.head.weight, "head.fc.bias": ref.head.bias}
    where = [(s.index, j) for s in ours.plan.stages for j in range(s.depth)]
    for i, b in enumerate(ref.blocks):
        si, j = where[i]
        p = f"stages.{si}.blocks.{j}"
        for name in ("norm1", "norm2", "qkv", "proj"):
            for t in ("weight", "bias"):
                state[f"{p}.{'token_mixer.' if name in ('qkv', 'proj') else ''}{name}.{t}"] = getattr(getattr(b, name), t)
        for name in ("fc1", "fc2"):
            for t in ("weight", "bias"):
                state[f"{p}.mlp.{name}.{t}"] = getattr(getattr(b, name), t)
        if b.pool:
            state[f"stages.{si + 1}.pos_embed.pos_embed"] = b.pos_embed
    ours.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)


# widths whose last pooling is before the last block: HVT with a pooling after its last block
# (e.g. width 1 or 5 at depth 6) would need a stage of 0 blocks, which specs do not allow.
@pytest.mark.parametrize("width", [2, 3, 4, 6, 7])
def test_outputs_match_independent_reference(width):
    torch.manual_seed(width)
    ref = RefHVT(64, 8, 32, 2, 6, width, 10).eval()
    ours = build_encoder(tiny_spec(width)).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    load_ref_into(ours, ref)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- layout contract


def test_grid_component_after_1d_pooling_fails_in_plan():
    spec = tiny_spec(3).model_dump(mode="json", exclude_none=True)
    spec["stages"][1]["token_mixer"] = {"kind": "sepconv"}
    with pytest.raises(PlanError) as err:
        resolve(load_spec(spec))
    assert err.value.loc == "stages.1.token_mixer"
    msg = str(err.value)
    assert "'seq' layout" in msg and "stages.1.downsample (max_pool_1d)" in msg and "without 2-D structure" in msg
    for key, value in (("downsample", {"kind": "conv", "patch_size": 2}), ("pos_embed", "learned")):
        spec = tiny_spec(3).model_dump(mode="json", exclude_none=True)
        spec["stages"][2][key] = value
        with pytest.raises(PlanError, match="seq") as err:
            resolve(load_spec(spec))
        assert err.value.loc == f"stages.2.{key}"


def test_max_pool_1d_checks_width_and_length():
    spec = tiny_spec(3).model_dump(mode="json", exclude_none=True)
    spec["stages"][1]["embedding"] = 48
    with pytest.raises(PlanError, match="keeps the width 32"):
        resolve(load_spec(spec))
    spec = tiny_spec(2, img=16, patch=8).model_dump(mode="json", exclude_none=True)  # 4 -> 1 -> nothing
    with pytest.raises(PlanError, match="longer than the 1 tokens") as err:
        resolve(load_spec(spec))
    assert err.value.loc == "stages.2.downsample.kernel_size"


def test_seq_stages_in_backbone_api():
    model = build_encoder(tiny_spec(2)).eval()  # 64 -> 31 -> 15 -> 7 tokens
    x = torch.randn(2, 3, 64, 64)
    plan = model.plan
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        feats = model.forward_features(x)
        nhwc = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(2, 32, *s.out_grid) for s in plan.stages]
    assert [tuple(m.shape[1:3]) for m in nhwc] == [tuple(s.out_grid) for s in plan.stages]
    assert tuple(maps[1].shape) == (2, 32, 31, 1)
    torch.testing.assert_close(final, feats)
    assert [f["reduction"] for f in model.feature_info] == [8, round(math.sqrt(64 * 64 / 31)),
                                                             round(math.sqrt(64 * 64 / 15)), round(math.sqrt(64 * 64 / 7))]
    assert {"stages.0.pos_embed.pos_embed", "stages.1.pos_embed.pos_embed"} <= model.no_weight_decay()
    # another input size: the plan re-derives the lengths and the 1-D embeddings are interpolated
    with torch.no_grad():
        out = model(torch.randn(1, 3, 48, 48))
    assert out.shape == (1, 10)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = build_encoder(tiny_spec(2))
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_short_digits_training_beats_chance(tmp_path):
    pytest.importorskip("sklearn")
    from hfactory.train import TrainConfig, train

    spec = tiny_spec(2, img=16, patch=4, dim=32, heads=2, depth=4, in_chans=1)  # 16 -> 7 -> 3 tokens
    # one thread: on a shared 2-core machine two threads can be 5x slower than one
    metrics = train(spec, tmp_path / "run", TrainConfig(epochs=3, lr=5e-3, batch_size=32, progress=False,
                                                        workers=0, seed=0, threads=1))
    assert metrics["test_accuracy"] > 0.6  # chance is 0.1; about 0.84 with this seed


def test_hvt_presets_plan_at_other_resolutions():
    """The presets pin no derived sequence lengths, so create_model(img_size=...) re-plans them:
    at 256x256, 16x16 patches give 256 tokens, then (256 - 3) // 2 + 1 = 127, 63, 31, 15."""
    import hfactory

    model = hfactory.create_model("hvt_s_4", img_size=256)
    assert [s.seq_len for s in model.plan.stages] == [256, 127, 63, 31, 15]
    assert model(torch.randn(1, 3, 256, 256)).shape == (1, 1000)

