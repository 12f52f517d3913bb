"""The SDXL LoRA's files and the trained 9-channel conv_in.

With `concat` conditioning the UNet sees noisy latent (4) + mask (1) + masked-image latent
(4) = 9 channels, the layout of the SDXL inpainting checkpoint. A 4-channel base gets its
`conv_in` widened with the 5 new input channels set to zero, so step 0 reproduces the base
model, and `conv_in` is trained fully beside the LoRA. It travels beside the LoRA in its own
file (CONV_IN_WEIGHT_NAME), and in the kohya/ComfyUI file as a difference against the
inpainting base's own conv_in.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from .lora_files import (
    COMFYUI_WEIGHT_NAME,
    CONV_IN_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    atomic_save_file,
    cast_lora,
    check_applied,
    check_conditioning,
    lora_layers,
    refuse_unreadable,
    resolve_lora_file,
)
from .lora_formats import CONV_IN_DIFF_KEYS, peft_modules, read_lora_file, sdxl_kohya_state
from .sdxl_spec import SPEC

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def lora_targets(convs: bool) -> list[str]:
    """The LoRA's PEFT target_modules: attention and feed-forward layers, with `convs` also the
    ResNet convs (--lora_convs; the spec's lora_conv_targets)."""
    return LORA_TARGET_MODULES + (list(SPEC.lora_conv_targets) if convs else [])
CONCAT_CHANNELS = 9  # 4 noisy latent + 1 mask + 4 masked-image latent


def widen_conv_in(unet: UNet2DConditionModel, in_channels: int) -> None:
    """Give `conv_in` extra input channels initialised to zero (base behaviour kept)."""
    old = unet.conv_in
    if old.in_channels == in_channels:
        return
    new = torch.nn.Conv2d(
        in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
        device=old.weight.device, dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)


class SDXLLoraFiles:
    """Mixed into SDXLBackend: saving and loading its LoRA and conv_in. Reads the backend's
    `unet`, `conditioning`, `base_model`, `base_in_channels`, `_base_conv_in` (the 9-channel
    base's own conv_in, or None) and `_prompt_pipe` (the pipeline whose LoRA loader it uses)."""

    def save_lora(self, directory: Path, compat: bool = True, dtype: torch.dtype = torch.float16) -> None:
        directory = Path(directory)
        lora = cast_lora(get_peft_model_state_dict(self.unet), dtype)
        # The alpha must travel with the weights (else loaders assume alpha = rank); dropout
        # must not: load_lora_weights leaves the new dropout layers in train mode, so a
        # nonzero value would make inference random.
        adapter_metadata = {**self.unet.peft_config["default"].to_dict(), "lora_dropout": 0.0}
        StableDiffusionXLInpaintPipeline.save_lora_weights(
            directory,
            unet_lora_layers=lora,
            unet_lora_adapter_metadata=adapter_metadata,
            weight_name=LORA_WEIGHT_NAME,
        )
        if compat:
            atomic_save_file(cast_lora(self.comfyui_state(), dtype), directory / COMFYUI_WEIGHT_NAME)
        if self.conditioning == "concat":
            conv = self.unet.conv_in
            atomic_save_file(
                {"conv_in.weight": conv.weight.detach().contiguous(), "conv_in.bias": conv.bias.detach().contiguous()},
                directory / CONV_IN_WEIGHT_NAME,
                metadata={"in_channels": str(conv.in_channels)},
            )

    def comfyui_state(self) -> dict[str, torch.Tensor]:
        """The trained LoRA in kohya keys with the real alpha, for ComfyUI, A1111/Forge and
        kohya (ComfyUI drops diffusers-format SDXL attention keys: "lora key not loaded", no
        error); on the 9-channel inpainting base also the trained conv_in as a same-shape
        difference, which ComfyUI applies to its inpainting model."""
        lora = {f"unet.{k}": v for k, v in get_peft_model_state_dict(self.unet).items()}
        config = self.unet.peft_config["default"]
        conv_diff = None
        if self.conditioning == "concat" and self._base_conv_in is not None:
            conv, (base_weight, base_bias) = self.unet.conv_in, self._base_conv_in
            conv_diff = (conv.weight.detach().float() - base_weight.to(conv.weight.device),
                         conv.bias.detach().float() - base_bias.to(conv.bias.device))
        scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        return sdxl_kohya_state(peft_modules(lora, "unet"), scale, _layers_per_block(self.unet), conv_diff)

    def load_lora(self, path: Path) -> None:
        """Ours (a final_model/ or checkpoint folder, or one of its files) or a foreign SDXL
        LoRA (kohya, diffusers); refuses one that would not be applied in full."""
        lora_file = resolve_lora_file(path)
        meta = check_conditioning(path, self.conditioning)
        state, _ = read_lora_file(lora_file)
        conv_diff = [state.pop(k, None) for k in CONV_IN_DIFF_KEYS]
        conv_file = lora_file.parent / CONV_IN_WEIGHT_NAME
        has_conv = conv_file.is_file() or conv_diff[0] is not None
        if has_conv and self.conditioning != "concat":
            raise ValueError(
                f"--lora_path {path}: holds a trained conv_in (a concat LoRA); it does not work with "
                f"--conditioning {self.conditioning}"
            )
        pipe = self._prompt_pipe
        with refuse_unreadable(path, "SDXL UNet"):
            converted, _ = pipe.lora_state_dict(dict(state), unet_config=self.unet.config)
        if not (expected := _unet_modules(converted)):
            check_applied(path, expected, set(), "SDXL UNet")
        before = set(lora_layers(self.unet))
        with refuse_unreadable(path, "SDXL UNet"):
            if conv_diff[0] is None:  # the file itself, so diffusers reads its adapter metadata (alpha)
                pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
            else:  # kohya keys carry their alpha
                pipe.load_lora_weights(state)
        injected = set().union(*[m for a, m in lora_layers(self.unet).items() if a not in before])
        check_applied(path, expected, injected, "SDXL UNet")
        if self.conditioning != "concat":
            return
        if conv_file.is_file():
            conv = load_file(conv_file)
            with torch.no_grad():
                self.unet.conv_in.weight.copy_(conv["conv_in.weight"])
                self.unet.conv_in.bias.copy_(conv["conv_in.bias"])
        elif conv_diff[0] is not None:
            if self._base_conv_in is None:
                raise ValueError(
                    f"--lora_path {path}: its conv_in is a difference against a 9-channel inpainting UNet; "
                    f"{self.base_model} has {self.base_in_channels} input channels"
                )
            with torch.no_grad():
                self.unet.conv_in.weight.add_(conv_diff[0].to(self.unet.conv_in.weight))
                self.unet.conv_in.bias.add_(conv_diff[1].to(self.unet.conv_in.bias))
        elif meta.get("conditioning") not in (None, "concat") and self.base_in_channels != CONCAT_CHANNELS:
            raise ValueError(
                f"--lora_path {path}: trained with --conditioning {meta['conditioning']}; on a 4-channel base "
                "--conditioning concat needs a trained conv_in"
            )
        elif meta.get("conditioning") == "concat" or self.base_in_channels != CONCAT_CHANNELS:
            raise FileNotFoundError(
                f"--lora_path {path}: no {CONV_IN_WEIGHT_NAME} beside {lora_file.name}; a concat LoRA "
                "needs its trained conv_in"
            )


def _layers_per_block(unet: UNet2DConditionModel) -> int:
    layers = unet.config.layers_per_block
    if isinstance(layers, int):
        return layers
    if len(set(layers)) != 1:
        raise ValueError(f"UNet with per-block layer counts {layers}: no kohya layout")
    return layers[0]


def _unet_modules(state: dict[str, torch.Tensor]) -> set[str]:
    """Names of the UNet modules a diffusers-converted LoRA state dict patches (PEFT keys, or
    the older `attn1.processor.to_q_lora.down` spelling)."""
    modules = set()
    for key in state:
        if not key.startswith("unet."):
            continue
        key = key.removeprefix("unet.").replace(".processor.", ".").replace("to_out_lora", "to_out.0_lora")
        for down in (".lora_A.weight", ".lora.down.weight", "_lora.down.weight"):
            if key.endswith(down):
                modules.add(key[: -len(down)])
    return modules
