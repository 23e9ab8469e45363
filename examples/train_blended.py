r"""Train expert denoisers jointly through their blended output, with a ratio schedule (two-experts paper).

    eps(x_t, t) = sum_k w_k(t) * eps_k(x_t, t),   two experts: r(t) * eps_1 + (1 - r(t)) * eps_0

`--ratio_schedule linear|sigmoid` fixes `w(t)`; `learned` trains per-expert logits at `--num_knots` knots over
`[0, T]` (`mixture.routing_logits`) together with the experts, with their own learning rate (`--routing_lr`).
`--init_from DIR` starts every expert from one pretrained single model (the paper's LSUN setting). Routing lives in
the exported `ExpertMixtureUNet` config (and `routing.safetensors` for the learned schedule), so sampling uses exactly
the schedule that was trained.

One CPU:

    python examples/train_blended.py --ratio_schedule learned --output_dir out/blended

Two CPU processes:

    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \
        examples/train_blended.py --ratio_schedule learned --output_dir out/blended

GPUs:

    accelerate launch --multi_gpu --num_processes 8 examples/train_blended.py --ratio_schedule sigmoid \
        --init_from out/single/unet/expert_0 --dataset_name <dataset> --resolution 64 --output_dir out/blended

The output folder loads with `MultiExpertPipeline.from_pretrained(output_dir)`.
"""

import argparse
import os

import torch
from accelerate.utils import set_seed

from diffusers_experts import ExpertMixtureUNet
from diffusers_experts import routing as R
from diffusers_experts.evaluation.trained_model import UsageError, usage_errors
from diffusers_experts.loading import class_from_model_folder
from diffusers_experts.training import (
    BatchStream,
    RunLog,
    build_training_dataset,
    check_output_dir,
    class_embeddings,
    configure_logging,
    dataset_description,
    denoising_loss,
    experts_from_args,
    export_run,
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
    resume,
    save_preview,
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


SCRIPT = "train_blended"
RATIO_SCHEDULES = ("linear", "sigmoid", "learned")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, usage=SHORT_USAGE)
    group = add_expert_arguments(parser, default_num_experts=2, default_expert_type="unet")
    group.add_argument("--ratio_schedule", type=str, default="learned", choices=list(RATIO_SCHEDULES))
    group.add_argument(
        "--init_from",
        type=str,
        default=None,
        help="Saved single model folder every expert starts from (instead of fresh experts).",
    )
    group.add_argument("--blend_width", type=float, default=None, help="Linear ramps' width (default T / (N-1)).")
    group.add_argument("--sharpness", type=float, default=10.0, help="Sigmoid ramps' steepness.")
    group.add_argument("--num_knots", type=int, default=11, help="Knots of the learned schedule.")
    group.add_argument("--learned_init", type=str, default="linear", choices=list(R.LEARNED_INITS))
    group.add_argument("--routing_lr", type=float, default=1e-2, help="Learning rate of the learned schedule.")
    add_diffusion_training_arguments(parser, default_output_dir="blended-model")
    return parser


def parse_args(argv=None):
    return parse_checked(build_parser(), argv, check_args)


def check_args(args):
    check_common_arguments(args)
    if not isinstance(args.num_experts, int) or args.num_experts < 2:
        raise ValueError(f"`--num_experts` must be at least 2 to blend experts, got {args.num_experts!r}.")
    R.normalize_boundaries(args.boundaries, args.num_experts, args.num_train_timesteps)
    if args.routing_lr <= 0:
        raise ValueError(f"`--routing_lr` must be > 0, got {args.routing_lr!r}.")
    if args.init_from is not None and args.model_config is not None:
        raise ValueError("`--init_from` gives the architecture: drop `--model_config`.")
    if args.init_from is not None and not os.path.isdir(args.init_from):
        raise ValueError(f"`--init_from` {args.init_from!r} is not a saved model folder.")
    check_output_dir(args, SCRIPT)


def make_mixture(args, sample_size: int, in_channels: int) -> ExpertMixtureUNet:
    if args.init_from is not None:
        with usage_errors("--init_from", args.init_from):
            expert_cls = class_from_model_folder(args.init_from)
            experts = [expert_cls.from_pretrained(args.init_from) for _ in range(args.num_experts)]
        got = (experts[0].config.sample_size, experts[0].config.in_channels, experts[0].config.get("num_class_embeds"))
        wanted = (sample_size, in_channels, class_embeddings(args.num_classes))
        if got != wanted:
            raise UsageError(
                f"`--init_from` model takes (sample_size, in_channels, num_class_embeds) = {got}, the data and "
                f"`--num_classes` give {wanted}."
            )
    else:
        experts = experts_from_args(args, sample_size, in_channels)
    routing_kwargs = {"sharpness": args.sharpness, "num_knots": args.num_knots, "learned_init": args.learned_init}
    if args.blend_width is not None:
        routing_kwargs["blend_width"] = args.blend_width
    return ExpertMixtureUNet.from_experts(
        experts,
        boundaries=args.boundaries,
        routing=args.ratio_schedule,
        num_train_timesteps=args.num_train_timesteps,
        **routing_kwargs,
    )


