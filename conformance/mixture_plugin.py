"""pytest plugin: run diffusers' own tests with their denoiser swapped for an `ExpertMixtureUNet`.

Load it with `-p mixture_plugin` (this folder on `PYTHONPATH`) while running tests from an extracted diffusers
`tests/` folder. Nothing of diffusers' test code is copied; the plugin patches the collected test classes:

- pipeline tests (`PipelineTesterMixin` classes, `BasePipelineTesterConfig` classes and plain `unittest` classes such
  as `DDPMPipelineFastTests`): `get_dummy_components()` and every `dummy_*` property/method are wrapped, so
  - each `UNet2DModel` they build (anywhere in the result, as before) is replaced by a mixture of that very model;
  - a `UNet2DConditionModel`, `DiTTransformer2DModel`, `SD3Transformer2DModel` or `WanTransformer3DModel` is replaced
    only where it is the `unet`, `transformer` or `transformer_2` entry of the components dict they return;
- model tests (`BaseModelTesterConfig` classes whose `model_class` is one of these five classes): `model_class` becomes a
  shim that builds that model from the test's `get_init_dict()` and returns it as a mixture;
  `model_class.from_pretrained` is `ExpertMixtureUNet.from_pretrained`, class attributes are the mixture's.

Only these exact classes are swapped (not subclasses, not other `ModelMixin`s such as VAEs or text encoders).

With `HF_HUB_OFFLINE` set, a test that fails (in any mode, the baseline too) because it needs files from the Hugging
Face Hub (diffusers' SD/SDXL/SD3/Wan fast tests load tiny tokenizers and text-encoder configs from the Hub) is reported
as skipped with the reason `mixture_plugin: not runnable offline: ...` instead of failed: it says nothing about the
mixture. `run.py` counts these as `offline` and flags a test that passes on the baseline but is `offline` with a mixture.

Environment:
    MIXTURE_EXPERTS  number of experts, default 1. `1`: `ExpertMixtureUNet.from_experts([model])`; `N > 1`: the model
                     and `N - 1` deep copies of it (identical weights, so every output must equal the plain model's);
                     `0`: plugin inert (baseline run with the plain model; only the offline report stays active).
    MIXTURE_ROUTING  routing mode of the mixture, default `hard` (bit-identical); `linear`/`sigmoid` blend identical
                     experts (equal up to float rounding).
    HF_HUB_OFFLINE   when set (`1`), Hub-access failures are reported as "not runnable offline" skips (see above).
"""

from __future__ import annotations

import copy
import functools
import inspect
import os

import pytest
from diffusers import (
    DiTTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
    WanTransformer3DModel,
)


def _settings() -> tuple[int, str]:
    raw = os.environ.get("MIXTURE_EXPERTS", "1").strip()
    if not raw.isdigit():
        raise pytest.UsageError(f"MIXTURE_EXPERTS must be a non-negative integer, got {raw!r}.")
    routing = os.environ.get("MIXTURE_ROUTING", "hard").strip()
    return int(raw), routing


NUM_EXPERTS, ROUTING = _settings()
OFFLINE = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
OFFLINE_REASON = "mixture_plugin: not runnable offline"
# swapped wherever they are built (the original UNet2DModel behaviour)
ANYWHERE_CLASSES = (UNet2DModel,)
# swapped only as these entries of a components dict (pipeline tests) or as `model_class` (model tests)
KEYED_CLASSES = (UNet2DConditionModel, DiTTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel)
DENOISER_KEYS = ("unet", "transformer", "transformer_2")
DENOISER_CLASSES = ANYWHERE_CLASSES + KEYED_CLASSES
_PATCHED = "_mixture_plugin_patched"
_BUILT = [0]  # mixtures built so far; a test "used a mixture" if the count grew from its setup to its call


def _mixture_class():
    """`ExpertMixtureUNet`, imported on first use: the baseline mode (`MIXTURE_EXPERTS=0`) never imports it."""
    from diffusers_experts import ExpertMixtureUNet

    return ExpertMixtureUNet


def _is_one_of(value, classes) -> bool:
    """`value` is an instance of exactly one of `classes` (subclasses do not count)."""
    return any(type(value) is cls for cls in classes)


