"""Sample-quality metrics (FID, KID, Inception Score, precision / recall) through torch-fidelity, offline-capable.

Nothing here downloads: torch-fidelity's Inception needs a local weights file (`feature_extractor_weights_path`),
or use the project's own [`~diffusers_experts.evaluation.ReferenceClassifier`]. To get the Inception weights on a
machine with internet (about 92 MB; the file torch-fidelity itself would fetch):

    wget https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth

The file is read here with `torch.load(weights_only=True)` (or as `.safetensors`), never unpickled.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import numpy as np
import torch
import torch_fidelity
from PIL import Image
from torch.utils.data import Dataset

from .feature_extractor import (
    CLASSIFIER_EXTRACTOR_NAME,
    MIN_EXTRACTOR_ACCURACY,
    ReferenceClassifier,
    check_extractor_accuracy,
)


INCEPTION_NAME = "inception-v3-compat"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
METRICS = ("fid", "kid", "isc", "prc")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageTensorDataset(Dataset):
    """Images as torch-fidelity wants them: each item a uint8 `[3, H, W]` tensor (grey is repeated to 3 channels)."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Expected uint8 images (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}.")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def _pil_to_uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def read_image_folder(folder: str | os.PathLike) -> torch.Tensor:
    """All images (png, jpg, jpeg, bmp, webp) directly in `folder`, sorted by name, as uint8 `(N, 3, H, W)`."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"Image folder {folder!r} does not exist.")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder!r}.")
    images = []
    for name in names:
        with Image.open(os.path.join(folder, name)) as image:
            images.append(_pil_to_uint8(image))
    return torch.stack(images)


def to_uint8_images(images, name: str = "images", image_column: str | None = None) -> torch.Tensor:
    r"""
    Convert `images` to a uint8 tensor `(N, C, H, W)` (C in {1, 3}).

    Accepted: a folder path; a uint8 tensor / array `(N, C, H, W)` or `(N, H, W)`; a float tensor / array in [0, 1]
    (what diffusers pipelines return with `output_type="pt"` or `"np"`, channels first or last); a list of PIL
    images; a `datasets.Dataset` (column `image_column`, default: its first `Image` column); a torch `Dataset` of
    such tensors or PIL images. Values outside the valid range raise instead of being clipped.
    """
    if isinstance(images, (str, os.PathLike)):
        return read_image_folder(images)
    if _is_hf_dataset(images):
        return _from_hf_dataset(images, name, image_column)
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        return torch.stack([_pil_to_uint8(image) for image in images])
    if isinstance(images, Dataset):
        return to_uint8_images([images[i] for i in range(len(images))], name)
    if (
        isinstance(images, (list, tuple))
        and images
        and (torch.is_tensor(images[0]) or isinstance(images[0], np.ndarray))
    ):
        return to_uint8_images(torch.stack([torch.as_tensor(np.asarray(x)) for x in images]), name)
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not torch.is_tensor(images):
        raise TypeError(
            f"`{name}` must be a folder path, an image tensor or array, a list of PIL images, a datasets.Dataset or "
            f"a torch Dataset, got {type(images).__name__}."
        )
    x = images.detach().cpu()
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)  # channels last (output_type="np")
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"`{name}` must have shape (N, C, H, W) with C in (1, 3), got {tuple(images.shape)}.")
    if x.dtype == torch.uint8:
        return x.contiguous()
    if x.is_floating_point():
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"`{name}` as floats must lie in [0, 1] (diffusers `output_type='pt'`), got range [{low}, {high}]; "
                f"pass uint8 for 0..255 values or map [-1, 1] samples with `(x + 1) / 2`."
            )
        return (x * 255).round().to(torch.uint8).contiguous()
    raise TypeError(f"`{name}` must be uint8 or float in [0, 1], got dtype {x.dtype}.")


def _is_hf_dataset(obj) -> bool:
    return type(obj).__module__.startswith("datasets.") and hasattr(obj, "features") and hasattr(obj, "column_names")


def _from_hf_dataset(dataset, name: str, image_column: str | None) -> torch.Tensor:
    from datasets import Image as ImageFeature

    if image_column is None:
        columns = [c for c, f in dataset.features.items() if isinstance(f, ImageFeature)]
        if not columns:
            raise ValueError(f"`{name}` has no Image column; columns: {dataset.column_names}. Pass `image_column`.")
        image_column = columns[0]
    if image_column not in dataset.column_names:
        raise ValueError(f"`image_column`={image_column!r} is not a column of `{name}`: {dataset.column_names}.")
    values = dataset[image_column]
    if values and isinstance(values[0], Image.Image):
        return torch.stack([_pil_to_uint8(image) for image in values])
    return to_uint8_images(values, name)


def _safe_inception_weights(path: str, workdir: str) -> str:
    """Copy of the Inception weights that torch-fidelity may `torch.load`: read safely, re-saved as a plain state dict."""
    if not os.path.isfile(path):
        raise ValueError(
            f"`feature_extractor_weights_path` {path!r} is not a file. Download the Inception weights on a machine "
            f"with internet: {INCEPTION_WEIGHTS_URL}"
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state_dict = load_file(path)
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(f"`feature_extractor_weights_path` {path!r} does not hold a state dict of tensors.")
    safe_path = os.path.join(workdir, "inception_state_dict.pth")
    torch.save(state_dict, safe_path)
    return safe_path


def compute_metrics(
    samples,
    reference=None,
    metrics: Sequence[str] = ("fid", "kid", "prc"),
    feature_extractor: str | ReferenceClassifier = INCEPTION_NAME,
    feature_extractor_weights_path: str | os.PathLike | None = None,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    isc_splits: int = 10,
    prc_neighborhood: int = 3,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    seed: int = 2020,
    image_column: str | None = None,
    verbose: bool = False,
    min_extractor_accuracy: float | None = MIN_EXTRACTOR_ACCURACY,
) -> dict[str, float]:
    r"""
    FID, KID, Inception Score and precision / recall of `samples` against `reference`, computed by torch-fidelity
    without any network access and without torch-fidelity's name-keyed statistics cache (so changed data is never
    mistaken for cached data).

    Args:
        samples: Generated images: a folder, a tensor / array (uint8, or float in [0, 1]), a list of PIL images, a
            `datasets.Dataset` or a torch `Dataset` (see [`to_uint8_images`]).
        reference: Real images, same forms. Needed for every metric but `"isc"`.
        metrics (`Sequence[str]`, defaults to `("fid", "kid", "prc")`): Any of `"fid"`, `"kid"`, `"isc"`, `"prc"`.
        feature_extractor (`str` or [`ReferenceClassifier`], defaults to `"inception-v3-compat"`):
            `"inception-v3-compat"` (torch-fidelity's Inception; needs `feature_extractor_weights_path`, a local
            weights file), `"diffusers-experts-classifier"` (a saved [`ReferenceClassifier`];
            `feature_extractor_weights_path` is its folder) or a `ReferenceClassifier` instance.
        feature_extractor_weights_path (`str`, *optional*): See `feature_extractor`. Never downloaded.
        kid_subset_size (`int`, *optional*): Defaults to `min(1000, len(samples), len(reference))`; must not exceed
            either count.
        kid_subsets, isc_splits, prc_neighborhood (`int`): torch-fidelity's options of the same names.
        batch_size (`int`, defaults to 64): Feature extraction batch size.
        device (`str` or `torch.device`, *optional*): `"cpu"` or `"cuda"`; defaults to CUDA when available.
        seed (`int`, defaults to 2020): Seed of KID's random subsets.
        image_column (`str`, *optional*): Image column of `datasets.Dataset` inputs.
        verbose (`bool`, defaults to `False`): torch-fidelity's progress output.
        min_extractor_accuracy (`float`, *optional*, defaults to 0.9): A [`ReferenceClassifier`] extractor must have
            recorded at least this held-out accuracy (see [`ReferenceClassifier.fit`]), else a `ValueError`: an
            untrained extractor scores every sample set as near-perfect. `None` skips the check.

    Returns:
        `dict[str, float]`: keys among `fid`, `kid_mean`, `kid_std`, `isc_mean`, `isc_std`, `precision`, `recall`,
        `f_score`, plus `num_samples` and `num_reference`.

    Example:
        ```py
        >>> from diffusers_experts.evaluation import compute_metrics
        >>> scores = compute_metrics("samples/", "reference/", feature_extractor="inception-v3-compat",
        ...                          feature_extractor_weights_path="weights-inception-2015-12-05-6726825d.pth")
        ```
    """
    # 1. check the request
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"`metrics` must be a non-empty subset of {list(METRICS)}, got {metrics!r}.")
    needs_reference = any(m != "isc" for m in metrics)
    if needs_reference and reference is None:
        raise ValueError(f"`reference` images are required for metrics {[m for m in metrics if m != 'isc']}.")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"`device` must be 'cpu' or 'cuda', got {str(device)!r}.")

    # 2. images as uint8 [3, H, W] datasets
    sample_images = to_uint8_images(samples, "samples", image_column)
    inputs = {"input1": ImageTensorDataset(sample_images)}
    num_reference = 0
    if needs_reference:
        reference_images = to_uint8_images(reference, "reference", image_column)
        inputs["input2"] = ImageTensorDataset(reference_images)
        num_reference = len(reference_images)
    num_samples = len(sample_images)

    options = dict(
        cuda=device.type == "cuda",
        batch_size=batch_size,
        isc="isc" in metrics,
        fid="fid" in metrics,
        kid="kid" in metrics,
        prc="prc" in metrics,
        cache=False,
        save_cpu_ram=True,
        verbose=verbose,
        rng_seed=seed,
        isc_splits=isc_splits,
        kid_subsets=kid_subsets,
        prc_neighborhood=prc_neighborhood,
        datasets_download=False,
    )
    if "kid" in metrics:
        largest = min(num_samples, num_reference)
        if kid_subset_size is None:
            kid_subset_size = min(1000, largest)
        if not (isinstance(kid_subset_size, int) and 2 <= kid_subset_size <= largest):
            raise ValueError(
                f"`kid_subset_size` must be an integer in [2, min(len(samples), len(reference))] = [2, {largest}], "
                f"got {kid_subset_size!r}."
            )
        options["kid_subset_size"] = kid_subset_size
    if "prc" in metrics and min(num_samples, num_reference) <= prc_neighborhood:
        raise ValueError(
            f"Precision / recall need more than `prc_neighborhood`={prc_neighborhood} images per set, got "
            f"{num_samples} samples and {num_reference} reference images."
        )
    if "isc" in metrics and num_samples < isc_splits:
        raise ValueError(f"`isc_splits`={isc_splits} exceeds the number of samples ({num_samples}).")

    # 3. the feature extractor: a local Inception file, or the project's classifier; never a download
    with tempfile.TemporaryDirectory(prefix="diffusers-experts-metrics-") as workdir:
        if isinstance(feature_extractor, ReferenceClassifier):
            check_extractor_accuracy(feature_extractor, min_extractor_accuracy)
            feature_extractor.save_pretrained(os.path.join(workdir, "classifier"))
            name, weights = CLASSIFIER_EXTRACTOR_NAME, os.path.join(workdir, "classifier")
        elif feature_extractor == CLASSIFIER_EXTRACTOR_NAME:
            if feature_extractor_weights_path is None or not os.path.isdir(feature_extractor_weights_path):
                raise ValueError(
                    f"`feature_extractor_weights_path` must be the folder of a saved ReferenceClassifier for "
                    f"feature_extractor={CLASSIFIER_EXTRACTOR_NAME!r}, got {feature_extractor_weights_path!r}."
                )
            check_extractor_accuracy(
                ReferenceClassifier.from_pretrained(feature_extractor_weights_path), min_extractor_accuracy
            )
            name, weights = CLASSIFIER_EXTRACTOR_NAME, os.fspath(feature_extractor_weights_path)
        elif feature_extractor == INCEPTION_NAME:
            if feature_extractor_weights_path is None:
                raise ValueError(
                    f"`feature_extractor_weights_path` is required for {INCEPTION_NAME!r}: nothing is downloaded "
                    f"here. Get the weights on a machine with internet ({INCEPTION_WEIGHTS_URL}) or use "
                    f"feature_extractor={CLASSIFIER_EXTRACTOR_NAME!r} with a trained ReferenceClassifier."
                )
            name = INCEPTION_NAME
            weights = _safe_inception_weights(os.fspath(feature_extractor_weights_path), workdir)
        else:
            raise ValueError(
                f"`feature_extractor` must be {INCEPTION_NAME!r}, {CLASSIFIER_EXTRACTOR_NAME!r} or a "
                f"ReferenceClassifier instance, got {feature_extractor!r}."
            )
        raw = torch_fidelity.calculate_metrics(
            **inputs, feature_extractor=name, feature_extractor_weights_path=weights, **options
        )

    # 4. plain names
    renames = {
        "frechet_inception_distance": "fid",
        "kernel_inception_distance_mean": "kid_mean",
        "kernel_inception_distance_std": "kid_std",
        "inception_score_mean": "isc_mean",
        "inception_score_std": "isc_std",
        "precision": "precision",
        "recall": "recall",
        "f_score": "f_score",
    }
    result = {renames[k]: float(v) for k, v in raw.items() if k in renames}
    result.update(num_samples=num_samples, num_reference=num_reference)
    return result
