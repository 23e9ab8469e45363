"""Evaluate a multi-expert model or a folder of samples: FID, KID, Inception Score, precision / recall, params, MACs.

Metrics come from torch-fidelity and never download anything. Two feature extractors:

- `--extractor inception` (torch-fidelity's Inception-v3, comparable with published FIDs) needs a local weights file,
  `--inception_weights`; on a machine with internet get it once with
  `wget https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth`
- `--extractor classifier` (offline): a small classifier trained on labelled reference images and saved to
  `--classifier_dir` (safetensors + config.json) on first use, reloaded afterwards so figures stay comparable.

    # generate 1000 samples from a saved pipeline or mixture (expert-major, resumable) and score them against MNIST
    python examples/evaluate.py --model my-pipeline --num_images 1000 --reference mnist \
        --extractor classifier --classifier_dir mnist-classifier --out eval/
    # a folder of samples against a folder of real images, with a local Inception file
    python examples/evaluate.py --samples samples/ --reference real/ --extractor inception \
        --inception_weights weights-inception-2015-12-05-6726825d.pth --out eval/
    # a datasets dataset as reference (saved with `save_to_disk`, or a dataset id already in the local cache)
    python examples/evaluate.py --samples samples/ --reference_dataset my_dataset --reference_split test \
        --image_column image --label_column label --extractor classifier --classifier_dir clf/ --out eval/

Writes `<out>/metrics.json` (metrics, settings, params and MACs per step when `--model` is given) and prints a table.
"""

import argparse
import json
import os
import time

import torch

