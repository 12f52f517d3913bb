"""benchmarks/known_answer_comfyui.py at smoke size: the LoRA trained by the real trainer on the
harder toy, loaded by the IC-LoRA Loader node (its iclora_config.json picks FLUX `zero`),
completes the evaluation composites in ComfyUI as iclora's inference does."""

from __future__ import annotations

import sys

import pytest

from comfy_harness import REPO, requires_comfyui

pytestmark = [requires_comfyui, pytest.mark.slow]


def test_comfyui_row_equals_iclora_inference(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from known_answer_comfyui import main

    report = main(["--backend", "flux", "--conditioning", "context", "--context_timestep", "zero", "--steps", "6",
                   "--batch_size", "2", "--mask_probability", "1.0", "--max_masked_panels", "3", "--n_train", "8",
                   "--n_eval", "2", "--inference_steps", "4", "--threads", "1", "--work_dir", str(tmp_path)])
    table = report["table"]
    assert report["max_pixel_difference"] <= 1
    ours, node = table["(b) through iclora's inference"], table["(b) through the ComfyUI node"]
    assert abs(ours["colour_error"] - node["colour_error"]) < 0.5
