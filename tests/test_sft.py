"""SFT (the thesis repo's iteratively refined hierarchical RAM): the plan's level arithmetic and
errors, level mechanics on grids of any rank, the cross-attention block against plain math, the
sweeps against a transcription of the thesis's activation bookkeeping (query mode / context mode,
``update_activations``), gradients, and a short digits run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hfactory import PlanError
from hfactory.sft import CrossBlock, build_sft, group_tokens, load_sft_spec, sincos_pos_embed, ungroup_tokens
from hfactory.spec.sft import resolve_sft

EXAMPLE = "examples/sft/digits.yaml"


def spec(**over):
    data = load_sft_spec(EXAMPLE).model_dump(mode="json", exclude_none=True)
    data.update(over)
    return load_sft_spec(data)


def test_plan_levels_match_the_thesis_base_config():
    # thesis configs/models/encoders/sft/imagenet/no_rec/base-4.yaml: 56^2 -> 32^2 -> 16^2 -> 8^2 -> 4^2
    base = load_sft_spec({
        "img_size": 224, "patch_size": 4, "embedding": 128, "levels": [
            {"group_size": 7, "queries": 4, "embedding": 256, "num_heads": 4, "forward_layers": [1, 1]},
            {"group_size": 8, "queries": 4, "embedding": 512, "num_heads": 8, "forward_layers": [1, 1]},
            {"group_size": 8, "queries": 4, "embedding": 1024, "num_heads": 16, "forward_layers": [16, 2]},
            {"group_size": 8, "queries": 4, "embedding": 1024, "num_heads": 32, "forward_layers": [1, 1]}]})
    plan = resolve_sft(base)
    assert [lv.grid for lv in plan.levels] == [(56, 56), (32, 32), (16, 16), (8, 8), (4, 4)]
    assert [lv.chs for lv in plan.levels] == [128, 256, 512, 1024, 1024]
    assert [t.groups for t in plan.transitions] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert [t.dim_head for t in plan.transitions] == [32, 32, 32, 32]  # codec at level i's width
    assert not plan.builds_backward  # n_passes 1: forward only, as the thesis builds no backward codecs


def test_plan_errors_name_the_field():
    with pytest.raises(PlanError, match="valid: 1, 2, 4, 8") as err:
        resolve_sft(spec(levels=[{"group_size": 3, "queries": 1, "embedding": 32, "num_heads": 2}]))
    assert err.value.loc == "levels.0.group_size"
    with pytest.raises(PlanError, match="widths may not shrink") as err:
        resolve_sft(spec(levels=[{"group_size": 4, "queries": 2, "embedding": 16, "num_heads": 2}]))
    assert err.value.loc == "levels.0.embedding"
    with pytest.raises(PlanError, match="does not divide level 0's width 32") as err:
        resolve_sft(spec(levels=[{"group_size": 4, "queries": 2, "embedding": 32, "num_heads": 3}]))
    assert err.value.loc == "levels.0.num_heads"
    with pytest.raises(PlanError, match="patch 3 does not divide"):
        resolve_sft(spec(patch_size=3))
    with pytest.raises(Exception, match="unknown key 'group'"):
        spec(levels=[{"group": 4, "queries": 2, "embedding": 32, "num_heads": 2}])


def test_huge_sizes_are_refused_before_anything_loops_over_them():
    import time

    start = time.process_time()
    with pytest.raises(PlanError, match="larger than 65536") as err:
        resolve_sft(spec(img_size=10**12))  # used to list the divisors of 10**12 / 4
    assert err.value.loc == "img_size"
    with pytest.raises(PlanError, match="larger than 65536") as err:
        resolve_sft(spec(levels=[{"group_size": 4, "queries": 10**9, "embedding": 32, "num_heads": 2}]))
    assert err.value.loc == "levels.0.queries"
    with pytest.raises(PlanError, match="attention blocks; at most 1024") as err:
        resolve_sft(spec(n_passes=5000))
    assert err.value.loc == "n_passes"
    assert time.process_time() - start < 2


@pytest.mark.parametrize("grid,group", [((12,), (4,)), ((4, 6), (2, 3)), ((2, 4, 6), (1, 2, 3))])
def test_level_mechanics_work_on_any_rank(grid, group):
    x = torch.arange(2 * math.prod(grid) * 3, dtype=torch.float32).reshape(2, *grid, 3)
    g = group_tokens(x, group)
    groups = tuple(n // s for n, s in zip(grid, group))
    assert g.shape == (2 * math.prod(groups), math.prod(group), 3)
    torch.testing.assert_close(ungroup_tokens(g, 2, groups, group), x)
    # the first group holds the first block of the grid
    first = x[(0, *(slice(0, s) for s in group))].reshape(-1, 3)
    torch.testing.assert_close(g[0], first)
    assert sincos_pos_embed(grid, 8).shape == (*grid, 8)


def test_cross_block_is_pre_norm_cross_attention():
    torch.manual_seed(0)
    blk = CrossBlock(8, 2, {"kind": "mlp", "dim": 8, "hidden_features": 16, "activation": "gelu", "bias": True,
                            "drop": 0.0}, {"kind": "layernorm", "dim": 8, "eps": 1e-5, "bias": True})
    x, ctx = torch.randn(3, 4, 8), torch.randn(3, 5, 8)
    with torch.no_grad():
        q = blk.to_q(F.layer_norm(x, (8,))).reshape(3, 4, 2, 4).transpose(1, 2)
        k, v = (t.reshape(3, 5, 2, 4).transpose(1, 2) for t in blk.to_kv(F.layer_norm(ctx, (8,))).chunk(2, -1))
        a = ((q @ k.transpose(-1, -2)) / 2).softmax(-1) @ v
        y = x + blk.proj(a.transpose(1, 2).reshape(3, 4, 8))
        want = y + blk.mlp.fc2(F.gelu(blk.mlp.fc1(F.layer_norm(y, (8,)))))
        torch.testing.assert_close(blk(x, ctx), want, rtol=1e-5, atol=1e-6)


def thesis_sweeps(model, x):
    """The thesis's SFTBackbone.update_activations bookkeeping, transcribed: activation ``i`` is in
    context mode (a grid) at the current position and in query mode (grouped tokens, at the
    codec's width) elsewhere; codec(i -> i+1) returns (new context, new query); the backward codec
    projects the coarse context first and leaves it, projected, in query mode. Returns the final
    context (the top level) after ``n_passes`` sweeps. Uses the model's blocks as black boxes."""
    h = model.stem(x).permute(0, 2, 3, 1)
    a = {0: h + sincos_pos_embed(tuple(h.shape[1:3]), h.shape[-1])}
    pos, stop, step = 0, len(model.codecs), 1
    b = x.shape[0]
    for p in range(model.plan.n_passes):
        for i in range(pos, stop, step):
            i1 = i + step
            j = min(i, i1)
            codec = model.codecs[j]
            t = model.plan.transitions[j]
            if step == 1:  # forward codec: context a[i] (grid), query a[i1] (query mode or None)
                ctx = group_tokens(a[i], t.group_size)
                for blk in codec.fwd_self:
                    ctx = blk(ctx)
                q = a.get(i1)
                if q is None:
                    q = codec.query.expand(ctx.shape[0], -1, -1)
                for blk in codec.fwd_cross:
                    q = blk(q, ctx)
                a[i1] = ungroup_tokens(codec.up(q), b, t.groups, t.queries)  # context mode
                a[i] = ctx  # query mode
            else:  # backward codec: context a[i] (coarse grid), query a[i1] (fine, query mode)
                ctx = codec.down(group_tokens(a[i], t.queries))
                q = a[i1]
                for blk in codec.bwd_cross:
                    q = blk(q, ctx)
                for blk in codec.bwd_self:
                    q = blk(q)
                a[i1] = ungroup_tokens(q, b, t.groups, t.group_size)  # context mode
                a[i] = ctx  # query mode, projected
        pos, stop = stop, pos
        step = -step
    return a[pos]


@pytest.mark.parametrize("n_passes", [1, 2, 3, 5])
def test_sweeps_match_the_thesis_bookkeeping(n_passes):
    torch.manual_seed(n_passes)
    model = build_sft(spec(n_passes=n_passes)).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        levels = model.forward_levels(x)
        want = thesis_sweeps(model, x)
    last = levels[0] if n_passes % 2 == 0 else levels[-1]  # where the last sweep ended, in context mode
    torch.testing.assert_close(last, want, rtol=1e-4, atol=1e-5)
    assert [tuple(t.shape[1:]) for t in levels] == [(*lv.grid, lv.chs) for lv in model.plan.levels]
    assert hasattr(model.codecs[0], "down") == (n_passes > 1)


def test_backbone_api_returns_every_level():
    model = build_sft(EXAMPLE).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        nhwc = model.forward_intermediates(x, indices=[-1], output_fmt="NHWC", intermediates_only=True)
        logits = model(x)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 8, 8), (2, 48, 4, 4), (2, 64, 2, 2)]
    torch.testing.assert_close(final, maps[-1])
    torch.testing.assert_close(nhwc[0], maps[-1].permute(0, 2, 3, 1))
    assert logits.shape == (2, 10)
    assert [f["reduction"] for f in model.feature_info] == [2, 4, 8]
    assert model.no_weight_decay() == {"codecs.0.query", "codecs.1.query"}
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)  # any size the groups divide
    with pytest.raises(PlanError, match="group_size"):
        model(torch.randn(1, 1, 20, 20))


