"""Checkpointing the trainable part of a denoiser (LoRA, plus conv_in for SDXL concat)."""

from __future__ import annotations

import torch


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every tensor the optimizer updates, by parameter name."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `trainable_state`; refuses a state that lacks any trainable tensor."""
    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
    unknown = [n for n in state if n not in params]
    if unknown:
        raise ValueError(f"checkpoint has {len(unknown)} tensors this model lacks, e.g. {unknown[0]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


class TransformerWeights:
    """The weight methods of a backend whose trainable part is its `transformer`'s LoRA,
    written and read by its `lora_module` (save_lora / comfyui_state / load_lora)."""

    lora_module = None  # the backend's LoRA file module (flux_lora, flux2_lora)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.transformer)

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(self.transformer, state)

    def save_lora(self, directory, compat: bool = True, dtype: torch.dtype = torch.float16) -> None:
        self.lora_module.save_lora(self.transformer, directory, compat, dtype)

    def comfyui_state(self) -> dict[str, torch.Tensor]:
        return self.lora_module.comfyui_state(self.transformer)

    def load_lora(self, path) -> None:
        self.lora_module.load_lora(self._pipe, self.transformer, path, self.conditioning)
