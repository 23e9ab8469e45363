"""An offline feature extractor for FID / KID / IS / precision-recall: a small classifier trained on the reference data.

torch-fidelity's default Inception-v3 weights are downloaded from GitHub. Where that is impossible (or for small
grey datasets such as MNIST, where Inception features say little), train a [`ReferenceClassifier`] on labelled
reference images, save it (safetensors + `config.json`) and pass it to
[`~diffusers_experts.evaluation.compute_metrics`]: its penultimate layer serves FID / KID / precision-recall and its
logits serve the Inception Score. Figures made with it are comparable only with figures from the same saved
classifier.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from tqdm.auto import tqdm

from ..saving import atomic_directory


CLASSIFIER_EXTRACTOR_NAME = "diffusers-experts-classifier"
CLASSIFIER_FEATURES = ("features", "logits")
# Held-out accuracy below which a ReferenceClassifier's features are refused for metrics: an extractor near chance
# gives FIDs near 0 for any samples (it maps everything to the same features).
MIN_EXTRACTOR_ACCURACY = 0.9


def images_to_float(images: torch.Tensor, in_channels: int, sample_size: int) -> torch.Tensor:
    """uint8 (or [0, 255] float) images `(B, C, H, W)`, C in {1, 3} -> float in [-1, 1] with `in_channels` (grey is
    repeated, colour averaged) and `sample_size` (bilinear, antialiased): what a model of that shape reads."""
    x = images.float() / 127.5 - 1.0
    if x.shape[1] != in_channels:
        if in_channels == 1 and x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        elif in_channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        else:
            raise ValueError(f"Images have {x.shape[1]} channels; the model takes {in_channels} (1 or 3).")
    if tuple(x.shape[-2:]) != (sample_size, sample_size):
        x = F.interpolate(x, size=(sample_size, sample_size), mode="bilinear", align_corners=False, antialias=True)
    return x


class ReferenceClassifier(ModelMixin, ConfigMixin):
    r"""
    A small convolutional classifier whose penultimate features stand in for Inception features when no pretrained
    network can be downloaded. Train it with [`ReferenceClassifier.fit`] on labelled reference images.

    Args:
        in_channels (`int`, defaults to 1): Channels it reads (3-channel input is averaged to grey when 1).
        sample_size (`int`, defaults to 32): Images are resized to `sample_size x sample_size`.
        num_classes (`int`, defaults to 10): Classes of the reference labels.
        block_out_channels (`tuple[int]`, defaults to `(32, 64, 128)`): Channels of the conv stages (2x pooling each).
        feature_dim (`int`, defaults to 128): Size of the feature vector used for FID / KID / precision-recall.
        heldout_accuracy (`float`, *optional*): Accuracy on reference images held out of training, recorded by
            [`ReferenceClassifier.fit`] (saved in `config.json`); metrics refuse an extractor below
            `MIN_EXTRACTOR_ACCURACY` or without it (see [`check_extractor_accuracy`]).

    Example:
        ```py
        >>> import torch
        >>> from diffusers_experts.evaluation import ReferenceClassifier
        >>> images = torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8)
        >>> labels = (images.float().mean(dim=(1, 2, 3)) > 127.5).long()
        >>> clf = ReferenceClassifier.fit(images, labels, num_classes=2, sample_size=16, steps=5, batch_size=32)
        >>> clf.save_pretrained("reference-classifier")
        >>> clf = ReferenceClassifier.from_pretrained("reference-classifier")
        ```
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        sample_size: int = 32,
        num_classes: int = 10,
        block_out_channels: Sequence[int] = (32, 64, 128),
        feature_dim: int = 128,
        heldout_accuracy: float | None = None,
    ):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"`in_channels` must be 1 or 3, got {in_channels!r}.")
        if not (isinstance(num_classes, int) and num_classes >= 2):
            raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")
        layers = []
        channels = in_channels
        for width in block_out_channels:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.GroupNorm(min(8, width), width),
                nn.SiLU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.SiLU(),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.conv = nn.Sequential(*layers)
        self.to_features = nn.Linear(channels, feature_dim)
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(features, logits)` of float images in [-1, 1] of shape `(B, in_channels, sample_size, sample_size)`."""
        h = self.conv(x).mean(dim=(2, 3))
        features = self.to_features(h)
        return features, self.classifier(F.silu(features))

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(features, logits)` of uint8 images `(B, C, H, W)` (any size, 1 or 3 channels)."""
        param = next(self.parameters())
        x = images_to_float(images.to(param.device), self.config.in_channels, self.config.sample_size)
        return self(x.to(param.dtype))

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
        """Share of `images` (uint8) classified as `labels`."""
        correct = 0
        for i in range(0, len(images), batch_size):
            logits = self.extract(images[i : i + batch_size])[1]
            correct += int((logits.argmax(dim=1).cpu() == labels[i : i + batch_size].cpu()).sum())
        return correct / len(images)

    @classmethod
    def fit(
        cls,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int | None = None,
        sample_size: int | None = None,
        in_channels: int | None = None,
        steps: int = 500,
        batch_size: int = 64,
        learning_rate: float = 1e-3,
        seed: int = 0,
        device: str | torch.device | None = None,
        holdout: float = 0.1,
        progress: bool = True,
        **config,
    ) -> ReferenceClassifier:
        r"""
        Train a classifier on labelled reference images (AdamW, cross-entropy, random shifts of `sample_size // 14`
        pixels) and record its accuracy on a held-out share of them (`config.heldout_accuracy`). On the bundled
        MNIST digits, 300 steps reach about 0.97 held-out accuracy (the former default learning rate, 5e-3, stayed at
        chance).

        Args:
            images (`torch.Tensor`): uint8 images `(N, C, H, W)` with C in {1, 3} (or `(N, H, W)` grey).
            labels (`torch.Tensor`): Integer class labels `(N,)`.
            num_classes (`int`, *optional*): Defaults to `labels.max() + 1`.
            sample_size (`int`, *optional*): Defaults to the images' height.
            in_channels (`int`, *optional*): Defaults to the images' channels.
            steps (`int`, defaults to 500), batch_size (`int`, defaults to 64), learning_rate (`float`, defaults to
                1e-3): Training.
            seed (`int`, defaults to 0): Seeds the initialisation, the held-out split and the batches.
            device (`str` or `torch.device`, *optional*): Where to train (default CPU); the model stays there.
            holdout (`float`, defaults to 0.1): Share of the images held out of training to measure the accuracy
                (0: none, `heldout_accuracy` stays `None` and metrics refuse the extractor).
            progress (`bool`, defaults to `True`): Show a progress bar with the training loss.
            config: Further [`ReferenceClassifier`] arguments (`block_out_channels`, `feature_dim`).
        """
        images = _check_uint8_images(images, "images")
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.numel() != images.shape[0]:
            raise ValueError(f"`labels` must hold one label per image ({images.shape[0]}), got {labels.numel()}.")
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"`steps` must be a positive integer, got {steps!r}.")
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"`holdout` must lie in [0, 1), got {holdout!r}.")
        num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(images), generator=generator)
        num_heldout = int(round(holdout * len(images)))
        heldout, train = order[:num_heldout], order[num_heldout:]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(
                in_channels=in_channels or images.shape[1],
                sample_size=sample_size or images.shape[-1],
                num_classes=num_classes,
                **config,
            )
        device = torch.device(device or "cpu")
        model.to(device)
        x_all = images_to_float(images[train], model.config.in_channels, model.config.sample_size).to(device)
        train_labels = labels[train].to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
        max_shift = model.config.sample_size // 14  # 2 pixels at MNIST's 28-32 pixels, none below 14
        model.train()
        bar = tqdm(range(steps), desc="feature extractor", disable=not progress)
        for _ in bar:
            idx = torch.randint(0, len(x_all), (min(batch_size, len(x_all)),), generator=generator).to(device)
            x = x_all[idx]
            if max_shift > 0:
                shift = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
                x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x)[1], train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        model.eval()
        if num_heldout > 0:
            model.register_to_config(heldout_accuracy=model.accuracy(images[heldout], labels[heldout]))
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save `config.json` and safetensors weights atomically (see `ModelMixin.save_pretrained`)."""
        if kwargs.get("safe_serialization", True) is False:
            raise ValueError("`safe_serialization=False` is not supported: weights are saved as safetensors only.")
        kwargs["safe_serialization"] = True
        with atomic_directory(save_directory) as tmp:
            super().save_pretrained(tmp, **kwargs)


