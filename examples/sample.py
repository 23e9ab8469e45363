"""Sample images from a multi-expert model with any diffusers scheduler.

    python examples/sample.py --model DIR --num_images 64 --steps 50 --scheduler dpmpp --out samples/
    python examples/sample.py --model DIR --num_images 64 --class_label 3 --guidance_scale 1.0 3.0 --out samples/
    python examples/sample.py --model DIR --num_images 5000 --bulk --offload cuda --out samples/   # expert-major

`--model` is a saved `MultiExpertPipeline` folder (`model_index.json`), a saved `ExpertMixtureUNet` folder
(`config.json`), or a Hub repo id of either. Writes `000000.png`, ... and `grid.png` into `--out`.
"""

import argparse
import os

import torch
from PIL import Image

from diffusers_experts import BlendedScheduler
from diffusers_experts.evaluation import load_pipeline, save_image_grid
from diffusers_experts.schedulers import SCHEDULER_NAMES


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Pipeline or mixture folder, or a Hub repo id.")
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scheduler", default="ddim", help=f"One of {sorted(SCHEDULER_NAMES)}.")
    parser.add_argument("--blended", action="store_true", help="Wrap the scheduler in a BlendedScheduler.")
    parser.add_argument("--align", action="store_true", help="Align the steps to the expert boundaries (--blended).")
    parser.add_argument("--steps_per_expert", type=int, nargs="+", default=None, help="Expert 0 first (--blended).")
    parser.add_argument("--class_label", type=int, default=None, help="Class of class-conditional experts.")
    parser.add_argument(
        "--guidance_scale", type=float, nargs="+", default=[1.0], help="One value, or one per expert (expert 0 first)."
    )
    parser.add_argument("--offload", default=None, help="Per-expert offload onto this device (e.g. cuda).")
    parser.add_argument("--bulk", action="store_true", help="Expert-major generation (generate_many), resumable.")
    parser.add_argument("--seed", type=int, default=0, help="Image i uses seed + i.")
    parser.add_argument("--out", default="samples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(args):
    if not args.blended and (args.align or args.steps_per_expert):
        raise ValueError("`--align` / `--steps_per_expert` need `--blended`.")
    pipe = load_pipeline(args.model, scheduler=args.scheduler)
    if args.blended:
        options = dict(align_to_boundaries=args.align, steps_per_expert=args.steps_per_expert)
        pipe.scheduler = BlendedScheduler.from_scheduler(pipe.scheduler, **options)
    if args.offload:
        pipe.enable_expert_offload(args.offload)
    else:
        pipe.to(args.device)

    guidance = args.guidance_scale[0] if len(args.guidance_scale) == 1 else args.guidance_scale
    call = dict(num_inference_steps=args.steps, guidance_scale=guidance)
    os.makedirs(args.out, exist_ok=True)
    if args.bulk:
        result = pipe.generate_many(
            args.num_images, batch_size=args.batch_size, seed=args.seed, output_dir=args.out,
            class_labels=args.class_label, **call,
        )  # fmt: skip
        images = [Image.open(path) for path in result.paths[:64]]
        print(f"expert loads: {result.expert_loads}")
    else:
        images = []
        for start in range(0, args.num_images, args.batch_size):
            indices = range(start, min(start + args.batch_size, args.num_images))
            generators = [torch.Generator().manual_seed(args.seed + i) for i in indices]
            batch = pipe(len(indices), generator=generators, class_labels=args.class_label, **call).images
            for i, image in zip(indices, batch):
                image.save(os.path.join(args.out, f"{i:06d}.png"))
            images.extend(batch)
    save_image_grid(images[:64], os.path.join(args.out, "grid.png"))
    print(f"wrote {args.num_images} images and grid.png to {args.out}")


if __name__ == "__main__":
    main(parse_args())
