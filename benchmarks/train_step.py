"""Per-step training time of train_meme's inner step vs a plain diffusers UNet2DModel training step.

Both steps train the *same* `UNet2DModel` on the *same* batch with the same optimizer: the plain step is the
`train_unconditional.py` recipe (uniform timesteps, `add_noise`, MSE, backward, clip, AdamW); the MEME step is
`examples/train_meme.py`'s `training_loss` on that model as expert k of a 4-expert `ExpertMixtureUNet` (soft
timestep sampling through the mixture, class-free), then the same backward/clip/AdamW. Steps alternate between the
two so that machine load affects both alike; the script prints the median step times and their ratio
(target <= 1.05).

    OMP_NUM_THREADS=2 python benchmarks/train_step.py                 # CPU
    python benchmarks/train_step.py --device cuda --batch_size 64 --resolution 64
"""

import argparse
import importlib.util
import os
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from diffusers_experts import ExpertMixtureUNet


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_train_meme():
    spec = importlib.util.spec_from_file_location("train_meme", os.path.join(ROOT, "examples", "train_meme.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 64])
    parser.add_argument("--steps", type=int, default=12, help="Timed steps of each kind (after 2 warm-up steps).")
    return parser.parse_args()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(args):
    train_meme = load_train_meme()
    torch.manual_seed(0)
    stages = len(args.block_out_channels)
    model = UNet2DModel(
        sample_size=args.resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=2,
        down_block_types=("DownBlock2D",) * (stages - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (stages - 1),
        norm_num_groups=8,
    ).to(args.device)
    others = [UNet2DModel.from_config(model.config) for _ in range(3)]
    mixture = ExpertMixtureUNet.from_experts([*others[:1], model, *others[1:]])  # the model is expert 1 of 4
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    clean = torch.randn(args.batch_size, 3, args.resolution, args.resolution, device=args.device)
    batch = {"pixel_values": clean}
    meme_args = argparse.Namespace(
        cache_latents=False,
        strategy="soft",
        expertization_probs=None,
        num_classes=None,
        class_dropout_prob=None,
        prediction_type="epsilon",
    )
    generator = torch.Generator().manual_seed(0)

    def plain_step():
        noise = torch.randn(clean.shape, generator=generator).to(args.device)
        timesteps = torch.randint(0, 1000, (clean.shape[0],), generator=generator).to(args.device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(model(noisy, timesteps).sample.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def meme_step():
        loss = train_meme.training_loss(
            meme_args, mixture, model, 1, batch, noise_scheduler, None, generator, args.device
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {"plain": [], "meme": []}
    for i in range(args.steps + 2):
        for name, step in (
            (("plain", plain_step), ("meme", meme_step))
            if i % 2 == 0
            else (
                ("meme", meme_step),
                ("plain", plain_step),
            )
        ):
            sync(args.device)
            start = time.perf_counter()
            step()
            sync(args.device)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    plain, meme = statistics.median(times["plain"]), statistics.median(times["meme"])
    print(
        f"device {args.device}, threads {torch.get_num_threads()}, batch {args.batch_size}x3x{args.resolution}^2, "
        f"UNet2DModel {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {args.steps} steps each"
    )
    print(f"plain UNet2DModel step: {plain * 1000:.1f} ms (median)")
    print(f"train_meme inner step:  {meme * 1000:.1f} ms (median)")
    print(f"ratio meme / plain: {meme / plain:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main(parse_args())
