"""iclora's FLUX.2 LoRA file in ComfyUI's own LoRA loader (comfy.sd.load_lora_for_models, as
the LoraLoader node calls it) on a tiny random FLUX.2 that ComfyUI's model detection takes
for FLUX.2: every key is loaded, and each of ComfyUI's weights changes by exactly the
update the LoRA was trained with (alpha / rank included)."""

from __future__ import annotations

import logging

import torch
from safetensors.torch import load_file

from comfy_harness import comfy, requires_comfyui  # noqa: F401 (comfy: a fixture)

pytestmark = requires_comfyui

DEPTH, DEPTH_SINGLE, HIDDEN, CONTEXT = 2, 2, 128, 32  # ComfyUI's FLUX.2: heads of 128 channels
RANK, ALPHA = 4, 2


def comfy_flux2(comfy):
    """A tiny FLUX.2 in ComfyUI's own layout (its Flux class with the settings its model
    detection gives FLUX.2), random weights, loaded through the stock diffusion-model loader."""
    from comfy.ldm.flux.model import Flux

    torch.manual_seed(0)
    model = Flux(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=CONTEXT,
                 hidden_size=HIDDEN, mlp_ratio=3.0, num_heads=1, depth=DEPTH, depth_single_blocks=DEPTH_SINGLE,
                 axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False, guidance_embed=False,
                 txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True, ops_bias=False,
                 default_ref_method="index", ref_index_scale=10.0, operations=comfy.comfy.ops.disable_weight_init)
    state = {k: torch.randn(v.shape) * 0.1 for k, v in model.state_dict().items()}
    patcher = comfy.comfy.sd.load_diffusion_model_state_dict(state)
    assert type(patcher.model).__name__ == "Flux2"
    return patcher


def trained_lora(folder):
    """A diffusers FLUX.2 transformer of the same shapes with a random LoRA, saved by iclora."""
    from diffusers import Flux2Transformer2DModel
    from peft import LoraConfig

    from iclora.backends.flux2_lora import LORA_TARGET_MODULES, save_lora

    torch.manual_seed(1)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=DEPTH, num_single_layers=DEPTH_SINGLE, attention_head_dim=128,
        num_attention_heads=1, joint_attention_dim=CONTEXT, axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False)
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGET_MODULES))
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_((torch.randn(param.shape) * 0.3).half().float())  # as written (float16)
    save_lora(transformer, folder)
    return transformer


def test_comfyui_loads_the_flux2_lora_at_its_trained_scale(comfy, tmp_path, caplog):
    from iclora.backends.lora_files import COMFYUI_WEIGHT_NAME, lora_layers

    patcher = comfy_flux2(comfy)
    transformer = trained_lora(tmp_path)
    lora = load_file(tmp_path / COMFYUI_WEIGHT_NAME)
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    assert "lora key not loaded" not in caplog.text

    # What the LoRA was trained to add, placed by ComfyUI's own diffusers -> FLUX map.
    unet_config = patcher.model.model_config.unet_config
    to_comfy = comfy.comfy.utils.flux_to_diffusers(unet_config, output_prefix="diffusion_model.")
    weights = patcher.model.state_dict()
    expected: dict[str, torch.Tensor] = {}
    for module in lora_layers(transformer)["default"]:
        layer = transformer.get_submodule(module)
        delta = layer.get_delta_weight("default")
        assert layer.scaling["default"] == ALPHA / RANK
        target = to_comfy[f"{module}.weight"]
        name, where = (target[0], target[1]) if isinstance(target, tuple) else (target, None)
        total = expected.setdefault(name, torch.zeros_like(weights[name], dtype=torch.float32))
        (total if where is None else total.narrow(*where)).add_(delta)
    assert set(patched.patches) == set(expected) and len(expected) == DEPTH * 8 + DEPTH_SINGLE * 2

    for name, delta in expected.items():
        base = weights[name].float()
        after = comfy.comfy.lora.calculate_weight(patched.patches[name], base.clone(), name)
        torch.testing.assert_close(after - base, delta, atol=1e-5, rtol=1e-4, msg=name)
