"""The slow-epoch warning (issue 16, newcomer fixes): from the summary's GMACs and the CPU's
measured matmul rate, a floor on the epoch's time, with a warning from two minutes up."""

import torch

import hfactory
from hfactory.train.estimate import epoch_seconds_floor, epoch_time_warning


def test_floor_is_three_forwards_per_training_image_and_one_per_test_image():
    assert epoch_seconds_floor(2.0, 1000, 200, rate=100.0) == (3 * 1000 + 200) * 2.0 / 100.0  # 64 s


def test_a_full_size_preset_on_imagenet_sized_data_is_warned_about_and_a_tiny_run_is_not():
    spec = hfactory.load_preset("caformer_s18").with_changes({"num_classes": 10})
    model = hfactory.build_encoder(spec)
    image = torch.randn(1, 3, 224, 224)
    warning = epoch_time_warning(model, image, train_images=10_000, test_images=1_000, rate=50.0)
    assert warning is not None and "GMACs per image" in warning and "--epochs" in warning
    # caformer_s18 is ~4 GMACs: 31,000 images x 4 / 50 GMAC/s is about 41 minutes
    assert " min on this CPU" in warning and int(warning.split("at least ")[1].split(" min")[0]) > 30
    assert epoch_time_warning(model, image, train_images=8, test_images=2, rate=50.0) is None
