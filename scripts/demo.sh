#!/usr/bin/env bash
# The product on a CPU in about two minutes, no download: train an IC-LoRA on a small toy
# base model that can already draw (iclora.toy: a fitted tiny SDXL, shipped in
# benchmarks/assets), then complete hidden panels with it.
#
# The toy composites show one object in every panel; the caption never names its colour
# or shape, so only the visible panels tell what the hidden ones must show. The untrained
# base draws the same blobs whatever it is shown; the IC-LoRA takes the object's place,
# shape and colour from the visible panels. It trains in context mode (the visible panels
# enter the UNet clean), the mode that measured best (benchmarks/RESULTS.md).
#
# Writes output/demo/ (removed first, so the demo runs again and again):
#   samples/progress.png     per validation composite: input | mask | step 0 (untrained) | ... | final
#   samples/step_N/          the sample sheets rendered during training
#   train_log.jsonl, loss.png
#   inference/               panels 2 3 of one more composite, by the inference script
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
OUT=output/demo
rm -rf "$OUT"
python -m iclora.toy --base_model "$OUT/base" --out "$OUT/data" --n 96 --seed 0 --panel_size 64
python -m iclora.toy --out "$OUT/validation" --n 4 --one_per_colour --panel_size 64
python src/training/train_sdxl_ic_lora.py --data_dir "$OUT/data" --output_dir "$OUT" \
    --model_id "$OUT/base" --image_size 128 --conditioning context --mask_probability 1.0 \
    --max_train_steps 800 --batch_size 8 --learning_rate 3e-3 --lr_scheduler cosine --lr_warmup_steps 20 \
    --lora_rank 32 --lora_alpha 32 --lora_dropout 0 --cache_text_embeddings --save_every 400 --seed 0 \
    --validation_image "$OUT"/validation/0000{0,1,2,3}.png --validation_panels 2 3 --validation_every 400 \
    --validation_guidance_scale 1
python src/inference/sdxl_ic_lora_inference.py --lora_path "$OUT/final_model" \
    --input_image data/sample/00003.png --prompt "$(cat data/sample/00003.txt)" \
    --panels_to_inpaint 2 3 --num_inference_steps 20 --guidance_scale 1 --seed 0 --save_comparison \
    --output_dir "$OUT/inference"
echo "untrained base vs IC-LoRA during training: $OUT/samples/progress.png"
echo "inference comparison: $OUT/inference/00003_comparison.png"
