"""Hub push / pull of mixtures and experts over real HTTP, against the loopback Hub (tests/hub_server.py)."""

import ast
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from torch import nn

from conftest import tiny_iunet, tiny_mixture, tiny_unet
from diffusers_experts import ExpertMixtureUNet, IUNet2DModel
from diffusers_experts.hub import load_expert, push_experts_to_hub, push_mixture_to_hub


_ids = itertools.count()
X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
T = torch.tensor([5, 480, 990])


@pytest.fixture
def repo(hub_server, request):
    """A fresh repo id per test (the server lives for the whole session)."""
    return f"org/{request.node.name.replace('[', '-').replace(']', '')[:60]}-{next(_ids)}"


def _same_outputs(a, b):
    with torch.no_grad():
        torch.testing.assert_close(a(X, T).sample, b(X, T).sample)


def _snapshot_files(cache_dir) -> list[str]:
    """Files of every snapshot in a huggingface_hub cache folder (relative to their snapshot)."""
    found = []
    for path in Path(cache_dir).rglob("*"):
        parts = path.relative_to(cache_dir).parts
        if path.is_file() and "snapshots" in parts:
            found.append("/".join(parts[parts.index("snapshots") + 2 :]))
    return sorted(found)


def test_mixture_round_trip_in_one_commit(repo, tmp_path):
    mixture = tiny_mixture(2, routing="learned", kind="iunet")
    with torch.no_grad():
        mixture.routing_logits.add_(0.1 * torch.randn_like(mixture.routing_logits))
    api = HfApi()
    info = mixture.push_to_hub(repo, metadata={"training_steps": 123, "metrics": {"fid": 9.5}})
    commits = api.list_repo_commits(repo)
    assert [c.commit_id for c in commits[:1]] == [info.oid] and len(commits) == 2  # repo creation + ONE commit
    assert sorted(api.list_repo_files(repo)) == [
        ".gitattributes", "README.md", "config.json",
        "expert_0/README.md", "expert_0/config.json", "expert_0/diffusion_pytorch_model.safetensors",
        "expert_1/README.md", "expert_1/config.json", "expert_1/diffusion_pytorch_model.safetensors",
        "routing.safetensors",
    ]  # fmt: skip
    model_info = api.model_info(repo)
    assert model_info.library_name == "diffusers-experts"
    assert model_info.pipeline_tag == "unconditional-image-generation"
    assert {"diffusers", "mixture-of-experts", "diffusers-experts"} <= set(model_info.tags)
    card = ModelCard.load(hf_hub_download(repo, "README.md"))
    assert "training steps: 123" in card.text and "| fid | 9.5 |" in card.text
    assert f'ExpertMixtureUNet.from_pretrained("{repo}")' in card.text

    loaded = ExpertMixtureUNet.from_pretrained(repo, cache_dir=tmp_path)
    assert loaded.config.expert_classes == mixture.config.expert_classes
    torch.testing.assert_close(loaded.routing_logits, mixture.routing_logits)
    _same_outputs(loaded, mixture)
    # each expert is a normal diffusers model folder on the Hub
    alone = IUNet2DModel.from_pretrained(repo, subfolder="expert_1", cache_dir=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(alone(X, T).sample, mixture.experts[1](X, T).sample)


def test_new_push_replaces_old_version_and_older_revision_still_loads(repo, tmp_path):
    api = HfApi()
    three = tiny_mixture(3, routing="learned")
    first = three.push_to_hub(repo)
    api.upload_file(path_or_fileobj=b"png bytes", path_in_repo="samples/grid.png", repo_id=repo)
    two = tiny_mixture(2, seed=7)
    second = two.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id=repo, commit_message="two experts")
    assert second is None  # save_pretrained pushes as a side effect
    files = set(api.list_repo_files(repo))
    assert "expert_2/config.json" not in files and "routing.safetensors" not in files  # stale entries deleted
    assert "samples/grid.png" in files  # files the mixture does not own are kept
    assert api.list_repo_commits(repo)[0].title == "two experts"

    _same_outputs(ExpertMixtureUNet.from_pretrained(repo, cache_dir=tmp_path), two)
    old = ExpertMixtureUNet.from_pretrained(repo, revision=first.oid, cache_dir=tmp_path)
    assert old.num_experts == 3 and old.config.routing == "learned"
    _same_outputs(old, three)


