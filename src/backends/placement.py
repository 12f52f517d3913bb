"""Where a backend's models are during a run: on the training device or on the host.

A backend's models form three parts: the denoiser, the text encoders and the VAE. `to` sets
the training device and casts every frozen weight to the run's dtype where it lies; `place`
then moves one part onto the device or back to the host and records the move. The record
(`placement()`) says where each model is even when the training device is the host itself
(a CPU run): it is what a run's memory log writes per phase (training/memory_log.py), and
what the memory plan is tested against.

The plan the trainer follows (training/run_setup.py): with cached text embeddings and latents
the encoders reach the device only while entries are missing, with the denoiser off it, and
leave before training starts; the denoiser then never shares the device with T5.
"""

from __future__ import annotations

import torch

PARTS = ("denoiser", "text_encoders", "vae")


def module_dtype(module: torch.nn.Module) -> str:
    """The floating dtype holding most of `module`'s weights, prefixed by its bitsandbytes
    quantization ('nf4', 'int8') when it has one."""
    counts: dict[torch.dtype, int] = {}
    for p in module.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    name = str(max(counts, key=counts.get)).removeprefix("torch.") if counts else "none"
    quantizer = getattr(module, "hf_quantizer", None)
    if quantizer is not None:
        config = quantizer.quantization_config
        kind = getattr(config, "bnb_4bit_quant_type", "nf4") if getattr(config, "load_in_4bit", False) else "int8"
        return f"{kind}+{name}"
    return name


class Placement:
    """Mixed into each backend. `part_modules` names the attributes that make up each part."""

    part_modules: dict[str, tuple[str, ...]]
    device = torch.device("cpu")

    def _on_device(self) -> dict[str, bool]:
        if "_placed" not in self.__dict__:
            # Loaded on the host, except bitsandbytes weights, which load onto the GPU.
            self._placed = {part: part == "denoiser" and self.quantized for part in PARTS}
            if self.quantized:
                self.device = next(self.denoiser.parameters()).device
        return self._placed

    def set_device(self, device: torch.device) -> None:
        """Make `device` the one `place` moves parts onto, nothing moved (inference's plan)."""
        self._on_device()  # the load's own placement, before the device is set
        self.device = torch.device(device)

    def is_placed(self, part: str) -> bool:
        return self._on_device()[part]

    def place(self, part: str, on_device: bool) -> None:
        """Move `part` onto the training device (`on_device`) or to the host, its dtypes kept."""
        placed = self._on_device()
        target = self.device if on_device else torch.device("cpu")
        for name in self.part_modules[part]:
            getattr(self, name).to(target)
        placed[part] = on_device
        if not on_device and self.device.type == "cuda":
            # Hand the freed blocks back: the allocator would otherwise keep them reserved
            # beside what the next part allocates (a 6 GB NF4 transformer under T5's 9.5 GB).
            torch.cuda.empty_cache()

    def placement(self) -> dict[str, dict]:
        """{model: {"part", "on_device", "dtype"}} for every model of the backend."""
        placed = self._on_device()
        return {name: {"part": part, "on_device": placed[part], "dtype": module_dtype(getattr(self, name))}
                for part in PARTS for name in self.part_modules[part]}

    def release_text_encoders(self) -> None:
        self.place("text_encoders", False)

    def release_vae(self) -> None:
        self.place("vae", False)
