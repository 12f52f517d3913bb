"""iclora: In-Context LoRA training and panel inpainting for SDXL and FLUX.1."""

__version__ = "0.1.0"
