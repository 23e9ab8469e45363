r"""Train a multi-expert diffusion model (MEME, AAAI 2024) with Hugging Face Accelerate.

N experts each own part of the noise range (an `ExpertMixtureUNet`); each expert trains on its own timesteps
(`--strategy soft`: MEME's soft expert strategy, `hard`: own interval only, `uniform`: anywhere), so a training step
costs one expert. Experts are MEME iU-Nets with per-expert attention shares (`--expert_type iunet`), plain
`UNet2DModel`s (`--expert_type unet`, the paper's "Multi-Expert" baseline), one model (`--num_experts 1`, the
single-model baselines), or LoRA adapters on one shared frozen base (`--lora_rank R --base_model DIR`).

One CPU (or one GPU):

    accelerate launch --num_processes 1 examples/train_meme.py --output_dir out/meme
    python examples/train_meme.py --output_dir out/meme          # the same, without accelerate's launcher

Two CPU processes (data parallel, gloo):

    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \
        examples/train_meme.py --output_dir out/meme

Multi-GPU, one node / several nodes:

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 examples/train_meme.py \
        --dataset_name <dataset> --resolution 64 --model_config examples/configs/meme_s.json --output_dir out/meme
    accelerate launch --multi_gpu --num_machines 2 --machine_rank $RANK --main_process_ip $MASTER \
        --main_process_port 29500 --num_processes 16 examples/train_meme.py ...

Experts in parallel (separate jobs, GPUs or nodes), then one mixture:

    for k in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$k accelerate launch examples/train_meme.py --expert_index $k \
        --output_dir out/expert_$k & done; wait
    python examples/train_meme.py --assemble out/expert_0 out/expert_1 out/expert_2 out/expert_3 --output_dir out/meme

The output folder loads with `MultiExpertPipeline.from_pretrained(output_dir)` and holds model cards for the
mixture and each expert. `--max_train_steps` counts optimizer steps *per expert*.
"""

import argparse
import os

import torch
from accelerate.utils import set_seed
from diffusers import DDPMScheduler

from diffusers_experts import ExpertMixtureUNet
from diffusers_experts import routing as R
from diffusers_experts.evaluation.trained_model import UsageError
from diffusers_experts.training import (
    BatchStream,
    LatentCache,
    RunLog,
    build_lora_experts,
    build_training_dataset,
    check_output_dir,
    class_embeddings,
    collate,
    configure_logging,
    dataset_description,
    denoising_loss,
    enable_gradient_checkpointing,
    encode_latents,
    experts_from_args,
    export_pipeline,
    export_run,
    load_vae,
    make_accelerator,
    make_dataloader,
    make_ema,
    make_lr_scheduler,
    make_noise_scheduler,
    make_optimizer,
    maybe_save_checkpoint,
    optimizer_step,
    optimizer_steps,
    prepare_output_dir,
    process_generator,
    push_pipeline,
    read_expert_runs,
    resume,
    save_expert_run,
    save_preview,
    trainable_parameters,
    training_labels,
)
from diffusers_experts.training.arguments import (
    SHORT_USAGE,
    HelpFormatter,
    add_diffusion_training_arguments,
    add_expert_arguments,
    check_common_arguments,
    parse_checked,
)
from diffusers_experts.training.export import EXPERT_RUN_FOLDER, SCHEDULER_FOLDER
from diffusers_experts.training.latents import vae_downsampling_factor


SCRIPT = "train_meme"
EXPERT_ORDERS = ("sequential", "interleaved")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, usage=SHORT_USAGE)
    group = add_expert_arguments(parser, default_num_experts=4, default_expert_type="iunet")
    group.add_argument(
        "--strategy",
        type=str,
        default="soft",
        choices=list(R.TIMESTEP_STRATEGIES),
        help="Timesteps per expert: soft (MEME), hard (own interval) or uniform.",
    )
    group.add_argument(
        "--expertization_probs",
        type=float,
        nargs="+",
        default=None,
        help="Soft strategy p_k per expert (default MEME's 0.8 0.4 0.2 0.1 for 4 experts).",
    )
    group.add_argument("--expert_index", type=int, default=None, help="Train only expert k (parallel jobs).")
    group.add_argument(
        "--expert_order",
        type=str,
        default="sequential",
        choices=list(EXPERT_ORDERS),
        help="Training all experts in one run: one after another, or one step each in turn.",
    )
    group.add_argument(
        "--assemble",
        type=str,
        nargs="+",
        default=None,
        help="Build the mixture from the output folders of --expert_index runs, export, exit.",
    )
    group.add_argument("--lora_rank", type=int, default=None, help="Train each expert as a LoRA adapter of rank R.")
    group.add_argument("--lora_alpha", type=float, default=None)
    group.add_argument("--base_model", type=str, default=None, help="Frozen base model folder for LoRA experts.")
    group.add_argument("--vae", type=str, default=None, help="AutoencoderKL folder / repo: train on its latents.")
    group.add_argument("--vae_subfolder", type=str, default=None)
    group.add_argument("--cache_latents", action="store_true", help="Encode the dataset once (no --random_flip).")
    add_diffusion_training_arguments(parser, default_output_dir="meme-model")
    return parser


