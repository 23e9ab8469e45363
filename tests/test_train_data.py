"""The built-in MNIST training data: `--max_train_samples` takes a class-balanced subset whose complement is the
held-out split of `diffusers_experts.evaluation.heldout_digits`."""

from types import SimpleNamespace

import torch

from diffusers_experts.evaluation import heldout_digits, mnist_digits
from diffusers_experts.training import build_training_dataset


def _args(**overrides):
    args = dict(
        dataset_name=None,
        dataset_config_name=None,
        train_data_dir=None,
        cache_dir=None,
        image_column=None,
        label_column="label",
        num_classes=10,
        max_train_samples=None,
        num_channels=None,
        resolution=16,
        center_crop=True,
        random_flip=False,
    )
    args.update(overrides)
    return SimpleNamespace(**args)


def test_max_train_samples_of_builtin_mnist_holds_every_class():
    """The bundled file is sorted by label: a first-N subset used to train on digits 0 and 1 only."""
    dataset, _ = build_training_dataset(_args(max_train_samples=200))
    labels = [int(x["class_labels"]) for x in dataset]
    assert len(labels) == 200
    assert set(labels) == set(range(10))
    counts = torch.bincount(torch.tensor(labels), minlength=10)
    assert counts.min() >= 10


def test_training_subset_and_heldout_digits_do_not_overlap():
    n = 300
    dataset, _ = build_training_dataset(_args(max_train_samples=n, resolution=28))
    digits, labels = mnist_digits(28, seed=0)
    train = torch.stack([x["pixel_values"] for x in dataset])
    assert torch.allclose(train, digits[:n].float() / 255 * 2 - 1, atol=1e-5)
    assert [int(x["class_labels"]) for x in dataset] == labels[:n].tolist()
    held, held_labels = heldout_digits(28, num_train=n, num_heldout=50)
    assert torch.equal(held_labels, labels[n : n + 50])