def test_failed_push_leaves_the_previous_revision_intact(repo, hub_server, tmp_path):
    api = HfApi()
    before = tiny_mixture(2)
    kept = before.push_to_hub(repo)
    hub_server.fail_commits = 1
    with pytest.raises(HfHubHTTPError, match=f"nothing was committed, the repo is unchanged at {kept.oid}"):
        tiny_mixture(3, seed=3).push_to_hub(repo)
    assert api.model_info(repo).sha == kept.oid
    assert len(api.list_repo_commits(repo)) == 2
    assert "expert_2/config.json" not in api.list_repo_files(repo)
    _same_outputs(ExpertMixtureUNet.from_pretrained(repo, cache_dir=tmp_path), before)


def test_push_to_branch_and_pull_request(repo):
    api = HfApi()
    main = tiny_mixture(2).push_to_hub(repo)
    dev = push_mixture_to_hub(tiny_mixture(2, seed=5), repo, revision="dev")
    assert api.model_info(repo).sha == main.oid and api.model_info(repo, revision="dev").sha == dev.oid
    pr = push_mixture_to_hub(tiny_mixture(2, seed=6), repo, create_pr=True)
    assert pr.pr_url is not None and api.model_info(repo).sha == main.oid
    assert [p.ref for p in api.list_repo_refs(repo, include_pull_requests=True).pull_requests] == ["refs/pr/1"]
    # a mixture pushed into a subfolder: only that folder is written / cleaned
    inner = tiny_mixture(2, seed=8)
    push_mixture_to_hub(tiny_mixture(3), repo, subfolder="unet")
    push_mixture_to_hub(inner, repo, subfolder="unet")
    files = set(api.list_repo_files(repo))
    assert "unet/expert_2/config.json" not in files and {"unet/README.md", "expert_1/config.json"} <= files
    _same_outputs(ExpertMixtureUNet.from_pretrained(repo, subfolder="unet"), inner)


def test_per_expert_repos_assembled_into_a_mixture(repo, tmp_path):
    api = HfApi()
    mixture = ExpertMixtureUNet.from_experts([tiny_unet(0), tiny_iunet(1)], boundaries=[300], routing="sigmoid")
    expert_repos = [f"{repo}-low", f"{repo}-high"]
    metadata = {"experts": [{"training_steps": 1000, "metrics": {"loss": 0.04}}, None]}
    sources = push_experts_to_hub(mixture, expert_repos, metadata=metadata, mixture_repo_id=repo)
    assert [s["repo_id"] for s in sources] == expert_repos
    assert all(s["revision"] == api.model_info(r).sha for s, r in zip(sources, expert_repos))  # pinned to commits
    assert sorted(api.list_repo_files(expert_repos[0])) == [
        ".gitattributes", "README.md", "config.json", "diffusion_pytorch_model.safetensors"
    ]  # fmt: skip
    card = api.model_info(expert_repos[0])
    assert card.library_name == "diffusers"  # a UNet2DModel expert loads with diffusers alone
    text = ModelCard.load(hf_hub_download(expert_repos[0], "README.md")).text
    assert f"[{repo}](https://huggingface.co/{repo})" in text and "**[0, 300)**" in text and "1,000" in text

    push_mixture_to_hub(mixture, repo, expert_sources=sources)
    assert sorted(api.list_repo_files(repo)) == [".gitattributes", "README.md", "config.json"]  # references only
    assert mixture.config.expert_sources is None  # the in-memory mixture is unchanged
    loaded = ExpertMixtureUNet.from_pretrained(repo, cache_dir=tmp_path)
    assert loaded.config.expert_sources == sources
    _same_outputs(loaded, mixture)

    # a newer expert version on the expert repo does not change the pinned mixture
    push_experts_to_hub(ExpertMixtureUNet.from_experts([tiny_unet(9), tiny_iunet(1)]), [expert_repos[0], None])
    _same_outputs(ExpertMixtureUNet.from_pretrained(repo, cache_dir=tmp_path), mixture)

    # from_experts with references: kept as references when saving locally
    assembled = ExpertMixtureUNet.from_experts(
        [sources[0], {"repo_id": expert_repos[1], "revision": sources[1]["revision"]}], boundaries=[300],
        routing="sigmoid",
    )  # fmt: skip
    _same_outputs(assembled, mixture)
    assert assembled.config.expert_sources == sources  # references normalised to repo_id / revision / subfolder
    assembled.save_pretrained(tmp_path / "assembled")
    assert sorted(os.listdir(tmp_path / "assembled")) == ["config.json"]
    _same_outputs(ExpertMixtureUNet.from_pretrained(tmp_path / "assembled", cache_dir=tmp_path), mixture)
    # a repo id string embeds the expert instead
    embedded = ExpertMixtureUNet.from_experts([tiny_unet(0), expert_repos[1]], boundaries=[300], routing="sigmoid")
    assert embedded.config.expert_sources is None
    _same_outputs(embedded, mixture)


