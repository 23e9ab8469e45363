r"""Evaluate a multi-expert model or a folder of samples: FID, KID, Inception Score, precision / recall, params, MACs.

Metrics come from torch-fidelity and never download anything. Two feature extractors:

- `--extractor inception` (torch-fidelity's Inception-v3, comparable with published FIDs) needs a local weights file,
  `--inception_weights`; on a machine with internet get it once with
  `wget https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth`
- `--extractor classifier` (offline): a small classifier trained on labelled reference images and saved to
  `--classifier_dir` (safetensors + config.json) on first use, reloaded afterwards so figures stay comparable. Its
  accuracy on held-out reference images is measured and recorded; below `--min_classifier_accuracy` (0.9) evaluation
  stops with an error instead of printing meaningless scores, and such a classifier is neither saved nor reused.

    # generate 1000 samples from a saved pipeline or mixture (expert-major, resumable) and score them against MNIST
    python examples/evaluate.py --model my-pipeline --num_images 1000 --reference mnist \
        --extractor classifier --classifier_dir mnist-classifier --out eval/
    # a class-conditional model: every class in turn (or --class_label 3 7), guided
    python examples/evaluate.py --model outputs/demo --num_images 500 --class_label all --guidance_scale 1.5 \
        --reference mnist --classifier_dir mnist-classifier --out eval/
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
    MIN_EXTRACTOR_ACCURACY,
    ReferenceClassifier,
    UsageError,
    add_class_and_guidance_arguments,
    class_labels_for,
    compute_metrics,
    count_parameters,
    guidance_for,
    load_pipeline,
    mixture_macs_per_call,
    mnist_digits,
    read_image_folder,
    to_uint8_images,
)
from diffusers_experts.saving import atomic_file
from diffusers_experts.training.arguments import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="MultiExpertPipeline or ExpertMixtureUNet folder, or a Hub repo id.")
    source.add_argument("--samples", help="Folder of generated images.")
    parser.add_argument("--num_images", type=int, default=1000, help="Samples to generate with --model.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="Inference steps with --model.")
    parser.add_argument("--scheduler", default="ddim", help="Scheduler name (see diffusers_experts.schedulers).")
    add_class_and_guidance_arguments(parser)
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
    parser.add_argument("--classifier_steps", type=int, default=500, help="Training steps of a new classifier.")
    parser.add_argument(
        "--min_classifier_accuracy",
        type=float,
        default=MIN_EXTRACTOR_ACCURACY,
        help="Held-out accuracy the classifier must reach; below it evaluation stops (its scores would be meaningless).",
    )
    parser.add_argument("--kid_subset_size", type=int, default=None)
    parser.add_argument("--isc_splits", type=int, default=10)
    parser.add_argument("--out", default="eval")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def parse_args(argv=None):
    parser = build_parser()
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


def check_classifier(classifier: ReferenceClassifier, args) -> None:
    """Refuse a classifier whose recorded held-out accuracy is missing or below `--min_classifier_accuracy`."""
    accuracy = classifier.config.get("heldout_accuracy")
    if accuracy is None:
        raise UsageError(
            f"--classifier_dir {args.classifier_dir} holds a classifier without a recorded held-out accuracy (saved by "
            f"an older version): delete the folder to train a new one."
        )
    if accuracy < args.min_classifier_accuracy:
        raise UsageError(
            f"--classifier_dir {args.classifier_dir}: the classifier's held-out accuracy {accuracy:.3f} is below "
            f"--min_classifier_accuracy {args.min_classifier_accuracy}; its FID/KID would be meaningless. Raise "
            f"--classifier_steps (or give more labelled reference images); a new classifier is saved only if it passes."
        )


def load_classifier(args, reference: torch.Tensor, labels: torch.Tensor | None) -> str:
    """Folder of the offline feature extractor: reloaded when saved (and accurate enough), else trained on the
    labelled reference and saved only if it reaches `--min_classifier_accuracy`."""
    if os.path.isfile(os.path.join(args.classifier_dir, CONFIG_NAME)):
        check_classifier(ReferenceClassifier.from_pretrained(args.classifier_dir), args)
        return args.classifier_dir
    if labels is None:
        raise ValueError(
            f"No classifier in {args.classifier_dir!r} and no labels to train one: use --reference mnist or "
            f"--reference_dataset with --label_column, or --extractor inception."
        )
    start = time.perf_counter()
    classifier = ReferenceClassifier.fit(reference, labels, steps=args.classifier_steps, seed=args.seed)
    accuracy = classifier.config.heldout_accuracy
    print(f"trained the feature extractor in {time.perf_counter() - start:.0f}s (held-out accuracy {accuracy:.3f})")
    check_classifier(classifier, args)
    classifier.save_pretrained(args.classifier_dir)
    return args.classifier_dir


def generate(args) -> tuple[str, dict]:
    """Generate `--num_images` into `<out>/samples` (expert-major, resumable); params and MACs of the model."""
    pipe = load_pipeline(args.model, scheduler=args.scheduler)
    labels = class_labels_for(args.class_label, args.num_images, pipe.unet.config.num_class_embeds)
    guidance = guidance_for(args.guidance_scale, pipe.unet.num_experts, labels is not None)
    pipe.to(args.device)
    sample_dir = os.path.join(args.out, "samples")
    start = time.perf_counter()
    pipe.generate_many(
        args.num_images,
        batch_size=args.batch_size,
        seed=args.seed,
        output_dir=sample_dir,
        class_labels=labels,
        num_inference_steps=args.steps,
        guidance_scale=guidance,
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
        min_extractor_accuracy=args.min_classifier_accuracy,
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
    cli = build_parser()
    try:
        main(parse_args())
    except UsageError as error:  # found once the model or the classifier is loaded: one line naming the flag
        cli.error(str(error))
