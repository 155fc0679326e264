"""Datasets for ``hfactory train`` / ``hfactory eval``: the embedded digits set or an ImageFolder.

``digits`` (the default) is scikit-learn's bundled handwritten digits (``load_digits``: 1,797
grayscale 8x8 images, pixel values 0..16, 10 classes; shipped inside scikit-learn, so no
download). The split is fixed and documented in :data:`DIGITS_SPLIT` (stratified 80/20,
``random_state=0``: 1,437 train / 360 test images) so every run and every ``eval`` sees the same
test images. Images are resized to the spec's ``img_size`` once and kept in memory.

Any other ``--data`` value is a directory in torchvision ``ImageFolder`` layout::

    DIR/train/<class>/*.jpg
    DIR/val/<class>/*.jpg
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..errors import UsageError

__all__ = ["DIGITS_SPLIT", "DataBundle", "load_data", "load_digits", "load_image_folder"]

#: The fixed digits split: ``train_test_split(..., test_size=0.2, random_state=0, stratify=y)``.
DIGITS_SPLIT = {"test_size": 0.2, "random_state": 0, "stratify": True}

#: ImageNet channel statistics (torchvision / timm), used for ImageFolder data.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def load_data(data: str, img_size: tuple[int, int], in_chans: int) -> DataBundle:
    """``'digits'`` -> :func:`load_digits`; anything else is an ImageFolder root directory.

    Raises:
        FileNotFoundError / UsageError: see :func:`load_image_folder`.
    """
    if data == "digits":
        return load_digits(img_size, in_chans)
    return load_image_folder(data, img_size, in_chans)


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


def _transforms(img_size: tuple[int, int], in_chans: int, train: bool):
    from torchvision import transforms as T

    if in_chans == 3:
        colour, mean, std = [T.Lambda(_to_rgb)], IMAGENET_MEAN, IMAGENET_STD
    else:  # grayscale, replicated; the luminance of ImageNet's statistics
        colour = [T.Grayscale(1)]
        mean, std = (sum(IMAGENET_MEAN) / 3,) * in_chans, (sum(IMAGENET_STD) / 3,) * in_chans
    if train:
        geometry = [T.RandomResizedCrop(img_size, antialias=True), T.RandomHorizontalFlip()]
    else:  # timm's eval crop (crop_pct 0.875): resize, then center-crop
        h, w = img_size
        # square: the short side to size/0.875, keeping the aspect ratio; otherwise both sides
        resize = math.floor(h / 0.875) if h == w else (math.floor(h / 0.875), math.floor(w / 0.875))
        geometry = [T.Resize(resize, antialias=True), T.CenterCrop(img_size)]
    post = [_RepeatChannels(in_chans)] if in_chans not in (1, 3) else []
    return T.Compose(colour + geometry + [T.ToTensor()] + post + [T.Normalize(mean, std)])


def _to_rgb(img):
    return img.convert("RGB")


def load_image_folder(root: str | os.PathLike, img_size: tuple[int, int], in_chans: int = 3) -> DataBundle:
    """``root/train`` and ``root/val`` as torchvision ``ImageFolder`` datasets.

    Train: RandomResizedCrop to ``img_size`` + horizontal flip; val: resize to ``img_size/0.875``
    + center crop. Both normalised with ImageNet mean/std (their average for grayscale
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
            ds = ImageFolder(str(path), transform=_transforms(img_size, in_chans, split == "train"),
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
