r"""Score trained multi-expert and single models side by side on held-out MNIST digits (what `make demo` prints).

For every `--model NAME=DIR` (a folder written by `examples/train_meme.py`) and every `--guidance_scale`:

- class accuracy of `--num_images` class-conditional samples (classes cycled 0..9), judged by an offline MNIST
  classifier trained on the training digits (its held-out accuracy must reach 0.9, see `ReferenceClassifier`);
- FID and KID of those samples against the held-out digits, at the models' resolution, with that classifier's
  features (figures comparable only with figures from the same classifier);
- the held-out denoising loss per timestep bin (noise-prediction MSE on digits never trained on, fixed noise and t);
- parameters and MACs per denoiser call.

Each model is reported at its best guidance scale (lowest FID) and all at one shared scale. The first 40 samples of
each model at its best scale are saved as a grid, `<out>/grid_<NAME>.png` (4 rows of the classes 0..9).

    python examples/demo_report.py --model mixture=outputs/demo --model single=outputs/demo-single \
        --train_digits 4500 --num_images 300 --guidance_scale 1.0 1.5 2.0 --out outputs/demo
"""

import argparse
import json
import os
import time

import torch

from diffusers_experts.evaluation import (
    MNIST_NUM_CLASSES,
    ReferenceClassifier,
    UsageError,
    compute_metrics,
    count_parameters,
    heldout_loss,
    load_pipeline,
    mixture_macs_per_call,
    mnist_digits,
    save_image_grid,
)
from diffusers_experts.saving import atomic_file
from diffusers_experts.training.arguments import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="NAME=FOLDER of a trained model (repeat).")
    parser.add_argument(
        "--train_digits", type=int, default=4500, help="Digits the models trained on (the rest is held out)."
    )
    parser.add_argument("--num_images", type=int, default=300, help="Samples per model and guidance scale.")
    parser.add_argument("--guidance_scale", type=float, nargs="+", default=[1.0, 1.5, 2.0], help="Scales to sweep.")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps.")
    parser.add_argument("--classifier_steps", type=int, default=300, help="Training steps of the judging classifier.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/demo", help="Folder of the report, grids and the classifier.")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    models = {}
    for item in args.model:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--model takes NAME=FOLDER, got {item!r}")
        if name in models:
            parser.error(f"--model names must differ, got {name!r} twice")
        models[name] = folder
    args.models = models
    if not 0 < args.train_digits < 5000:
        parser.error(f"--train_digits must lie in [1, 4999] (5,000 bundled digits), got {args.train_digits}")
    if args.num_images < MNIST_NUM_CLASSES:
        parser.error(f"--num_images must be at least {MNIST_NUM_CLASSES} (one per class), got {args.num_images}")
    return args


def judge(args, image_size: int) -> ReferenceClassifier:
    """The offline classifier that judges the samples: trained on the training digits, cached in `<out>`."""
    folder = os.path.join(args.out, f"classifier-{image_size}px")
    if os.path.isdir(folder):
        classifier = ReferenceClassifier.from_pretrained(folder)
    else:
        digits, labels = mnist_digits(image_size)
        classifier = ReferenceClassifier.fit(
            digits[: args.train_digits], labels[: args.train_digits], steps=args.classifier_steps, seed=args.seed
        )
    accuracy = classifier.config.heldout_accuracy
    if accuracy is None or accuracy < 0.9:
        raise UsageError(f"the judging classifier reached held-out accuracy {accuracy}; raise --classifier_steps")
    classifier.save_pretrained(folder)
    return classifier


def score(pipe, classifier, reference, args, guidance: float) -> tuple[dict, list]:
    labels = torch.arange(args.num_images) % MNIST_NUM_CLASSES
    result = pipe.generate_many(
        args.num_images,
        batch_size=100,
        seed=args.seed,
        class_labels=labels,
        output_type="pt",
        num_inference_steps=args.steps,
        guidance_scale=guidance,
    )
    images = (result.images * 255).round().to(torch.uint8)
    predicted = classifier.extract(images)[1].argmax(dim=1)
    metrics = compute_metrics(images, reference, metrics=("fid", "kid"), feature_extractor=classifier, seed=args.seed)
    row = {
        "guidance_scale": guidance,
        "class_accuracy": float((predicted == labels).float().mean()),
        "grid_class_accuracy": float((predicted[:40] == labels[:40]).float().mean()),
        "fid": metrics["fid"],
        "kid": metrics["kid_mean"],
    }
    return row, list(result.images[:40])