def parse_args(argv=None):
    return parse_checked(build_parser(), argv, check_args)


def check_args(args):
    """Stop on bad arguments before anything is loaded."""
    if args.assemble is not None:
        return
    check_common_arguments(args)
    if not isinstance(args.num_experts, int) or args.num_experts < 1:
        raise ValueError(f"`--num_experts` must be a positive integer, got {args.num_experts!r}.")
    if args.expert_index is not None and not 0 <= args.expert_index < args.num_experts:
        raise ValueError(
            f"`--expert_index` must be in [0, {args.num_experts - 1}] for {args.num_experts} experts, "
            f"got {args.expert_index}."
        )
    if args.expertization_probs is not None:
        if args.strategy != "soft":
            raise ValueError(f"`--expertization_probs` is for `--strategy soft`, got `--strategy {args.strategy}`.")
        R.check_expertization_probs(args.expertization_probs, args.num_experts)
    R.normalize_boundaries(args.boundaries, args.num_experts, args.num_train_timesteps)
    if (args.lora_rank is None) != (args.base_model is None):
        raise ValueError("LoRA experts need both `--lora_rank` and `--base_model`.")
    if args.lora_rank is not None and args.lora_rank < 1:
        raise ValueError(f"`--lora_rank` must be a positive integer, got {args.lora_rank!r}.")
    if args.lora_rank is not None and (args.model_config or args.vae):
        raise ValueError(
            "With LoRA experts the architecture and the sample space come from `--base_model`; drop "
            "`--model_config` and `--vae`."
        )
    if args.cache_latents and args.vae is None:
        raise ValueError("`--cache_latents` needs `--vae`.")
    if args.cache_latents and args.random_flip:
        raise ValueError("`--cache_latents` encodes each image once, without augmentation: drop `--random_flip`.")
    check_output_dir(args, SCRIPT)


# ---------------------------------------------------------------------------------------------------- set-up


def make_mixture(args, sample_size: int, in_channels: int):
    """The mixture whose experts this run trains (fresh experts, or LoRA adapters on the base)."""
    if args.lora_rank is not None:
        experts = build_lora_experts(args.base_model, args.num_experts, args.lora_rank, args.lora_alpha)
    else:
        experts = experts_from_args(args, sample_size, in_channels)
    return ExpertMixtureUNet.from_experts(
        experts, boundaries=args.boundaries, routing="hard", num_train_timesteps=args.num_train_timesteps
    )


def check_lora_base(args, mixture, sample_size: int, in_channels: int) -> None:
    """The LoRA base must take the data's samples and have the requested conditioning."""
    if (mixture.config.in_channels, mixture.config.sample_size) != (in_channels, sample_size):
        raise UsageError(
            f"`--base_model` takes {mixture.config.in_channels}x{mixture.config.sample_size}^2 samples but the data "
            f"gives {in_channels}x{sample_size}^2: match `--resolution` and `--num_channels` to the base."
        )
    if mixture.config.num_class_embeds != class_embeddings(args.num_classes):
        raise UsageError(
            f"`--num_classes` {args.num_classes} does not match `--base_model`, which has num_class_embeds="
            f"{mixture.config.num_class_embeds} (num_classes + 1 for the null class, or None)."
        )


