"""Token sizes travel with the tokens (issue 12): merged-token sizes are arguments and return
values of the stages, blocks, mixers and head, never a global or context variable, so activation
checkpointing (which recomputes blocks in the backward pass, possibly on another thread) and a
separate ``forward_head(forward_features(x))`` see the sizes of their own forward.

The reference for every comparison is the same model without checkpointing in the thread that
built it (the behaviour the thesis repo has); gradients must agree parameter by parameter."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from hfactory import load_spec, resolve
from hfactory.encoder import build_encoder
from hfactory.errors import UsageError

from test_thesis import tiny

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ATT0_SOFT = {"kind": "att0", "assignment": "soft", "last_assignment": "soft"}


def two_geme():
    """Stages 2 and 3 both merge (64 -> 16 -> 4 tokens): the blocks of stage 2 need sizes (B, 16),
    those of stage 3 and the head (B, 4); two blocks per merged stage."""
    spec = tiny(last="geme").model_dump(mode="json", exclude_none=True)
    spec["stages"][2]["downsample"] = {"kind": "geme"}
    for s in spec["stages"][2:]:
        s["depth"] = 2
    return load_spec(spec)


def att0_soft():
    """att0 with a soft last assignment: it emits sizes (B, 4) for stage 3 and the head."""
    spec = tiny(last=ATT0_SOFT).model_dump(mode="json", exclude_none=True)
    spec["stages"][3]["depth"] = 2
    return load_spec(spec)


SPECS = {"geme-geme": two_geme, "att0-soft": att0_soft}


def test_the_specs_carry_sizes_where_this_file_assumes():
    plan = resolve(two_geme())
    assert [s.seq_len for s in plan.stages[2:]] == [16, 4]
    assert all(b.token_mixer.get("token_sizes") for s in plan.stages[2:] for b in s.blocks)
    assert plan.stages[3].downsample["token_sizes_in"] is True and plan.head["token_sizes"] is True
    plan = resolve(att0_soft())
    assert plan.stages[3].token_mixer["token_sizes"] and plan.head["token_sizes"] is True


def _model(make, device):
    torch.manual_seed(0)
    model = build_encoder(make()).to(device).train()  # drop_path_rate 0: the forward is deterministic
    for p in model.parameters():  # scales away from 1, so that any misrouted size would show
        if p.ndim == 1:
            p.data.add_(0.1 * torch.randn_like(p))
    return model


def _batch(device):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=g).to(device), torch.tensor([3, 7], device=device)


def _loss_and_grads(model, x, labels, checkpointing, backward_in_thread=False):
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(checkpointing)
    loss = F.cross_entropy(model(x), labels)
    if backward_in_thread:
        errors = []

        def run():
            try:
                loss.backward()
            except BaseException as err:  # noqa: BLE001 - handed to the test thread
                errors.append(err)

        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
        if errors:
            raise errors[0]
    else:
        loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, want):
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(SPECS))
def test_checkpointing_gives_the_same_loss_and_gradients(name, device):
    model = _model(SPECS[name], device)
    x, labels = _batch(device)
    want = _loss_and_grads(model, x, labels, checkpointing=False)
    assert any("stages.3.blocks" in n for n in want[1])  # the blocks that read sizes are trained
    got = _loss_and_grads(model, x, labels, checkpointing=True)
    assert model.grad_checkpointing
    _assert_same(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(SPECS))
def test_checkpointed_backward_in_another_thread(name, device):
    # The recomputation runs where the backward runs: here a thread that never ran a forward
    # (as autograd's own device threads on CUDA).
    model = _model(SPECS[name], device)
    x, labels = _batch(device)
    want = _loss_and_grads(model, x, labels, checkpointing=False)
    _assert_same(_loss_and_grads(model, x, labels, checkpointing=True, backward_in_thread=True), want)


def test_forward_in_another_thread_than_the_one_that_built_the_model():
    model = _model(two_geme, "cpu")
    x, labels = _batch("cpu")
    want = _loss_and_grads(model, x, labels, checkpointing=True)
    out = []
    worker = threading.Thread(target=lambda: out.append(_loss_and_grads(model, x, labels, checkpointing=True)))
    worker.start()
    worker.join()
    assert out, "the forward in the worker thread raised"
    _assert_same(out[0], want)


def test_forward_head_of_forward_features_equals_forward():
    model = _model(two_geme, "cpu").eval()
    x, _ = _batch("cpu")
    with torch.no_grad():
        logits = model(x)
        final = model.forward_features(x)
        sizes = model.last_token_sizes  # recorded by forward_features on this instance
        torch.testing.assert_close(model.forward_head(final), logits, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(final, token_sizes=sizes), logits, rtol=0, atol=0)
        # the sizes matter: merged tokens stand for different numbers of input tokens
        assert sizes.shape == (2, 4) and torch.equal(sizes.sum(-1), torch.full((2,), 64.0))
        assert not torch.allclose(model.forward_head(final, token_sizes=torch.ones_like(sizes)), logits)
        # a forward between them does not disturb the recorded sizes
        model(torch.randn(2, 3, 32, 32))
        torch.testing.assert_close(model.forward_head(final), logits, rtol=0, atol=0)
        # forward_intermediates records the sizes of its final map too (timm's usage)
        final2, maps = model.forward_intermediates(x)
        torch.testing.assert_close(model.forward_head(final2), logits, rtol=0, atol=0)
    assert tuple(maps[2].shape) == (2, 32, 16, 1) and tuple(maps[3].shape) == (2, 48, 4, 1)


def test_forward_head_refuses_sizes_that_do_not_fit():
    model = _model(two_geme, "cpu").eval()
    x, _ = _batch("cpu")
    with torch.no_grad():
        final = model.forward_features(x)
        with pytest.raises(UsageError, match=r"\(token_sizes\) got token sizes of shape \(2, 5\) for 2 x 4 tokens"):
            model.forward_head(final, token_sizes=torch.ones(2, 5))
        with pytest.raises(ValueError, match=r"shape \(4,\)"):
            model.forward_head(final, token_sizes=torch.ones(4))
        # recorded sizes of another batch (forward_features of 3 images, then the head on 2)
        model.forward_features(torch.randn(3, 3, 32, 32))
        with pytest.raises(UsageError, match="recorded by the last forward_features call"):
            model.forward_head(final)
        # a fresh model has recorded nothing
        fresh = _model(two_geme, "cpu").eval()
        with pytest.raises(UsageError, match="got none"):
            fresh.forward_head(final)


def test_a_stage_returns_the_sizes_of_its_own_tokens():
    model = _model(two_geme, "cpu").eval()
    x, _ = _batch("cpu")
    with torch.no_grad():
        t, sizes = x.permute(0, 2, 3, 1), None
        seen = []
        for stage in model.stages:
            t, sizes = stage(t, sizes)
            seen.append(None if sizes is None else tuple(sizes.shape))
        # a stage given sizes it cannot use refuses them (geme after geme)
        with pytest.raises(UsageError, match=r"merging downsampler.*got none"):
            model.stages[3](model.stages[2](*model.stages[1](*model.stages[0](x.permute(0, 2, 3, 1))))[0])
        model.forward_features(x)
    assert seen == [None, None, (2, 16), (2, 4)]
    torch.testing.assert_close(sizes, model.last_token_sizes)


def test_models_without_merging_pass_no_sizes():
    model = build_encoder(tiny()).eval()
    x, _ = _batch("cpu")
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits)
    assert model.last_token_sizes is None and not model.head.takes_token_sizes
    assert not any(getattr(b, "takes_token_sizes", False) for s in model.stages for b in s.blocks)


def test_sizes_pass_through_a_downsampler_that_keeps_the_tokens():
    spec = tiny(last="geme").model_dump(mode="json", exclude_none=True)
    spec["stages"].append({"embedding": 48, "depth": 1, "downsample": {"kind": "none"},
                           "token_mixer": {"kind": "attention"}})
    plan = resolve(load_spec(spec))
    assert plan.stages[4].token_mixer["token_sizes"] and plan.head["token_sizes"]
    model = _model(lambda: load_spec(spec), "cpu")
    x, labels = _batch("cpu")
    with torch.no_grad():
        t, sizes = x.permute(0, 2, 3, 1), None
        for stage in model.stages[:4]:
            t, sizes = stage(t, sizes)
        assert torch.equal(model.stages[4](t, sizes)[1], sizes)  # the tokens did not change: nor their sizes
    want = _loss_and_grads(model, x, labels, checkpointing=False)
    _assert_same(_loss_and_grads(model, x, labels, checkpointing=True), want)


def test_a_max_pool_head_needs_no_sizes():
    model = _model(two_geme, "cpu").eval()
    model.reset_classifier(10, global_pool="max")
    x, _ = _batch("cpu")
    with torch.no_grad():
        final = model.forward_features(x)
        fresh = _model(two_geme, "cpu").eval()
        fresh.load_state_dict(model.state_dict())
        fresh.reset_classifier(10, global_pool="max")
        fresh.head.fc.load_state_dict(model.head.fc.state_dict())
        torch.testing.assert_close(fresh.forward_head(final), model(x))  # nothing recorded, nothing needed