def report_model(name: str, folder: str, classifier, reference, heldout, args) -> dict:
    pipe = load_pipeline(folder, scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    mixture = pipe.unet
    if mixture.config.num_class_embeds != MNIST_NUM_CLASSES + 1:
        raise UsageError(f"--model {name}={folder} is not a class-conditional MNIST model (10 classes + null class)")
    start = time.perf_counter()
    rows, grids = [], {}
    for guidance in args.guidance_scale:
        row, grid = score(pipe, classifier, reference, args, guidance)
        rows.append(row)
        grids[guidance] = grid
    best = min(rows, key=lambda r: r["fid"])
    save_image_grid(grids[best["guidance_scale"]], os.path.join(args.out, f"grid_{name}.png"), columns=10, scale=4)
    images, labels = heldout
    loss = heldout_loss(mixture, pipe.scheduler, images, class_labels=labels, seed=args.seed, conditions=["cond"])
    pipe.scheduler.set_timesteps(args.steps)
    size = mixture.config.sample_size
    macs = mixture_macs_per_call(
        mixture, pipe.scheduler.timesteps, (1, mixture.config.in_channels, size, size), class_labels=labels[:1]
    )
    return {
        "name": name,
        "folder": folder,
        "experts": mixture.num_experts,
        "params": count_parameters(mixture),
        "macs_per_step": macs,
        "heldout_loss": loss.mean(),
        "heldout_loss_bins": loss.bins([0, 250, 500, 750, 1000]),
        "sweep": rows,
        "best": best,
        "scoring_seconds": time.perf_counter() - start,
    }


def print_table(results: list[dict], shared: float, real: dict) -> None:
    print(
        f"\nOn held-out MNIST digits; each model at its best guidance scale (lowest FID) and at the shared {shared}:"
    )
    header = "model | experts | params | MACs/step | loss t<250 | 250-500 | 500-750 | >=750 | best g | acc | grid acc | FID | acc@g | FID@g"
    print(header)
    print("|".join("---" for _ in header.split("|")))
    for r in results:
        at_shared = next(row for row in r["sweep"] if row["guidance_scale"] == shared)
        bins = " | ".join(f"{v:.4f}" for v in r["heldout_loss_bins"])
        b = r["best"]
        print(
            f"{r['name']} | {r['experts']} | {r['params'] / 1e6:.2f}M | {r['macs_per_step'] / 1e6:.1f}M | {bins} | "
            f"{b['guidance_scale']} | {b['class_accuracy']:.1%} | {b['grid_class_accuracy']:.1%} | {b['fid']:.2f} | "
            f"{at_shared['class_accuracy']:.1%} | {at_shared['fid']:.2f}"
        )
    print(f"real digits | | | | | | | | | {real['class_accuracy']:.1%} | | {real['fid']:.2f} | |")


def main(args) -> list[dict]:
    os.makedirs(args.out, exist_ok=True)
    first = load_pipeline(next(iter(args.models.values())))
    image_size = first.unet.config.sample_size
    classifier = judge(args, image_size)
    digits, labels = mnist_digits(image_size)
    reference = digits[args.train_digits :]
    heldout = (reference.float() / 127.5 - 1.0, labels[args.train_digits :])
    results = [
        report_model(name, folder, classifier, reference, heldout, args) for name, folder in args.models.items()
    ]
    shared = sorted(r["best"]["guidance_scale"] for r in results)[len(results) // 2]
    # the floor: as many real training digits as samples, scored the same way
    real_images = digits[: args.num_images]
    real_scores = compute_metrics(real_images, reference, metrics=("fid", "kid"), feature_extractor=classifier)
    # (accuracy: the classifier's own held-out accuracy; it trained on these digits)
    real = {"class_accuracy": classifier.config.heldout_accuracy, "fid": real_scores["fid"]}
    print_table(results, shared, real)
    path = os.path.join(args.out, "report.json")
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump({"shared_guidance_scale": shared, "real_digits": real, "models": results}, f, indent=2)
    print(f"wrote {path} and the grids grid_<model>.png")
    return results


if __name__ == "__main__":
    cli = build_parser()
    try:
        main(parse_args())
    except UsageError as error:
        cli.error(str(error))
