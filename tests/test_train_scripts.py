"""End-to-end runs of examples/train_meme.py, train_blended.py and train_vae.py in subprocesses, on a tiny generated
image folder (16 RGB images of 16x16, two classes), a few steps each. The runs start together in a module fixture
(two at a time, since interpreter start-up dominates); each test checks one run's outputs, which must load back and
sample."""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors.torch import load_file


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TINY_IUNET = {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_head_dim": 8, "norm_num_groups": 8}
TINY_UNET = {
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
}
QUICK = [
    "--report_to",
    "none",
    "--train_batch_size",
    "4",
    "--resolution",
    "16",
    "--lr_warmup_steps",
    "0",
    "--num_preview_images",
    "2",
    "--preview_inference_steps",
    "2",
    "--learning_rate",
    "1e-3",
]


def _environment() -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(ROOT, "src"), env.get("PYTHONPATH")) if p)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        )
    return done


def _script(name: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(EXAMPLES, name), *args]


def _losses(output_dir) -> list[tuple[int, float]]:
    with open(os.path.join(output_dir, "train_log.jsonl"), encoding="utf-8") as f:
        return [(row["step"], row["loss"]) for row in map(json.loads, f)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from diffusers import UNet2DModel
    from PIL import Image

    root = tmp_path_factory.mktemp("train_scripts")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        os.makedirs(root / "data" / label)
        for i in range(8):
            array = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / "data" / label / f"{i}.png")
    (root / "tiny_iunet.json").write_text(json.dumps(TINY_IUNET))
    (root / "tiny_unet.json").write_text(json.dumps(TINY_UNET))
    torch.manual_seed(0)
    UNet2DModel(sample_size=16, **TINY_UNET).save_pretrained(root / "base")  # frozen base of the LoRA experts
    return root


@pytest.fixture(scope="module")
def runs(workspace):
    """Start every scripted run (dependent runs chained), two at a time; tests wait for the one they check."""
    w = workspace
    data = ["--train_data_dir", str(w / "data")]
    iunet, unet = ["--model_config", str(w / "tiny_iunet.json")], ["--model_config", str(w / "tiny_unet.json")]

    def meme_soft_conditional_then_resume():
        common = _script(
            "train_meme.py",
            *data,
            *QUICK,
            *iunet,
            "--num_experts",
            "2",
            "--strategy",
            "soft",
            "--expertization_probs",
            "0.9",
            "0.3",
            "--num_classes",
            "2",
            "--class_dropout_prob",
            "0.3",
            "--use_ema",
            "--max_train_steps",
            "3",
            "--checkpointing_steps",
            "2",
            "--lr_scheduler",
            "cosine",
            "--prediction_type",
            "v_prediction",
        )
        full = _run([*common, "--output_dir", str(w / "soft")])
        # resume from checkpoint-2 of an identical run; a half-written (temporary) checkpoint must be ignored
        resumed = w / "resumed"
        os.makedirs(resumed)
        shutil.copytree(w / "soft" / "checkpoint-2", resumed / "checkpoint-2")
        os.makedirs(resumed / ".checkpoint-4.tmp")
        again = _run([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
        # the same folder for another configuration: refused before anything loads (issue 11, item 3)
        other = list(common)
        other[other.index("--num_classes") + 1] = "3"
        refused = subprocess.run(
            [*other, "--output_dir", str(w / "soft")], env=_environment(), capture_output=True, text=True, cwd=ROOT
        )
        return full, again, refused

    def per_expert_then_assemble():
        for k in (0, 1):
            _run(
                _script(
                    "train_meme.py",
                    *data,
                    *QUICK,
                    *unet,
                    "--expert_type",
                    "unet",
                    "--num_experts",
                    "2",
                    "--strategy",
                    "hard",
                    "--boundaries",
                    "300",
                    "--expert_index",
                    str(k),
                    "--max_train_steps",
                    "2",
                    "--output_dir",
                    str(w / f"expert_{k}"),
                )
            )
        return _run(
            _script(
                "train_meme.py",
                "--assemble",
                str(w / "expert_0"),
                str(w / "expert_1"),
                "--output_dir",
                str(w / "assembled"),
            )
        )

    def lora():
        return _run(
            _script(
                "train_meme.py",
                *data,
                *QUICK,
                "--lora_rank",
                "2",
                "--base_model",
                str(w / "base"),
                "--num_experts",
                "2",
                "--max_train_steps",
                "2",
                "--learning_rate",
                "1e-2",
                "--output_dir",
                str(w / "lora"),
            )
        )

    def vae_then_latent():
        _run(
            _script(
                "train_vae.py",
                *data,
                *QUICK[:8],
                "--block_out_channels",
                "8",
                "16",
                "--norm_num_groups",
                "8",
                "--latent_channels",
                "4",
                "--max_train_steps",
                "2",
                "--output_dir",
                str(w / "vae"),
            )
        )
        return _run(
            _script(
                "train_meme.py",
                *data,
                *QUICK,
                *unet,
                "--expert_type",
                "unet",
                "--num_experts",
                "2",
                "--vae",
                str(w / "vae"),
                "--cache_latents",
                "--max_train_steps",
                "1",
                "--output_dir",
                str(w / "latent"),
            )
        )

    def blended():
        return _run(
            _script(
                "train_blended.py",
                *data,
                *QUICK,
                *unet,
                "--ratio_schedule",
                "learned",
                "--routing_lr",
                "0.1",
                "--max_train_steps",
                "3",
                "--output_dir",
                str(w / "blended"),
            )
        )

    def two_processes():
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            os.path.join(EXAMPLES, "train_meme.py"),
            *data,
            *QUICK,
            *iunet,
            "--num_experts",
            "2",
            "--expert_order",
            "interleaved",
            "--max_train_steps",
            "2",
            "--checkpointing_steps",
            "2",
            "--output_dir",
            str(w / "ddp"),
        ]
        return _run(command)

    jobs = {
        "soft": meme_soft_conditional_then_resume,
        "assemble": per_expert_then_assemble,
        "lora": lora,
        "latent": vae_then_latent,
        "blended": blended,
        "ddp": two_processes,
    }
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(job) for name, job in jobs.items()}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _pipeline(path):
    from diffusers_experts import MultiExpertPipeline

    pipe = MultiExpertPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_soft_conditional_run_exports_a_pipeline_with_cards_and_samples_with_guidance(runs, workspace):
    full, _, _ = runs["soft"].result()
    out = workspace / "soft"
    assert "sample grid:" in full.stdout and os.path.isfile(out / "samples" / "final.png")
    assert os.path.isfile(out / "README.md") and os.path.isfile(out / "unet" / "expert_1" / "README.md")
    assert "0.9" in (out / "README.md").read_text()  # p_k in the card metadata
    pipe = _pipeline(out)
    mixture = pipe.unet
    assert mixture.num_experts == 2 and mixture.config.num_class_embeds == 3  # 2 classes + null class
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    images = pipe(
        batch_size=2,
        num_inference_steps=2,
        class_labels=[0, 1],
        guidance_scale=2.0,
        generator=torch.manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    assert [step for step, _ in _losses(out)] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(out)).count("checkpoint-6") == 1


