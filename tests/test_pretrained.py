"""Pretrained weights (issue 14): ``create_model(name, pretrained=...)`` through timm's own download
and cache, local files of every format, the Hugging Face Hub (``hf-hub:`` loading, the folder
``push_to_hub`` uploads), classifier reset, refusals that leave the model untouched, the
evaluation transform of a pretrained config, layer-wise learning-rate decay, and fine-tuning from
the command line.

Nothing here touches the network: timm's and huggingface_hub's machinery run for real against a
Hugging Face cache that each test lays out under ``tmp_path`` (``models--<org>--<name>/snapshots/
<revision>/<file>`` + ``refs/main``), with ``HF_HUB_OFFLINE`` set, and the weights in it are
randomised timm models' state dicts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
hub_constants = pytest.importorskip("huggingface_hub.constants")

from reference_utils import assert_rel_close, randomize_, write_image_folder  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import hfactory  # noqa: E402
from hfactory.cli import main  # noqa: E402
from hfactory.errors import UsageError  # noqa: E402
from hfactory.presets import load_preset, presets_with_weights, timm_weights  # noqa: E402
from hfactory.pretrained import load_weights, model_card, push_to_hub, save_for_hub  # noqa: E402

REVISION = "0123456789abcdef0123456789abcdef01234567"

TINY = """\
name: tiny_pretrained
img_size: 32
num_classes: 3
defaults:
  feedforward: {kind: mlp, hidden_layer_multiplier: 2}
stages:
  - {embedding: 16, depth: 2, token_mixer: {kind: sepconv, kernel_size: 3}, pos_embed: learned,
     downsample: {kind: conv, patch_size: 4, stride: 4}}
  - {embedding: 32, depth: 1, token_mixer: attention, num_heads: 2}
