"""Every ```python block of README.md is executed here, so the snippets cannot silently rot.

How the README is run, as a reader would run it:

- **One namespace per `## ` section, blocks in README order.** Within a section the snippets build on each other
  (`pipe`, `mixture`, `small`, `digits`, `commit`, ...); across sections they never do (each section starts with its
  own imports). One test item per block (`test_readme_block[<section>-L<line>]`); a block runs after the earlier
  blocks of its section, which are replayed first when it is selected alone (`-k`). Code is compiled with its README
  line numbers, so a traceback points at README.md.
- **In a temporary working directory per section**, so snippets can write `my-mixture/`, `samples/`, plots, ...
- **Hub snippets run against the loopback Hub** (`hub_server` fixture, `tests/hub_server.py`; `tests/conftest.py`
  points `HF_ENDPOINT` at it, sets a test token and refuses non-loopback connections). The README's `your-org/...`
  repo ids are used as written: the test Hub accepts any namespace for the test token.
- **Folders a snippet loads but a unit test cannot train** (`outputs/demo` from `make demo`, the single-model run
  `out/single`) are created first, from tiny models, by the setup functions in `PREPARED_FOLDERS`, in the layout the
  training scripts export (`diffusers_experts.training.export.export_pipeline`).
- **Substitutions** (`SUBSTITUTIONS`): a visible table of (section, README text, replacement, reason) that shrinks
  a snippet too slow for a unit test as written (none today: every block runs as written); each README text must
  occur exactly once in its section's python blocks, so README drift fails the test instead of silently disabling a
  substitution. `README_FULL=1` runs every block exactly as written (no substitution).
- **Printed results are checked**: a `print(...)` line whose trailing comment shows its output (`# torch.bfloat16`,
  `# [[3], [3], ..., [0]]`; `...` matches anything) must print that; comments that describe rather than show the
  output are listed in `DESCRIPTIVE_PRINT_COMMENTS`.
- **Not runnable here** a block may only be by a visible marker, a first line `# requires: <what and why>`; it is
  then reported as skipped with that reason. Every python block is either run or so marked: none can be ignored.

Only python blocks run: ```bash blocks launch `make` targets and the training / evaluation scripts, which
tests/test_train_scripts.py (and the other script tests) cover. Their `examples/*.py` command lines are still
checked here: each parses with its script's own parser (no unknown flag, no bad value), and every folder a training
command reads (`--base_model`, `--vae`, `--init_from`, `--assemble`) is written by an earlier command of the README.
Any other fence language (```py, an untagged fence) fails `test_fences_are_python_or_bash`, so a snippet cannot
escape this test under another tag.
"""

from __future__ import annotations

import builtins
import importlib.util
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = README.parent / "examples"
# README_FULL=1: every block as written, without the shrinking SUBSTITUTIONS
FULL = os.environ.get("README_FULL", "") not in ("", "0")
REQUIRES_MARKER = "# requires:"
FENCE_LANGUAGES = ("python", "bash")


@dataclass(frozen=True)
class Block:
    language: str
    section: str  # the `## ` heading the block sits under
    line: int  # README line of the block's first code line
    code: str

    @property
    def id(self) -> str:
        return f"{_slug(self.section)}-L{self.line}"

    @property
    def requires(self) -> str | None:
        """The reason given by a first-line `# requires: ...` marker, if any."""
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        return first[len(REQUIRES_MARKER) :].strip() if first.startswith(REQUIRES_MARKER) else None


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-").split("-")[0] or "top"


def parse_readme(text: str) -> list[Block]:
    """All fenced code blocks of a Markdown text, with the `## ` section each one is in."""
    blocks, section, fence = [], "", None
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if fence is None:
            if line.startswith("## "):
                section = line[3:].strip()
            match = re.match(r"^\s*(`{3,}|~{3,})\s*([^`\s]*)", line)
            if match:
                fence, language, start, body = match.group(1), match.group(2), number + 1, []
        elif line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            blocks.append(Block(language, section, start, "\n".join(body)))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"README.md: code fence opened at line {start - 1} is never closed"
    return blocks


