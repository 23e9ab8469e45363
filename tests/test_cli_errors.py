"""The command lines of `examples/` speak the user's language (issue 11, items 3, 6 and 8): `--help` shows every
default and keeps the docstring's line breaks; an output folder or a checkpoint of another run is refused; a bad
value is one usage line naming the flag (exit status 2), never a traceback. In-process where possible (the scripts
are imported), with one subprocess per kind of entry point to check what the user sees."""

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from diffusers_experts.evaluation.trained_model import UsageError, load_pipeline
from test_train_scripts import TINY_UNET


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SCRIPTS = sorted(name[:-3] for name in os.listdir(EXAMPLES) if name.endswith(".py"))


def _load_example(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _usage_error(parse, argv, capsys) -> str:
    """The error line a parse prints (exit status 2), checked to be one line."""
    with pytest.raises(SystemExit) as raised:
        parse(argv)
    assert raised.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"{os.path.basename(sys.argv[0])}: error: ") and "Traceback" not in lines
    return lines[-1]


def _environment() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_DATASETS_OFFLINE": "1"}
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(ROOT, "src"), env.get("PYTHONPATH")) if p)
    return env


def _run_script(name: str, *argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, os.path.join(EXAMPLES, name), *argv]
    return subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=300, cwd=ROOT)


# ---------------------------------------------------------------------------------------------------- --help (item 8)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_the_defaults_and_keeps_the_docstring_line_breaks(name, capsys, monkeypatch):
    module = _load_example(name)
    parsers = []
    parse = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(
        argparse.ArgumentParser, "parse_args", lambda self, *a, **k: parsers.append(self) or parse(self, *a, **k)
    )
    with pytest.raises(SystemExit) as raised:
        module.parse_args(["--help"])
    assert raised.value.code == 0
    shown = capsys.readouterr().out
    options = [a for a in parsers[0]._actions if a.option_strings and a.default is not argparse.SUPPRESS]
    assert " ".join(shown.split()).count("(default: ") >= len(options)  # one per option, beside any in the help text
    # a backslash line continuation in a non-raw docstring would join the lines (and drop the backslash)
    with open(os.path.join(EXAMPLES, f"{name}.py"), encoding="utf-8") as f:
        source = f.read()
    docstring = ast.get_source_segment(source, ast.parse(source).body[0])
    continued = [line for line in docstring.splitlines() if line.endswith("\\")]
    assert len([line for line in module.__doc__.splitlines() if line.endswith("\\")]) == len(continued)
    for line in module.__doc__.splitlines():
        if line.endswith("\\"):
            assert line.strip() in shown, line


def test_every_script_uses_the_one_help_formatter():
    from diffusers_experts.training.arguments import HelpFormatter

    for name in SCRIPTS:
        with open(os.path.join(EXAMPLES, f"{name}.py"), encoding="utf-8") as f:
            source = f.read()
        assert "formatter_class=HelpFormatter" in source and "class HelpFormatter" not in source, name
    assert issubclass(HelpFormatter, __import__("argparse").ArgumentDefaultsHelpFormatter)


# ---------------------------------------------------------------------------------------------------- output folders (item 3)


@pytest.fixture(scope="module")
def train_meme():
    return _load_example("train_meme")


def _meme_argv(out, *extra) -> list[str]:
    return ["--num_experts", "2", "--resolution", "16", "--output_dir", str(out), *extra]


def _record(train_meme, out, *extra) -> None:
    """`out` as a run of `_meme_argv(out, *extra)` leaves it (its run configuration recorded)."""
    from diffusers_experts.training import run_config, write_run_config

    os.makedirs(out, exist_ok=True)
    write_run_config(str(out), run_config(train_meme.parse_args(_meme_argv(out, *extra)), "train_meme"))