def check_extractor_accuracy(classifier: ReferenceClassifier, min_accuracy: float | None = MIN_EXTRACTOR_ACCURACY):
    """Raise a `ValueError` when `classifier`'s recorded held-out accuracy is missing or below `min_accuracy`
    (`None` skips the check, e.g. for tests with tiny extractors)."""
    if min_accuracy is None:
        return
    accuracy = classifier.config.get("heldout_accuracy")
    if accuracy is None:
        raise ValueError(
            "The ReferenceClassifier has no recorded held-out accuracy (trained before it was recorded, by hand, or "
            "with holdout=0), so its features cannot be trusted for metrics: retrain it with "
            "`ReferenceClassifier.fit` (examples/evaluate.py: delete the --classifier_dir folder), or pass "
            "`min_extractor_accuracy=None` to skip this check."
        )
    if accuracy < min_accuracy:
        raise ValueError(
            f"The ReferenceClassifier's held-out accuracy is {accuracy:.3f}, below the required {min_accuracy}: an "
            f"extractor this weak makes FID/KID/precision meaningless (near chance, every image gets the same "
            f"features). Train it longer or on more labelled images (ReferenceClassifier.fit(steps=...)), or lower "
            f"`min_extractor_accuracy`."
        )


def _check_uint8_images(images, name: str) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"`{name}` must have shape (N, C, H, W) with C in (1, 3), got {tuple(images.shape)}.")
    if images.dtype != torch.uint8:
        raise TypeError(f"`{name}` must be a uint8 tensor (values 0..255), got dtype {images.dtype}.")
    return images


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor backed by a saved [`ReferenceClassifier`].

    Registered as `"diffusers-experts-classifier"`; `feature_extractor_weights_path` is the classifier's folder.
    Features: `"features"` (FID, KID, precision-recall) and `"logits"` (Inception Score).
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None or not os.path.isdir(feature_extractor_weights_path):
            raise ValueError(
                f"`feature_extractor_weights_path` must be the folder of a saved ReferenceClassifier, got "
                f"{feature_extractor_weights_path!r}."
            )
        self.classifier = ReferenceClassifier.from_pretrained(feature_extractor_weights_path).float().eval()

    @staticmethod
    def get_provided_features_list():
        return CLASSIFIER_FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.ndim == 4):
            raise ValueError("ClassifierFeatureExtractor expects uint8 images of shape (B, 3, H, W).")
        features, logits = self.classifier.extract(x)
        out = {"features": features.float(), "logits": logits.float()}
        return tuple(out[name] for name in self.features_list)


if CLASSIFIER_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(CLASSIFIER_EXTRACTOR_NAME, ClassifierFeatureExtractor)