BLOCKS = parse_readme(README.read_text(encoding="utf-8"))
PYTHON = [b for b in BLOCKS if b.language == "python"]


# --- Folders that snippets load but that only training produces: built here from tiny models. ---------------------
def _tiny_demo_pipeline(path: str) -> None:
    """`outputs/demo` as `make demo` leaves it: a class-conditional 4-expert MEME mixture of iU-Nets (10 classes +
    the null class, 1 channel, 16x16) exported by the training scripts' `export_pipeline`; tiny and untrained."""
    import torch
    from diffusers import DDPMScheduler

    from diffusers_experts import ExpertMixtureUNet, IUNet2DModel, meme_expert_config
    from diffusers_experts.training.export import export_pipeline

    torch.manual_seed(0)
    tiny = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), norm_num_groups=8)
    experts = [
        IUNet2DModel(**meme_expert_config(k, 4, **tiny), attention_head_dim=8, layers_per_block=1, num_class_embeds=11)
        for k in range(4)
    ]
    export_pipeline(path, ExpertMixtureUNet.from_experts(experts), DDPMScheduler(), metadata={"training_steps": 0})


def _tiny_single_run(path: str) -> None:
    """`out/single` as `train_meme.py --num_experts 1 --expert_type unet --output_dir out/single` leaves it: a
    pipeline whose mixture holds one `UNet2DModel` expert, so `out/single/unet/expert_0` is that model's folder."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from diffusers_experts import ExpertMixtureUNet
    from diffusers_experts.training.export import export_pipeline

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    export_pipeline(path, ExpertMixtureUNet.from_experts([unet]), DDPMScheduler(), metadata={"training_steps": 0})


# folder (as quoted in the README) -> the folder to build and how; built before the first block that quotes it
PREPARED_FOLDERS = {
    "outputs/demo": ("outputs/demo", _tiny_demo_pipeline),
    "out/single/unet/expert_0": ("out/single", _tiny_single_run),
}

# (section, README text, replacement, reason) for a snippet too slow to run as written; each README text must occur
# exactly once in its section's python blocks. Empty: every snippet runs as written (the slowest, the
# `ReferenceClassifier.fit(..., steps=300)` of Evaluation, takes ~30 s of the file's ~45 s on one thread). Example:
# ("Evaluation", "labels[:4000], steps=300)", "labels[:4000], steps=20)", "300 classifier steps: ~30 s; scores unchecked")
SUBSTITUTIONS: list[tuple[str, str, str, str]] = []

# trailing comments of print lines that describe the output instead of showing it (not compared with the output);
# the scores dict lists its main keys only (compute_metrics also returns isc_std, f_score, num_samples, num_reference)
DESCRIPTIVE_PRINT_COMMENTS = {
    "(batch, N), rows sum to 1",
    "mean MACs per step",
    "{'fid': ..., 'kid_mean': ..., 'kid_std': ..., 'isc_mean': ..., 'precision': ..., 'recall': ...}",
}


def _section_of(name: str) -> str:
    matches = {b.section for b in PYTHON if b.section == name or _slug(b.section) == _slug(name)}
    assert len(matches) == 1, f"no single README section {name!r} with python blocks: {sorted(matches)}"
    return matches.pop()


def _substituted(block: Block, full: bool = FULL) -> str:
    """The code of `block` as run: shrunk by `SUBSTITUTIONS`, or as written with `full` (`README_FULL=1`)."""
    code = block.code
    if full:
        return code
    for section, old, new, _ in SUBSTITUTIONS:
        if block.section == _section_of(section) and old in code:
            code = code.replace(old, new)
    return code


def _printed_claims(block: Block) -> dict[int, str]:
    """README line -> the output shown in the trailing comment of a `print(...)` line there."""
    claims = {}
    for offset, line in enumerate(block.code.splitlines()):
        match = re.match(r"^\s*print\(.*\)\s*#\s*(.+?)\s*$", line)
        if match and match.group(1) not in DESCRIPTIVE_PRINT_COMMENTS:
            claims[block.line + offset] = match.group(1)
    return claims


def _matches_claim(printed: str, claim: str) -> bool:
    pattern = ".*".join(re.escape(part) for part in claim.split("..."))
    return re.fullmatch(pattern, " ".join(printed.split()), flags=re.DOTALL) is not None


class _Section:
    """The state a reader's session would have: one namespace and one working directory for a README section."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.namespace: dict = {"__name__": "__readme__"}
        self.done: list[int] = []  # README lines of the blocks run so far
        self.failed: int | None = None
        self.printed: dict[int, list[str]] = {}

    def _print(self, *args, sep=" ", end="\n", file=None, flush=False):
        line = sys._getframe(1).f_lineno if sys._getframe(1).f_code.co_filename == str(README) else None
        if file is None and line is not None:
            self.printed.setdefault(line, []).append(sep.join(map(str, args)))
        builtins.print(*args, sep=sep, end=end, file=file, flush=flush)

    def run(self, block: Block) -> None:
        for quoted, (folder, build) in PREPARED_FOLDERS.items():
            if f'"{quoted}"' in block.code and not os.path.exists(folder):
                build(folder)
        code = compile("\n" * (block.line - 1) + _substituted(block), str(README), "exec")
        self.namespace["print"] = self._print
        try:
            exec(code, self.namespace)
        except BaseException:
            self.failed = block.line
            raise
        finally:
            self.namespace.pop("print", None)
        self.done.append(block.line)
        for line, claim in _printed_claims(block).items():
            outputs = self.printed.get(line, [])
            assert outputs, f"README.md:{line}: the print shown with `# {claim}` printed nothing"
            assert _matches_claim(outputs[-1], claim), (
                f"README.md:{line}: printed {outputs[-1]!r}, the README comment says `# {claim}`"
            )


