"""The files a run writes: LoRA weights at --save_precision while a checkpoint's trainable
state stays float32 (resume stays exact), and the permissions the user's umask gives any
new file, whatever library wrote it.

    pytest tests/test_output_files.py
"""

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_training
from iclora.backends.lora_files import COMFYUI_WEIGHT_NAME, CONV_IN_WEIGHT_NAME, LORA_WEIGHT_NAME
from iclora.convert import main as convert_main
from iclora.inference import sdxl_ic_lora_inference

STEPS = ["--max_train_steps", "2", "--save_every", "1", "--learning_rate", "1e-2"]


def _factors(file: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(file).items() if ".lora_" in k and not k.endswith(".alpha")}


def _dtypes(folder: Path) -> dict[str, set]:
    return {name: {v.dtype for v in _factors(folder / name).values()} for name in (LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME)}


@pytest.fixture(scope="module")
def fp16_run(data_2x2, tmp_path_factory):
    return run_training(data_2x2, tmp_path_factory.mktemp("fp16"), *STEPS)  # the default


@pytest.fixture(scope="module")
def fp32_run(data_2x2, tmp_path_factory):
    return run_training(data_2x2, tmp_path_factory.mktemp("fp32"), *STEPS, "--save_precision", "fp32")


def test_lora_files_are_fp16_by_default_and_the_trainable_state_float32(fp16_run, fp32_run):
    assert fp16_run.losses == fp32_run.losses  # the precision of the files changes nothing in training
    out16, out32 = fp16_run.final_dir.parent, fp32_run.final_dir.parent
    for folder in ("final_model", "checkpoints/checkpoint-1", "checkpoints/checkpoint-2"):
        assert _dtypes(out16 / folder) == {LORA_WEIGHT_NAME: {torch.float16}, COMFYUI_WEIGHT_NAME: {torch.float16}}
        assert _dtypes(out32 / folder) == {LORA_WEIGHT_NAME: {torch.float32}, COMFYUI_WEIGHT_NAME: {torch.float32}}
        for name in (LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME):  # the same weights, rounded once
            half, full = _factors(out16 / folder / name), _factors(out32 / folder / name)
            assert half.keys() == full.keys() and all(torch.equal(half[k], full[k].half()) for k in half)
        # kohya / ComfyUI alphas and the fully trained conv_in stay float32
        alphas = [v for k, v in load_file(out16 / folder / COMFYUI_WEIGHT_NAME).items() if k.endswith(".alpha")]
        assert alphas and {a.dtype for a in alphas} == {torch.float32}
        assert {v.dtype for v in load_file(out16 / folder / CONV_IN_WEIGHT_NAME).values()} == {torch.float32}
    for step in (1, 2):  # what a resume reads
        trainable = load_file(out16 / "checkpoints" / f"checkpoint-{step}" / "trainable.safetensors")
        assert {v.dtype for v in trainable.values()} == {torch.float32}
    size16 = (fp16_run.final_dir / LORA_WEIGHT_NAME).stat().st_size
    assert size16 < 0.6 * (fp32_run.final_dir / LORA_WEIGHT_NAME).stat().st_size


def test_an_fp16_lora_runs_as_its_fp32_twin(fp16_run, fp32_run):
    from iclora.backends.sdxl import SDXLBackend

    outputs = []
    for run in (fp16_run, fp32_run):
        backend = SDXLBackend.from_pretrained("tiny-sdxl", conditioning="concat")
        backend.load_lora(run.final_dir)  # diffusers' load_lora_weights, then the trained conv_in
        cfg, g = backend.unet.config, torch.Generator().manual_seed(0)
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        with torch.no_grad():
            outputs.append(backend.unet(
                torch.randn(1, cfg.in_channels, 8, 8, generator=g), torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 5, cfg.cross_attention_dim, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(1, pooled, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}, return_dict=False)[0])
    torch.testing.assert_close(outputs[0], outputs[1], atol=2e-3, rtol=2e-3)


