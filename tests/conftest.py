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


# --- Tiny conditional models: text (SD / SDXL, PixArt), class (DiT) and video (Wan) denoisers, and their VAEs.
def tiny_text_unet(seed: int = 0, **overrides):
    """A UNet2DConditionModel laid out as SD's (a cross-attention block under a plain one), on 16-wide embeddings."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (8, 16),
        "norm_num_groups": 4,
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 16,
        "attention_head_dim": 4,
        **overrides,
    }
    return UNet2DConditionModel(**config).eval()


# 2D transformers on 4-channel 8 x 8 latents, with learned sigma (out_channels = 2 x in_channels) as DiT-XL and PixArt
TINY_TRANSFORMER_2D = {
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 1,
    "sample_size": 8,
    "patch_size": 2,
}


def tiny_dit(seed: int = 0, **overrides):
    """A class-conditional DiTTransformer2DModel; DiTPipeline's null class (guidance) is 1000 = num_embeds_ada_norm."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(**{**TINY_TRANSFORMER_2D, "num_embeds_ada_norm": 1000, **overrides}).eval()


def tiny_pixart(seed: int = 0, **overrides):
    """A text-conditional PixArtTransformer2DModel on 16-wide caption embeddings."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    config = {**TINY_TRANSFORMER_2D, "caption_channels": 16, **overrides}
    # the captions are projected to the transformer's width, which the cross-attention then reads
    config.setdefault("cross_attention_dim", config["num_attention_heads"] * config["attention_head_dim"])
    return PixArtTransformer2DModel(**config).eval()


def tiny_wan_transformer(seed: int = 0, **overrides):
    """diffusers' dummy WanTransformer3DModel (tests/pipelines/wan/test_wan.py): 16 latent channels, 32-wide text."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    config = {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 32,
        "freq_dim": 256,
        "ffn_dim": 32,
        "num_layers": 2,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 32,
        **overrides,
    }
    return WanTransformer3DModel(**config).eval()


def tiny_vae(seed: int = 0, **overrides):
    """An AutoencoderKL with 4 latent channels and no downsampling (8 x 8 latents decode to 8 x 8 images)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    config = {
        "block_out_channels": (8,),
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",),
        "up_block_types": ("UpDecoderBlock2D",),
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 8,
        **overrides,
    }
    return AutoencoderKL(**config).eval()


def tiny_wan_vae(seed: int = 0, **overrides):
    """diffusers' own dummy AutoencoderKLWan: 16 latent channels, 8 x spatial and 4 x temporal compression."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    config = {
        "base_dim": 3,
        "z_dim": 16,
        "dim_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
        **overrides,
    }
    return AutoencoderKLWan(**config).eval()


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