@pytest.fixture(scope="module")
def sections():
    """README section -> its `_Section`, shared by the block tests of this module."""
    return {}


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_readme_block(block, sections, tmp_path_factory, monkeypatch, hub_server):
    if block.requires is not None:
        pytest.skip(f"README.md:{block.line} is marked `{REQUIRES_MARKER} {block.requires}`")
    if block.section not in sections:
        sections[block.section] = _Section(tmp_path_factory.mktemp(f"readme-{_slug(block.section)}"))
    state = sections[block.section]
    if state.failed is not None:
        pytest.skip(f"an earlier block of this section failed (README.md:{state.failed}); it is reported there")
    monkeypatch.chdir(state.workdir)
    earlier = [b for b in PYTHON if b.section == block.section and b.line < block.line and b.requires is None]
    for previous in earlier:  # replayed only when this block was selected without them
        if previous.line not in state.done:
            state.run(previous)
    state.run(block)


def test_fences_are_python_or_bash():
    """A snippet under another fence tag (```py, ```python3, untagged) would escape `test_readme_block`."""
    others = [f"README.md:{b.line - 1} ```{b.language}" for b in BLOCKS if b.language not in FENCE_LANGUAGES]
    assert not others, f"fences must be ```python (executed here) or ```bash (not executed): {others}"
    assert PYTHON, "README.md has no python block: the parser is broken"


def test_every_python_block_is_run_or_marked():
    """Each python block is a `test_readme_block` item that runs it, unless its first line is a `# requires:` marker
    with a reason (a marker without a reason is an error)."""
    for block in PYTHON:
        if block.code.lstrip().startswith(REQUIRES_MARKER):
            assert block.requires, f"README.md:{block.line}: `{REQUIRES_MARKER}` needs a reason"
    assert len({b.id for b in PYTHON}) == len(PYTHON)


def test_substitutions_and_prepared_folders_match_the_readme():
    """Each substitution's README text occurs exactly once in its section, and each prepared folder is quoted by a
    block, so neither table can go stale silently."""
    for section, old, new, reason in SUBSTITUTIONS:
        code = "\n".join(b.code for b in PYTHON if b.section == _section_of(section))
        assert code.count(old) == 1, f"substitution for {section!r} ({reason}): {old!r} occurs {code.count(old)} times"
        assert old != new
    for quoted in PREPARED_FOLDERS:
        assert any(f'"{quoted}"' in b.code for b in PYTHON), f"no README block loads {quoted!r} any more"


