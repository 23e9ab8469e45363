"""Shared test set-up. The environment block runs before anything imports huggingface_hub or diffusers."""

import os
import socket
import tempfile


# --- Hub client environment: must be set before huggingface_hub / diffusers are imported (both read it at import).
_HUB_HOME = tempfile.mkdtemp(prefix="diffusers-experts-hf-home-")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HUB_TEST_PORT = int(os.environ.get("HUB_TEST_PORT") or _free_port())
os.environ["HUB_TEST_PORT"] = str(HUB_TEST_PORT)
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_TEST_PORT}"
os.environ["HF_HOME"] = _HUB_HOME
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_TOKEN"] = "hf_dummy_test_token"
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads cost more than they give

import pytest  # noqa: E402
import torch  # noqa: E402


torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# --- No hidden network: any connection to a non-loopback address fails the test.
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _is_loopback(address) -> bool:
    if isinstance(address, (str, bytes)):  # unix socket path
        return True
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode()
    return host in ("localhost", "::1") or host.startswith("127.") or host == "0.0.0.0"


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise RuntimeError(f"Test tried to reach the network: {address!r}. Only loopback is allowed in tests.")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise RuntimeError(f"Test tried to reach the network: {address!r}. Only loopback is allowed in tests.")
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex


# --- Tiny models, built in-process with fixed seeds.
TINY = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), norm_num_groups=8)


def tiny_iunet(seed: int = 0, **overrides):
    from diffusers_experts import IUNet2DModel

    torch.manual_seed(seed)
    return IUNet2DModel(**{**TINY, "attention_head_dim": 8, "layers_per_block": 1, **overrides}).eval()


def tiny_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    config = {
        **TINY,
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": 8,
        **overrides,
    }
    return UNet2DModel(**config).eval()


def tiny_mixture(num_experts: int = 2, routing: str = "hard", kind: str = "unet", seed: int = 0, **kwargs):
    from diffusers_experts import ExpertMixtureUNet

    make = tiny_unet if kind == "unet" else tiny_iunet
    experts = [make(seed + k) for k in range(num_experts)]
    return ExpertMixtureUNet.from_experts(experts, routing=routing, **kwargs).eval()


@pytest.fixture
def make_iunet():
    return tiny_iunet


@pytest.fixture
def make_unet():
    return tiny_unet


@pytest.fixture
def make_mixture():
    return tiny_mixture


# --- Loopback Hub-compatible server (tests/hub_server.py) on HUB_TEST_PORT, i.e. at HF_ENDPOINT; one per session.
@pytest.fixture(scope="session")
def hub_server():
    from hub_server import HubTestServer

    server = HubTestServer(HUB_TEST_PORT).start()
    yield server
    server.stop()
