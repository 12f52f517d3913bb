"""iclora's SDXL LoRA file, with --lora_convs, in ComfyUI's own LoRA loader
(comfy.sd.load_lora_for_models, as the LoraLoader node calls it) on ComfyUI's SDXL model
holding the tiny UNet: every key is loaded, the attention layers and the ResNet convs alike,
and each of ComfyUI's weights changes by exactly the update the LoRA was trained with
(alpha / rank included)."""

from __future__ import annotations

import logging

import torch
from safetensors.torch import load_file

from comfy_harness import comfy, comfy_sdxl, requires_comfyui  # noqa: F401 (comfy: a fixture)

pytestmark = requires_comfyui

RANK, ALPHA = 4, 2


def test_comfyui_loads_the_sdxl_lora_with_resnet_convs_at_its_trained_scale(comfy, tmp_path, caplog):
    import comfy.utils as comfy_utils

    from iclora.backends.lora_files import COMFYUI_WEIGHT_NAME, lora_layers
    from iclora.backends.sdxl import SDXLBackend
    from iclora.backends.tiny import build_tiny_sdxl_components

    patcher = comfy_sdxl(comfy, build_tiny_sdxl_components()["unet"])
    backend = SDXLBackend(build_tiny_sdxl_components(), "tiny-sdxl", "blend")
    backend.add_lora(RANK, ALPHA, 0.0, convs=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in backend.unet.named_parameters():
            if "lora_" in name:
                param.copy_((torch.randn(param.shape) * 0.3).half().float())  # as written (float16)
    backend.save_lora(tmp_path)
    lora = load_file(tmp_path / COMFYUI_WEIGHT_NAME)
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    assert "lora key not loaded" not in caplog.text

    # What the LoRA was trained to add, placed by ComfyUI's own diffusers -> SGM map.
    to_sgm = comfy_utils.unet_to_diffusers(patcher.model.model_config.unet_config)
    weights = patcher.model.state_dict()
    expected = {}
    for module in lora_layers(backend.unet)["default"]:
        layer = backend.unet.get_submodule(module)
        assert layer.scaling["default"] == ALPHA / RANK
        expected[f"diffusion_model.{to_sgm[f'{module}.weight']}"] = layer.get_delta_weight("default")
    convs = [name for name in expected if ".in_layers.2." in name or ".out_layers.3." in name]
    assert len(convs) == 2 * (2 + 2 + 4)  # the ResNets of 2 down blocks (1 each), the mid block, 2 up blocks (2 each)
    assert set(patched.patches) == set(expected)

    for name, delta in expected.items():
        base = weights[name].float()
        after = comfy.comfy.lora.calculate_weight(patched.patches[name], base.clone(), name)
        torch.testing.assert_close(after - base, delta, atol=1e-5, rtol=1e-4, msg=name)