def test_pull_downloads_only_needed_files(repo, hub_server, tmp_path):
    api = HfApi()
    mixture = tiny_mixture(3)
    mixture.push_to_hub(repo)
    api.upload_file(path_or_fileobj=os.urandom(5000), path_in_repo="samples/grid.safetensors", repo_id=repo)

    full = tmp_path / "full"
    ExpertMixtureUNet.from_pretrained(repo, cache_dir=full)
    assert _snapshot_files(full) == sorted(
        ["config.json"]
        + [f"expert_{k}/{f}" for k in range(3) for f in ("config.json", "diffusion_pytorch_model.safetensors")]
    )  # no cards, no samples

    one = tmp_path / "one"
    start = len(hub_server.request_log)
    expert = load_expert(repo, 1, cache_dir=one)
    assert _snapshot_files(one) == [
        "config.json",
        "expert_1/config.json",
        "expert_1/diffusion_pytorch_model.safetensors",
    ]
    downloads = [p for m, p in hub_server.request_log[start:] if m == "GET" and "/resolve/" in p]
    assert all("expert_0" not in p and "expert_2" not in p for p in downloads)
    with torch.no_grad():
        torch.testing.assert_close(expert(X, T).sample, mixture.experts[1](X, T).sample)


def test_cache_dir_local_files_only_and_token(repo, hub_server, tmp_path):
    mixture = tiny_mixture(2)
    mixture.push_to_hub(repo, private=True)
    with pytest.raises(ValueError, match=f"Hub repo '{repo}' was not found .*token"):
        ExpertMixtureUNet.from_pretrained(repo, token=False, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="`local_files_only=True` and it is not in the cache"):
        ExpertMixtureUNet.from_pretrained(repo, local_files_only=True, cache_dir=tmp_path)
    ExpertMixtureUNet.from_pretrained(repo, token=os.environ["HF_TOKEN"], cache_dir=tmp_path)
    start = len(hub_server.request_log)
    offline = ExpertMixtureUNet.from_pretrained(repo, local_files_only=True, cache_dir=tmp_path)
    assert hub_server.request_log[start:] == []  # served from cache_dir, no request at all
    _same_outputs(offline, mixture)


def test_errors_name_repo_revision_and_expert(repo, tmp_path):
    api = HfApi()
    with pytest.raises(ValueError, match="Hub repo 'org/does-not-exist' was not found"):
        ExpertMixtureUNet.from_pretrained("org/does-not-exist", cache_dir=tmp_path)
    mixture = tiny_mixture(2)
    mixture.push_to_hub(repo)
    with pytest.raises(ValueError, match=f"revision 'v9' does not exist in Hub repo '{repo}'"):
        ExpertMixtureUNet.from_pretrained(repo, revision="v9", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="has no 'unet/config.json': not a saved ExpertMixtureUNet .*'unet'"):
        ExpertMixtureUNet.from_pretrained(repo, subfolder="unet", cache_dir=tmp_path)

    # an expert folder missing in the referenced repo
    missing = [None, {"repo_id": repo, "revision": None, "subfolder": "expert_7"}]
    push_mixture_to_hub(mixture, f"{repo}-ref", expert_sources=missing)
    with pytest.raises(ValueError, match=rf"Expert 1 \('{repo}/expert_7'.*no expert folder 'expert_7'.*\['expert_0', 'expert_1'\]"):  # fmt: skip
        ExpertMixtureUNet.from_pretrained(f"{repo}-ref", cache_dir=tmp_path)

    # a referenced expert whose channels do not fit the mixture
    gray = ExpertMixtureUNet.from_experts([tiny_unet(0, in_channels=1, out_channels=1)])
    (source,) = push_experts_to_hub(gray, [f"{repo}-gray"])
    push_mixture_to_hub(mixture, f"{repo}-mismatch", expert_sources=[None, source])
    with pytest.raises(ValueError, match=rf"Expert 1 \('{repo}-gray'.*`in_channels`=1, the mixture needs 3"):
        ExpertMixtureUNet.from_pretrained(f"{repo}-mismatch", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=rf"Expert 1 \('{repo}-gray'.*`in_channels`=1, the mixture needs 3"):
        ExpertMixtureUNet.from_experts([tiny_unet(0), source])

    # pushing nothing
    empty = tiny_mixture(1)
    empty.experts = nn.ModuleList()
    with pytest.raises(ValueError, match=f"Cannot push to '{repo}-empty': the mixture has no experts"):
        empty.push_to_hub(f"{repo}-empty")
    assert not api.repo_exists(f"{repo}-empty")
    with pytest.raises(ValueError, match=r"one repo id \(or None\) per expert \(2\)"):
        push_experts_to_hub(mixture, ["org/only-one"])
    with pytest.raises(ValueError, match=r"one reference \(or None\) per expert \(2\)"):
        push_mixture_to_hub(mixture, repo, expert_sources=[None])
    with pytest.raises(ValueError, match=r"`expert_sources\[1\]` has unknown key\(s\) \['branch'\]"):
        push_mixture_to_hub(mixture, repo, expert_sources=[None, {"repo_id": repo, "branch": "main"}])
    with pytest.raises(ValueError, match="`repo_id` must be a Hub repo id"):
        push_mixture_to_hub(mixture, "not a repo")
    with pytest.raises(ValueError, match=r"`expert` must be an expert index in \[0, 1\], got 2"):
        load_expert(repo, 2, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="must be an ExpertMixtureUNet or a pipeline"):
        push_mixture_to_hub(tiny_unet(), repo)


