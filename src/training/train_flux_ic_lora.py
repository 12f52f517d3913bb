"""Train a FLUX.1 In-Context LoRA on composites with randomly masked panels.

    python src/training/train_flux_ic_lora.py --data_dir data/sample --output_dir ./output/flux_lora \
        --max_train_steps 5000 --batch_size 4 --learning_rate 1e-4 --lora_rank 16 \
        --mixed_precision bf16 --gradient_checkpointing --cache_text_embeddings

FLUX.1-dev trains with --conditioning context (the default here: visible panels enter the
transformer clean, modulated as timestep 0; measured best on the known-answer benchmark,
benchmarks/RESULTS.md) or blend (LoRAs for stock latent-blend inpainting); a FLUX.1-Fill base
(black-forest-labs/FLUX.1-Fill-dev) with --conditioning concat. --quantize nf4 loads the
frozen transformer in 4 bits (QLoRA, CUDA only).
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

# The backend's own defaults (model, rank, steps, guidance ...): backends/flux_spec.py.
DEFAULTS = backend_spec("flux").train_defaults


def main(argv=None, prog="train_flux_ic_lora.py"):
    return train_entry(argv, prog, __doc__, DEFAULTS)


if __name__ == "__main__":
    run_cli(main)
