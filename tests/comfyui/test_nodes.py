"""The node pack inside ComfyUI: loaded by ComfyUI's own custom-node loader, the panel mask
node against iclora's inference mask, compose / split, and what the context node refuses."""

from __future__ import annotations

import asyncio

import pytest
import torch

from comfy_harness import REPO, comfy, requires_comfyui  # noqa: F401 (comfy: a fixture)

pytestmark = requires_comfyui


def test_comfyui_loads_the_pack(comfy):
    import inspect

    loaded = comfy.nodes.load_custom_node(str(REPO / "comfyui_iclora"))
    if inspect.iscoroutine(loaded):
        loaded = asyncio.run(loaded)
    assert loaded is not False
    for name in ("ICLoRAContext", "ICLoRALoader", "ICLoRAPanelMask", "ICLoRACompose", "ICLoRASplit"):
        assert name in comfy.nodes.NODE_CLASS_MAPPINGS
        assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[name].startswith("IC-LoRA")


@pytest.mark.parametrize("gradient", [0, 20])
def test_panel_mask_node_is_the_cli_mask(comfy, gradient):
    from iclora.panels import Grid, inpaint_mask

    images = torch.rand(2, 64, 96, 3)  # ComfyUI's IMAGE: (B, H, W, C)
    (mask,) = comfy.pack.nodes.ICLoRAPanelMask().mask(images, "2x2", "2 3", gradient, "flux (16 px tokens)")
    assert mask.shape == (2, 64, 96)  # ComfyUI's MASK: (B, H, W)
    assert torch.equal(mask[1], inpaint_mask([2, 3], Grid(2, 2), 64, 96, gradient)[0])
    with pytest.raises(ValueError, match="outside the 2x2 grid"):
        comfy.pack.nodes.ICLoRAPanelMask().mask(images, "2x2", "4", 0, "flux (16 px tokens)")


def test_compose_then_split_gives_the_panels_back(comfy):
    panels = torch.rand(3, 32, 48, 3)
    (composite,) = comfy.pack.nodes.ICLoRACompose().compose(panels, "1x3", 48, 32, "stretch", "white")
    assert composite.shape == (1, 32, 144, 3)
    (back,) = comfy.pack.nodes.ICLoRASplit().split(composite, "1x3")
    assert back.shape == (3, 32, 48, 3) and (back - panels).abs().max() <= 0.5 / 255 + 1e-6


def test_context_node_refuses_a_fill_model(comfy):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    fill = FluxTransformer2DModel(patch_size=1, in_channels=384, out_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=128, num_attention_heads=1, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    model = comfy.comfy.sd.load_diffusion_model_state_dict(fill.state_dict())
    with pytest.raises(ValueError, match="FLUX.1-Fill"):
        comfy.pack.nodes.ICLoRAContext().apply(model, "none", "auto")