def test_printed_claims_are_matched_literally():
    """The `...` wildcard of printed-output comments: a sanity check of the matcher the block tests rely on."""
    assert _matches_claim("[[3], [3], [3], [2], [0]]", "[[3], [3], ..., [0]]")
    assert _matches_claim("(0.75, 0.375, 0.1875)", "(0.75, 0.375, 0.1875)")
    assert not _matches_claim("(0.75, 0.5, 0.1875)", "(0.75, 0.375, 0.1875)")
    assert not _matches_claim("[[3], [1]]", "[[3], [3], ..., [0]]")


def test_readme_full_runs_the_blocks_as_written(monkeypatch):
    """By default a substitution shrinks its block; `README_FULL=1` (the `full` flag) runs the README text."""
    block = next(b for b in PYTHON if b.requires is None)
    old = block.code.strip().splitlines()[-1]
    monkeypatch.setattr(sys.modules[__name__], "SUBSTITUTIONS", [(block.section, old, "pass  # shrunk", "test")])
    assert "pass  # shrunk" in _substituted(block, full=False) and old not in _substituted(block, full=False)
    assert _substituted(block, full=True) == block.code


# --- The ```bash blocks' example command lines: they parse, and the folders they read are written before. ----------
# flags whose folder a training command reads, and the flags naming the folder a command writes
INPUT_FOLDER_FLAGS = ("--base_model", "--vae", "--init_from", "--assemble")
OUTPUT_FOLDER_FLAGS = ("--output_dir", "--out")


def _example_commands() -> list[tuple[int, str, list[str]]]:
    """(README line, script name, arguments) of every `examples/<script>.py` command of the README's bash blocks, in
    README order; shell variables (`$k`) are kept as `{k}`."""
    commands = []
    for block in (b for b in BLOCKS if b.language == "bash"):
        text = block.code.replace("\\\n", " ")
        for number, line in enumerate(text.splitlines()):
            for part in re.split(r"\s*(?:;|&&|&)\s*", line):
                words = [re.sub(r"\$(\w+)", r"{\1}", w) for w in shlex.split(part, comments=True)]
                scripts = [i for i, w in enumerate(words) if re.fullmatch(r"examples/\w+\.py", w)]
                if scripts:
                    i = scripts[0]
                    commands.append((block.line + number, Path(words[i]).stem, words[i + 1 :]))
    return commands


def _example_parser(name: str):
    spec = importlib.util.spec_from_file_location(f"readme_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser() if hasattr(module, "build_parser") else None, module


def test_bash_example_commands_parse_and_read_only_folders_written_before(capsys):
    commands = _example_commands()
    assert any(name == "train_meme" for _, name, _ in commands), "the README lost its training commands"
    written = []  # regular expressions of the folders written so far (a shell variable matches any name)
    for line, name, argv in commands:
        parser, module = _example_parser(name)
        parsed = [re.sub(r"\{\w+\}", "0", word) for word in argv]
        try:
            args = parser.parse_args(parsed) if parser is not None else module.parse_args(parsed)
        except SystemExit:
            raise AssertionError(
                f"README.md:{line}: examples/{name}.py {' '.join(argv)}: {capsys.readouterr().err}"
            ) from None
        for flag in INPUT_FOLDER_FLAGS:
            value = getattr(args, flag[2:], None)
            for folder in [value] if isinstance(value, str) else value or []:
                assert any(re.fullmatch(pattern + "(/.*)?", folder) for pattern in written), (
                    f"README.md:{line}: `{flag} {folder}` reads a folder that no earlier command writes"
                )
        for flag in OUTPUT_FOLDER_FLAGS:
            if flag in argv:
                raw = argv[argv.index(flag) + 1]
                written.append(re.sub(r"\\\{\w+\\\}", r"\\w+", re.escape(raw)))
