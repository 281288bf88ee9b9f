"""Named augmentation presets (torchvision transforms v2).

Images reach the transforms as uint8 tensors ``[3, H, W]`` already resized to the
configured size (by the dataset, or read from the prepared cache), and leave them
as uint8 tensors of that same size: loaders collate uint8 batches (a quarter of the
bytes of float ones), and the model converts and normalises them on its own device
(:meth:`finegrain.models.model.FinegrainModel.normalise_input`), with its backbone's
mean and standard deviation. The presets:

- ``plain``: nothing (evaluation, and training without augmentation);
- ``light``: random resized crop (scale 0.6-1) and horizontal flip, the usual fine-tuning recipe;
- ``seed``: the seed documents' augmentations: random crop (reflect-padded), flip,
  rotation up to 15 degrees, colour jitter;
- ``strong``: random resized crop (scale 0.35-1), flip, TrivialAugment, random erasing.
"""

from __future__ import annotations

from torchvision.transforms import v2

from finegrain.errors import unknown_name

PRESETS = ("plain", "light", "seed", "strong")


def build_transform(preset: str, size: tuple[int, int], train: bool) -> v2.Transform:
    """The transform of a preset (uint8 in, uint8 out); with ``train=False`` every preset is ``plain``."""
    if preset not in PRESETS:
        raise unknown_name("augmentation preset", preset, PRESETS)
    h, w = size
    steps: list = []
    if train and preset == "light":
        steps += [v2.RandomResizedCrop((h, w), scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    elif train and preset == "seed":
        pad = max(2, min(h, w) // 16)
        steps += [
            v2.RandomCrop((h, w), padding=pad, padding_mode="reflect"),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(15),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        ]
    elif train and preset == "strong":
        steps += [
            v2.RandomResizedCrop((h, w), scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.TrivialAugmentWide(),
            v2.RandomErasing(p=0.25),
        ]
    return v2.Compose(steps) if steps else v2.Identity()