def test_pipeline_round_trip(repo, tmp_path):
    from diffusers import DDIMScheduler

    from diffusers_experts import MultiExpertPipeline

    api = HfApi()
    mixture = ExpertMixtureUNet.from_experts([tiny_unet(0), tiny_iunet(1)], routing="linear")
    pipeline = MultiExpertPipeline(unet=mixture, scheduler=DDIMScheduler(num_train_timesteps=1000))
    info = pipeline.push_to_hub(repo, metadata={"dataset": "MNIST"})
    assert [c.commit_id for c in api.list_repo_commits(repo)] == [info.oid, api.list_repo_commits(repo)[-1].commit_id]
    files = set(api.list_repo_files(repo))
    assert {"model_index.json", "README.md", "scheduler/scheduler_config.json", "unet/config.json",
            "unet/expert_0/README.md", "unet/expert_1/diffusion_pytorch_model.safetensors"} <= files  # fmt: skip
    card = ModelCard.load(hf_hub_download(repo, "README.md", cache_dir=tmp_path / "card"))
    assert card.data.library_name == "diffusers-experts" and "`unet/`" in card.text and "`unet/expert_1/`" in card.text
    assert f'MultiExpertPipeline.from_pretrained("{repo}")' in card.text

    cache = tmp_path / "cache"
    loaded = MultiExpertPipeline.from_pretrained(repo, cache_dir=cache)
    assert "README.md" not in _snapshot_files(cache) and "unet/expert_0/README.md" not in _snapshot_files(cache)
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    run = dict(batch_size=2, num_inference_steps=3, output_type="np")
    expected = pipeline(generator=torch.Generator().manual_seed(0), **run).images
    got = loaded(generator=torch.Generator().manual_seed(0), **run).images
    assert abs(got - expected).max() < 1e-5
    unet = ExpertMixtureUNet.from_pretrained(repo, subfolder="unet", cache_dir=cache)
    _same_outputs(unet, mixture)

    # experts referenced from their own repos; older pipeline revision still loads
    sources = push_experts_to_hub(mixture, [f"{repo}-e0", f"{repo}-e1"], mixture_repo_id=repo)
    second = push_mixture_to_hub(pipeline, repo, expert_sources=sources)
    assert not any(f.startswith("unet/expert_") for f in api.list_repo_files(repo))
    referenced = MultiExpertPipeline.from_pretrained(repo, cache_dir=cache)
    assert referenced.unet.config.expert_sources == sources
    assert abs(referenced(generator=torch.Generator().manual_seed(0), **run).images - expected).max() < 1e-5
    older = MultiExpertPipeline.from_pretrained(repo, revision=info.oid, cache_dir=cache)
    assert older.unet.config.expert_sources is None and second.oid != info.oid