@pytest.mark.parametrize("n_passes", [1, 2, 3])
def test_gradients_reach_every_parameter(n_passes):
    model = build_sft(spec(n_passes=n_passes))
    levels = model.forward_levels(torch.randn(2, 1, 16, 16))
    # every level is a feature: a loss on all of them reaches every codec part that ran
    loss = sum(t.square().mean() for t in levels) + model.forward_head(levels[-1].permute(0, 3, 1, 2)).sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def train_digits_sft() -> float:
    """Test accuracy of the SFT example after 4 one-thread epochs on digits (fixed seeds); also
    run by benchmarks/digits_short.py, which prints it."""
    from hfactory.train import evaluate
    from hfactory.train.data import load_digits
    from hfactory.train.loop import WarmupCosine, param_groups

    torch.manual_seed(0)
    model = build_sft(EXAMPLE)  # 3 passes: forward, backward, forward
    data = load_digits((16, 16), 1)
    x, y = data.train.tensors
    epochs, steps = 4, math.ceil(len(y) / 32)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(steps, epochs * steps))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine one thread is much faster than two
    try:
        gen = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=gen).split(32):
                loss = F.cross_entropy(model(x[idx]), y[idx], label_smoothing=0.1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        acc = evaluate(model, data.test)["test_accuracy"]
    finally:
        torch.set_num_threads(threads)
    return acc


def test_short_digits_training_beats_chance():
    pytest.importorskip("sklearn")
    assert train_digits_sft() > 0.5  # chance is 0.1; about 0.75 with this seed


def test_sft_spec_files_load_by_path_whatever_their_extension(tmp_path):
    from hfactory.sft import load_sft_spec

    src = Path(__file__).resolve().parents[1] / "examples" / "sft" / "digits.yaml"
    plain = tmp_path / "sft_spec"
    plain.write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    assert load_sft_spec(str(plain)) == load_sft_spec(str(src)) == load_sft_spec(src)
    with pytest.raises(ValueError, match="at least 'embedding' and 'levels'"):
        load_sft_spec("[1, 2]")


def test_an_sft_spec_given_where_encoder_specs_go_says_how_to_build_it(capsys):
    from hfactory import load_spec
    from hfactory.cli import main
    from hfactory.spec.io import SpecKindError

    with pytest.raises(SpecKindError, match=r"digits.yaml: this is an SFT spec .* hfactory.build\(spec\)"):
        load_spec(EXAMPLE)
    assert main(["sweep", EXAMPLE, "--grid", "n_passes=1,2"]) == 2  # sweep takes encoder specs only
    assert "this is an SFT spec (it has 'levels', not 'stages')" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"group_size \(2, 2\) must have one positive entry per grid axis, each "
                                         r"dividing the grid \(5, 5\)"):
        group_tokens(torch.zeros(1, 5, 5, 3), (2, 2))