def test_an_output_dir_holding_another_run_is_refused_without_overwrite(train_meme, tmp_path, capsys):
    out = tmp_path / "out"
    _record(train_meme, out, "--num_classes", "10")
    (out / "train_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    line = _usage_error(train_meme.parse_args, _meme_argv(out), capsys)
    assert "`--output_dir`" in line and "`--num_classes` 10 there, None now" in line
    assert "`--overwrite_output_dir`" in line
    train_meme.parse_args(_meme_argv(out, "--num_classes", "10"))  # the same run again: allowed
    train_meme.parse_args(_meme_argv(out, "--overwrite_output_dir"))  # replacing it: allowed
    train_meme.parse_args(_meme_argv(out, "--num_classes", "10", "--report_to", "none", "--checkpointing_steps", "7"))


def test_an_output_dir_of_an_unrecorded_run_or_of_another_script_is_refused(train_meme, tmp_path, capsys):
    out = tmp_path / "old"
    os.makedirs(out / "checkpoint-20")
    line = _usage_error(train_meme.parse_args, _meme_argv(out), capsys)
    assert "checkpoint-20" in line and "not recorded" in line and "`--overwrite_output_dir`" in line
    train_vae = _load_example("train_vae")
    vae_out = tmp_path / "vae"
    os.makedirs(vae_out)
    from diffusers_experts.training import run_config, write_run_config

    write_run_config(str(vae_out), run_config(train_vae.parse_args(["--output_dir", str(vae_out)]), "train_vae"))
    assert "written by train_vae.py" in _usage_error(train_meme.parse_args, _meme_argv(vae_out), capsys)
    empty = tmp_path / "empty"
    os.makedirs(empty)
    train_meme.parse_args(_meme_argv(empty))  # an empty folder is no run


def test_resume_latest_takes_only_a_checkpoint_of_the_same_configuration(train_meme, tmp_path, capsys):
    out = tmp_path / "out"
    _record(train_meme, out, "--resolution", "32")
    os.makedirs(out / "checkpoint-20")
    shutil.copy(out / "run_config.json", out / "checkpoint-20" / "run_config.json")
    line = _usage_error(train_meme.parse_args, _meme_argv(out, "--resume_from_checkpoint", "latest"), capsys)
    assert "checkpoint-20" in line and "`--resolution` 32 there, 16 now" in line
    train_meme.parse_args(_meme_argv(out, "--resolution", "32", "--resume_from_checkpoint", "latest"))
    # the record is in the checkpoint: a checkpoint copied into a fresh folder resumes (and is checked) too
    fresh = tmp_path / "fresh"
    shutil.copytree(out / "checkpoint-20", fresh / "checkpoint-20")
    train_meme.parse_args(_meme_argv(fresh, "--resolution", "32", "--resume_from_checkpoint", "latest"))
    assert "`--resolution`" in _usage_error(
        train_meme.parse_args, _meme_argv(fresh, "--resume_from_checkpoint", "latest"), capsys
    )
    line = _usage_error(train_meme.parse_args, _meme_argv(out, "--resume_from_checkpoint", str(out / "nope")), capsys)
    assert "`--resume_from_checkpoint`" in line


def test_local_paths_are_recorded_absolute(train_meme, tmp_path, monkeypatch):
    from diffusers_experts.training import run_config

    os.makedirs(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    relative = run_config(train_meme.parse_args(_meme_argv("o", "--train_data_dir", "data")), "train_meme")
    absolute = run_config(train_meme.parse_args(_meme_argv("o", "--train_data_dir", str(tmp_path / "data"))), "x")
    assert relative["train_data_dir"] == absolute["train_data_dir"] and "output_dir" not in relative


def test_a_new_run_starts_its_log_and_a_resumed_one_drops_the_steps_it_redoes(tmp_path):
    from diffusers_experts.training import RunLog

    accelerator = SimpleNamespace(is_main_process=True, is_local_main_process=False, log=lambda *a, **k: None)
    args = SimpleNamespace(output_dir=str(tmp_path), report_to="none")
    log = tmp_path / "train_log.jsonl"

    def steps():
        return [json.loads(line)["step"] for line in log.read_text().splitlines()]

    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)))
    RunLog(accelerator, args, "t", total_steps=8, initial_step=2).close()
    assert steps() == [1, 2]
    run = RunLog(accelerator, args, "t", total_steps=8, initial_step=0)
    run.step(1, {"loss": 0.5})
    run.close()
    assert steps() == [1]


# ---------------------------------------------------------------------------------------------------- bad values (item 6)


def test_training_value_errors_name_the_flag(train_meme, tmp_path):
    from PIL import Image

    data = tmp_path / "data" / "a"
    os.makedirs(data)
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 60, 0, 0)).save(data / f"{i}.png")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_UNET))
    common = ["--expert_type", "unet", "--model_config", str(tmp_path / "tiny.json"), "--report_to", "none"]

    def error(*argv) -> str:
        args = train_meme.parse_args([*common, "--output_dir", str(tmp_path / "out"), *argv])
        with pytest.raises(UsageError) as raised:
            train_meme.main(args)
        assert "\n" not in str(raised.value)
        return str(raised.value)

    assert "`--resolution` 15 must be divisible by 2" in error(
        "--train_data_dir", str(tmp_path / "data"), "--resolution", "15"
    )
    os.makedirs(tmp_path / "empty")
    assert "`--train_data_dir`" in error("--train_data_dir", str(tmp_path / "empty")) and "no image files" in error(
        "--train_data_dir", str(tmp_path / "empty")
    )
    message = error("--dataset_name", "./my_datset")
    assert "`--dataset_name` './my_datset' is neither a local folder" in message
    (tmp_path / "broken.json").write_text('{"block_out_channels": [16,')
    args = [*common[:2], "--model_config", str(tmp_path / "broken.json"), "--train_data_dir", str(tmp_path / "data")]
    message = error(*args, "--resolution", "16")
    assert "`--model_config`" in message and "broken.json" in message


def test_a_training_value_error_is_one_usage_line(tmp_path):
    os.makedirs(tmp_path / "empty")
    done = _run_script(
        "train_meme.py", "--train_data_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o")
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("train_meme.py: error: `--train_data_dir`")


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    from diffusers import DDPMScheduler, UNet2DModel

    from diffusers_experts import ExpertMixtureUNet
    from diffusers_experts.training.export import export_pipeline

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli") / "pipe"
    experts = [UNet2DModel(sample_size=16, **TINY_UNET) for _ in range(2)]
    export_pipeline(
        str(path), ExpertMixtureUNet.from_experts(experts), DDPMScheduler(), metadata={"training_steps": 0}
    )
    return path


def test_model_errors_name_the_flag_and_the_file(saved_pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"^--model \./missing: .*neither a model folder"):
        load_pipeline("./missing")
    broken = tmp_path / "broken"
    shutil.copytree(saved_pipeline, broken)
    (broken / "unet" / "expert_1" / "config.json").write_text('{"_class_name": "UNet2DModel", ')
    with pytest.raises(UsageError, match=r"--model .*broken: .*expert_1/config\.json"):
        load_pipeline(str(broken))
    truncated = tmp_path / "truncated"
    shutil.copytree(saved_pipeline, truncated)
    weights = truncated / "unet" / "expert_1" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UsageError) as raised:
        load_pipeline(str(truncated))
    message = str(raised.value)
    assert str(weights) in message and "truncated or corrupt" in message and "Unable to locate" not in message
    assert "\n" not in message


def test_a_missing_model_folder_is_one_usage_line(tmp_path):
    done = _run_script("sample.py", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "s"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"sample.py: error: --model {tmp_path / 'missing'}: ")
