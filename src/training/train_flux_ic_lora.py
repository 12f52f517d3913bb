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

# The official IC-LoRA recipe (ali-vilab/In-Context-LoRA): FLUX.1-dev, rank 16, alpha 16.
DEFAULTS = {
    "backend": "flux",
    "model_id": "black-forest-labs/FLUX.1-dev",
    "lora_rank": 16,
    "lora_alpha": 16,
    "conditioning": "context",
    # Every sample completes 1-3 panels from the others: on the harder known-answer toy this
    # completes 13.5 colour error against 19.1 at the trainer's 0.7 / 2 (whole composites:
    # 20.2), and its text -> set samples agree with themselves as well (benchmarks/RESULTS.md).
    "mask_probability": 1.0,
    "max_masked_panels": 3,
}


def main(argv=None, prog="train_flux_ic_lora.py"):
    return train_entry(argv, prog, __doc__, DEFAULTS)


if __name__ == "__main__":
    run_cli(main)
