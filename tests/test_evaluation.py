"""Metrics through torch-fidelity with the offline feature extractor: behaviour, save / reload, input forms, errors."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_experts.evaluation import (
    CLASSIFIER_EXTRACTOR_NAME,
    INCEPTION_WEIGHTS_URL,
    ReferenceClassifier,
    compute_metrics,
    to_uint8_images,
)
from diffusers_experts.evaluation.metrics import _safe_inception_weights


def _patterns(num_images: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labelled synthetic 8x8 grey images: a bright horizontal bar, vertical bar, diagonal or square, at random
    positions and brightness, on a noisy background (4 classes)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(num_images, 1, 8, 8, generator=generator) * 60
    labels = torch.arange(num_images) % 4
    offsets = torch.randint(0, 5, (num_images, 2), generator=generator)
    brightness = 150 + torch.rand(num_images, generator=generator) * 105
    for i, (label, (r, c)) in enumerate(zip(labels.tolist(), offsets.tolist())):
        if label == 0:
            images[i, 0, r + 1, c : c + 4] = brightness[i]
        elif label == 1:
            images[i, 0, r : r + 4, c + 1] = brightness[i]
        elif label == 2:
            for k in range(4):
                images[i, 0, r + k, c + k] = brightness[i]
        else:
            images[i, 0, r : r + 3, c : c + 3] = brightness[i]
    return images.round().to(torch.uint8), labels


@pytest.fixture(scope="module")
def digits():
    """400 labelled synthetic 8x8 images (uint8) with 4 classes."""
    return _patterns(400)


@pytest.fixture(scope="module")
def classifier(digits):
    images, labels = digits
    return ReferenceClassifier.fit(
        images, labels, steps=60, batch_size=64, learning_rate=1e-2, block_out_channels=(8, 16), feature_dim=16
    )


def test_classifier_learns_the_reference_labels(classifier, digits):
    images, labels = digits
    assert classifier.accuracy(*_patterns(200, seed=1)) > 0.6  # held-out images; chance is 0.25


def test_fid_kid_near_zero_for_same_set_and_larger_for_different_sets(classifier, digits):
    images, _ = digits
    a, b = images[:150], images[150:300]
    noise = torch.randint(0, 256, a.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(metrics=("fid", "kid", "prc"), feature_extractor=classifier, kid_subset_size=150, kid_subsets=20)
    same = compute_metrics(a, a, **kwargs)
    similar = compute_metrics(a, b, **kwargs)
    different = compute_metrics(noise, b, **kwargs)
    assert abs(same["fid"]) < 1e-6 * different["fid"] and abs(same["kid_mean"]) < 0.2 * different["kid_mean"]
    assert abs(similar["fid"]) < 0.2 * different["fid"]
    assert abs(similar["kid_mean"]) < 0.2 * different["kid_mean"]
    assert similar["precision"] > different["precision"] and similar["recall"] > different["recall"]
    assert same["num_samples"] == 150 and same["num_reference"] == 150


def test_saved_extractor_reloads_and_gives_the_same_numbers(classifier, digits, tmp_path):
    images, _ = digits
    folder = tmp_path / "extractor"
    classifier.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    reloaded = ReferenceClassifier.from_pretrained(folder)
    torch.testing.assert_close(reloaded.extract(images[:10]), classifier.extract(images[:10]), rtol=0, atol=0)

    kwargs = dict(metrics=("fid", "kid", "isc", "prc"), kid_subset_size=50, isc_splits=5)
    in_memory = compute_metrics(images[:100], images[200:300], feature_extractor=classifier, **kwargs)
    from_folder = compute_metrics(
        images[:100],
        images[200:300],
        feature_extractor=CLASSIFIER_EXTRACTOR_NAME,
        feature_extractor_weights_path=str(folder),
        **kwargs,
    )
    assert from_folder == in_memory
    assert in_memory["isc_mean"] > 1.0


def test_input_forms_give_identical_images(digits, tmp_path):
    images, _ = digits
    grey = images[:6]
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(grey):
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{i:03d}.png")
    as_rgb = grey.expand(-1, 3, -1, -1)
    torch.testing.assert_close(to_uint8_images(str(folder)), as_rgb)  # grey files come back with 3 channels
    as_float = grey.float() / 255
    torch.testing.assert_close(to_uint8_images(as_float), grey)
    torch.testing.assert_close(to_uint8_images(as_float.permute(0, 2, 3, 1).numpy()), grey)  # output_type="np"
    pil = [Image.fromarray(image[0].numpy(), mode="L") for image in grey]
    torch.testing.assert_close(to_uint8_images(pil), as_rgb)

    import datasets

    dataset = datasets.Dataset.from_dict({"image": pil, "label": list(range(6))}).cast_column(
        "image", datasets.Image()
    )
    torch.testing.assert_close(to_uint8_images(dataset), as_rgb)


def test_bad_inputs_raise(classifier, digits):
    images, _ = digits
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8_images(images.float())  # 0..255 floats are not silently rescaled
    with pytest.raises(ValueError, match="does not exist"):
        to_uint8_images("cifar10-train")  # a torch-fidelity dataset name would download: not accepted
    with pytest.raises(ValueError, match="`metrics`"):
        compute_metrics(images[:20], images[20:40], metrics=("fid", "lpips"), feature_extractor=classifier)
    with pytest.raises(ValueError, match="`kid_subset_size`"):
        compute_metrics(images[:20], images[20:60], metrics=("kid",), feature_extractor=classifier, kid_subset_size=30)
    with pytest.raises(ValueError, match="`reference`"):
        compute_metrics(images[:20], metrics=("fid",), feature_extractor=classifier)
    with pytest.raises(ValueError, match="`feature_extractor`"):
        compute_metrics(images[:20], images[20:40], feature_extractor="clip-vit-b-32")


def test_inception_never_downloads(digits, tmp_path):
    images, _ = digits
    with pytest.raises(ValueError, match="feature_extractor_weights_path") as info:
        compute_metrics(images[:20], images[20:40], feature_extractor="inception-v3-compat")
    assert INCEPTION_WEIGHTS_URL in str(info.value)
    with pytest.raises(ValueError, match="not a file"):
        compute_metrics(images[:20], images[20:40], feature_extractor_weights_path=str(tmp_path / "missing.pth"))


def test_inception_weights_are_read_without_unpickling_objects(tmp_path):
    state = {"fc.weight": torch.randn(3, 2), "fc.bias": torch.zeros(3)}
    good = tmp_path / "weights.pth"
    torch.save(state, good)
    safe = _safe_inception_weights(str(good), str(tmp_path))
    torch.testing.assert_close(torch.load(safe, weights_only=True), state)

    from safetensors.torch import save_file

    save_file(state, tmp_path / "weights.safetensors")
    safe = _safe_inception_weights(str(tmp_path / "weights.safetensors"), str(tmp_path))
    torch.testing.assert_close(torch.load(safe, weights_only=True), state)

    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": np.dtype("float32"), "payload": Image.new("L", (1, 1))}, evil)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported"):
        _safe_inception_weights(str(evil), str(tmp_path))


def test_classifier_bad_inputs(classifier, digits, tmp_path):
    images, labels = digits
    with pytest.raises(TypeError, match="uint8"):
        ReferenceClassifier.fit(images.float(), labels, steps=1)
    with pytest.raises(ValueError, match="one label per image"):
        ReferenceClassifier.fit(images, labels[:-1], steps=1)
    with pytest.raises(ValueError, match="`in_channels`"):
        ReferenceClassifier(in_channels=2)
    with pytest.raises(ValueError, match="safetensors"):
        classifier.save_pretrained(tmp_path / "c", safe_serialization=False)
    assert not (tmp_path / "c").exists()


def test_metrics_refuse_an_extractor_that_did_not_learn(digits):
    images, labels = digits
    assert ReferenceClassifier.fit(images, labels, steps=1, progress=False).config.heldout_accuracy < 0.9
    weak = ReferenceClassifier.fit(images, labels, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"held-out accuracy is 0\.\d+, below the required 0\.9"):
        compute_metrics(images[:50], images[50:100], metrics=("fid",), feature_extractor=weak)
    unmeasured = ReferenceClassifier.fit(images, labels, steps=1, holdout=0.0, progress=False)
    with pytest.raises(ValueError, match="no recorded held-out accuracy"):
        compute_metrics(images[:50], images[50:100], metrics=("fid",), feature_extractor=unmeasured)
    # an explicit opt-out is the only way past the check
    scores = compute_metrics(
        images[:50], images[50:100], metrics=("fid",), feature_extractor=weak, min_extractor_accuracy=None
    )
    assert scores["fid"] >= 0
