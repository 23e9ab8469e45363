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


def test_trainers_use_fused_adamw_where_the_parameters_allow_it():
    import argparse

    from diffusers_experts.training import make_optimizer

    options = argparse.Namespace(
        learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0, adam_epsilon=1e-8
    )
    weights = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = make_optimizer([{"params": iter([weights]), "lr": 1e-2}], options)  # groups may hold iterators
    assert optimizer.defaults["fused"] is True and optimizer.param_groups[0]["lr"] == 1e-2
    reference = torch.optim.AdamW([weights.detach().clone().requires_grad_()], lr=1e-2, eps=1e-8, weight_decay=0.0)
    for opt in (optimizer, reference):
        (param,) = opt.param_groups[0]["params"]
        param.grad = torch.ones_like(param)
        opt.step()
    torch.testing.assert_close(weights, reference.param_groups[0]["params"][0], rtol=0, atol=1e-6)
    # a parameter without a fused kernel (an integer tensor cannot train; a complex one has no fused AdamW on the CPU)
    complex_weights = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    assert not make_optimizer([complex_weights], options).defaults["fused"]