def test_sft_through_the_cli_summary_train_eval(tmp_path, capsys):
    """hfactory summary / train / eval take SFT specs: the summary's parts add up to a count made
    without them, a short run beats chance clearly, eval of the saved model repeats its accuracy."""
    import json

    from torch.utils.flop_counter import FlopCounterMode

    from hfactory import attention_backend
    from hfactory.cli import main

    assert main(["summary", EXAMPLE, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    model = build_sft(EXAMPLE)
    assert summary["total"]["params"] == sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad(), attention_backend("math"):
        model(torch.zeros(1, 1, 16, 16))  # a real forward, attention as matmuls (the summary's definition)
    assert summary["total"]["gmacs"] == pytest.approx(counter.get_total_flops() / 2 / 1e9, rel=1e-6)
    # the codecs' own work is attributed to them (not left to the head's remainder)
    assert all(t["gmacs"] > 0 and t["activation_bytes"] > 0 for t in summary["transitions"])
    assert summary["head"]["gmacs"] < 0.01 * summary["total"]["gmacs"]
    assert [lv["tokens"] for lv in summary["levels"]] == [64, 16, 4]
    assert main(["summary", EXAMPLE]) == 0 and "codec 0->1" in capsys.readouterr().out

    out = tmp_path / "run"
    assert main(["train", EXAMPLE, "--epochs", "4", "--out", str(out), "--no-progress"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["test_accuracy"] > 0.5  # chance 0.1; 0.69 seen
    assert main(["eval", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == trained["test_accuracy"]

    assert main(["summary", EXAMPLE, "--set", "n_passes=1"]) == 2
    assert "--set changes encoder specs" in capsys.readouterr().err
    assert main(["sweep", EXAMPLE, "--grid", "n_passes=1,2"]) == 2
    assert "hfactory train, eval and summary take either" in capsys.readouterr().err


# -- the backbone API (issue 12): HierarchicalEncoder's methods with the same semantics --------

def _digits(n_passes=3, **over):
    torch.manual_seed(n_passes)
    return build_sft(spec(n_passes=n_passes, **over)).eval()


def test_reset_classifier_reheads_and_the_model_saves_and_reloads(tmp_path):
    from pydantic import ValidationError

    from hfactory.models import load

    model = _digits()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        top = model.forward_features(x)
    pooled = F.layer_norm(top.mean(dim=(2, 3)), (64,), model.norm.weight, model.norm.bias)  # mean, then the norm
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(top, pre_logits=True), pooled)
    assert model.get_classifier() is model.head and tuple(model.head.weight.shape) == (10, 64)
    assert model.num_features == model.head_hidden_size == model.feature_info[-1]["num_chs"] == 64
    assert model.in_chans == 1

    model.reset_classifier(5, global_pool="avg")
    assert model.spec.num_classes == model.plan.num_classes == model.num_classes == 5
    head = model.get_classifier()
    assert isinstance(head, torch.nn.Linear) and tuple(head.weight.shape) == (5, 64) and not head.bias.any()
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(model.forward_features(x), top)  # the body is untouched
        torch.testing.assert_close(logits, head(pooled))
    assert logits.shape == (2, 5)
    loaded = load(model.save_pretrained(tmp_path / "reheaded")).eval()
    assert loaded.spec == model.spec and loaded.num_classes == 5
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), logits)

    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity) and model.spec.num_classes == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), pooled)  # 0 classes: the pooled, normed features
    with pytest.raises(ValueError, match="valid: None \\(keep\\) or 'avg'"):
        model.reset_classifier(3, global_pool="max")
    with pytest.raises(ValidationError):
        model.reset_classifier(-1)
    assert model.spec.num_classes == 0 and isinstance(model.head, torch.nn.Identity)  # unchanged by the errors


