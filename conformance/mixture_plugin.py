"""pytest plugin: run diffusers' own tests with their `UNet2DModel` swapped for an `ExpertMixtureUNet`.

Load it with `-p mixture_plugin` (this folder on `PYTHONPATH`) while running tests from an extracted diffusers
`tests/` folder. Nothing of diffusers' test code is copied; the plugin patches the collected test classes:

- pipeline tests (`PipelineTesterMixin` classes and plain `unittest` classes such as `DDPMPipelineFastTests`):
  `get_dummy_components()` and every `dummy_*` property/method are wrapped, so each `UNet2DModel` they build is
  replaced by a mixture of that very model;
- model tests (`BaseModelTesterConfig` classes whose `model_class` is `UNet2DModel`): `model_class` becomes a shim
  that builds the `UNet2DModel` from the test's `get_init_dict()` and returns it as a mixture;
  `model_class.from_pretrained` is `ExpertMixtureUNet.from_pretrained`, class attributes are the mixture's.

Environment:
    MIXTURE_EXPERTS  number of experts, default 1. `1`: `ExpertMixtureUNet.from_experts([unet])`; `N > 1`: the unet
                     and `N - 1` deep copies of it (identical weights, so every output must equal the plain model's);
                     `0`: plugin inert (baseline run with the plain `UNet2DModel`).
    MIXTURE_ROUTING  routing mode of the mixture, default `hard` (bit-identical); `linear`/`sigmoid` blend identical
                     experts (equal up to float rounding).
"""

from __future__ import annotations

import copy
import functools
import inspect
import os

import pytest
from diffusers import UNet2DModel


def _settings() -> tuple[int, str]:
    raw = os.environ.get("MIXTURE_EXPERTS", "1").strip()
    if not raw.isdigit():
        raise pytest.UsageError(f"MIXTURE_EXPERTS must be a non-negative integer, got {raw!r}.")
    routing = os.environ.get("MIXTURE_ROUTING", "hard").strip()
    return int(raw), routing


NUM_EXPERTS, ROUTING = _settings()
_PATCHED = "_mixture_plugin_patched"
_BUILT = [0]  # mixtures built so far; a test "used a mixture" if the count grew from its setup to its call


def _mixture_class():
    """`ExpertMixtureUNet`, imported on first use: the baseline mode (`MIXTURE_EXPERTS=0`) never imports it."""
    from diffusers_experts import ExpertMixtureUNet

    return ExpertMixtureUNet


def to_mixture(unet):
    """A mixture of `unet` and `NUM_EXPERTS - 1` deep copies of it, in the same train/eval mode."""
    experts = [unet] + [copy.deepcopy(unet) for _ in range(NUM_EXPERTS - 1)]
    mixture = _mixture_class().from_experts(experts, routing=ROUTING)
    mixture.train(unet.training)
    _BUILT[0] += 1
    return mixture


def _swap(value):
    """`value` with every plain `UNet2DModel` (also inside a dict/list/tuple) replaced by a mixture of it."""
    if type(value) is UNet2DModel:
        return to_mixture(value)
    if isinstance(value, dict):
        return {k: _swap(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_swap(v) for v in value)
    return value


def _wrap_function(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return _swap(fn(*args, **kwargs))

    return wrapper


def _shim_class():
    """`UNet2DModel(**init_dict)` -> mixture; class attributes (read and monkeypatched) are `ExpertMixtureUNet`'s."""
    ExpertMixtureUNet = _mixture_class()
    base_meta = type(ExpertMixtureUNet)

    class _MixtureShimMeta(base_meta):
        def __call__(cls, *args, **init_dict):
            return to_mixture(UNet2DModel(*args, **init_dict))

        def __setattr__(cls, name, value):  # e.g. monkeypatch.setattr(model_class, "_keep_in_fp32_modules", ...)
            setattr(ExpertMixtureUNet, name, value)

        def __delattr__(cls, name):
            delattr(ExpertMixtureUNet, name)

    class UNet2DModelAsExpertMixture(ExpertMixtureUNet, metaclass=_MixtureShimMeta):
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return ExpertMixtureUNet.from_pretrained(*args, **kwargs)

        @classmethod
        def from_config(cls, *args, **kwargs):
            return ExpertMixtureUNet.from_config(*args, **kwargs)

    return UNet2DModelAsExpertMixture


def _patch_test_class(cls) -> None:
    """Patch one test class in place, once: its UNet2DModel factories now return mixtures."""
    if cls is None or _PATCHED in cls.__dict__:
        return
    for name, attr in _members(cls):
        if name == "model_class" and isinstance(attr, property):
            try:
                builds_unet = attr.fget(cls.__new__(cls)) is UNet2DModel
            except Exception:
                builds_unet = False
            if builds_unet:
                shim = _shim_class()
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


def pytest_report_header(config):
    if NUM_EXPERTS == 0:
        return "mixture_plugin: inert (MIXTURE_EXPERTS=0), tests run with the plain UNet2DModel"
    return f"mixture_plugin: UNet2DModel -> ExpertMixtureUNet, {NUM_EXPERTS} expert(s), routing={ROUTING!r}"


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
        f"({NUM_EXPERTS} expert(s), routing={ROUTING!r}) in place of UNet2DModel"
    )
    for nodeid in unswapped:
        terminalreporter.write_line(
            f"built no mixture (returned before building components, or reused a class-scoped fixture's): {nodeid}"
        )