def training_metadata(args, mixture, steps_per_expert: int, dataset_size: int) -> dict:
    probs = None
    if args.strategy == "soft":
        probs = args.expertization_probs or R.default_expertization_probs(mixture.num_experts)
    return {
        "training_steps": steps_per_expert * (1 if args.expert_index is not None else mixture.num_experts),
        "dataset": dataset_description(args),
        "hyperparameters": {
            "strategy": args.strategy,
            "expertization_probs": probs,
            "steps_per_expert": steps_per_expert,
            "train_batch_size": args.train_batch_size,
            "learning_rate": args.learning_rate,
            "resolution": args.resolution,
            "prediction_type": args.prediction_type,
            "num_classes": args.num_classes,
            "class_dropout_prob": args.class_dropout_prob,
            "guidance_scale": args.guidance_scale if args.num_classes else None,
            "lora_rank": args.lora_rank,
            "vae": args.vae,
            "dataset_size": dataset_size,
        },
        "experts": [{"training_steps": steps_per_expert} for _ in range(mixture.num_experts)],
    }


# ---------------------------------------------------------------------------------------------------- assemble


def assemble(args):
    """Build one mixture from the outputs of `--expert_index` runs and export it as a pipeline."""
    infos = read_expert_runs(args.assemble)
    paths = [os.path.join(info["path"], EXPERT_RUN_FOLDER) for info in infos]
    mixture = ExpertMixtureUNet.from_experts(
        paths,
        boundaries=infos[0]["boundaries"],
        routing=infos[0]["routing"],
        num_train_timesteps=infos[0]["num_train_timesteps"],
        boundary_units="timestep",
    )
    noise_scheduler = DDPMScheduler.from_pretrained(os.path.join(infos[0]["path"], SCHEDULER_FOLDER))
    vae = load_vae(infos[0]["vae"], infos[0].get("vae_subfolder")) if infos[0].get("vae") else None
    metadata = {
        "training_steps": sum(info["steps"] for info in infos),
        "dataset": infos[0].get("dataset"),
        "hyperparameters": {
            "strategy": infos[0]["strategy"],
            "expertization_probs": infos[0].get("expertization_probs"),
        },
        "experts": [{"training_steps": info["steps"]} for info in infos],
    }
    pipe = export_pipeline(args.output_dir, mixture, noise_scheduler, vae, metadata)
    print(f"assembled {len(infos)} experts into {args.output_dir}")
    if args.push_to_hub:
        push_pipeline(args, pipe, metadata)


# ---------------------------------------------------------------------------------------------------- training


