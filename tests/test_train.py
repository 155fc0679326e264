"""``hfactory train`` / ``hfactory eval``: learning, exact resume, NaN stop, run-directory safety.

Uses a tiny hybrid (sepconv + attention, 16x16 input, ~36k parameters) so that every run takes
a second or two; the full example is exercised by benchmarks/train_digits.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from hfactory.cli import main  # noqa: E402
from hfactory.encoder import from_pretrained  # noqa: E402
from hfactory.io import spec_hash  # noqa: E402
from hfactory.spec.io import load_spec  # noqa: E402
from hfactory.train import TrainConfig  # noqa: E402
from hfactory.train import classify, loop  # noqa: E402
from hfactory.train.checkpoint import find_checkpoint  # noqa: E402
from hfactory.train.data import load_digits  # noqa: E402

TINY = """\
name: tiny_hybrid
img_size: 16
in_chans: 1
num_classes: 10
drop_path_rate: 0.1
defaults:
  feedforward: {kind: mlp, hidden_layer_multiplier: 2}
stages:
  - {embedding: 24, depth: 1, token_mixer: {kind: sepconv, kernel_size: 3},
     downsample: {kind: conv, patch_size: 3, stride: 2, padding: 1}}
  - {embedding: 48, depth: 1, token_mixer: attention, num_heads: 2, pos_embed: learned}
"""
FAST = ["--lr", "5e-3", "--batch-size", "32", "--no-progress"]
STEPS_PER_EPOCH = 45  # ceil(1437 / 32)


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "tiny.yaml"
    path.write_text(TINY, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tiny_spec, tmp_path_factory) -> Path:
    """One finished 4-epoch run shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", str(tiny_spec), "--out", str(out), "--epochs", "4", *FAST]) == 0
    return out