@pytest.mark.parametrize("n_passes", [1, 2])
def test_grad_checkpointing_recomputes_steps_with_the_same_gradients(n_passes):
    model = _digits(n_passes).train()
    x = torch.randn(2, 1, 16, 16)

    def grads_and_saved():
        model.zero_grad(set_to_none=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            final, levels = model.forward_intermediates(x)
            loss = sum(t.square().mean() for t in levels) + model.forward_head(final).logsumexp(-1).sum()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)

    plain, saved_plain = grads_and_saved()
    assert not model.grad_checkpointing
    model.set_grad_checkpointing()
    assert model.grad_checkpointing
    ckpt, saved_ckpt = grads_and_saved()
    assert saved_ckpt < saved_plain / 2  # the steps' activations are not kept for backward
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-5, msg=name)
    with torch.no_grad():
        assert model(x).shape == (2, 10)  # no autograd: plain forward
    model.set_grad_checkpointing(False)
    assert not model.grad_checkpointing


@pytest.mark.parametrize("n_passes,layers,indices,kept_codecs", [
    (1, [1, 1], [0], 1),    # transition 0's self blocks refine level 0: it stays, level 1 too
    (1, [0, 1], [-2], 1),   # transition 1 has no self blocks: levels 0 and 1 are all that is left
    (1, [1, 1], 1, 2),      # the top level: nothing but the head goes
    (3, [1, 1], [0, 1], 2), # backward sweeps feed every level: nothing goes
])
def test_prune_intermediate_layers_keeps_the_requested_levels_exact(tmp_path, n_passes, layers, indices,
                                                                     kept_codecs):
    from hfactory.models import load
    from hfactory.sft import SFTEncoder

    levels = spec().model_dump(mode="json", exclude_none=True)["levels"]
    levels[1]["forward_layers"] = layers
    model = _digits(n_passes, levels=levels)
    x = torch.randn(2, 1, 16, 16)
    names = set(model.state_dict())
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
    take = model.prune_intermediate_layers(indices)
    assert take == {(0,): [0], (-2,): [1], 1: [2], (0, 1): [0, 1]}[tuple(indices) if isinstance(indices, list)
                                                                    else indices]
    with torch.no_grad():
        pruned = model.forward_intermediates(x, indices=take, intermediates_only=True)
    for i, got in zip(take, pruned):
        torch.testing.assert_close(got, full[i], rtol=0, atol=0)
    # what stays: the stem and the first kept_codecs codecs, with the norm only when the top level stays
    top_kept = kept_codecs == 2
    want = {n for n in names if n.startswith("stem.") or any(n.startswith(f"codecs.{i}.") for i in range(kept_codecs))
            or (top_kept and n.startswith("norm."))}
    assert set(model.state_dict()) == want
    assert len(model.codecs) == len(model.spec.levels) == len(model.plan.transitions) == kept_codecs
    assert model.spec.num_classes == 0 and isinstance(model.get_classifier(), torch.nn.Identity)
    assert model.plan == resolve_sft(model.spec)  # spec and plan stay true
    assert {k: v.shape for k, v in SFTEncoder(model.spec).state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    assert model.no_weight_decay() <= set(dict(model.named_parameters()))
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)  # pooled features of the kept top level
    loaded = load(model.save_pretrained(tmp_path / "pruned")).eval()
    with torch.no_grad():
        again = loaded.forward_intermediates(x, indices=take, intermediates_only=True)
    for i, got in zip(take, again):
        torch.testing.assert_close(got, full[i])


