"""`models.unet.LDMUNet` against ComfyUI's own openaimodel `UNetModel`, on tiny SD1-, SD2- and SDXL-like layouts.

What is checked: the config derived from a ComfyUI U-Net's state-dict shapes is the one it was built with; that
state dict loads strictly and the noise prediction matches ComfyUI's (float32, relative error ≤ 1e-5, odd latent
sizes included), while halving the heads visibly does not; `sdxl_vector` equals ComfyUI's SDXL.encode_adm; the
shipped ToyWorld weights are an LDMUNet configuration read from their shapes.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from comfy_host import import_comfy, release_comfy_path
from concept_eraser.models.arch import UNET_PREFIX
from concept_eraser.models.unet import LDMConfig, LDMUNet, config_from_shapes, sdxl_vector

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny layouts with each family's structural features. ComfyUI's GroupNorms have 32 groups, so every width is a
# multiple of 32; with 64 channels per head (SD2, SDXL) the levels with attention have at least 64.
CONFIGS = {
    # conv 1×1 proj_in/out, 8 heads, the deepest level without attention (as SD1's 4th)
    "sd1": dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=(2, 2, 2),
                transformer_depth=(1, 1, 1, 1, 0, 0), transformer_depth_middle=1,
                transformer_depth_output=(1, 1, 1, 1, 1, 1, 0, 0, 0), context_dim=48, num_heads=8),
    # linear proj_in/out, 64 channels per head (1 and 2 heads), uneven res blocks per level
    "sd2": dict(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=(1, 2, 1),
                transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1,
                transformer_depth_output=(1, 1, 1, 1, 1, 0, 0), context_dim=80, num_head_channels=64,
                use_linear_in_transformer=True),
    # label_emb, no attention on the first level, transformers of depth 2 and 3 (SDXL: 2 and 10)
    "sdxl": dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2),
                 transformer_depth=(0, 0, 2, 2, 3, 3), transformer_depth_middle=3,
                 transformer_depth_output=(0, 0, 0, 2, 2, 2, 3, 3, 3), context_dim=96, num_head_channels=64,
                 use_linear_in_transformer=True, adm_in_channels=64 + 6 * 256),
}
LATENT = {"sd1": (8, 8), "sd2": (9, 7), "sdxl": (12, 10)}  # odd sizes: Upsample resizes to the skip's size
POOLED = 64  # SDXL-like pooled width (SDXL: 1280)


@pytest.fixture(scope="module")
def comfy():
    import_comfy()
    import comfy.ldm.modules.diffusionmodules.openaimodel
    import comfy.model_base
    import comfy.ops

    yield comfy
    release_comfy_path()


def randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Seeded non-zero values everywhere (ComfyUI's disable_weight_init leaves them uninitialised): 1 + noise
    for norm scales, small noise for biases, LeCun-scaled noise for weights."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(noise * p.shape[1:].numel() ** -0.5)


def comfy_unet(comfy, kwargs: dict, gen: torch.Generator) -> torch.nn.Module:
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    if config.get("adm_in_channels"):
        config["num_classes"] = "sequential"
    unet = comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel(
        image_size=32, use_spatial_transformer=True, legacy=False, dtype=torch.float32,
        operations=comfy.ops.disable_weight_init, **config)
    randomize(unet, gen)
    return unet.eval()


def inputs(family: str, gen: torch.Generator, batch: int = 2) -> dict:
    cfg = CONFIGS[family]
    args = {"x": torch.randn(batch, cfg["in_channels"], *LATENT[family], generator=gen),
            "timesteps": torch.tensor([3.0, 871.5])[:batch],
            "context": torch.randn(batch, 7, cfg["context_dim"], generator=gen)}
    if cfg.get("adm_in_channels"):
        args["y"] = sdxl_vector(torch.randn(batch, POOLED, generator=gen), 8 * LATENT[family][0], 8 * LATENT[family][1])
    return args


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.host
@pytest.mark.parametrize("family", list(CONFIGS))
def test_matches_comfyui(comfy, family):
    gen = torch.Generator().manual_seed(0)
    reference = comfy_unet(comfy, CONFIGS[family], gen)
    state = reference.state_dict()
    cfg = config_from_shapes({k: tuple(v.shape) for k, v in state.items()}, family)
    assert cfg == LDMConfig(**CONFIGS[family])
    ours = LDMUNet(cfg).eval()
    ours.load_state_dict(state, strict=True)
    args = inputs(family, gen)
    with torch.no_grad():
        expected = reference(**args, transformer_options={})
        assert expected.shape == args["x"].shape and expected.abs().mean() > 0.1
        assert rel_error(ours(**args), expected) <= 1e-5
        # the heads change no shape, only the output: halving them must show
        fewer = dataclasses.replace(cfg, **({"num_heads": cfg.num_heads // 2} if cfg.num_heads > 0
                                            else {"num_head_channels": cfg.num_head_channels // 2}))
        wrong = LDMUNet(fewer).eval()
        wrong.load_state_dict(state, strict=True)
        assert rel_error(wrong(**args), expected) > 1e-3


@pytest.mark.host
def test_sdxl_vector_matches_comfyui(comfy):
    pooled = torch.randn(3, 1280, generator=torch.Generator().manual_seed(2))
    host = types.SimpleNamespace(embedder=comfy.ldm.modules.diffusionmodules.openaimodel.Timestep(256),
                                 noise_augmentor=None)  # SDXL.encode_adm reads only these two
    for height, width in ((1024, 1024), (832, 1216)):
        expected = comfy.model_base.SDXL.encode_adm(host, pooled_output=pooled, height=height, width=width)
        ours = sdxl_vector(pooled, height, width)
        assert ours.shape == (3, 2816)
        assert torch.equal(ours, expected)


def test_toyworld_is_an_ldm_configuration():
    from safetensors import safe_open

    from concept_eraser.toyworld.build import UNET
    from concept_eraser.toyworld.pipeline import CHECKPOINT
    from concept_eraser.toyworld.unet import ToyUNet

    with safe_open(CHECKPOINT, "pt") as f:
        state = {k[len(UNET_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(UNET_PREFIX)}
    unet = ToyUNet(UNET)
    assert config_from_shapes({k: tuple(v.shape) for k, v in state.items()}, "toyworld") == unet.config
    unet.load_state_dict(state, strict=True)
