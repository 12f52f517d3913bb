"""Train a FLUX.2 [klein] In-Context LoRA on composites with randomly masked panels.

    python src/training/train_flux2_ic_lora.py --data_dir data/sample --output_dir ./output/flux2_lora \
        --max_train_steps 5000 --batch_size 4 --learning_rate 1e-4 --lora_rank 16 \
        --mixed_precision bf16 --gradient_checkpointing --cache_text_embeddings

The base models train: black-forest-labs/FLUX.2-klein-base-4B (the default, Apache-2.0) in
bf16, black-forest-labs/FLUX.2-klein-base-9B (non-commercial licence) with --quantize int8 or
nf4 (CUDA only). --conditioning context (the default: visible panels enter the transformer
clean, modulated as timestep 0 per token, masked ones noisy), blend (LoRAs for latent-blend
inpainting) or reference (the masked image as reference tokens, the editing layout); there is
no FLUX.2 Fill model, so no concat. --max_token_length counts Qwen3
tokens with the chat template (default 512, the pipeline's).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _bootstrap import ensure_package

    sys.path.pop(0)
    ensure_package()

from iclora.cli import train_entry, run_cli
from iclora.backends.registry import backend_spec

# The backend's own defaults (model, rank, conditioning ...): backends/flux2_spec.py.
DEFAULTS = backend_spec("flux2").train_defaults


def main(argv=None, prog="train_flux2_ic_lora.py"):
    return train_entry(argv, prog, __doc__, DEFAULTS)


if __name__ == "__main__":
    run_cli(main)