def test_lora_experts_push_only_adapters(repo, tmp_path):
    from diffusers_experts import LoRAExpert

    api = HfApi()
    base = tiny_unet(0)
    base.push_to_hub(f"{repo}-base")  # diffusers' own push of the public base
    experts = [LoRAExpert.from_base(base, f"{repo}-base", adapter_name=f"expert_{k}", rank=2) for k in range(2)]
    torch.manual_seed(0)
    with torch.no_grad():
        for expert in experts:
            for parameter in expert.adapter_parameters():
                parameter.normal_(0, 0.05)
    mixture = ExpertMixtureUNet.from_experts(experts, routing="linear")
    mixture.push_to_hub(repo)
    infos = {f.path: f for f in api.list_repo_tree(repo, recursive=True) if hasattr(f, "size")}
    assert sorted(p for p in infos if p.startswith("expert_0/")) == [
        "expert_0/README.md", "expert_0/adapter_model.safetensors", "expert_0/config.json"
    ]  # fmt: skip
    base_weights = next(f for f in api.list_repo_tree(f"{repo}-base") if f.path.endswith(".safetensors"))
    assert infos["expert_0/adapter_model.safetensors"].size < base_weights.size / 4
    text = ModelCard.load(hf_hub_download(repo, "expert_0/README.md", cache_dir=tmp_path / "card")).text
    assert f"(LoRA adapters on `{repo}-base`)" in text and "of which LoRA adapter" in text

    loaded = ExpertMixtureUNet.from_pretrained(repo, cache_dir=tmp_path / "cache")
    assert [type(e).__name__ for e in loaded.experts] == ["LoRAExpert", "LoRAExpert"]
    assert loaded.experts[0].base_model is loaded.experts[1].base_model  # rebuilt on one shared base
    assert loaded.experts[0].base_model is not base
    _same_outputs(loaded, mixture)

    # a LoRA expert in its own repo, referenced by a mixture
    (source, _) = push_experts_to_hub(mixture, [f"{repo}-lora0", None])
    assert sorted(api.list_repo_files(f"{repo}-lora0")) == [
        ".gitattributes", "README.md", "adapter_model.safetensors", "config.json"
    ]  # fmt: skip
    assert source["repo_id"] == f"{repo}-lora0"
    alone = LoRAExpert.from_pretrained(f"{repo}-lora0", cache_dir=tmp_path / "one")
    with torch.no_grad():
        torch.testing.assert_close(alone(X, T).sample, experts[0](X, T).sample)

    # an adapter on a local base cannot be shared
    base.save_pretrained(tmp_path / "local-base")
    local = LoRAExpert.from_base(tiny_unet(0), tmp_path / "local-base", rank=2)
    with pytest.raises(ValueError, match=r"Cannot push expert 0 to .*LoRA adapter on the local base model"):
        ExpertMixtureUNet.from_experts([local]).push_to_hub(f"{repo}-local")


# ---------------------------------------------------------------------------------------------------- layering

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "diffusers_experts"
# DESIGN contract 10: routing <- loading <- models <- (schedulers, pipelines, evaluation) <- cards <- push. The
# trainers' toolkit sits on top: it saves, cards and pushes what it trained (`training/export.py`).
# A module may import its own layer and lower ones, never a higher one (not even inside a function).
LAYERS = {
    "constants": 0, "saving": 0, "routing": 0,
    "loading": 1, "variant_lookup": 1, "hub_mixin": 1,
    "models": 2,
    "schedulers": 3, "pipelines": 3, "evaluation": 3,
    "model_card": 4,
    "hub": 5,
    "training": 6,
}  # fmt: skip
TOP = max(LAYERS.values()) + 1  # the package `__init__`, which re-exports everything
MODULES = sorted(
    ".".join(("diffusers_experts", *path.relative_to(PACKAGE_DIR).with_suffix("").parts)).removesuffix(".__init__")
    for path in PACKAGE_DIR.rglob("*.py")
)


def _module_file(module: str) -> Path:
    parts = module.split(".")[1:]
    package = PACKAGE_DIR.joinpath(*parts) / "__init__.py"
    return package if package.is_file() else PACKAGE_DIR.joinpath(*parts).with_suffix(".py")


def _layer(module: str) -> int:
    """Layer of a `diffusers_experts` module, or of a name imported from the package root (`TOP`)."""
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 and parts[1] in LAYERS else TOP