def test_checkpoints_leave_the_progress_bar_alone_and_record_the_run_configuration(runs, workspace):
    full, _, _ = runs["soft"].result()
    # accelerate's INFO lines (about 16 per checkpoint) no longer interleave with the progress bar
    assert "Saving current state" not in full.stderr and "accelerate.checkpointing" not in full.stderr
    recorded = json.loads((workspace / "soft" / "run_config.json").read_text())
    assert recorded["script"] == "train_meme" and recorded["num_classes"] == 2 and "output_dir" not in recorded
    assert json.loads((workspace / "soft" / "checkpoint-6" / "run_config.json").read_text()) == recorded


def test_an_output_dir_of_another_configuration_is_refused_in_one_line(runs, workspace):
    _, _, refused = runs["soft"].result()
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"train_meme.py: error: `--output_dir` {workspace / 'soft'} holds another run (`--num_classes` 2 there, 3 "
        f"now): pass `--overwrite_output_dir` to replace it, or choose another `--output_dir`."
    )
    assert [step for step, _ in _losses(workspace / "soft")] == [1, 2, 3, 4, 5, 6]  # untouched


def test_resume_from_latest_checkpoint_continues_with_the_same_losses(runs, workspace):
    _, again, _ = runs["soft"].result()
    assert "resumed from" in again.stdout and "checkpoint-2 at step 2" in again.stdout
    uninterrupted = dict(_losses(workspace / "soft"))
    resumed = _losses(workspace / "resumed")
    assert [step for step, _ in resumed] == [3, 4, 5, 6]
    for step, loss in resumed:
        assert loss == uninterrupted[step], (step, loss, uninterrupted[step])
    weights = load_file(workspace / "resumed" / "unet" / "expert_1" / "diffusion_pytorch_model.safetensors")
    reference = load_file(workspace / "soft" / "unet" / "expert_1" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(weights[name], reference[name]) for name in reference)