"""


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache under tmp_path, offline: huggingface_hub reads its settings at
    import time into ``huggingface_hub.constants``, so they are set there (and in the environment,
    for anything imported later)."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def put_in_cache(cache: Path, repo_id: str, files: dict[str, Path | dict]) -> Path:
    """Lay ``files`` (name -> a file to copy, or a state dict to save as safetensors) out as the
    Hugging Face cache holds a model repository at revision ``main``; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, dict):
            save_file({k: v.contiguous() for k, v in content.items()}, str(snapshot / name))
        else:
            (snapshot / name).write_bytes(Path(content).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def cache_timm_twin(cache: Path, weights: str, **kwargs) -> torch.nn.Module:
    """A randomised timm model of ``weights`` (``arch[.tag]``) whose state dict sits in the cache
    where timm's pretrained config for those weights points (``hf_hub_id``)."""
    cfg = timm.models.get_pretrained_cfg(weights)
    model = randomize_(timm.create_model(weights.split(".")[0], pretrained=False, num_classes=cfg.num_classes,
                                         **kwargs)).eval()
    put_in_cache(cache, cfg.hf_hub_id, {"model.safetensors": model.state_dict()})
    return model


def state_copy(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


# -- timm twins through timm's download and cache -------------------------------------------------
def test_caformer_s18_pretrained_equals_its_timm_twin(hf_cache, caplog):
    twin = cache_timm_twin(hf_cache, timm_weights("caformer_s18"))
    model = hfactory.create_model("caformer_s18", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)  # no position tables: a small input keeps the test fast
    with torch.no_grad():
        assert_rel_close(model(x), twin(x), 1e-4, "caformer_s18 logits")
    cfg = timm.models.get_pretrained_cfg("caformer_s18").to_dict()
    assert {k: model.pretrained_cfg[k] for k in ("mean", "std", "crop_pct", "interpolation")} == \
        {k: cfg[k] for k in ("mean", "std", "crop_pct", "interpolation")}

    # Another class count: the classifier layer (head.fc.fc2 of the MLP head) is new, the rest loads.
    with caplog.at_level(logging.WARNING, logger="hfactory.pretrained"):
        ten = hfactory.create_model("caformer_s18", pretrained=True, num_classes=10).eval()
    assert "head.fc.fc2 reset" in caplog.text and "1000 classes" in caplog.text, caplog.text
    assert ten.head.fc.fc2.weight.shape == (10, 2048)
    torch.testing.assert_close(ten.head.fc.fc1.weight, twin.head.fc.fc1.weight, rtol=0, atol=0)
    with torch.no_grad():
        assert_rel_close(ten.forward_features(x), model.forward_features(x), 1e-6, "features")


def test_hiera_tiny_224_pretrained_equals_its_timm_twin_and_resizes(hf_cache, tmp_path):
    weights = timm_weights("hiera_tiny_224")
    twin = cache_timm_twin(hf_cache, weights)
    model = hfactory.create_model("hiera_tiny_224", pretrained=True).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = twin(x)
        assert_rel_close(model(x), ref, 1e-4, "hiera_tiny_224 logits")
    assert model.pretrained_cfg["crop_pct"] == timm.models.get_pretrained_cfg(weights).crop_pct == 0.9

    # The same weights as the official hiera package's checkpoint file ({"model_state": ...} with its
    # own head names), read from a local path.
    official = {("head.projection." + k[len("head.fc."):] if k.startswith("head.fc.") else
                 "norm." + k[len("head.norm."):] if k.startswith("head.norm.") else k): v
                for k, v in twin.state_dict().items()}
    torch.save({"model_state": official, "epoch": 7}, tmp_path / "hiera_tiny_224.pth")
    randomize_(model, seed=1)  # forget the weights, then read them back from the file
    report = load_weights(model, tmp_path / "hiera_tiny_224.pth")
    assert report["format"] == "official hiera package hiera" and report["classifier"] is None
    with torch.no_grad():
        assert_rel_close(model(x), ref, 1e-4, "official-format checkpoint")

    # Another image size: the position embedding is resized as timm resizes one
    # (layers.resample_abs_pos_embed), the rest is unchanged.
    big = hfactory.create_model("hiera_tiny_224", pretrained=True, img_size=256)
    pos = big.stages[0].pos_embed.pos_embed
    assert pos.shape == (1, 64, 64, 96)
    expected = timm.layers.resample_abs_pos_embed(twin.pos_embed.detach(), new_size=(64, 64), num_prefix_tokens=0)
    torch.testing.assert_close(pos.detach(), expected.reshape(1, 64, 64, 96), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(big.stages[2].blocks[0].token_mixer.qkv.weight, twin.blocks[3].attn.qkv.weight,
                               rtol=0, atol=0)


def test_mae_preset_takes_timms_mae_pretrained_hiera_encoder(hf_cache):
    """mae_hiera_tiny_224 (Hiera-T without pooling into its last stage) loads timm's
    hiera_tiny_224.mae: stages 0-2, where the two architectures agree, give timm's maps."""
    twin = cache_timm_twin(hf_cache, "hiera_tiny_224.mae")
    model = hfactory.create_model("mae_hiera_tiny_224", pretrained=True).eval()
    assert model.num_classes == 0
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = model.forward_intermediates(x, indices=[0, 1, 2], intermediates_only=True, stop_early=True)
        theirs = twin.forward_intermediates(x, indices=[0, 1, 2], intermediates_only=True, stop_early=True)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_rel_close(a, b, 1e-4, f"stage {i}")


def test_timm_weights_repository_on_the_hub_loads_without_a_spec(hf_cache):
    """hf-hub:timm/<weights> holds timm's weights alone (no spec.yaml): they load into a preset."""
    twin = cache_timm_twin(hf_cache, "poolformer_s12")
    repo = timm.models.get_pretrained_cfg("poolformer_s12").hf_hub_id
    model = hfactory.create_model("poolformer_s12", pretrained=f"hf-hub:{repo}").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_rel_close(model(x), twin(x), 1e-4, "poolformer_s12 from hf-hub:timm/...")


def test_weights_missing_from_the_offline_cache_are_a_clear_error(hf_cache):
    with pytest.raises(FileNotFoundError, match=r"timm weights caformer_s18\.sail_in1k.*not in the cache.*"
                                                r"HF_HUB_OFFLINE"):
        hfactory.create_model("caformer_s18", pretrained=True)
    with pytest.raises(UsageError, match="timm has no pretrained weights 'caformer_s18.nonsense'; it has: "
                                         "caformer_s18.sail_in1k"):
        hfactory.create_model("caformer_s18.nonsense", pretrained=True)
    with pytest.raises(UsageError, match="selects timm weights"):
        hfactory.create_model("caformer_s18.sail_in1k")


def test_preset_without_weights_names_the_presets_with_weights():
    with pytest.raises(UsageError) as err:
        hfactory.create_model("hvt_s_1", pretrained=True)
    message = str(err.value)
    assert "'hvt_s_1' has no pretrained weights" in message
    with_weights = presets_with_weights()
    assert {"caformer_s18", "hiera_tiny_224", "mae_hiera_tiny_224", "swin_tiny_patch4_window7_224"} <= set(with_weights)
    assert not any(p.startswith("hvt") for p in with_weights)
    for name in with_weights:
        assert name in message


def test_weights_table_agrees_with_the_timm_twins():
    """Every preset with a timm twin loads that twin's weights; every entry names timm weights."""
    twins = pytest.importorskip("hfactory.timm").TIMM_TWINS
    for preset in hfactory.list_models():
        weights = timm_weights(preset)
        if preset in twins and timm.models.is_model_pretrained(twins[preset]):
            assert weights == twins[preset]
        if weights is not None:
            assert timm.models.get_pretrained_cfg(weights) is not None, weights
    assert timm_weights("mae_hiera_tiny_224") == "hiera_tiny_224.mae"


# -- local files ----------------------------------------------------------------------------------
def test_another_architecture_is_refused_and_nothing_is_loaded(tmp_path):
    other = randomize_(timm.create_model("poolformer_s12", pretrained=False))
    torch.save({"state_dict": other.state_dict()}, tmp_path / "poolformer_s12.pth")
    model = hfactory.create_model("poolformerv2_s12")
    before = state_copy(model)
    for num_classes_kw in ({}, {"adopt_num_classes": True}):
        with pytest.raises(UsageError) as err:
            load_weights(model, tmp_path / "poolformer_s12.pth", **num_classes_kw)
        message = str(err.value)
        assert "does not fit this model (poolformerv2_s12); nothing was loaded" in message
        assert "as metaformer weights" in message and "missing: " in message
        assert "stages.0.blocks.0.mlp.act.scale" in message  # StarReLU's scale: v2 has it, v1 does not
        assert_state_equal(model, before)
    assert model.num_classes == 1000


def test_hfactory_saves_and_unknown_files(tmp_path):
    model = hfactory.build(TINY)
    randomize_(model)
    model.save_pretrained(tmp_path / "saved")
    spec = hfactory.load_spec(TINY)
    for source in (tmp_path / "saved", tmp_path / "saved" / "model.safetensors"):
        fresh = hfactory.build(spec)
        report = load_weights(fresh, source)
        assert report["format"] == "hfactory" and report["classifier"] is None
        assert_state_equal(fresh, model.state_dict())

    # An hfactory save of another spec is refused with the mismatch report.
    wider = hfactory.build(TINY.replace("embedding: 32", "embedding: 64"))
    before = state_copy(wider)
    with pytest.raises(UsageError, match=r"shape mismatch: stages\.1\.downsample"):
        load_weights(wider, tmp_path / "saved")
    assert_state_equal(wider, before)

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match=r"junk\.pth: not a readable weights file"):
        load_weights(wider, tmp_path / "junk.pth")
    torch.save({"epoch": 3}, tmp_path / "nostate.pth")
    with pytest.raises(UsageError, match="not a state dict.*keys epoch"):
        load_weights(wider, tmp_path / "nostate.pth")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_weights(wider, tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="looked for an hfactory save"):
        load_weights(wider, tmp_path / "empty")


def test_official_hiera_mae_checkpoint_loads_into_the_mae_preset_encoder(tmp_path):
    hiera = pytest.importorskip("hiera")
    mae = randomize_(hiera.mae_hiera_tiny_224(pretrained=False))
    torch.save({"model_state": mae.state_dict()}, tmp_path / "mae_hiera_tiny_224.pth")
    model = hfactory.create_model("mae_hiera_tiny_224", pretrained=tmp_path / "mae_hiera_tiny_224.pth")
    assert model.num_classes == 0
    torch.testing.assert_close(model.stages[0].downsample.conv.weight, mae.patch_embed.proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.norm.weight, mae.encoder_norm.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.stages[3].blocks[1].token_mixer.qkv.weight, mae.blocks[11].attn.qkv.weight,
                               rtol=0, atol=0)


# -- the Hub --------------------------------------------------------------------------------------
def test_hub_folder_card_and_loading_from_the_cache(hf_cache, tmp_path):
    from hfactory.summary import format_summary, summarize

    model = randomize_(hfactory.build(TINY)).eval()
    folder = save_for_hub(model, tmp_path / "repo", "my-org/tiny")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model.safetensors", "spec.yaml"]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: hfactory\n")
    assert format_summary(summarize(model.spec)).rstrip() in card
    assert "hfactory.from_pretrained('hf-hub:my-org/tiny')" in card

    put_in_cache(hf_cache, "my-org/tiny", {p.name: p for p in folder.iterdir()})
    loaded = hfactory.from_pretrained("hf-hub:my-org/tiny").eval()
    assert loaded.spec == model.spec
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # The same repository as a weight source for a built model (a new classifier for 5 classes).
    five = hfactory.build(TINY.replace("num_classes: 3", "num_classes: 5"))
    report = load_weights(five, "hf-hub:my-org/tiny", log=False)
    assert report["num_classes"] == 3 and "classifier head.fc reset" in report["classifier"]
    torch.testing.assert_close(five.stages[1].blocks[0].token_mixer.qkv.weight,
                               model.stages[1].blocks[0].token_mixer.qkv.weight, rtol=0, atol=0)

    with pytest.raises(FileNotFoundError, match="hf-hub:my-org/absent: spec.yaml could not be read.*offline mode"):
        hfactory.from_pretrained("hf-hub:my-org/absent")
    with pytest.raises(UsageError, match="expected hf-hub:ORG/NAME"):
        hfactory.from_pretrained("hf-hub:no-slash")


def test_push_to_hub_uploads_the_folder_save_for_hub_writes(monkeypatch, tmp_path):
    """The upload itself needs the network: the two HfApi calls are replaced by recorders (the
    loading side is tested for real above); they see exactly save_for_hub's files."""
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        calls.append(("upload_folder", repo_id, files, kwargs))
        return "https://huggingface.co/my-org/tiny/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = hfactory.build(TINY)
    assert push_to_hub(model, "my-org/tiny", private=True) == "https://huggingface.co/my-org/tiny/commit/abc"
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][2]["exist_ok"] and calls[0][2]["private"]
    uploaded = calls[1][2]
    assert sorted(uploaded) == ["README.md", "model.safetensors", "spec.yaml"]
    assert uploaded["README.md"].decode() == model_card(model, "my-org/tiny")
    expected = save_for_hub(model, tmp_path / "same", "my-org/tiny")
    assert uploaded["spec.yaml"] == (expected / "spec.yaml").read_bytes()
    with pytest.raises(UsageError, match="expected ORG/NAME"):
        push_to_hub(model, "no-org")