def test_a_resume_may_change_the_save_precision_and_stays_exact(data_2x2, fp16_run, fp32_run, tmp_path):
    checkpoint = fp16_run.final_dir.parent / "checkpoints" / "checkpoint-1"
    resumed = run_training(data_2x2, tmp_path, *STEPS, "--save_precision", "fp32", "--resume_from_checkpoint",
                           str(checkpoint))
    assert resumed.losses == fp32_run.losses[1:]
    first, second = _factors(resumed.final_dir / LORA_WEIGHT_NAME), _factors(fp32_run.final_dir / LORA_WEIGHT_NAME)
    assert all(torch.equal(first[k], second[k]) for k in second)


@pytest.mark.parametrize("flags, dtype", [(["--save_precision", "bf16"], torch.bfloat16),
                                          (["--mixed_precision", "bf16"], torch.bfloat16)])
def test_bf16_files(flags, dtype, data_2x2, tmp_path):
    result = run_training(data_2x2, tmp_path, "--max_train_steps", "1", "--conditioning", "blend", *flags)
    assert _dtypes(result.final_dir) == {LORA_WEIGHT_NAME: {dtype}, COMFYUI_WEIGHT_NAME: {dtype}}


def test_convert_keeps_the_loras_precision_unless_told(fp16_run, tmp_path):
    convert_main(["--lora_path", str(fp16_run.final_dir), "--output_dir", str(tmp_path / "same")])
    assert {v.dtype for v in _factors(tmp_path / "same" / COMFYUI_WEIGHT_NAME).values()} == {torch.float16}
    convert_main(["--lora_path", str(fp16_run.final_dir), "--output_dir", str(tmp_path / "full"),
                  "--save_precision", "fp32"])
    assert {v.dtype for v in _factors(tmp_path / "full" / COMFYUI_WEIGHT_NAME).values()} == {torch.float32}


# ---- permissions ---------------------------------------------------------------------------------


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


def test_every_output_gets_the_mode_the_umask_gives(data_2x2, tmp_path, umask_027):
    """umask 027: files 0640, folders 0750; not safetensors' 0600 nor a fixed 0644."""
    from iclora.toy import make_base_model

    out = tmp_path / "run"
    result = run_training(data_2x2, out, *STEPS, "--cache_text_embeddings", "--cache_latents",
                          "--validation_every", "1", "--validation_inference_steps", "1")
    sdxl_ic_lora_inference.main(["--lora_path", str(result.final_dir), "--input_image", str(data_2x2 / "00001.png"),
                                 "--prompt", "p", "--num_inference_steps", "1", "--save_comparison",
                                 "--output_dir", str(tmp_path / "inference")])
    convert_main(["--lora_path", str(result.final_dir), "--output_dir", str(tmp_path / "converted"),
                  "--export_unet", "--unet_dtype", "float32"])
    make_base_model(tmp_path / "toy_base")
    modes = _modes(tmp_path)
    names = set(modes)
    for expected in ("run/final_model/" + LORA_WEIGHT_NAME, "run/final_model/" + COMFYUI_WEIGHT_NAME,
                     "run/final_model/" + CONV_IN_WEIGHT_NAME, "run/final_model/iclora_config.json",
                     "run/checkpoints/checkpoint-1/" + LORA_WEIGHT_NAME, "run/checkpoints/checkpoint-1/trainable.safetensors",
                     "run/train_log.jsonl", "run/samples/progress.png", "inference/00001_0.png",
                     "converted/" + COMFYUI_WEIGHT_NAME, "converted/unet/diffusion_pytorch_model.safetensors",
                     "toy_base/unet/diffusion_pytorch_model.safetensors"):
        assert expected in names, expected
    assert any(name.startswith("run/cache/") and name.endswith(".safetensors") for name in names)
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o750 if (tmp_path / name).is_dir() else 0o640)}
    assert wrong == {}
