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
#   heldout/                 a composite the run never saw, neither in training nor in the sheets
#   inference/               its right-hand panels (1 3; the sheets hide the bottom ones, 2 3) completed
#                            by the inference script: heldout_comparison.png
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# One thread: the toy model's ops are too small to share out, and float sums in one order
# make the same picture, byte for byte, on every machine.
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
python -m iclora.toy --out "$OUT/heldout" --n 1 --seed 1000 --panel_size 64
mv "$OUT/heldout/00000.png" "$OUT/heldout/heldout.png" && mv "$OUT/heldout/00000.txt" "$OUT/heldout/heldout.txt"
python src/inference/sdxl_ic_lora_inference.py --lora_path "$OUT/final_model" \
    --input_image "$OUT/heldout/heldout.png" --prompt "$(cat "$OUT/heldout/heldout.txt")" \
    --panels_to_inpaint 1 3 --num_inference_steps 20 --guidance_scale 1 --seed 0 --num_images 2 --save_comparison \
    --output_dir "$OUT/inference"
echo "untrained base vs IC-LoRA during training: $OUT/samples/progress.png (docs/demo.png)"
echo "a held-out composite, its right-hand panels completed: $OUT/inference/heldout_comparison.png (docs/demo_heldout.png)"