# -- preprocessing and layer-wise learning-rate decay ---------------------------------------------
@pytest.mark.parametrize("weights", ["hiera_tiny_224", "caformer_s18"])
def test_eval_transform_follows_the_pretrained_config_as_timm(weights):
    from PIL import Image

    from hfactory.pretrained import timm_preprocessing
    from hfactory.train.data import image_transform

    cfg = timm.data.resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(weights).to_dict())
    reference = timm.data.create_transform(**cfg, is_training=False)
    ours = image_transform((224, 224), 3, train=False, preprocess=timm_preprocessing(weights))
    gen = torch.Generator().manual_seed(0)
    image = Image.fromarray(torch.randint(0, 255, (300, 400, 3), generator=gen).to(torch.uint8).numpy())
    torch.testing.assert_close(ours(image), reference(image), rtol=0, atol=0)


SMALL = """\
name: small_lrd
img_size: 16
num_classes: 4
defaults:
  feedforward: {kind: mlp, hidden_layer_multiplier: 2}
stages:
  - {embedding: 8, depth: 2, token_mixer: attention, num_heads: 1, pos_embed: learned,
     downsample: {kind: conv, patch_size: 4, stride: 4}}
  - {embedding: 16, depth: 1, token_mixer: attention, num_heads: 1}
"""