def main(args):
    # 1. data and the mixture: every check on them runs before training starts
    set_seed(args.seed)
    dataset, num_channels = build_training_dataset(args)
    mixture = make_mixture(args, args.resolution, num_channels)

    # 2. accelerate (blended routing may give an expert zero weight on a whole batch: DDP must allow that)
    accelerator = make_accelerator(args, find_unused_parameters=True)
    configure_logging()
    prepare_output_dir(args, accelerator, SCRIPT)
    dataloader = make_dataloader(dataset, args)

    # 3. one optimizer, the routing parameters in their own group
    if args.gradient_checkpointing:
        mixture.enable_gradient_checkpointing()
    noise_scheduler = make_noise_scheduler(args)
    groups = [{"params": list(mixture.experts.parameters()), "lr": args.learning_rate}]
    if mixture.routing_logits is not None:
        groups.append({"params": [mixture.routing_logits], "lr": args.routing_lr, "weight_decay": 0.0})
    optimizer = make_optimizer(groups, args)
    total_steps = optimizer_steps(args, dataloader, accelerator)
    lr_scheduler = make_lr_scheduler(optimizer, args, accelerator, total_steps)
    model, optimizer, lr_scheduler, dataloader = accelerator.prepare(mixture, optimizer, lr_scheduler, dataloader)
    # the learned schedule is averaged with the experts: exporting averaged experts with the last raw logits would pair
    # weights that were never trained together
    routing_parameters = [mixture.routing_logits] if mixture.routing_logits is not None else None
    ema = make_ema(args, accelerator, list(mixture.experts), range(mixture.num_experts), routing_parameters)
    generator = process_generator(accelerator, args.seed)

    # 4. resume, train
    global_step = resume(accelerator, args.output_dir, args.resume_from_checkpoint)
    run_log = RunLog(accelerator, args, "train_blended", total_steps, initial_step=global_step)
    stream = iter(BatchStream(dataloader, start_batch=global_step * args.gradient_accumulation_steps))
    device = accelerator.device
    while global_step < total_steps:
        model.train()
        step_loss = 0.0
        for _ in range(args.gradient_accumulation_steps):
            batch = next(stream)
            with accelerator.accumulate(model):
                clean = batch["pixel_values"].to(device)
                noise = torch.randn(clean.shape, generator=generator).to(device)
                # uniform on [0, T): the blend, not the sampling, decides which expert learns at t
                timesteps = torch.randint(0, args.num_train_timesteps, (clean.shape[0],), generator=generator)
                timesteps = timesteps.to(device)
                labels = training_labels(args, batch, generator, device)
                # the prepared mixture: its output is the blend of the experts' predictions
                loss = denoising_loss(model, noise_scheduler, clean, noise, timesteps, labels, args.prediction_type)
                params = mixture.experts.parameters()
                optimizer_step(accelerator, loss, optimizer, lr_scheduler, params, args.max_grad_norm)
            step_loss += accelerator.gather(loss.detach()).mean().item() / args.gradient_accumulation_steps
        if ema is not None:
            for k in range(mixture.num_experts):
                ema.step(k)
            if routing_parameters is not None:
                ema.step_routing()
        global_step += 1
        logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}
        if mixture.routing_logits is not None:
            # the learned ratio r(t) = w_{N-1}(t) at a few noise levels, to watch the schedule move
            probe = torch.tensor([0.25, 0.5, 0.75]) * args.num_train_timesteps
            with torch.no_grad():
                weights = mixture.expert_weights(probe.to(device))
            logs.update({f"w_last(t={int(t)})": float(w) for t, w in zip(probe, weights[:, -1])})
        run_log.step(global_step, logs, loss=f"{step_loss:.4f}")
        maybe_save_checkpoint(accelerator, args, global_step, total_steps)
        if args.save_images_steps and global_step % args.save_images_steps == 0 and accelerator.is_main_process:
            save_preview(args, mixture, noise_scheduler, f"step-{global_step}.png", ema, None, device)
    run_log.close()

    # 5. export
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to_experts()
    if accelerator.is_main_process:
        metadata = {
            "training_steps": total_steps,
            "dataset": dataset_description(args),
            "hyperparameters": {
                "ratio_schedule": args.ratio_schedule,
                "routing_lr": args.routing_lr if args.ratio_schedule == "learned" else None,
                "init_from": args.init_from,
                "train_batch_size": args.train_batch_size,
                "learning_rate": args.learning_rate,
                "resolution": args.resolution,
                "guidance_scale": args.guidance_scale if args.num_classes else None,
            },
        }
        export_run(args, mixture, noise_scheduler, metadata, None, device)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main(parse_args())
    except UsageError as error:  # found once the data or a model is loaded: one line naming the flag
        build_parser().error(str(error))
