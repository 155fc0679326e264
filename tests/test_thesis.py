"""The thesis repo's downsamplers (leognk/HierarchicalTransformers, models/encoders/metaformer.py):
shapes and parameter counts against the plan and hand counts, outputs against plain functional
recomputations, greedy merging against a literal transcription of the thesis algorithm, token
sizes (log-size key bias = repeated keys; size-weighted pool), layout errors, gradients, and
short digits runs."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from hfactory import PlanError, from_pretrained, load_spec, resolve
from hfactory.encoder import build_encoder
from hfactory.layers.attention import attention
from hfactory.layers.thesis import GreedyMerging, greedy_merge_groups

EXAMPLE = "examples/caformer_s18_downsamplers.yaml"
SIMPLE = ["avg", "max", "rand_conv", "sp_lin", "sp_mlp", "rand"]


def tiny(downsample=None, last=None, img=32, in_chans=3, num_classes=10, **top):
    """A 4-stage CAFormer-like spec small enough for CPU tests: 32 -> 16 -> 8 -> 4 -> 2 tokens a side
    (sepconv, sepconv, attention, attention); ``downsample`` for stages 1-3, ``last`` for stage 3."""
    spec = load_spec(EXAMPLE).model_dump(mode="json", exclude_none=True)
    dims = [16, 24, 32, 48]
    spec["stages"] = [{**s, "embedding": d, "depth": 1} for s, d in zip(spec["stages"], dims)]
    spec["stages"][0]["downsample"] = {"kind": "conv", "patch_size": 3, "stride": 2, "padding": 1,
                                       "norm": {"kind": "layernorm", "eps": 1e-6, "bias": False}}
    if downsample is not None:
        spec["defaults"]["downsample"] = downsample
    if last is not None:
        spec["stages"][3]["downsample"] = last
    spec["defaults"]["dim_head"] = 8
    spec.update(img_size=img, in_chans=in_chans, num_classes=num_classes, drop_path_rate=0.0, **top)
    return load_spec(spec)


# ------------------------------------------------------------------------- simple downsamplers


@pytest.mark.parametrize("kind", SIMPLE)
def test_example_swaps_every_downsampler_by_one_field(kind):
    spec = load_spec(EXAMPLE).model_dump(mode="json", exclude_none=True)
    spec["defaults"]["downsample"] = {"kind": kind}
    plan = resolve(load_spec(spec))
    assert [s.out_grid for s in plan.stages] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert [s.downsample["kind"] for s in plan.stages] == ["conv", kind, kind, kind]


def _ds_param_count(kind, c_in, c_out, n_in, n_out):
    """Hand count from the thesis modules (LN without bias = C weights)."""
    if kind in ("avg", "max"):
        return c_in + c_in * c_out + c_out
    if kind == "rand_conv":
        return c_in + 9 * c_in * c_out + c_out
    spatial = n_in * n_out if kind in ("sp_lin", "rand") else n_in * n_out + 2 + n_out * n_out
    return 2 * c_in + spatial + c_in * c_out


@pytest.mark.parametrize("kind", SIMPLE)
def test_simple_downsamplers_shapes_params_and_outputs(kind):
    model = build_encoder(tiny({"kind": kind})).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
    plan = model.plan
    assert [tuple(m.shape) for m in maps] == [(2, s.out_chs, *s.out_grid) for s in plan.stages]
    for s in plan.stages[1:]:
        ds = model.stages[s.index].downsample
        n_in, n_out = s.in_grid[0] * s.in_grid[1], s.out_grid[0] * s.out_grid[1]
        assert sum(p.numel() for p in ds.parameters()) == _ds_param_count(kind, s.in_chs, s.out_chs, n_in, n_out)
        frozen = {n for n, p in ds.named_parameters() if not p.requires_grad}
        want = {"rand_conv": {"pool.weight", "pool.bias"}, "rand": {"spatial_proj.weight"}}.get(kind, set())
        assert frozen == want
        # recompute the downsampler functionally from its weights
        t = torch.randn(2, *s.in_grid, s.in_chs)
        with torch.no_grad():
            got = ds(t)
            normed = F.layer_norm(t, (s.in_chs,), ds.norm.weight if hasattr(ds, "norm") else ds.norm1.weight,
                                  None, 1e-6)
            if kind in ("avg", "max", "rand_conv"):
                nchw = normed.permute(0, 3, 1, 2)
                if kind == "rand_conv":
                    want_out = F.conv2d(nchw, ds.pool.weight, ds.pool.bias, 2, 1)
                else:
                    proj = F.conv2d(nchw, ds.pool[0].weight, ds.pool[0].bias)
                    want_out = F.avg_pool2d(proj, 3, 2, 1) if kind == "avg" else F.max_pool2d(proj, 3, 2, 1)
                want_out = want_out.permute(0, 2, 3, 1)
            else:
                flat = normed.reshape(2, n_in, s.in_chs)
                if kind == "sp_mlp":
                    a = ds.spatial_proj[1]
                    hid = torch.einsum("bnc,mn->bmc", flat, ds.spatial_proj[0].weight)
                    mixed = torch.einsum("bnc,mn->bmc", a.scale * F.relu(hid) ** 2 + a.bias, ds.spatial_proj[2].weight)
                else:
                    mixed = torch.einsum("bnc,mn->bmc", flat, ds.spatial_proj.weight)
                mixed = F.layer_norm(mixed, (s.in_chs,), ds.norm2.weight, None, 1e-6)
                want_out = (mixed @ ds.channel_proj.weight.T).reshape(2, *s.out_grid, s.out_chs)
        torch.testing.assert_close(got, want_out, rtol=1e-4, atol=1e-5)


def test_downsampler_plan_errors():
    with pytest.raises(PlanError, match="stride 2 does not divide the token height 7") as err:
        resolve(tiny({"kind": "avg"}, img=56))  # 28 -> 14 -> 7 -> 3.5
    assert err.value.loc == "stages.3.downsample.stride"
    with pytest.raises(PlanError, match="padding 0 gives") as err:
        resolve(tiny({"kind": "max", "kernel_size": 2, "stride": 2, "padding": 1}))
    assert err.value.loc == "stages.1.downsample.padding"
    model = build_encoder(tiny({"kind": "sp_lin"}))
    with pytest.raises(PlanError, match="runs only on 32x32 images, not 64x64") as err:
        model(torch.randn(1, 3, 64, 64))  # refused by the plan, before any weight is used
    assert err.value.loc == "stages.1.downsample"


# ------------------------------------------------------------------------------- greedy merging


def thesis_greedy_groups(k: torch.Tensor, n_out: int) -> list[list[int]]:
    """Literal transcription of the thesis's GreedyMerging for one sample: sort all pairs by key
    cosine similarity, merge the best pair of different groups until n_out groups remain."""
    kn = k / k.norm(dim=-1, keepdim=True)
    s = (kn @ kn.T).tolist()
    n = len(s)
    edges = sorted(((s[i][j], i, j) for i in range(n) for j in range(i + 1, n)), reverse=True)
    gid = list(range(n))
    merges = 0
    for _, i, j in edges:
        if merges == n - n_out:
            break
        gi, gj = gid[i], gid[j]
        if gi != gj:
            gid = [gj if g == gi else g for g in gid]
            merges += 1
    groups = {}
    for t, g in enumerate(gid):
        groups.setdefault(g, []).append(t)
    return sorted(groups.values())


@pytest.mark.parametrize("n,n_out", [(16, 4), (49, 12), (36, 1), (20, 20)])
def test_vectorised_merging_gives_the_thesis_merges(n, n_out):
    torch.manual_seed(n)
    k = torch.randn(3, n, 8)
    labels = greedy_merge_groups(k, n_out)
    for b in range(3):
        ours = {}
        for t, g in enumerate(labels[b].tolist()):
            ours.setdefault(g, []).append(t)
        assert sorted(ours) == list(range(n_out))
        assert sorted(ours.values()) == thesis_greedy_groups(k[b], n_out)
        firsts = [min(ours[g]) for g in range(n_out)]
        assert firsts == sorted(firsts)  # groups numbered by their first token


def test_merging_means_and_sizes():
    torch.manual_seed(0)
    k, v = torch.randn(2, 12, 4), torch.randn(2, 12, 5)
    out, sizes = GreedyMerging(3)(k, v)
    labels = greedy_merge_groups(k, 3)
    for b in range(2):
        for g in range(3):
            members = labels[b] == g
            assert sizes[b, g] == members.sum()
            torch.testing.assert_close(out[b, g], v[b, members].mean(0))
    w = torch.rand(2, 12) + 0.5  # incoming sizes weight the means and add up
    out, sizes = GreedyMerging(3)(k, v, w)
    for b in range(2):
        for g in range(3):
            m = labels[b] == g
            torch.testing.assert_close(sizes[b, g], w[b, m].sum())
            torch.testing.assert_close(out[b, g], (v[b, m] * w[b, m, None]).sum(0) / w[b, m].sum())


def test_log_size_key_bias_equals_repeated_keys():
    # proportional attention: a key of size s weighs as s copies of it
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    sizes = torch.tensor([[1.0, 3.0, 2.0]])
    biased = attention(q, k, v, torch.log(sizes)[:, None, None, :])
    rep = torch.tensor([0, 1, 1, 1, 2, 2])
    torch.testing.assert_close(biased, attention(q, k[:, :, rep], v[:, :, rep]))


def test_geme_in_the_plan_and_the_model():
    spec = tiny(last="geme")
    plan = resolve(spec)
    s3 = plan.stages[3]
    assert s3.out_grid == (4, 1) and s3.layout == "seq"  # 4x4 tokens -> 16 // 4 groups
    assert s3.token_mixer["token_sizes"] and all(b.token_mixer["token_sizes"] for b in s3.blocks)
    assert "token_sizes" not in plan.stages[2].token_mixer
    assert plan.head["token_sizes"] is True
    model = build_encoder(spec).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        logits = model(x)
    assert tuple(maps[3].shape) == (2, 48, 4, 1)
    # the head's pool weights each merged token by its size (here recomputed from the labels)
    ds = model.stages[3].downsample
    with torch.no_grad():
        t, no_sizes = model.stages[2](*model.stages[1](*model.stages[0](x.permute(0, 2, 3, 1))))
        assert no_sizes is None  # sizes start at the merge
        k, _ = ds.to_kv(ds.norm1(t.flatten(1, 2))).chunk(2, -1)
        labels = greedy_merge_groups(k, 4)
        sizes = torch.stack([torch.bincount(lab, minlength=4) for lab in labels]).float()
        torch.testing.assert_close(model.stages[3](t)[1], sizes)  # the stage returns them with its tokens
        pooled = (final.flatten(2) * (sizes / 16)[:, None]).sum(-1)
        want = model.head.fc(model.norm(pooled))
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)
    # grid components cannot follow: the plan says where the grid was lost
    bad = tiny(last="geme").model_dump(mode="json", exclude_none=True)
    bad["stages"][3]["token_mixer"] = {"kind": "sepconv"}
    with pytest.raises(PlanError, match=r"since stages\.3\.downsample \(geme\)") as err:
        resolve(load_spec(bad))
    assert err.value.loc == "stages.3.token_mixer"


def test_sizes_stop_at_a_downsampler_that_does_not_carry_them():
    spec = tiny(last="geme").model_dump(mode="json", exclude_none=True)
    spec["stages"].append({"embedding": 48, "depth": 1, "downsample": {"kind": "max_pool_1d", "kernel_size": 2},
                           "token_mixer": {"kind": "attention"}})
    plan = resolve(load_spec(spec))
    assert plan.stages[4].seq_len == 2 and "token_sizes" not in plan.stages[4].token_mixer
    assert "token_sizes" not in plan.head
    spec["stages"][4]["downsample"] = {"kind": "geme"}
    spec["stages"][4]["embedding"] = 48
    spec["stages"][3]["downsample"] = {"kind": "geme", "stride": 1}  # 16 -> 16, then 16 -> 4
    plan = resolve(load_spec(spec))
    assert plan.stages[4].downsample["token_sizes_in"] is True
    model = build_encoder(load_spec(spec))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# ------------------------------------------------------------------------------------------- att0

CONV_INIT = {"kind": "conv", "patch_size": 3, "stride": 2, "padding": 1, "pre_norm": True,
             "norm": {"kind": "layernorm", "eps": 1e-6, "bias": False}}
ATT0 = [{"kind": "att0"}, {"kind": "att0", "assignment": "soft", "last_assignment": "soft"},
        {"kind": "att0", "assignment": "hard", "last_assignment": "hard"},
        {"kind": "att0", "last_assignment": "soft", "clusters_init": CONV_INIT}]


def ref_assign(scores, mode, eps):
    """Thesis cluster rows: scores (b h nc n) -> weights over tokens."""
    if mode is None:
        return scores.softmax(-1)
    soft = scores.softmax(-2)
    if mode == "hard":
        soft = F.one_hot(soft.argmax(-2), soft.shape[-2]).transpose(-1, -2).to(soft.dtype)
    return soft / (soft.sum(-1, keepdim=True) + eps)


def ref_att0(model, x, att0):
    """The thesis's stage-with-clusters and Attention0Pooling written out in plain tensor math
    from the facts (not hfactory's code), reading the weights of ``model``; returns the stage-3
    tokens (B, N', C) and the sizes (or None)."""
    with torch.no_grad():
        t, _ = model.stages[1](*model.stages[0](x.permute(0, 2, 3, 1)))
        stage = model.stages[2]
        t = stage.pos_embed(stage.downsample(t))
        b, h, w, c = t.shape
        carry = stage.carry
        clusters = carry.clusters.expand(b, -1, -1) if carry.init is None else \
            carry.init(t).reshape(b, -1, c)
        tok = t.reshape(b, h * w, c)
        for blk in stage.blocks:
            mix = blk.token_mixer
            heads = mix.num_heads
            split = lambda z: z.reshape(b, z.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
            xn, cn = blk.norm1(tok), blk.norm1(clusters)
            qx, kx, vx = (split(z) for z in F.linear(xn, mix.qkv.weight).chunk(3, -1))
            qc = split(F.linear(cn, mix.qkv.weight).chunk(3, -1)[0])
            scale = qx.shape[-1] ** -0.5
            ox = ((qx @ kx.transpose(-1, -2)) * scale).softmax(-1) @ vx
            oc = ref_assign((qc @ kx.transpose(-1, -2)) * scale, att0.get("assignment"), 1e-5) @ vx
            merge = lambda o: F.linear(o.transpose(1, 2).reshape(b, o.shape[2], c), mix.proj.weight)  # noqa: E731
            tok = blk.res_scale1(tok) + merge(ox)
            clusters = blk.res_scale1(clusters) + merge(oc)
            tok = blk.res_scale2(tok) + blk.mlp(blk.norm2(tok))
            clusters = blk.res_scale2(clusters) + blk.mlp(blk.norm2(clusters))
        pool = model.stages[3].downsample
        heads = pool.num_heads
        split = lambda z: z.reshape(b, z.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        xn, cn = pool.norm1(tok), pool.norm1(clusters)
        q = split(pool.to_q(cn))
        k, v = (split(z) for z in pool.to_kv(xn).chunk(2, -1))
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        mode = att0.get("last_assignment")
        if mode is None:
            weights, sizes = scores.softmax(-1), None
        else:
            soft = scores.softmax(-2)
            if mode == "hard":
                soft = F.one_hot(soft.argmax(-2), soft.shape[-2]).transpose(-1, -2).to(soft.dtype)
            mass = soft.sum(-1)
            weights = soft / (mass[..., None] + 1e-6)
            sizes = mass.mean(1).reshape(b, -1, 2).sum(-1)
        agg = pool.to_out((weights @ v).transpose(1, 2).reshape(b, -1, c))
        y = (pool.res_scale(clusters) + agg).reshape(b, -1, 2 * c)
        return pool.proj(pool.norm2(y)), sizes


@pytest.mark.parametrize("att0", ATT0, ids=["nn", "ss", "hh", "ns-conv"])
def test_att0_matches_the_thesis_computation(att0):
    torch.manual_seed(0)
    model = build_encoder(tiny(last=att0)).eval()
    for p in model.parameters():  # res scales away from 1, so that a misplaced one shows
        if p.ndim == 1:
            p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32)
    want, sizes = ref_att0(model, x, att0)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        stage2, _ = model.stages[2](*model.stages[1](*model.stages[0](x.permute(0, 2, 3, 1))))
        stage3_in = model.stages[3].downsample(stage2)
    got = None
    if isinstance(stage3_in, tuple):  # an assignment: the downsampler returns sizes with its tokens
        stage3_in, got = stage3_in
    torch.testing.assert_close(stage3_in.reshape(want.shape), want, rtol=1e-4, atol=1e-5)
    # intermediates drop the clusters: stage 2 is its 4x4 grid
    assert tuple(maps[2].shape) == (2, 32, 4, 4)
    plan = model.plan
    grid_out = "clusters_init" in att0
    assert plan.stages[3].layout == ("grid" if grid_out else "seq")
    assert plan.stages[3].out_grid == ((2, 2) if grid_out else (4, 1))
    assert plan.stages[2].carry["num_clusters"] == 8
    assert ("stages.2.carry.clusters" in model.no_weight_decay()) == (not grid_out)
    assert [b.token_mixer["kind"] for b in plan.stages[2].blocks] == ["cluster_attention"]
    assert (got is None) == (sizes is None) and model.stages[3].downsample.emits_token_sizes == (sizes is not None)
    if sizes is not None:
        torch.testing.assert_close(got, sizes, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.sum(-1), torch.full((2,), 16.0), rtol=1e-4, atol=1e-4)  # every token once
        assert plan.head["token_sizes"] and plan.stages[3].token_mixer["token_sizes"]
    else:
        assert "token_sizes" not in plan.head


def test_att0_plan_errors():
    bad = tiny(last="att0").model_dump(mode="json", exclude_none=True)
    bad["stages"][2]["token_mixer"] = {"kind": "sepconv"}
    with pytest.raises(PlanError, match="needs global attention there") as err:
        resolve(load_spec(bad))
    assert err.value.loc == "stages.2.token_mixer"
    bad = tiny().model_dump(mode="json", exclude_none=True)
    bad["stages"][0]["downsample"] = {"kind": "att0"}
    with pytest.raises(PlanError, match="cannot start stage 0"):
        resolve(load_spec(bad))
    bad = tiny().model_dump(mode="json", exclude_none=True)
    bad["stages"][2]["token_mixer"] = {"kind": "cluster_attention"}
    with pytest.raises(PlanError, match="write token_mixer: attention"):
        resolve(load_spec(bad))
    with pytest.raises(PlanError, match="att0 needs 2x2 cells") as err:
        resolve(tiny(last={"kind": "att0", "clusters_init": {**CONV_INIT, "stride": 1}}))
    assert err.value.loc == "stages.3.downsample.clusters_init"
    for kind in ("geme", "max_pool_1d", "q_pool"):  # components that cannot make a grid of clusters
        with pytest.raises(PlanError, match=f"'{kind}' cannot make clusters") as err:
            resolve(tiny(last={"kind": "att0", "clusters_init": {"kind": kind}}))
        assert err.value.loc == "stages.3.downsample.clusters_init" and "use stride" not in str(err.value)


# --------------------------------------------------------------------------- gradients, training


@pytest.mark.parametrize("kind", SIMPLE + ["geme"] + ATT0)
def test_gradients_reach_every_trainable_parameter(kind):
    spec = tiny(last=kind) if kind == "geme" or isinstance(kind, dict) else tiny({"kind": kind})
    model = build_encoder(spec)
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        if kind == "geme" and name.endswith("downsample.to_kv.weight"):
            # the merge decisions are discrete: only the value half of to_kv learns (as in the thesis)
            c = p.shape[1]
            assert p.grad[:c].abs().sum() == 0 and p.grad[c:].abs().sum() > 0
        else:
            assert p.grad.abs().sum() > 0, name


def digits_spec(last):
    """3 stages on 16x16 digits: 8x8 sepconv, 4x4 attention, then ``last`` (2x2 or 4 merged tokens)."""
    spec = tiny(last=None, img=16, in_chans=1).model_dump(mode="json", exclude_none=True)
    spec["stages"] = spec["stages"][:1] + spec["stages"][2:]
    spec["stages"][1]["embedding"] = 32
    spec["stages"][2]["downsample"] = last
    return load_spec(spec)


@pytest.mark.parametrize("last", ["geme", {"kind": "att0", "assignment": "soft", "last_assignment": "soft"}],
                         ids=["geme", "att0-ss"])
def test_short_digits_training_beats_chance(last, tmp_path):
    pytest.importorskip("sklearn")
    from hfactory.train import TrainConfig, train

    metrics = train(digits_spec(last), tmp_path / "run", TrainConfig(
        epochs=4, lr=5e-3, batch_size=32, progress=False, workers=0, seed=0, threads=1))
    # chance is 0.1; with this seed geme reaches about 0.68 and att0-ss about 0.62 (a conv
    # downsampler about 0.95: merging 16 tokens into 4 by single linkage mostly gives one large
    # group and its keys learn nothing; att0's clusters start from noise)
    assert metrics["test_accuracy"] > 0.4


def test_pruning_before_an_att0_stage_drops_its_clusters_and_reloads(tmp_path):
    # Regression: pruning used to keep stage 2's clusters (made for stage 3's att0) while the
    # re-planned spec had none, so the saved model did not reload.
    torch.manual_seed(0)
    spec = tiny(last={"kind": "att0", "assignment": "soft", "last_assignment": "soft"})
    model = build_encoder(spec.model_copy(update={"drop_path_rate": 0.3})).eval()
    model.stages[2].blocks[0].norm1.weight.requires_grad_(False)  # state the rebuilt stage must keep
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.forward_intermediates(x, intermediates_only=True)[:3]
    assert model.stages[2].carry is not None
    model.prune_intermediate_layers([0, 1, 2])
    assert model.stages[2].carry is None and "stages.2.carry.clusters" not in model.state_dict()
    assert not model.stages[2].training  # eval mode kept (drop-path stays off)
    assert not model.stages[2].blocks[0].norm1.weight.requires_grad
    with torch.no_grad():
        after = model.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(before, after):  # tokens never attended to the clusters: the same maps
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    again = from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("last", [{"kind": "att0", "assignment": "soft", "last_assignment": "soft"},
                                  {"kind": "geme"}], ids=["att0", "geme"])
def test_sweep_measures_merging_specs_as_whole_models(last):
    # Regression: the sweep fed stage 3 a plain grid although att0's clusters ride into it.
    from hfactory.summary import summarize
    from hfactory.sweep import sweep

    rows = sweep(tiny(last=last), {"stages.0.depth": [1, 2]})
    for row in rows:
        whole = summarize(row["spec"])["total"]
        assert (row["params"], row["gmacs"], row["activation_bytes"]) == (
            whole["params"], whole["gmacs"], whole["activation_bytes"])
    assert rows[1]["params"] > rows[0]["params"]


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_att0_with_pooling_clusters_keeps_the_grid(pool):
    # clusters_init from a pooling downsampler (C_in -> 2 C_in per output cell): the output keeps
    # the grid layout, and gradients reach the pooling layer's projection.
    last = {"kind": "att0", "assignment": "soft", "last_assignment": "soft",
            "clusters_init": {"kind": pool, "kernel_size": 2, "stride": 2, "padding": 0}}
    model = build_encoder(tiny(last=last))
    plan = model.plan
    assert plan.stages[3].layout == "grid" and plan.stages[3].out_grid == (2, 2)
    assert plan.stages[2].carry["num_clusters"] == 8
    maps = model.forward_intermediates(torch.randn(2, 3, 32, 32), intermediates_only=True)
    assert [tuple(m.shape[1:]) for m in maps] == [(s.out_chs, *s.out_grid) for s in plan.stages]
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    init = [p for n, p in model.named_parameters() if n.startswith("stages.2.carry.")]
    assert init and all(p.grad is not None and p.grad.abs().sum() > 0 for p in init)
