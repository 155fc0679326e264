"""hfactory encoders inside the libraries that consume backbones (issue 14): segmentation-models-
pytorch's ``tu-`` encoders, transformers' ``TimmBackbone`` / ``AutoBackbone`` (UperNet), and
torchvision's detectors through :class:`hfactory.detection.BackboneWithFPN`.

Each library's maps are compared with the encoder's own ``forward_intermediates`` after the same
weights are loaded into both, so the wiring (which stages, their order, NCHW) is checked, not
only shapes. Facts on each library's conventions: ``shared/reference/interop.md``."""

from collections import OrderedDict

import pytest
import torch

import hfactory

timm = pytest.importorskip("timm")
import hfactory.timm  # noqa: E402  (registers hfactory_* before the libraries resolve names)

NAME = "downstream_tiny_encoder"  # a user-registered name (not hfactory_*, which the presets own)
#: A small 4-stage spec (strides 4, 8, 16, 32; conv mixers then attention), registered once.
SPEC = hfactory.load_preset("caformer_s18").with_changes(
    {"name": "downstream_tiny", "stages.*.depth": 1, "stages.0.embedding": 16, "stages.1.embedding": 32,
     "stages.2.embedding": 64, "stages.3.embedding": 64, "num_classes": 5})
hfactory.timm.register(NAME, SPEC)
CHANNELS = [16, 32, 64, 64]


def reference(seed: int = 0):
    torch.manual_seed(seed)
    return hfactory.build_encoder(SPEC).eval()


def load_into(module: torch.nn.Module, ref) -> None:
    """``ref``'s weights into ``module`` (an hfactory encoder a library built, perhaps without its
    head): every tensor of ``module`` must come from ``ref``."""
    missing, _ = module.load_state_dict(ref.state_dict(), strict=False)
    assert not missing, missing


def ref_maps(ref, x):
    with torch.no_grad():
        return ref.forward_intermediates(x, intermediates_only=True)


# ----------------------------------------------------------------------------- segmentation_models_pytorch

smp = pytest.importorskip("segmentation_models_pytorch")
DECODERS = ["Unet", "UnetPlusPlus", "FPN", "Linknet", "MAnet", "PSPNet", "UPerNet", "Segformer"]


@pytest.mark.parametrize("decoder", DECODERS)
def test_smp_decoders_take_the_encoder(decoder):
    net = getattr(smp, decoder)(f"tu-{NAME}", encoder_weights=None, classes=2).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_smp_encoder_gives_the_encoders_stage_maps():
    net = smp.Unet(f"tu-{NAME}", encoder_weights=None, classes=2).eval()
    # smp's transformer-style encoder: the image, an empty /2 level, then stages 0..3 (/4../32)
    assert net.encoder.out_channels == [3, 0, *CHANNELS]
    ref = reference()
    load_into(net.encoder.model.model, ref)  # smp TimmUniversalEncoder -> timm FeatureGetterNet -> encoder
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = net.encoder(x)
    assert feats[0] is x and feats[1].shape == (2, 0, 32, 48)
    for got, want in zip(feats[2:], ref_maps(ref, x), strict=True):
        torch.testing.assert_close(got, want)


def test_smp_encoder_depth_and_input_channels():
    net = smp.Unet(f"tu-{NAME}", encoder_weights=None, encoder_depth=4, decoder_channels=(64, 32, 16, 8),
                   in_channels=1, classes=3).eval()
    assert net.encoder.out_channels == [1, 0, *CHANNELS[:3]]
    with torch.no_grad():
        assert net(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)


# ----------------------------------------------------------------------------- transformers

transformers = pytest.importorskip("transformers")


def backbone_config(out_indices=(0, 1, 2, 3)):
    return transformers.TimmBackboneConfig(backbone=NAME, out_indices=list(out_indices), use_pretrained_backbone=False)


def test_transformers_auto_backbone_gives_the_encoders_stage_maps():
    backbone = transformers.AutoBackbone.from_config(backbone_config()).eval()
    assert type(backbone).__name__ == "TimmBackbone"
    assert backbone.channels == CHANNELS and backbone.stage_names == [f"stages.{i}" for i in range(4)]
    ref = reference(1)
    load_into(backbone._backbone.model, ref)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = backbone(x).feature_maps
    for got, want in zip(maps, ref_maps(ref, x), strict=True):
        torch.testing.assert_close(got, want)


def test_transformers_upernet_segments_with_the_encoder():
    config = transformers.UperNetConfig(backbone_config=backbone_config(), num_labels=3, hidden_size=32,
                                        auxiliary_in_channels=CHANNELS[2], auxiliary_channels=16)
    model = transformers.UperNetForSemanticSegmentation(config).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 3, 64, 64))
    assert out.logits.shape == (1, 3, 64, 64) and torch.isfinite(out.logits).all()


# ----------------------------------------------------------------------------- torchvision detection

torchvision = pytest.importorskip("torchvision")
from hfactory.detection import BackboneWithFPN  # noqa: E402
from hfactory.errors import UsageError  # noqa: E402


def test_backbone_with_fpn_levels_follow_the_stages():
    ref = reference(2)
    backbone = BackboneWithFPN(ref, out_channels=24).eval()
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        out = backbone(x)
        # the pyramid of the encoder's own maps, through the same FPN
        want = backbone.fpn(OrderedDict((str(i), m) for i, m in enumerate(ref_maps(ref, x))))
    assert list(out) == ["0", "1", "2", "3", "pool"] and backbone.out_channels == 24
    assert [tuple(m.shape[2:]) for m in out.values()] == [(16, 32), (8, 16), (4, 8), (2, 4), (1, 2)]
    for key in out:
        torch.testing.assert_close(out[key], want[key])
    with pytest.raises(UsageError, match="out_indices"):
        BackboneWithFPN(ref, out_indices=[1, 4])


def test_faster_rcnn_trains_and_detects_with_the_encoder():
    from torchvision.models.detection import FasterRCNN

    torch.manual_seed(0)
    model = FasterRCNN(BackboneWithFPN(reference(3), out_channels=32), num_classes=3, min_size=128, max_size=128)
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 50.0, 40.0], [60.0, 30.0, 120.0, 90.0]]),
                "labels": torch.tensor([2, 1])}]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    stem = model.backbone.body.stages[0].downsample
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stem.parameters())
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "labels", "scores"}