def to_mixture(model):
    """A mixture of `model` and `NUM_EXPERTS - 1` deep copies of it, in the same train/eval mode."""
    experts = [model] + [copy.deepcopy(model) for _ in range(NUM_EXPERTS - 1)]
    mixture = _mixture_class().from_experts(experts, routing=ROUTING)
    mixture.train(model.training)
    _BUILT[0] += 1
    return mixture


def _swap(value):
    """`value` with every plain `UNet2DModel` (also inside a dict/list/tuple) replaced by a mixture of it."""
    if _is_one_of(value, ANYWHERE_CLASSES):
        return to_mixture(value)
    if isinstance(value, dict):
        return {k: _swap(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_swap(v) for v in value)
    return value


def _swap_components(value):
    """`_swap(value)`, and in a components dict the `unet`/`transformer`/`transformer_2` entries that are one of the
    `KEYED_CLASSES` replaced by a mixture."""
    if isinstance(value, dict):
        return {
            k: to_mixture(v) if k in DENOISER_KEYS and _is_one_of(v, KEYED_CLASSES) else _swap(v)
            for k, v in value.items()
        }
    return _swap(value)


def _wrap_function(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return _swap_components(fn(*args, **kwargs))

    return wrapper


_SHIMS: dict[type, type] = {}


def _shim_class(expert_class=UNet2DModel):
    """`expert_class(**init_dict)` -> mixture; class attributes (read and monkeypatched) are `ExpertMixtureUNet`'s."""
    if expert_class in _SHIMS:
        return _SHIMS[expert_class]
    ExpertMixtureUNet = _mixture_class()
    base_meta = type(ExpertMixtureUNet)

    class _MixtureShimMeta(base_meta):
        def __call__(cls, *args, **init_dict):
            return to_mixture(expert_class(*args, **init_dict))

        def __setattr__(cls, name, value):  # e.g. monkeypatch.setattr(model_class, "_keep_in_fp32_modules", ...)
            setattr(ExpertMixtureUNet, name, value)

        def __delattr__(cls, name):
            delattr(ExpertMixtureUNet, name)

    def from_pretrained(cls, *args, **kwargs):
        return ExpertMixtureUNet.from_pretrained(*args, **kwargs)

    def from_config(cls, *args, **kwargs):
        return ExpertMixtureUNet.from_config(*args, **kwargs)

    # `<Expert>AsExpertMixture`: tests that read `model_class.__name__` (e.g. "unet" in it) see the expert's name
    shim = _MixtureShimMeta(
        f"{expert_class.__name__}AsExpertMixture",
        (ExpertMixtureUNet,),
        {
            "__module__": __name__,
            "__qualname__": f"{expert_class.__name__}AsExpertMixture",
            "from_pretrained": classmethod(from_pretrained),
            "from_config": classmethod(from_config),
        },
    )
    _SHIMS[expert_class] = shim
    return shim


def _patch_test_class(cls) -> None:
    """Patch one test class in place, once: its denoiser factories now return mixtures."""
    if cls is None or _PATCHED in cls.__dict__:
        return
    for name, attr in _members(cls):
        if name == "model_class" and isinstance(attr, property):
            try:
                model_class = attr.fget(cls.__new__(cls))
            except Exception:
                model_class = None
            expert_class = next((c for c in DENOISER_CLASSES if model_class is c), None)
            if expert_class is not None:
                shim = _shim_class(expert_class)
                setattr(cls, name, property(lambda self, _shim=shim: _shim))
        elif name == "get_dummy_components" or name.startswith("dummy_"):
            if isinstance(attr, property) and attr.fget is not None:
                setattr(cls, name, property(_wrap_function(attr.fget)))
            elif inspect.isfunction(attr):
                setattr(cls, name, _wrap_function(attr))
    setattr(cls, _PATCHED, True)


def _members(cls) -> list:
    """(name, raw attribute) of `cls` and its bases, most derived last wins, without triggering descriptors."""
    seen = {}
    for klass in reversed(cls.__mro__):
        seen.update(vars(klass))
    return list(seen.items())


# ---------------------------------------------------------------------------------------------- offline Hub access


def _offline_error(exc: BaseException | None) -> str | None:
    """The message of a Hub-access failure in `exc`'s chain (offline mode, file not in the local cache), else None."""
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:  # pragma: no cover - old huggingface_hub
        LocalEntryNotFoundError = OfflineModeIsEnabled = ()
    markers = (
        "offline mode",
        "HF_HUB_OFFLINE",
        "couldn't connect to 'https://huggingface.co'",
        "cannot find the requested files in the disk cache",
        "outgoing traffic has been disabled",
    )
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or (
            isinstance(exc, OSError) and any(marker.lower() in text.lower() for marker in markers)
        ):
            return f"{type(exc).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"[:200]
        exc = exc.__cause__ or exc.__context__
    return None


def _tokenizer_without_files(exc: BaseException | None) -> str | None:
    """The name of a tokenizer in `exc`'s traceback that was "loaded" from a Hub repo absent from the local cache.

    Offline, `transformers` (5.x) does not fail on `CLIPTokenizer.from_pretrained("hf-internal-testing/tiny-random-clip")`
    when the files are missing: it builds an empty tokenizer (2 tokens, `model_max_length` = 1e30), whose first call
    then fails (`OverflowError: int too big to convert`). A failure raised inside such a tokenizer needs the Hub too.
    """
    try:
        from huggingface_hub import try_to_load_from_cache
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover
        return None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            owner = tb.tb_frame.f_locals.get("self")
            if isinstance(owner, PreTrainedTokenizerBase):
                name = str(getattr(owner, "name_or_path", "") or "")
                if name and not os.path.isdir(name):
                    cached = try_to_load_from_cache(name, "tokenizer_config.json")
                    if not isinstance(cached, str):
                        return (
                            f"tokenizer {name!r} is not in the local Hub cache (transformers built an empty one): "
                            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                        )[:200]
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return None


def pytest_report_header(config):
    offline = f"; Hub-access failures reported as '{OFFLINE_REASON}' skips" if OFFLINE else ""
    if NUM_EXPERTS == 0:
        return f"mixture_plugin: inert (MIXTURE_EXPERTS=0), tests run with the plain models{offline}"
    names = ", ".join(cls.__name__ for cls in DENOISER_CLASSES)
    return f"mixture_plugin: {names} -> ExpertMixtureUNet, {NUM_EXPERTS} expert(s), routing={ROUTING!r}{offline}"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    if NUM_EXPERTS == 0:
        return
    for item in items:
        _patch_test_class(getattr(item, "cls", None))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item._mixture_plugin_before = _BUILT[0]  # fixtures (e.g. `base_model_output`) build models during setup


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if OFFLINE and report.failed and call.excinfo is not None and report.when in ("setup", "call"):
        reason = _offline_error(call.excinfo.value) or _tokenizer_without_files(call.excinfo.value)
        if reason is not None:
            path, line, _ = item.reportinfo()
            report.outcome = "skipped"
            report.longrepr = (str(path), (line or 0) + 1, f"{OFFLINE_REASON}: {reason}")
    if report.when == "call" and NUM_EXPERTS:
        built = _BUILT[0] - getattr(item, "_mixture_plugin_before", _BUILT[0])
        item.config._mixture_plugin_runs.append((item.nodeid, report.outcome, built))


def pytest_configure(config):
    config._mixture_plugin_runs = []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if NUM_EXPERTS == 0:
        return
    runs = [run for run in config._mixture_plugin_runs if run[1] != "skipped"]
    unswapped = [nodeid for nodeid, outcome, built in runs if built == 0]
    terminalreporter.write_sep("-", "mixture_plugin")
    terminalreporter.write_line(
        f"{len(runs) - len(unswapped)} of {len(runs)} executed test(s) built an ExpertMixtureUNet "
        f"({NUM_EXPERTS} expert(s), routing={ROUTING!r}) in place of their denoiser"
    )
    for nodeid in unswapped:
        terminalreporter.write_line(
            f"built no mixture (returned before building components, or reused a class-scoped fixture's): {nodeid}"
        )
