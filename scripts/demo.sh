#!/usr/bin/env bash
# Install, train the built-in tiny SDXL a few steps on data/sample, then inpaint panels
# 2 and 3 of a composite and write a comparison image. Runs on a CPU in about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
python src/training/train_sdxl_ic_lora.py --data_dir data/sample --output_dir output/demo \
    --model_id tiny-sdxl --image_size 128 --batch_size 4 --max_train_steps 20 --save_every 10 \
    --lora_rank 8 --lora_alpha 8 --learning_rate 1e-3
python src/inference/sdxl_ic_lora_inference.py --lora_path output/demo/final_model \
    --input_image data/sample/00003.png --prompt "$(cat data/sample/00003.txt)" \
    --panels_to_inpaint 2 3 --num_inference_steps 20 --seed 42 --save_comparison \
    --output_dir output/demo/inference
echo "comparison image: output/demo/inference/00003_comparison.png"