def _package_imports(module: str) -> set[str]:
    """Every `diffusers_experts` module or root-level name that `module` imports, at any depth of its code."""
    path = _module_file(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(filter(None, [package.rsplit(".", node.level - 1)[0], node.module]))
            # `from .. import routing` imports a module, `from ..models import X` a name of a module
            found.update(base if base != "diffusers_experts" else f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == "diffusers_experts"}


@pytest.mark.parametrize("module", [m for m in MODULES if m != "diffusers_experts"])
def test_no_module_imports_a_higher_layer(module):
    higher = sorted(name for name in _package_imports(module) if _layer(name) > _layer(module))
    assert not higher, (
        f"{module} (layer {_layer(module)}) imports {higher}, which sit above it. Layers (DESIGN contract 10): "
        f"{LAYERS}; a lower layer reaches a higher one only through a registered callback (e.g. `_hub_pusher`)."
    )


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module imported first, in its own process, with the package `__init__` (which imports everything in a
    fixed order) replaced by an empty package: an import cycle between two modules fails here whichever comes first.
    Third-party libraries are imported once and the process forks per module, to keep this fast."""
    script = """
import importlib, importlib.util, os, sys, traceback, types
import diffusers, huggingface_hub, peft, safetensors.torch, torch  # third-party only, shared by the forks
from diffusers import DiffusionPipeline, ModelMixin, UNet2DModel  # resolve diffusers' lazy modules once
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        root = types.ModuleType("diffusers_experts")
        root.__path__ = list(importlib.util.find_spec("diffusers_experts").submodule_search_locations)
        sys.modules["diffusers_experts"] = root
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:  # an optional third-party dependency, not a cycle
            os._exit(0 if not (error.name or "").startswith("diffusers_experts") else 1)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("FAILED", failed)
"""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    modules = [m for m in MODULES if m != "diffusers_experts"]
    result = subprocess.run(
        [sys.executable, "-c", script, *modules], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0 and "FAILED []" in result.stdout, result.stdout + result.stderr


def test_a_missing_local_folder_is_not_reported_as_only_a_hub_problem(hub_server, tmp_path, monkeypatch):
    from diffusers_experts.evaluation import load_pipeline

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"Hub repo 'my-run'.*There is no local folder 'my-run' either"):
        load_pipeline("my-run")  # a typo'd output folder: the loopback Hub has no such repo
    with pytest.raises(ValueError, match=r"'\./runs/my-run' is neither a model folder nor a Hub repo id"):
        load_pipeline("./runs/my-run")


def test_wan_style_pair_through_per_expert_repos_loads_back_bit_identical(repo, tmp_path):
    from diffusers import WanTransformer3DModel

    from diffusers_experts import mixture_from_wan

    def transformer(seed):
        torch.manual_seed(seed)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=8, freq_dim=16, ffn_dim=16, num_layers=1, rope_max_seq_len=16,
        )  # fmt: skip

    mixture = mixture_from_wan(transformer(0), transformer(1), boundary_ratio=0.875)
    sources = push_experts_to_hub(mixture, [f"{repo}-low-noise", f"{repo}-high-noise"], mixture_repo_id=repo)
    push_mixture_to_hub(mixture, repo, expert_sources=sources)
    loaded = ExpertMixtureUNet.from_pretrained(repo, cache_dir=tmp_path)
    assert [type(e).__name__ for e in loaded.experts] == ["WanTransformer3DModel"] * 2
    assert loaded.config.boundaries == [875.0] and loaded.config.patch_size == [1, 2, 2]
    for original, back in zip(mixture.experts, loaded.experts):  # bit-identical weights
        state, loaded_state = original.state_dict(), back.state_dict()
        assert state.keys() == loaded_state.keys() and all(torch.equal(state[n], loaded_state[n]) for n in state)
    generator = torch.Generator().manual_seed(0)
    video, text = torch.randn(2, 4, 3, 8, 8, generator=generator), torch.randn(2, 5, 8, generator=generator)
    timesteps = torch.tensor([900.0, 100.0])  # one sample per expert
    # outputs: exactly those of each expert repo loaded by diffusers alone; the in-memory original differs in the last
    # bit at most (memory-mapped weights are aligned differently, so the CPU kernels may round differently)
    alone = [
        WanTransformer3DModel.from_pretrained(r, cache_dir=tmp_path)
        for r in (f"{repo}-low-noise", f"{repo}-high-noise")
    ]
    with torch.no_grad():
        got = loaded(hidden_states=video, timestep=timesteps, encoder_hidden_states=text).sample
        for row, k in ((0, 1), (1, 0)):
            own = alone[k](
                hidden_states=video[row : row + 1],
                timestep=timesteps[row : row + 1],
                encoder_hidden_states=text[row : row + 1],
            )
            assert torch.equal(got[row : row + 1], own.sample)
        expected = mixture(hidden_states=video, timestep=timesteps, encoder_hidden_states=text).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
