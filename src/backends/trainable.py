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