from diffusers_experts.constants import CONFIG_NAME
from diffusers_experts.evaluation import (
    CLASSIFIER_EXTRACTOR_NAME,
    INCEPTION_NAME,
    ReferenceClassifier,
    compute_metrics,
    count_parameters,
    load_pipeline,
    mixture_macs_per_call,
    mnist_digits,
    read_image_folder,
    to_uint8_images,
)
from diffusers_experts.saving import atomic_file


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="MultiExpertPipeline or ExpertMixtureUNet folder, or a Hub repo id.")
    source.add_argument("--samples", help="Folder of generated images.")
    parser.add_argument("--num_images", type=int, default=1000, help="Samples to generate with --model.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="Inference steps with --model.")
    parser.add_argument("--scheduler", default="ddim", help="Scheduler name (see diffusers_experts.schedulers).")
    parser.add_argument("--class_label", type=int, default=None, help="Class of class-conditional experts.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", default=None, help="Folder of real images, or 'mnist' (bundled digits).")
    parser.add_argument("--reference_dataset", default=None, help="A datasets dataset (save_to_disk folder or id).")
    parser.add_argument("--reference_split", default="train")
    parser.add_argument("--image_column", default=None)
    parser.add_argument("--label_column", default=None, help="Labels for training the offline classifier.")
    parser.add_argument("--metrics", nargs="+", default=["fid", "kid", "prc"], help="Any of fid kid isc prc.")
    parser.add_argument("--extractor", choices=["inception", "classifier"], default="classifier")
    parser.add_argument("--inception_weights", default=None, help="Local Inception-v3 weights (.pth / .safetensors).")
    parser.add_argument("--classifier_dir", default=None, help="Saved ReferenceClassifier (trained here if absent).")
    parser.add_argument("--classifier_steps", type=int, default=1000)
    parser.add_argument("--kid_subset_size", type=int, default=None)
    parser.add_argument("--isc_splits", type=int, default=10)
    parser.add_argument("--out", default="eval")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if (args.reference is None) == (args.reference_dataset is None):
        parser.error("give exactly one of --reference (folder or 'mnist') and --reference_dataset")
    if args.extractor == "inception" and not args.inception_weights:
        parser.error("--extractor inception needs --inception_weights (a local file; see the docstring)")
    if args.extractor == "classifier" and not args.classifier_dir:
        parser.error("--extractor classifier needs --classifier_dir (loaded if it exists, else trained and saved)")
    return args


def load_reference(args) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 reference images and, where known, their labels."""
    if args.reference == "mnist":
        return mnist_digits(32)
    if args.reference is not None:
        return read_image_folder(args.reference), None
    import datasets

    if os.path.isdir(args.reference_dataset):
        dataset = datasets.load_from_disk(args.reference_dataset)
    else:
        dataset = datasets.load_dataset(args.reference_dataset, split=args.reference_split)
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[args.reference_split]
    labels = torch.tensor(dataset[args.label_column]) if args.label_column else None
    return to_uint8_images(dataset, "reference", image_column=args.image_column), labels


def load_classifier(args, reference: torch.Tensor, labels: torch.Tensor | None) -> str:
    """Folder of the offline feature extractor: reloaded when saved, else trained on the labelled reference."""
    if os.path.isfile(os.path.join(args.classifier_dir, CONFIG_NAME)):
        return args.classifier_dir
    if labels is None:
        raise ValueError(
            f"No classifier in {args.classifier_dir!r} and no labels to train one: use --reference mnist or "
            f"--reference_dataset with --label_column, or --extractor inception."
        )
    start = time.perf_counter()
    classifier = ReferenceClassifier.fit(reference, labels, steps=args.classifier_steps, seed=args.seed)
    classifier.save_pretrained(args.classifier_dir)
    accuracy = classifier.accuracy(reference, labels)
    print(f"trained the feature extractor in {time.perf_counter() - start:.0f}s (reference accuracy {accuracy:.3f})")
    return args.classifier_dir


def generate(args) -> tuple[str, dict]:
    """Generate `--num_images` into `<out>/samples` (expert-major, resumable); params and MACs of the model."""
    pipe = load_pipeline(args.model, scheduler=args.scheduler)
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    sample_dir = os.path.join(args.out, "samples")
    start = time.perf_counter()
    pipe.generate_many(
        args.num_images,
        batch_size=args.batch_size,
        seed=args.seed,
        output_dir=sample_dir,
        class_labels=args.class_label,
        num_inference_steps=args.steps,
    )
    seconds = time.perf_counter() - start
    mixture = pipe.unet
    pipe.scheduler.set_timesteps(args.steps)
    size = mixture.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    labels = torch.zeros(1, dtype=torch.long) if mixture.config.num_class_embeds else None
    macs = mixture_macs_per_call(
        mixture, pipe.scheduler.timesteps, (1, mixture.config.in_channels, *size), class_labels=labels
    )
    info = {"params": count_parameters(mixture), "macs_per_step": macs, "generation_seconds": seconds}
    return sample_dir, info


def main(args) -> dict:
    os.makedirs(args.out, exist_ok=True)
    reference, labels = load_reference(args)
    model_info = {}
    samples = args.samples
    if args.model:
        samples, model_info = generate(args)
    if args.extractor == "inception":
        extractor = dict(feature_extractor=INCEPTION_NAME, feature_extractor_weights_path=args.inception_weights)
    else:
        folder = load_classifier(args, reference, labels)
        extractor = dict(feature_extractor=CLASSIFIER_EXTRACTOR_NAME, feature_extractor_weights_path=folder)
    scores = compute_metrics(
        samples,
        reference,
        metrics=args.metrics,
        kid_subset_size=args.kid_subset_size,
        isc_splits=args.isc_splits,
        device=args.device,
        seed=args.seed,
        **extractor,
    )
    result = {**model_info, **scores, "extractor": args.extractor, "settings": vars(args)}
    path = os.path.join(args.out, "metrics.json")
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)

    rows = [(k, v) for k, v in {**model_info, **scores}.items()]
    width = max(len(k) for k, _ in rows)
    print(f"{'metric'.ljust(width)} | value")
    print(f"{'-' * width}-|------")
    for key, value in rows:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key.ljust(width)} | {text}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main(parse_args())