def test_prune_norm_and_bad_indices():
    model = _digits()
    with pytest.raises(ValueError, match="out of range for 3 stages"):
        model.prune_intermediate_layers([3])
    assert model.prune_intermediate_layers(prune_norm=True, prune_head=False) == [2]
    assert isinstance(model.norm, torch.nn.Identity) and model.spec.head_norm.kind == "identity"
    assert model.num_classes == 10 and len(model.plan.levels) == 3
    with torch.no_grad():
        assert model(torch.randn(1, 1, 16, 16)).shape == (1, 10)


@pytest.mark.parametrize("n_passes", [1, 2, 3])
def test_stop_early_returns_what_a_full_run_returns_and_skips_steps(n_passes):
    import re

    model = _digits(n_passes)
    x = torch.randn(2, 1, 16, 16)
    calls: dict = {}
    for name, module in model.named_modules():
        if re.fullmatch(r"codecs\.\d+\.(fwd|bwd)_(self|cross)\.\d+", name):  # one block
            module.register_forward_hook(lambda m, a, o, key=name.rsplit(".", 1)[0]: calls.update({key: 1}))
    with torch.no_grad():
        final, full = model.forward_intermediates(x)
        for indices in ([0], [1], [2], [0, 2], None):
            calls.clear()
            early_final, early = model.forward_intermediates(x, indices=indices, stop_early=True)
            take = list(range(3)) if indices is None else indices
            for i, got in zip(take, early):
                torch.testing.assert_close(got, full[i], rtol=0, atol=0)
            torch.testing.assert_close(early_final, full[max(take)])  # the last requested level
            ran = set(calls)
            if n_passes == 1 and take == [0]:  # level 0 is final after transition 0's forward step
                assert ran == {"codecs.0.fwd_self", "codecs.0.fwd_cross"}
            if n_passes == 2 and take == [2]:  # the top level is final before the backward sweep
                assert ran == {"codecs.0.fwd_self", "codecs.0.fwd_cross", "codecs.1.fwd_self", "codecs.1.fwd_cross"}
            if n_passes == 2 and take == [0]:  # the backward sweep ends at level 0: everything runs
                assert "codecs.0.bwd_self" in ran
        normed = model.forward_intermediates(x, indices=[2], norm=True, stop_early=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], model.norm(full[2].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        torch.testing.assert_close(final, full[-1])


@pytest.mark.parametrize("coarse", [False, True])
def test_group_matcher_puts_every_parameter_in_one_group(coarse):
    import re

    model = _digits(2)  # with backward codecs (down, bwd_cross, bwd_self)
    matcher = model.group_matcher(coarse=coarse)
    assert list(matcher) == ["stem", "blocks"]
    regexes = [matcher["stem"]] + ([matcher["blocks"]] if coarse else [r for r, _ in matcher["blocks"]])
    unmatched = {"head.weight", "head.bias"} | ({"norm.weight", "norm.bias"} if coarse else set())
    for name, _ in model.named_parameters():
        hits = [r for r in regexes if re.match(r, name)]
        assert len(hits) == (0 if name in unmatched else 1), (name, hits)
    # timm's grouping (layer-wise lr decay) of these regexes: the stem first, codec 0 before codec 1,
    # within a codec the forward parts before the backward ones, the head last
    timm_models = pytest.importorskip("timm.models")
    layer = timm_models.group_parameters(model, matcher, reverse=True)
    assert layer["stem.weight"] == 0 and layer["head.weight"] == max(layer.values())
    assert layer["codecs.0.bwd_self.0.mlp.fc1.weight"] < layer["codecs.1.fwd_self.0.mlp.fc1.weight"]
    if not coarse:
        assert (layer["codecs.0.fwd_self.0.mlp.fc1.weight"] < layer["codecs.0.query"]
                < layer["codecs.0.fwd_cross.0.mlp.fc1.weight"] < layer["codecs.0.up.1.weight"]
                < layer["codecs.0.down.1.weight"] < layer["codecs.0.bwd_cross.0.mlp.fc1.weight"]
                < layer["codecs.0.bwd_self.0.mlp.fc1.weight"])
        assert layer["norm.weight"] == layer["codecs.1.bwd_self.0.mlp.fc1.weight"]  # merged into the last block group