def test_per_expert_runs_assemble_into_one_mixture(runs, workspace):
    from diffusers import UNet2DModel

    runs["assemble"].result()
    info = json.loads((workspace / "expert_1" / "expert_info.json").read_text())
    assert info["expert_index"] == 1 and info["strategy"] == "hard" and info["boundaries"] == [300.0]
    pipe = _pipeline(workspace / "assembled")
    assert pipe.unet.config.boundaries == [300.0]
    for k in (0, 1):
        alone = UNet2DModel.from_pretrained(workspace / f"expert_{k}" / "expert")
        for name, tensor in alone.state_dict().items():
            assert torch.equal(pipe.unet.experts[k].state_dict()[name], tensor)
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_lora_experts_are_saved_as_small_adapters_and_sample(runs, workspace):
    from diffusers_experts import LoRAExpert

    runs["lora"].result()
    out = workspace / "lora"
    base_bytes = os.path.getsize(workspace / "base" / "diffusion_pytorch_model.safetensors")
    for k in (0, 1):
        files = sorted(f for f in os.listdir(out / "unet" / f"expert_{k}") if f != "README.md")
        assert files == ["adapter_model.safetensors", "config.json"]
        assert os.path.getsize(out / "unet" / f"expert_{k}" / "adapter_model.safetensors") < base_bytes / 2
    pipe = _pipeline(out)
    experts = pipe.unet.experts
    assert all(isinstance(e, LoRAExpert) for e in experts) and experts[0].base_model is experts[1].base_model
    # the adapters trained (LoRA B starts at zero) and differ from each other
    b0 = [v for n, v in experts[0].adapter_state_dict().items() if "lora_B" in n]
    b1 = [v for n, v in experts[1].adapter_state_dict().items() if "lora_B" in n]
    assert any(v.abs().sum() > 0 for v in b0) and any(not torch.equal(a, b) for a, b in zip(b0, b1))
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_latent_experts_on_a_trained_tiny_vae(runs, workspace):
    runs["latent"].result()
    vae_config = json.loads((workspace / "vae" / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.18215  # measured from the latents
    pipe = _pipeline(workspace / "latent")
    assert pipe.vae is not None and pipe.unet.config.in_channels == 4 and pipe.unet.config.sample_size == 8
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_blended_learned_schedule_trains_its_parameters(runs, workspace):
    from diffusers_experts import ExpertMixtureUNet

    runs["blended"].result()
    pipe = _pipeline(workspace / "blended")
    assert pipe.unet.config.routing == "learned"
    fresh = ExpertMixtureUNet.from_experts(list(pipe.unet.experts), routing="learned")
    assert not torch.allclose(pipe.unet.routing_logits, fresh.routing_logits)
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_two_cpu_processes(runs, workspace):
    done = runs["ddp"].result()
    assert "2 process(es)" in done.stdout + done.stderr
    out = workspace / "ddp"
    assert sorted(os.listdir(out / "checkpoint-4")).count("random_states_1.pkl") == 1  # both processes saved
    assert [step for step, _ in _losses(out)] == [1, 2, 3, 4]
    pipe = _pipeline(out)
    assert pipe.unet.num_experts == 2


# ---------------------------------------------------------------------------------------------------- bad arguments


def _load_example(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--expertization_probs", "0.8", "1.4"], "must lie in [0, 1]"),
        (["--expertization_probs", "0.8", "0.4", "0.2"], "one probability per expert (2)"),
        (["--expert_index", "2"], "`--expert_index` must be in [0, 1]"),
        (["--class_dropout_prob", "0.1"], "needs `--num_classes`"),
        (["--lora_rank", "4"], "need both `--lora_rank` and `--base_model`"),
        (["--num_experts", "3", "--boundaries", "700", "300"], "strictly ascending"),
    ],
)
def test_bad_arguments_stop_before_training(argv, message, capsys):
    train_meme = _load_example("train_meme")
    with pytest.raises(SystemExit) as raised:
        train_meme.parse_args(["--num_experts", "2", *argv])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_dataset_and_resolution_errors_name_the_problem(workspace, tmp_path):
    import datasets

    from diffusers_experts.evaluation.trained_model import UsageError

    train_meme = _load_example("train_meme")
    no_images = tmp_path / "no_images"
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(no_images))
    args = train_meme.parse_args(["--dataset_name", str(no_images), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UsageError, match="no image column"):
        train_meme.main(args)
    args = train_meme.parse_args(
        [
            "--train_data_dir",
            str(workspace / "data"),
            "--resolution",
            "15",
            "--model_config",
            str(workspace / "tiny_iunet.json"),
            "--output_dir",
            str(tmp_path / "o"),
        ]
    )
    with pytest.raises(UsageError, match="`--resolution` 15 must be divisible by 2"):
        train_meme.main(args)


def test_push_to_hub_over_loopback(hub_server, workspace, tmp_path):
    """`--push_to_hub` publishes the exported pipeline (one commit, with cards) to the loopback Hub of the tests."""
    from huggingface_hub import HfApi

    from diffusers_experts import MultiExpertPipeline

    repo = "org/train-meme-push"
    command = _script(
        "train_meme.py",
        "--train_data_dir",
        str(workspace / "data"),
        *QUICK,
        "--model_config",
        str(workspace / "tiny_unet.json"),
        "--expert_type",
        "unet",
        "--num_experts",
        "2",
        "--max_train_steps",
        "2",
        "--output_dir",
        str(tmp_path / "out"),
        "--push_to_hub",
        "--hub_model_id",
        repo,
    )
    env = {**_environment(), "HF_HUB_OFFLINE": "0"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    api = HfApi()
    assert len(api.list_repo_commits(repo)) == 2  # the repo's initial commit + one push with everything
    files = set(api.list_repo_files(repo))
    assert {"model_index.json", "README.md", "unet/config.json", "unet/expert_1/README.md"} <= files
    pipe = MultiExpertPipeline.from_pretrained(repo, cache_dir=tmp_path / "cache")
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)
