"""Datasets for ``hfactory train`` / ``hfactory eval``: the embedded digits set or an ImageFolder.

``digits`` (the default) is scikit-learn's bundled handwritten digits (``load_digits``: 1,797
grayscale 8x8 images, pixel values 0..16, 10 classes; shipped inside scikit-learn, so no
download). The split is fixed and documented in :data:`DIGITS_SPLIT` (stratified 80/20,
``random_state=0``: 1,437 train / 360 test images) so every run and every ``eval`` sees the same
test images. Images are resized to the spec's ``img_size`` once and kept in memory.

Any other ``--data`` value is a directory in torchvision ``ImageFolder`` layout::

    DIR/train/<class>/*.jpg
    DIR/val/<class>/*.jpg

ImageFolder preprocessing follows a ``preprocess`` dict when one is given (the pretrained config of
the weights a run starts from: ``mean``, ``std``, ``crop_pct``, ``crop_mode``, ``interpolation``,
timm's field names), else hfactory's defaults (:data:`DEFAULT_PREPROCESS`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..errors import UsageError

__all__ = ["DIGITS_SPLIT", "DEFAULT_PREPROCESS", "DataBundle", "load_data", "load_digits", "load_image_folder",
           "count_classes", "image_transform"]

#: The fixed digits split: ``train_test_split(..., test_size=0.2, random_state=0, stratify=y)``.
DIGITS_SPLIT = {"test_size": 0.2, "random_state": 0, "stratify": True}

#: ImageNet channel statistics (torchvision / timm), used for ImageFolder data.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: ImageFolder preprocessing without a pretrained config: ImageNet statistics, timm's default
#: eval crop (0.875), bilinear resizing (torchvision's default).
DEFAULT_PREPROCESS = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 0.875, "crop_mode": "center",
                      "interpolation": "bilinear"}
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


@dataclass
class DataBundle:
    """Train and test datasets yielding ``(image (C, H, W) float32, label int64)``.

    ``in_memory`` marks TensorDatasets (batched by indexing, no DataLoader workers needed).
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_memory: bool


def load_data(data: str, img_size: tuple[int, int], in_chans: int, preprocess: Optional[dict] = None) -> DataBundle:
    """``'digits'`` -> :func:`load_digits`; anything else is an ImageFolder root directory, read
    with ``preprocess`` (see :func:`image_transform`; digits keep their own normalisation).

    Raises:
        FileNotFoundError / UsageError: see :func:`load_image_folder`.
    """
    if data == "digits":
        return load_digits(img_size, in_chans)
    return load_image_folder(data, img_size, in_chans, preprocess)


