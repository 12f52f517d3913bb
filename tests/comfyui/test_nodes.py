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


def _widgets(spec: dict) -> list[str]:
    """The widget inputs of a node (what widgets_values holds), in order."""
    inputs = {**spec.get("required", {}), **spec.get("optional", {})}
    return [n for n, s in inputs.items() if isinstance(s[0], list) or s[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "comfyui_iclora" / "example_workflows").glob("*.json")))
def test_example_workflow_matches_comfyui_nodes(comfy, name):
    """Every node exists (ComfyUI's own and this pack's), every link joins an output to an
    input of its type, every node holds one value per widget, and choices are valid ones."""
    import json

    nodes = comfy.nodes
    if "FluxGuidance" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    test_comfyui_loads_the_pack(comfy)
    workflow = json.loads((REPO / "comfyui_iclora" / "example_workflows" / name).read_text())
    by_id = {n["id"]: n for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        cls = nodes.NODE_CLASS_MAPPINGS[node["type"]]
        spec = cls.INPUT_TYPES()
        inputs = {**spec.get("required", {}), **spec.get("optional", {})}
        widgets = _widgets(spec)
        values = list(node["widgets_values"])
        for widget in widgets:
            value = values.pop(0)
            if widget in ("seed", "noise_seed"):
                assert values.pop(0) in ("fixed", "randomize", "increment", "decrement")
            choices = inputs[widget][0]
            if isinstance(choices, list) and choices and not widget.endswith("_name") and widget != "image":
                assert value in choices, f"{name}: {node['type']}.{widget} = {value!r}"
        assert values in ([], ["image"]), f"{name}: {node['type']} has extra widget values {values}"
        for socket in node["inputs"]:
            assert socket["type"] == inputs[socket["name"]][0], f"{name}: {node['type']}.{socket['name']}"
        for slot, out in enumerate(node["outputs"]):
            assert out["type"] == cls.RETURN_TYPES[slot]
    for link_id, src, slot, dst, dst_slot, type_ in workflow["links"]:
        assert by_id[src]["outputs"][slot]["type"] == type_ == by_id[dst]["inputs"][dst_slot]["type"]
        assert link_id in by_id[src]["outputs"][slot]["links"] and by_id[dst]["inputs"][dst_slot]["link"] == link_id
    for node in workflow["nodes"]:  # every required non-widget input is connected
        spec = nodes.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
        for input_name in set(spec.get("required", {})) - set(_widgets(spec)):
            assert any(s["name"] == input_name and s["link"] for s in node["inputs"]), f"{name}: {node['type']}.{input_name}"


def test_flux_zero_refuses_controlnet_and_reference_latents(comfy):
    """Per-token context reorders the image tokens; a ControlNet's residuals (added by token
    position) or Kontext reference tokens would not line up: refused, with what to do."""
    from comfyui_iclora.sampling import KEY, _flux_wrapper

    x = torch.zeros(1, 16, 4, 4)
    stash = {"clean": x, "mask": torch.ones(1, 1, 4, 4)}
    stash["mask"][..., :2, :] = 0
    wrapper = _flux_wrapper("zero")
    args = (x, torch.ones(1), torch.zeros(1, 3, 8), None, None)
    with pytest.raises(ValueError, match="ControlNet.*context_timestep shared"):
        wrapper(None, *args, None, {"input": []}, {KEY: stash})
    with pytest.raises(ValueError, match="reference latents"):
        wrapper(None, *args, [x], None, {KEY: stash})
