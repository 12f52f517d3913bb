"""Write the LoRA files other programs load for an existing LoRA (an output folder, a
checkpoint or one file), or merge an SDXL concat LoRA into a 9-channel UNet.

    python src/convert.py --lora_path output/lora_model/final_model
    python src/convert.py --lora_path output/lora_model/final_model --export_unet --output_dir merged
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _bootstrap import ensure_package

    sys.path.pop(0)
    ensure_package()

from iclora.cli import parse_config, run_cli


def main(argv=None, prog="convert.py"):
    from iclora.lora_export import ConvertConfig

    cfg = parse_config(ConvertConfig, argv, prog=prog, description=__doc__)
    from iclora.lora_export import convert

    files = convert(cfg)
    for file in files:
        print(file)
    return files


if __name__ == "__main__":
    run_cli(main)