def count_classes(data: str) -> int:
    """The number of classes of ``data`` without reading an image: 10 for digits, else the class
    folders of ``DIR/train`` (torchvision's ``find_classes``).

    Raises:
        FileNotFoundError: ``DIR/train`` does not exist.
        UsageError: it has no class folders.
    """
    if data == "digits":
        return 10
    from torchvision.datasets.folder import find_classes

    path = Path(data) / "train"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found; --data DIR needs {data}/train/<class>/*.jpg and "
                                f"{data}/val/<class>/*.jpg (ImageFolder layout)")
    try:
        return len(find_classes(str(path))[0])
    except FileNotFoundError as err:
        raise UsageError(f"{path}: no usable images ({err})") from None


def load_digits(img_size: tuple[int, int], in_chans: int = 1) -> DataBundle:
    """The scikit-learn digits in the fixed :data:`DIGITS_SPLIT`, as in-memory TensorDatasets.

    Each 8x8 image is scaled to [0, 1] (divided by 16), resized bilinearly to ``img_size``
    ``(H, W)``, normalised with the *train* set's mean and std (one scalar each, so test data
    never leaks into preprocessing), and repeated to ``in_chans`` channels.

    Returns:
        a :class:`DataBundle` whose images are ``(in_chans, H, W)`` float32, labels int64 in 0..9.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=DIGITS_SPLIT["test_size"],
        random_state=DIGITS_SPLIT["random_state"], stratify=y.numpy() if DIGITS_SPLIT["stratify"] else None)
    x = F.interpolate(x.unsqueeze(1), size=tuple(img_size), mode="bilinear", align_corners=False)
    x_train, x_test = x[torch.as_tensor(idx_train)], x[torch.as_tensor(idx_test)]
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    if in_chans != 1:
        x_train, x_test = x_train.repeat(1, in_chans, 1, 1), x_test.repeat(1, in_chans, 1, 1)
    return DataBundle("digits", TensorDataset(x_train.contiguous(), y[torch.as_tensor(idx_train)]),
                      TensorDataset(x_test.contiguous(), y[torch.as_tensor(idx_test)]), 10, True)


class _RepeatChannels:
    """Transform ``(1, H, W) -> (n, H, W)`` (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(self.n, 1, 1)


def image_transform(img_size: tuple[int, int], in_chans: int, train: bool, preprocess: Optional[dict] = None):
    """The torchvision transform of ImageFolder images (PIL) -> ``(in_chans, H, W)`` float tensors.

    ``preprocess`` (timm's pretrained-config fields; missing ones from :data:`DEFAULT_PREPROCESS`):
    ``mean`` / ``std`` normalise (their average for grayscale ``in_chans != 3``, where images are
    converted to grayscale and repeated); ``interpolation`` resizes. Train: RandomResizedCrop to
    ``img_size`` + horizontal flip. Eval, as timm's ``transforms_factory.transforms_imagenet_eval``
    (timm 1.0.31): ``crop_mode='center'`` resizes the short side to ``floor(size / crop_pct)``
    keeping the aspect ratio, ``'squash'`` both sides to ``floor(H / crop_pct), floor(W / crop_pct)``,
    then a center crop to ``img_size``. (A non-square ``img_size`` in ``center`` mode is resized
    on both sides, as ``squash``; timm keeps the aspect ratio there.)

    Raises:
        UsageError: an unknown ``interpolation`` or ``crop_mode``, or ``crop_pct`` not in (0, 1].
    """
    from torchvision import transforms as T

    cfg = {**DEFAULT_PREPROCESS, **{k: v for k, v in (preprocess or {}).items() if v is not None}}
    if cfg["interpolation"] not in _INTERPOLATIONS:
        raise UsageError(f"interpolation {cfg['interpolation']!r}: valid are {', '.join(_INTERPOLATIONS)}")
    if cfg["crop_mode"] not in ("center", "squash"):
        raise UsageError(f"crop_mode {cfg['crop_mode']!r}: hfactory supports 'center' and 'squash'")
    if not 0 < float(cfg["crop_pct"]) <= 1:
        raise UsageError(f"crop_pct {cfg['crop_pct']} must be in (0, 1]")
    interpolation = T.InterpolationMode(cfg["interpolation"])
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if in_chans == 3:
        colour = [T.Lambda(_to_rgb)]
    else:  # grayscale, replicated; the luminance of the statistics
        colour = [T.Grayscale(1)]
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    if train:
        geometry = [T.RandomResizedCrop(img_size, interpolation=interpolation, antialias=True),
                    T.RandomHorizontalFlip()]
    else:
        h, w = img_size
        crop_pct = float(cfg["crop_pct"])
        scaled = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        resize = scaled[0] if h == w and cfg["crop_mode"] == "center" else scaled
        geometry = [T.Resize(resize, interpolation=interpolation, antialias=True), T.CenterCrop(img_size)]
    post = [_RepeatChannels(in_chans)] if in_chans not in (1, 3) else []
    return T.Compose(colour + geometry + [T.ToTensor()] + post + [T.Normalize(mean, std)])


def _to_rgb(img):
    return img.convert("RGB")


def load_image_folder(root: str | os.PathLike, img_size: tuple[int, int], in_chans: int = 3,
                      preprocess: Optional[dict] = None) -> DataBundle:
    """``root/train`` and ``root/val`` as torchvision ``ImageFolder`` datasets, transformed by
    :func:`image_transform` with ``preprocess``: by default (no pretrained config) train
    RandomResizedCrop to ``img_size`` + horizontal flip, val resize to ``img_size/0.875`` (bilinear)
    + center crop; both normalised with ImageNet mean/std (their average for grayscale
    ``in_chans != 3``, where images are converted to grayscale and repeated).

    Raises:
        FileNotFoundError: ``root``, ``root/train`` or ``root/val`` does not exist.
        UsageError (a ValueError): a split has no class folders or no images, train and val class lists
            differ, or its first image cannot be read (the message names the path).
    """
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} not found; use --data digits or a directory with "
                                "train/ and val/ ImageFolder subfolders")
    splits = {}
    for split in ("train", "val"):
        path = root / split
        if not path.is_dir():
            raise FileNotFoundError(f"{path} not found; --data DIR needs {root}/train/<class>/*.jpg and "
                                    f"{root}/val/<class>/*.jpg (ImageFolder layout)")
        try:
            ds = ImageFolder(str(path), transform=image_transform(img_size, in_chans, split == "train", preprocess),
                             loader=_load_image)
        except (FileNotFoundError, OSError) as err:  # no class folders, or folders without images
            raise UsageError(f"{path}: no usable images ({err})") from None
        _check_readable(ds, path)
        splits[split] = ds
    if splits["train"].classes != splits["val"].classes:
        raise UsageError(f"{root}: train and val have different class folders "
                         f"({len(splits['train'].classes)} vs {len(splits['val'].classes)}); they must match")
    return DataBundle(str(root), splits["train"], splits["val"], len(splits["train"].classes), False)


def _load_image(path: str):
    """torchvision's PIL loader, but a corrupt file is a UsageError that names it (not a bare
    PIL error in the middle of an epoch)."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except Exception as err:  # PIL raises several types for corrupt files
        raise UsageError(f"cannot read image {path}: {err}") from None


def _check_readable(ds, path: Path) -> None:
    """Load the first sample now, so an unreadable dataset fails before training starts."""
    try:
        ds[0]
    except UsageError as err:  # an unreadable image; other errors (of transforms) are bugs and keep theirs
        raise UsageError(f"{path}: {err}") from None
