r"""Train a small diffusers `AutoencoderKL` for latent experts, offline (reconstruction + KL, no perceptual loss).

Pretrained VAEs cannot be downloaded everywhere; this trains one on the same data so latent experts can be trained
and shown offline (`examples/train_meme.py --vae OUT`). Users with internet pass any Hub VAE to `--vae` instead.
At the end the latents' standard deviation is measured and stored as `scaling_factor` in the VAE config, so scaled
latents have unit variance, as latent diffusion expects.

    python examples/train_vae.py --output_dir out/vae                                  # built-in MNIST, 1 CPU
    accelerate launch --multi_gpu --num_processes 4 examples/train_vae.py --dataset_name <dataset> \
        --resolution 64 --num_channels 3 --output_dir out/vae
"""

import argparse
import os

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import AutoencoderKL

from diffusers_experts.evaluation.trained_model import UsageError
from diffusers_experts.saving import atomic_directory
from diffusers_experts.training import (
    BatchStream,
    RunLog,
    build_training_dataset,
    check_output_dir,
    configure_logging,
    make_accelerator,
    make_dataloader,
    make_lr_scheduler,
    make_optimizer,
    maybe_save_checkpoint,
    optimizer_step,
    optimizer_steps,
    prepare_output_dir,
    process_generator,
    resume,
)
from diffusers_experts.training.arguments import (
    SHORT_USAGE,
    HelpFormatter,
    add_data_arguments,
    add_optimization_arguments,
    add_output_arguments,
    check_common_arguments,
    parse_checked,
)
from diffusers_experts.training.latents import vae_downsampling_factor


SCRIPT = "train_vae"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, usage=SHORT_USAGE)
    group = parser.add_argument_group("autoencoder")
    group.add_argument(
        "--block_out_channels",
        type=int,
        nargs="+",
        default=[32, 64],
        help="Channels per stage; the latents are 2 ** (stages - 1) times smaller.",
    )
    group.add_argument("--layers_per_block", type=int, default=1)
    group.add_argument("--latent_channels", type=int, default=4)
    group.add_argument("--norm_num_groups", type=int, default=16)
    group.add_argument("--kl_weight", type=float, default=1e-6, help="Weight of the KL term (0 = plain autoencoder).")
    add_data_arguments(parser)
    add_optimization_arguments(parser)
    add_output_arguments(parser, default_output_dir="vae-model")
    return parser


def parse_args(argv=None):
    return parse_checked(build_parser(), argv, check_args)


def check_args(args):
    """Stop on bad arguments before anything is loaded."""
    check_common_arguments(args)
    if args.kl_weight < 0:
        raise ValueError(f"`--kl_weight` must be >= 0, got {args.kl_weight!r}.")
    if any(c % args.norm_num_groups for c in args.block_out_channels):
        raise ValueError(
            f"`--block_out_channels` {args.block_out_channels} must be divisible by `--norm_num_groups` "
            f"{args.norm_num_groups}."
        )
    factor = 2 ** (len(args.block_out_channels) - 1)
    if args.resolution % factor:
        raise ValueError(f"`--resolution` {args.resolution} must be divisible by the downsampling {factor}.")
    check_output_dir(args, SCRIPT)


def make_vae(args, num_channels: int) -> AutoencoderKL:
    stages = len(args.block_out_channels)
    return AutoencoderKL(
        in_channels=num_channels,
        out_channels=num_channels,
        down_block_types=("DownEncoderBlock2D",) * stages,
        up_block_types=("UpDecoderBlock2D",) * stages,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        latent_channels=args.latent_channels,
        norm_num_groups=args.norm_num_groups,
        sample_size=args.resolution,
    )


class VAEObjective(torch.nn.Module):
    """Encode, sample the posterior with the given noise, decode: returns (reconstruction, mean KL to N(0, I))."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, noise: torch.Tensor):
        dist = self.vae.encode(images).latent_dist
        latents = dist.mean + dist.std * noise.to(dist.mean.dtype)
        return self.vae.decode(latents).sample, dist.kl().mean()


@torch.no_grad()
def latent_std(vae, dataloader, device, max_batches: int = 20) -> float:
    """Standard deviation of the (unscaled) latents over some training batches."""
    values = []
    for i, batch in enumerate(dataloader):
        if i == max_batches:
            break
        values.append(vae.encode(batch["pixel_values"].to(device)).latent_dist.mean.flatten().cpu())
    return float(torch.cat(values).std())


def main(args):
    set_seed(args.seed)
    dataset, num_channels = build_training_dataset(args)
    accelerator = make_accelerator(args)
    configure_logging()
    prepare_output_dir(args, accelerator, SCRIPT)
    dataloader = make_dataloader(dataset, args)
    vae = make_vae(args, num_channels)
    optimizer = make_optimizer(vae.parameters(), args)
    total_steps = optimizer_steps(args, dataloader, accelerator)
    lr_scheduler = make_lr_scheduler(optimizer, args, accelerator, total_steps)
    # the objective runs in one forward, so DDP synchronises the gradients of encoder and decoder
    model, optimizer, lr_scheduler, dataloader = accelerator.prepare(
        VAEObjective(vae), optimizer, lr_scheduler, dataloader
    )
    latent_size = [args.resolution // vae_downsampling_factor(vae)] * 2
    generator = process_generator(accelerator, args.seed)

    global_step = resume(accelerator, args.output_dir, args.resume_from_checkpoint)
    run_log = RunLog(accelerator, args, "train_vae", total_steps, initial_step=global_step)
    stream = iter(BatchStream(dataloader, start_batch=global_step * args.gradient_accumulation_steps))
    while global_step < total_steps:
        model.train()
        logs = {"loss": 0.0, "reconstruction": 0.0, "kl": 0.0}
        for _ in range(args.gradient_accumulation_steps):
            batch = next(stream)
            with accelerator.accumulate(model):
                images = batch["pixel_values"].to(accelerator.device)
                noise = torch.randn((images.shape[0], args.latent_channels, *latent_size), generator=generator)
                reconstruction, kl = model(images, noise.to(images.device))
                rec = F.mse_loss(reconstruction.float(), images.float())
                kl = kl / images[0].numel()  # per pixel, like the reconstruction term
                loss = rec + args.kl_weight * kl
                optimizer_step(accelerator, loss, optimizer, lr_scheduler, model.parameters(), args.max_grad_norm)
            for name, value in (("loss", loss), ("reconstruction", rec), ("kl", kl)):
                logs[name] += accelerator.gather(value.detach()).mean().item() / args.gradient_accumulation_steps
        global_step += 1
        run_log.step(global_step, logs, rec=f"{logs['reconstruction']:.4f}")
        maybe_save_checkpoint(accelerator, args, global_step, total_steps)
    run_log.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(model).vae.eval()
        std = latent_std(vae, dataloader, accelerator.device)
        vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
        with atomic_directory(args.output_dir, stale=("vae",)) as tmp:
            vae.save_pretrained(os.path.join(tmp, "vae"), safe_serialization=True)
        print(f"saved the VAE to {os.path.join(args.output_dir, 'vae')} (latent std {std:.4f})")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main(parse_args())
    except UsageError as error:  # found once the data or a model is loaded: one line naming the flag
        build_parser().error(str(error))