def main(args):
    if args.assemble is not None:
        return assemble(args)
    # 1. data, the VAE of latent training, the mixture: every check on them runs before training starts
    set_seed(args.seed)
    dataset, num_channels = build_training_dataset(args)
    vae = load_vae(args.vae, args.vae_subfolder) if args.vae else None
    if vae is not None:
        factor = vae_downsampling_factor(vae)
        if args.resolution % factor:
            raise UsageError(f"`--resolution` {args.resolution} must be divisible by the VAE's downsampling {factor}.")
        sample_size, in_channels = args.resolution // factor, vae.config.latent_channels
    else:
        sample_size, in_channels = args.resolution, num_channels
    mixture = make_mixture(args, sample_size, in_channels)
    if args.lora_rank is not None:
        check_lora_base(args, mixture, sample_size, in_channels)

    # 2. accelerate, the data loader
    accelerator = make_accelerator(args, find_unused_parameters=args.lora_rank is not None)
    configure_logging()
    prepare_output_dir(args, accelerator, SCRIPT)
    if vae is not None:
        vae.to(accelerator.device)
        if args.cache_latents:
            dataset = LatentCache(vae, dataset, batch_size=args.train_batch_size)
    dataloader = make_dataloader(dataset, args, collate_fn=None if args.cache_latents else collate)

    # 3. the experts this run trains
    order = [args.expert_index] if args.expert_index is not None else list(range(mixture.num_experts))
    experts = [mixture.experts[k] for k in order]
    if args.gradient_checkpointing:
        for expert in experts:
            enable_gradient_checkpointing(expert)
    noise_scheduler = make_noise_scheduler(args)
    batches_per_step = args.gradient_accumulation_steps
    steps_per_expert = optimizer_steps(args, dataloader, accelerator)
    total_steps = steps_per_expert * len(order)

    # 4. optimizers, lr schedules, EMA: one per trained expert
    optimizers = [make_optimizer(trainable_parameters(expert), args) for expert in experts]
    lr_schedulers = [make_lr_scheduler(opt, args, accelerator, steps_per_expert) for opt in optimizers]
    n = len(experts)
    prepared = accelerator.prepare(*experts, *optimizers, *lr_schedulers, dataloader)
    models, optimizers, lr_schedulers, dataloader = (
        list(prepared[:n]),
        list(prepared[n : 2 * n]),
        list(prepared[2 * n : 3 * n]),
        prepared[3 * n],
    )
    ema = make_ema(args, accelerator, experts, order)
    generator = process_generator(accelerator, args.seed)

    # 5. resume
    global_step = resume(accelerator, args.output_dir, args.resume_from_checkpoint)

    # 6. train
    run_log = RunLog(accelerator, args, "train_meme", total_steps, initial_step=global_step)
    stream = iter(BatchStream(dataloader, start_batch=global_step * batches_per_step))
    accelerator.print(
        f"training experts {order} for {steps_per_expert} steps each ({args.expert_order}), "
        f"{len(dataset)} examples, {accelerator.num_processes} process(es), batch {args.train_batch_size}/process"
    )
    while global_step < total_steps:
        if args.expert_order == "sequential":
            slot = global_step // steps_per_expert
        else:
            slot = global_step % len(order)
        k, model, optimizer, lr_scheduler = order[slot], models[slot], optimizers[slot], lr_schedulers[slot]
        model.train()
        step_loss = 0.0
        for _ in range(batches_per_step):
            batch = next(stream)
            with accelerator.accumulate(model):
                loss = training_loss(
                    args, mixture, model, k, batch, noise_scheduler, vae, generator, accelerator.device
                )
                params = trainable_parameters(experts[slot])
                optimizer_step(accelerator, loss, optimizer, lr_scheduler, params, args.max_grad_norm)
            step_loss += accelerator.gather(loss.detach()).mean().item() / batches_per_step
        if ema is not None:
            ema.step(k)
        global_step += 1
        logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0], "expert": k}
        run_log.step(global_step, logs, expert=k, loss=f"{step_loss:.4f}")
        maybe_save_checkpoint(accelerator, args, global_step, total_steps)
        if args.save_images_steps and global_step % args.save_images_steps == 0 and args.expert_index is None:
            if accelerator.is_main_process:
                save_preview(args, mixture, noise_scheduler, f"step-{global_step}.png", ema, vae, accelerator.device)
    run_log.close()

    # 7. export (averaged weights), final preview
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to_experts()
    metadata = training_metadata(args, mixture, steps_per_expert, len(dataset))
    if accelerator.is_main_process:
        if args.expert_index is not None:
            info = {
                "expert_index": args.expert_index,
                "num_experts": mixture.num_experts,
                "boundaries": list(mixture.config.boundaries),
                "num_train_timesteps": mixture.config.num_train_timesteps,
                "routing": mixture.config.routing,
                "strategy": args.strategy,
                "expertization_probs": metadata["hyperparameters"]["expertization_probs"],
                "steps": steps_per_expert,
                "dataset": metadata["dataset"],
                "vae": os.path.abspath(args.vae) if args.vae and os.path.isdir(args.vae) else args.vae,
                "vae_subfolder": args.vae_subfolder,
            }
            save_expert_run(args.output_dir, mixture.experts[args.expert_index], info, noise_scheduler)
            print(f"saved expert {args.expert_index} to {args.output_dir}")
        else:
            export_run(args, mixture, noise_scheduler, metadata, vae, accelerator.device)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def training_loss(args, mixture, model, k, batch, noise_scheduler, vae, generator, device):
    """Denoising loss of expert `k` (`model`, its prepared module) on one batch, at timesteps the mixture draws for
    expert `k` (`--strategy`, `--expertization_probs`)."""
    if args.cache_latents:
        clean = LatentCache.sample(batch, vae.config.scaling_factor, generator)
    elif vae is not None:
        clean = encode_latents(vae, batch["pixel_values"], generator)
    else:
        clean = batch["pixel_values"]
    clean = clean.to(device)
    batch_size = clean.shape[0]
    noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype).to(device)
    timesteps = mixture.sample_training_timesteps(
        batch_size, k, args.strategy, args.expertization_probs, generator=generator, device=device
    )
    labels = training_labels(args, batch, generator, device)
    return denoising_loss(model, noise_scheduler, clean, noise, timesteps, labels, args.prediction_type)


if __name__ == "__main__":
    try:
        main(parse_args())
    except UsageError as error:  # found once the data or a model is loaded: one line naming the flag
        build_parser().error(str(error))