def test_layer_decay_scales_each_layer_as_mae_and_hiera_fine_tune():
    """Three blocks: stem layer 0, blocks 1-3, head 4 (= num_layers + 1); scale decay^(4 - id).
    Stage 1's downsampler trains with stage 1's first block, the final norm with the last block."""
    from hfactory.train.loop import param_groups

    model = hfactory.build(SMALL)
    d = 0.5
    expected = {"stages.0.downsample": d ** 4, "stages.0.pos_embed": d ** 4, "stages.0.blocks.0": d ** 3,
                "stages.0.blocks.1": d ** 2, "stages.1.downsample": d ** 1, "stages.1.blocks.0": d ** 1,
                "norm": d ** 1, "head": 1.0}
    groups = param_groups(model, 0.05, layer_decay=d, lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            prefix = next(k for k in expected if name.startswith(k + "."))
            assert group["lr_scale"] == pytest.approx(expected[prefix]), name
            assert group["lr"] == pytest.approx(1e-3 * expected[prefix]), name
            assert group["weight_decay"] == (0.05 if p.ndim >= 2 and name not in model.no_weight_decay() else 0.0)
            seen.add(name)
    assert seen == set(names.values())
    assert {p for n, p in model.named_parameters() if n.startswith("stages.1.downsample")}  # it has weights

    # timm's own implementation (optim.param_groups_layer_decay) reads the model the same way.
    from timm.optim import param_groups_layer_decay

    theirs = {names[id(p)]: g["lr_scale"] for g in param_groups_layer_decay(model, 0.05, model.no_weight_decay(),
                                                                           layer_decay=d) for p in g["params"]}
    ours = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert ours == pytest.approx(theirs)
    with pytest.raises(UsageError, match=r"in \(0, 1\]"):
        param_groups(model, 0.05, layer_decay=1.5)


# -- fine-tuning from the command line ------------------------------------------------------------
SMALL_CAFORMER = ["--set", "stages.*.depth=1", "--set", "stages.0.embedding=16", "--set", "stages.1.embedding=32",
                  "--set", "stages.2.embedding=64", "--set", "stages.3.embedding=128", "--set", "img_size=32"]


def test_cli_fine_tunes_a_preset_from_a_local_timm_file(tmp_path, capsys):
    """hfactory train caformer_s18 (made small with --set) --pretrained FILE on a 2-class ImageFolder:
    the classifier follows the data (message), everything else starts from the file (checked
    after one epoch at a negligible learning rate), the layer-decayed groups reach the optimizer."""
    from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv

    # timm's caformer_s18 (timm/models/metaformer.py) with the depths and widths of the --set below
    twin = randomize_(MetaFormer(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128),
                                 token_mixers=[SepConv, SepConv, Attention, Attention],
                                 norm_layers=[LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2))
    save_file({k: v.contiguous() for k, v in twin.state_dict().items()}, str(tmp_path / "small.safetensors"))
    write_image_folder(tmp_path / "data")
    common = ["train", "caformer_s18", *SMALL_CAFORMER, "--data", str(tmp_path / "data"), "--epochs", "1",
              "--batch-size", "4", "--workers", "0", "--no-progress"]

    # Without --pretrained a class-count mismatch is refused, naming the flag that fixes it.
    status = main([*common, "--out", str(tmp_path / "scratch")])
    err = capsys.readouterr().err
    assert status == 2 and "--set num_classes=2" in err, err

    out = tmp_path / "run"
    assert main([*common, "--out", str(out), "--pretrained", str(tmp_path / "small.safetensors"),
                 "--lr", "1e-12", "--layer-decay", "0.75"]) == 0
    printed = capsys.readouterr().out
    assert "num_classes 1000 -> 2" in printed, printed
    assert "classifier head.fc.fc2 reset" in printed and "1000 classes" in printed, printed
    trained = load_file(str(out / "model" / "model.safetensors"))
    assert trained["head.fc.fc2.weight"].shape == (2, 512)
    for ours, theirs in (("stages.0.downsample.conv.weight", "stem.conv.weight"),
                         ("stages.2.blocks.0.token_mixer.qkv.weight", "stages.2.blocks.0.token_mixer.qkv.weight"),
                         ("head.fc.fc1.weight", "head.fc.fc1.weight")):
        torch.testing.assert_close(trained[ours], twin.state_dict()[theirs], rtol=0, atol=1e-6)
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["pretrained"] == str(tmp_path / "small.safetensors") and config["layer_decay"] == 0.75
    # hfactory eval reads the images as the run did (the twin's crop_pct 1.0, bicubic): the same loss
    recorded = json.loads((out / "metrics.json").read_text())
    assert main(["eval", str(out), "--workers", "0"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["test_loss"] == pytest.approx(recorded["test_loss"], rel=1e-6)
    from hfactory.train.checkpoint import find_checkpoint

    state = torch.load(find_checkpoint(out) / "state.pt", weights_only=True)
    scales = sorted({g["lr_scale"] for g in state["optimizer"]["param_groups"]})
    assert scales == pytest.approx([0.75 ** k for k in range(5, -1, -1)])  # stem, 4 blocks, head


def test_fine_tuning_preprocessing_and_spec_follow_the_weights(tmp_path):
    """--pretrained without a path takes the preset's timm weights' preprocessing; the spec's
    num_classes becomes the data's the way --set would (so a resume with either finds the run)."""
    from hfactory.train import TrainConfig
    from hfactory.train.classify import ClassificationTask

    write_image_folder(tmp_path / "data", labels=("a", "b", "c"))
    task = ClassificationTask(load_preset("hiera_tiny_224"), TrainConfig(data=str(tmp_path / "data"), pretrained=True))
    assert task.source == "timm:hiera_tiny_224"
    assert task.preprocess["crop_pct"] == 0.9 and task.preprocess["interpolation"] == "bicubic"
    assert task.spec == load_preset("hiera_tiny_224").with_changes({"num_classes": 3})
    assert "num_classes 1000 -> 3" in task.messages[0]
    with pytest.raises(UsageError, match="no preset with weights"):
        ClassificationTask(load_preset("hvt_s_1"), TrainConfig(data=str(tmp_path / "data"), pretrained=True))
    with pytest.raises(UsageError, match="--pretrained and --init-from"):
        ClassificationTask(load_preset("hiera_tiny_224"), TrainConfig(data=str(tmp_path / "data"), pretrained=True),
                           init_from=tmp_path)


def test_sam2_checkpoint_trunk_loads_into_the_sam2_preset(tmp_path):
    """A SAM2 release checkpoint ({"model": ...}, the trunk under image_encoder.trunk. with
    mlp.layers.N, no final norm, other parts beside it) loads its trunk; made here from timm's
    HieraDet with the renames timm's hieradet_sam2.checkpoint_filter_fn undoes."""
    trunk = randomize_(timm.create_model("sam2_hiera_tiny", pretrained=False))
    release = {"image_encoder.trunk." + k.replace(".mlp.fc1.", ".mlp.layers.0.").replace(".mlp.fc2.",
                                                                                      ".mlp.layers.1."): v
               for k, v in trunk.state_dict().items() if not k.startswith("head.")}
    release["sam_mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    torch.save({"model": release}, tmp_path / "sam2.1_hiera_tiny.pt")
    model = hfactory.create_model("sam2_hiera_tiny", pretrained=tmp_path / "sam2.1_hiera_tiny.pt")
    torch.testing.assert_close(model.stages[0].downsample.conv.weight, trunk.patch_embed.proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.stages[3].blocks[1].mlp.fc1.weight, trunk.blocks[11].mlp.fc1.weight,
                               rtol=0, atol=0)
    assert torch.equal(model.norm.weight, torch.ones(768))  # SAM2's trunk has no final norm
