"""Train an SDXL In-Context LoRA on composites with randomly masked panels.

    python src/training/train_sdxl_ic_lora.py --data_dir data/sample --output_dir ./output/lora_model \
        --num_epochs 50 --batch_size 4 --learning_rate 1e-4 --lora_rank 64
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

# The backend's own defaults (model, rank, steps, guidance ...): backends/sdxl_spec.py.
DEFAULTS = backend_spec("sdxl").train_defaults


def main(argv=None, prog="train_sdxl_ic_lora.py"):
    return train_entry(argv, prog, __doc__, DEFAULTS)


if __name__ == "__main__":
    run_cli(main)