def _snapshot(directory: Path) -> dict:
    """Relative path -> bytes of every file below ``directory``."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_digits_split_is_fixed_and_normalised():
    data = load_digits((16, 16), in_chans=3)
    x, y = data.train.tensors
    assert x.shape == (1437, 3, 16, 16) and len(data.test) == 360
    assert torch.equal(x[:, 0], x[:, 2])  # grayscale replicated
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3  # train-set statistics
    assert torch.bincount(data.test.tensors[1]).min() >= 35  # stratified: ~36 per class
    assert torch.equal(load_digits((16, 16), 1).test.tensors[1], data.test.tensors[1])  # same split every time


def test_training_beats_chance_and_writes_the_run(trained):
    final = json.loads((trained / "metrics.json").read_text())
    assert final["test_accuracy"] > 0.5, final  # chance is 0.1
    assert final["epochs"] == 4 and final["steps"] == 4 * STEPS_PER_EPOCH
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4]
    assert set(lines[0]) == {"epoch", "step", "train_loss", "test_loss", "test_accuracy", "lr", "images_per_s",
                             "elapsed_s"}
    assert lines[-1]["test_accuracy"] == final["test_accuracy"]
    model = from_pretrained(trained / "model")
    assert model.spec.name == "tiny_hybrid" and model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_eval_reproduces_recorded_accuracy(trained, capsys):
    recorded = json.loads((trained / "metrics.json").read_text())["test_accuracy"]
    capsys.readouterr()
    assert main(["eval", str(trained)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["test_accuracy"] == recorded and result["images"] == 360
    assert main(["eval", str(trained / "model"), "--data", "digits"]) == 0  # a save_pretrained dir works too
    assert json.loads(capsys.readouterr().out.strip())["test_accuracy"] == recorded


def test_eval_refuses_weights_of_another_spec(trained, tmp_path, capsys):
    edited = tmp_path / "model"
    edited.mkdir()
    for name in ("model.safetensors", "spec.yaml"):
        (edited / name).write_bytes((trained / "model" / name).read_bytes())
    (edited / "spec.yaml").write_text((edited / "spec.yaml").read_text().replace("tiny_hybrid", "renamed"))
    assert main(["eval", str(edited)]) == 2
    assert "spec was changed after saving" in capsys.readouterr().err


def test_out_dir_of_another_spec_is_refused_untouched(trained, tmp_path, capsys):
    other = tmp_path / "other.yaml"
    other.write_text(TINY.replace("embedding: 48", "embedding: 64"), encoding="utf-8")
    before = _snapshot(trained)
    assert main(["train", str(other), "--out", str(trained), "--epochs", "1", *FAST]) == 2
    assert "another spec" in capsys.readouterr().err
    assert main(["train", str(other), "--out", str(trained), "--resume", *FAST]) == 2
    assert _snapshot(trained) == before


def test_same_spec_without_resume_is_refused(trained, tiny_spec, capsys):
    before = _snapshot(trained)
    assert main(["train", str(tiny_spec), "--out", str(trained), *FAST]) == 2
    assert "--resume" in capsys.readouterr().err
    assert _snapshot(trained) == before


def test_resume_matches_uninterrupted_run(tiny_spec, tmp_path):
    args = ["--epochs", "2", *FAST]
    assert main(["train", str(tiny_spec), "--out", str(tmp_path / "full"), *args]) == 0
    # Stop in the middle of epoch 2, then resume (with defaults only: the config comes from the run).
    stop = STEPS_PER_EPOCH + 7
    assert main(["train", str(tiny_spec), "--out", str(tmp_path / "split"), "--stop-at-step", str(stop), *args]) == 0
    state = torch.load(find_checkpoint(tmp_path / "split") / "state.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["step_in_epoch"]) == (1, stop, 7)
    assert not (tmp_path / "split" / "model").exists()
    assert main(["train", str(tiny_spec), "--out", str(tmp_path / "split"), "--resume", "--no-progress"]) == 0
    full = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    assert full.keys() == split.keys()
    for name in full:
        torch.testing.assert_close(split[name], full[name], rtol=0, atol=1e-6, msg=name)
    metrics = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("full", "split")]
    assert [json.loads(m)["test_accuracy"] for m in metrics[0]] == [json.loads(m)["test_accuracy"] for m in metrics[1]]
    # A resume may extend the run: the new --epochs and --lr govern the remaining steps.
    assert main(["train", str(tiny_spec), "--out", str(tmp_path / "split"), "--resume", "--epochs", "3",
                 "--lr", "1e-3", "--no-progress"]) == 0
    lines = [json.loads(m) for m in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3] and lines[-1]["step"] == 3 * STEPS_PER_EPOCH
    longer = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    assert any(not torch.equal(longer[k], full[k]) for k in full)  # it trained on (lr was not left at 0)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_spec, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_loss = torch.nn.CrossEntropyLoss

    class NaNAfterOneEpoch(real_loss):
        def forward(self, logits, target):
            calls["n"] += 1
            loss = super().forward(logits, target)
            return loss * float("nan") if calls["n"] > STEPS_PER_EPOCH + 3 else loss

    monkeypatch.setattr(classify.nn, "CrossEntropyLoss", NaNAfterOneEpoch)
    out = tmp_path / "nan"
    assert main(["train", str(tiny_spec), "--out", str(out), "--epochs", "3", *FAST]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "checkpoint" in err
    checkpoint = find_checkpoint(out)
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, STEPS_PER_EPOCH)  # the end of the last good epoch
    assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "model.safetensors")).values())
    assert not (out / "model").exists() and not (out / "metrics.json").exists()


@pytest.mark.parametrize("layout", ["missing", "no_val", "empty", "corrupt"])
def test_bad_data_dir_gives_clear_error(tiny_spec, tmp_path, capsys, layout):
    data = tmp_path / "data"
    if layout != "missing":
        (data / "train" / "cat").mkdir(parents=True)
    if layout in ("empty", "corrupt"):
        (data / "val" / "cat").mkdir(parents=True)
    if layout == "corrupt":
        for split in ("train", "val"):
            (data / split / "cat" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert main(["train", str(tiny_spec), "--data", str(data), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "Traceback" not in err
    assert not out.exists()  # nothing written before the data loads


def test_image_folder_training(tiny_spec, tmp_path):
    from reference_utils import write_image_folder

    write_image_folder(tmp_path / "data", labels=("dark", "light"), base={"dark": 40, "light": 200})
    spec = tmp_path / "two.yaml"
    spec.write_text(TINY.replace("num_classes: 10", "num_classes: 2"), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["train", str(spec), "--data", str(tmp_path / "data"), "--out", str(out), "--epochs", "1",
                 "--workers", "0", *FAST]) == 0
    assert json.loads((out / "metrics.json").read_text())["test_images"] == 4
    # A spec whose num_classes does not fit the data is refused with the fix in the message.
    assert main(["train", str(tiny_spec), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o2"),
                 *FAST]) == 2


def test_weight_decay_groups_follow_timm_rule(tiny_spec):
    from hfactory.encoder import build_encoder

    model = build_encoder(tiny_spec)
    decay, no_decay = loop.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    assert not decayed & model.no_weight_decay() and model.no_weight_decay()  # the learned pos_embed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_cosine_schedule():
    f = loop.WarmupCosine(warmup=10, total=110)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(10) == 1.0
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)


def test_config_is_validated(tiny_spec, tmp_path, capsys):
    assert main(["train", str(tiny_spec), "--out", str(tmp_path / "o"), "--lr", "-1", "--no-progress"]) == 2
    assert "--lr -1.0 is out of range; it must be > 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--epochs 0 is out of range; it must be >= 1"):
        TrainConfig(epochs=0).validate()
    assert main(["eval", str(tmp_path / "o"), "--batch-size", "0"]) == 2
    assert "--batch-size 0" in capsys.readouterr().err


def test_spec_hash_is_recorded(trained, tiny_spec):
    run = json.loads((trained / "run.json").read_text())
    assert run["spec_hash"] == spec_hash(load_spec(tiny_spec))


def test_global_batch_shares_cover_each_batch_once():
    from hfactory.train.distributed import DistContext, GlobalBatchSampler

    order = torch.randperm(23, generator=torch.Generator().manual_seed(0)).tolist()
    for world in (1, 2, 3, 5):
        samplers = [GlobalBatchSampler(order, 7, DistContext(rank, world)) for rank in range(world)]
        assert len({len(s) for s in samplers}) == 1 and len(samplers[0]) == 4  # same step count everywhere
        for step, batch in enumerate(samplers[0].global_batches()):
            shares = [list(s)[step] for s in samplers]
            assert sorted(sum(shares, [])) == sorted(batch)  # each sample of the global batch exactly once
            assert shares[0] == batch[0::world]  # DistributedSampler's rank-strided split


def test_shift_augmentation_of_shares_equals_one_process():
    """Each process draws the whole global batch's offsets and applies its own rows, so the
    augmented shares are exactly the rows of the one-process augmented batch."""
    from hfactory.train.distributed import DistContext, shard_positions

    x = torch.randn(11, 1, 16, 16)
    full = classify._random_shift(x, 2, torch.Generator().manual_seed(5), fill=-1.0)
    for world in (2, 3):
        for rank in range(world):
            rows = shard_positions(len(x), DistContext(rank, world))
            share = classify._random_shift(x[rows], 2, torch.Generator().manual_seed(5), -1.0, rows, len(x))
            assert torch.equal(share, full[rows])
    # and the default fill (the batch minimum) is the digits training set's minimum for every batch
    data = load_digits((16, 16), 1)
    images = data.train.tensors[0]
    assert torch.equal(images.amin(dim=(1, 2, 3)), images.min().expand(len(images)))


def test_set_changes_the_trained_spec_and_its_lineage_reaches_the_run(tiny_spec, tmp_path, capsys):
    out = tmp_path / "set"
    sets = ["--set", "stages.1.depth=2", "--set", "stages.*.feedforward.hidden_layer_multiplier=3"]
    assert main(["train", str(tiny_spec), "--out", str(out), *sets, "--epochs", "1", "--stop-at-step", "2",
                 *FAST]) == 0
    saved = load_spec(out / "checkpoint" / "spec.yaml")
    assert saved.stages[1].depth == 2 and saved.lineage.base == "tiny_hybrid"
    assert [s.changes for s in saved.lineage.steps] == [{"stages.1.depth": 2,
                                                        "stages.*.feedforward.hidden_layer_multiplier": 3}]
    assert spec_hash(saved) == json.loads((out / "run.json").read_text())["spec_hash"]
    capsys.readouterr()
    # the run is that variant: resuming it without the same --set is refused, with it it goes on
    assert main(["train", str(tiny_spec), "--out", str(out), "--resume", *FAST]) == 2
    assert "spec" in capsys.readouterr().err
    assert main(["train", str(tiny_spec), "--out", str(out), *sets, "--resume", *FAST]) == 0


def test_bf16_autocast_training_runs(tiny_spec, tmp_path):
    # The tiny spec's sepconv uses StarReLU, whose hand-written backward sees bf16 activations
    # and fp32 parameters under autocast (a regression: it once raised a dtype error there).
    out = tmp_path / "amp"
    assert main(["train", str(tiny_spec), "--out", str(out), "--amp", "--epochs", "1", "--stop-at-step", "3",
                 *FAST]) == 0
    from safetensors.torch import load_file

    weights = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert weights["stages.0.blocks.0.token_mixer.act1.scale"].dtype == torch.float32


def test_layer_decay_run_resumes_exactly_and_refuses_switching_it_off(tiny_spec, tmp_path, capsys):
    """Layer-wise LR decay (--layer-decay): the optimizer's per-layer groups and their lr scales
    survive the checkpoint, so a run stopped and resumed equals one that never stopped (compared at
    step 6 through the checkpoints); a resume that would change the groups (layer decay switched
    off) is refused with the fix."""
    from hfactory.train import checkpoint as ckpt

    args = ["--epochs", "1", "--layer-decay", "0.5", *FAST]
    assert main(["train", str(tiny_spec), "--out", str(tmp_path / "full"), "--stop-at-step", "6", *args]) == 0
    split = tmp_path / "split"
    assert main(["train", str(tiny_spec), "--out", str(split), "--stop-at-step", "3", *args]) == 0
    groups = torch.load(find_checkpoint(split) / "state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert sorted({g["lr_scale"] for g in groups}) == [0.5 ** 3, 0.5 ** 2, 0.5, 1.0]  # stem, 2 blocks, head
    for g in groups:
        assert g["initial_lr"] == pytest.approx(5e-3 * g["lr_scale"])

    # As if the run had started without layer decay: its checkpoint's groups do not fit; refused.
    recorded = (split / ckpt.RUN_FILE).read_text()
    run = json.loads(recorded)
    run["config"]["layer_decay"] = None
    (split / ckpt.RUN_FILE).write_text(json.dumps(run))
    capsys.readouterr()
    assert main(["train", str(tiny_spec), "--out", str(split), "--resume", "--stop-at-step", "6", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "parameter groups" in err and "--layer-decay" in err, err
    (split / ckpt.RUN_FILE).write_text(recorded)

    assert main(["train", str(tiny_spec), "--out", str(split), "--resume", "--stop-at-step", "6", "--no-progress"]) == 0
    full = load_file(str(find_checkpoint(tmp_path / "full") / "model.safetensors"))
    resumed = load_file(str(find_checkpoint(split) / "model.safetensors"))
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=1e-6, msg=name)
