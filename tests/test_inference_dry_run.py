"""Inference's --dry_run: the plan and the memory line with no weights loaded and nothing
written; the estimate read from full-size configs, from a hub id in the local cache, and a
missing id refused in one line.

    pytest tests/test_inference_dry_run.py
"""

import re
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from iclora.backends.tiny import TINY_MODELS, save_tiny_model
from iclora.cli import run_cli
from iclora.inference.flux_ic_lora_inference import main as infer_flux
from iclora.inference.sdxl_ic_lora_inference import main as infer_sdxl
from iclora.prepare.memory import model_sizes
from iclora.toy import make_dataset
from iclora.training.train_sdxl_ic_lora import main as train_sdxl

from test_memory_estimate import LINE, full_size_folder

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def no_loading(monkeypatch):
    """Loading any model fails the test: a dry run reads configs only."""
    import iclora.backends

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded a model")

    monkeypatch.setattr(iclora.backends, "load_backend", refuse)


def _args(image: Path, out: Path, *extra: str) -> list[str]:
    return ["--input_image", str(image), "--prompt", "a set", "--panels_to_inpaint", "3",
            "--output_dir", str(out), "--dry_run", *extra]


def test_dry_run_prints_the_plan_and_ends_with_the_memory_line(data_2x2, tmp_path, capsys, no_loading):
    lora = tmp_path / "lora.safetensors"  # a foreign LoRA file: only its header is read
    save_file({"unet.a.lora_A.weight": torch.zeros(4, 32), "unet.a.lora_B.weight": torch.zeros(32, 4)}, lora)
    out = tmp_path / "out"
    report = infer_sdxl(["--lora_path", str(lora), "--base_model", "tiny-sdxl", "--image_size", "64",
                         "--num_images", "3", "--batch_size", "2", *_args(data_2x2 / "00000.png", out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert f"LoRA: {lora} (256 parameters)" in lines
    assert any(line.startswith("input 00000.png 64x64: working size 64x64 (--image_size") for line in lines)
    calls = [line for line in lines if line.startswith("pipeline call ")]
    assert [c.split(":")[1].split(",")[0].strip() for c in calls] == ["2 image(s) at 64x64", "1 image(s) at 64x64"]
    match = LINE.fullmatch(lines[-1])
    assert match and float(match[1]) == round(report.memory.peak, 1) and report.memory.peak < 1
    assert report.memory.peak_phase == match[2] and 1 <= int(match[3]) < 8
    assert not out.exists()


def test_dry_run_of_a_folder_batches_across_inputs(data_2x2, tmp_path, capsys, no_loading):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("00000", "00001"):
        shutil.copy(data_2x2 / f"{name}.png", inputs / f"{name}.png")
    report = infer_sdxl(["--lora_path", "none", "--base_model", "tiny-sdxl", "--input_dir", str(inputs),
                         "--prompt", "a set", "--panels_to_inpaint", "3", "--image_size", "64", "--num_images", "2",
                         "--batch_size", "4", "--output_dir", str(tmp_path / "out"), "--dry_run"])
    out = capsys.readouterr().out
    assert len(report.plans) == 2 and [len(call) for call in report.calls] == [4]
    assert "pipeline call 1 of 1: 4 image(s) at 64x64" in out
    assert LINE.fullmatch(out.strip().splitlines()[-1])
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    return {m: full_size_folder(m, root / m) for m in ("sdxl", "flux")}


def test_full_size_estimates_and_what_makes_them_fit(folders, data_2x2, tmp_path, capsys, no_loading):
    image = data_2x2 / "00000.png"
    sdxl = infer_sdxl(["--lora_path", "none", "--base_model", str(folders["sdxl"]), "--conditioning", "blend",
                       *_args(image, tmp_path / "o"), "--gpu_memory_gib", "16"])
    assert 7 < sdxl.memory.peak < 12  # SDXL 1024² batch 1: fp16 UNet, encoders and the float32 VAE
    assert "does not fit" not in capsys.readouterr().out

    flux = ["--lora_path", "none", "--base_model", str(folders["flux"]), "--conditioning", "context",
            *_args(image, tmp_path / "o"), "--gpu_memory_gib", "16"]
    bf16 = infer_flux(flux)
    # FLUX.1-dev in bf16 (T5-XXL off the GPU by then); on the host T5 and the transformer.
    assert 20 < bf16.memory.peak < 26 and bf16.memory.host > 30
    assert "does not fit --gpu_memory_gib 16: add --quantize nf4 (estimate" in capsys.readouterr().out
    nf4 = infer_flux(flux + ["--quantize", "nf4", "--num_images", "4", "--batch_size", "4", "--gpu_memory_gib", "10"])
    assert nf4.memory.peak > 10 and nf4.memory.peak_phase == "denoising" and nf4.memory.host < bf16.memory.host
    out = capsys.readouterr().out.strip().splitlines()
    hint = next(line for line in out if line.startswith("does not fit --gpu_memory_gib 10: add"))
    # One image a call brings the denoising under T5's 9.4 GiB; the VAE's tiling lowers no peak here.
    assert "--batch_size 1" in hint and "--quantize" not in hint and "--vae_tiling" not in hint
    assert float(re.search(r"estimate (\d+\.\d) GiB", hint)[1]) <= 10
    assert float(LINE.fullmatch(out[-1])[1]) == round(nf4.memory.peak, 1)


def test_the_flux_example_fits_16_gb_at_inference_without_offload(folders, tmp_path, capsys, no_loading):
    """The FLUX example's LoRA (NF4, context, 3x1 storyboards at 1024x1536): the memory plan
    keeps T5-XXL and the NF4 transformer apart, so the peak is the larger of the two."""
    from PIL import Image

    image = tmp_path / "storyboard.png"
    Image.new("RGB", (64, 96), (90, 120, 150)).save(image)  # 3 rows of 64x32 panels, 2:3 as the example's
    flux = ["--lora_path", "none", "--base_model", str(folders["flux"]), "--conditioning", "context",
            "--grid", "3x1", "--image_size", "1536", "--quantize", "nf4", "--gpu_memory_gib", "16",
            "--input_image", str(image), "--prompt", "a storyboard", "--panels_to_inpaint", "1", "2",
            "--output_dir", str(tmp_path / "o"), "--dry_run"]
    report = infer_flux(flux)
    gpu = report.memory.gpu
    out = capsys.readouterr().out
    assert list(gpu) == ["load", "text encoding", "denoising", "VAE decode"] and "1024x1536" in out
    assert 8.5 < gpu["text encoding"] < 10.5  # T5-XXL and CLIP in bf16, alone
    assert 5.5 < gpu["load"] < gpu["denoising"] < 15  # the NF4 transformer, then its sampling
    assert report.memory.peak < 15 and "does not fit" not in out
    assert report.memory.host < 20  # T5, CLIP, the VAE and the NF4 transformer while it waits
    offload = infer_flux([*flux, "--cpu_offload"])
    assert offload.memory.peak <= report.memory.peak  # still an option, never higher


# ---- hub ids whose configs are in the local cache ------------------------------------------


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache of the test's own holding tiny-sdxl as someone/tiny-sdxl, laid out as
    the hub client writes it (refs/main naming the snapshot); HF_HUB_OFFLINE=1 (the suite's)."""
    cache = tmp_path / "hub-cache"
    repo = cache / "models--someone--tiny-sdxl"
    save_tiny_model("tiny-sdxl", repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert constants.HF_HUB_OFFLINE
    return repo / "snapshots" / SNAPSHOT


def test_a_cached_hub_id_gets_the_estimate_of_its_configs(hub_cache, data_2x2, tmp_path, capsys, no_loading):
    unet = TINY_MODELS["tiny-sdxl"]()["unet"]
    sizes = model_sizes("sdxl", "someone/tiny-sdxl", 4, "concat")
    assert sizes.denoiser == sum(p.numel() for p in unet.parameters())  # the cached config's model
    assert sizes == model_sizes("sdxl", str(hub_cache), 4, "concat")

    data = tmp_path / "data"
    make_dataset(data, n=2, panel_size=32)
    train = ["--data_dir", str(data), "--output_dir", str(tmp_path / "o"), "--image_size", "64", "--dry_run"]
    by_id = train_sdxl([*train, "--model_id", "someone/tiny-sdxl"])
    by_folder = train_sdxl([*train, "--model_id", str(hub_cache)])
    out = capsys.readouterr().out.strip().splitlines()
    assert LINE.fullmatch(out[-1]) and by_id.memory == by_folder.memory

    args = _args(data_2x2 / "00000.png", tmp_path / "o", "--image_size", "64")
    by_id = infer_sdxl(["--lora_path", "none", "--base_model", "someone/tiny-sdxl", *args])
    assert LINE.fullmatch(capsys.readouterr().out.strip().splitlines()[-1])
    assert by_id.memory == infer_sdxl(["--lora_path", "none", "--base_model", str(hub_cache), *args]).memory
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--base_model", "--pretrained_vae"])
def test_an_uncached_hub_id_fails_in_one_line(hub_cache, data_2x2, tmp_path, capsys, flag):
    argv = ["--lora_path", "none", "--base_model", "someone/tiny-sdxl", *_args(data_2x2 / "00000.png", tmp_path / "o"),
            flag, "someone/not-downloaded"]
    with pytest.raises(SystemExit) as stop:
        run_cli(infer_sdxl, argv)
    assert stop.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err == [f"error: {flag} someone/not-downloaded: not a local folder and not in the Hugging Face cache "
                   "(HF_HUB_OFFLINE=1 is set); pass a local folder with the model, or unset HF_HUB_OFFLINE where "
                   "the hub is reachable to download it"]
    assert captured.out == "" and not (tmp_path / "o").exists()


def test_training_dry_run_of_an_uncached_hub_id_fails_in_one_line(hub_cache, tmp_path, capsys):
    data = tmp_path / "data"
    make_dataset(data, n=2, panel_size=32)
    with pytest.raises(SystemExit) as stop:
        run_cli(train_sdxl, ["--data_dir", str(data), "--model_id", "someone/not-downloaded", "--image_size", "64",
                             "--dry_run"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --model_id someone/not-downloaded: not a local folder and not "
                                               "in the Hugging Face cache")


def test_flux2_gets_an_estimate_marked_extrapolated(data_2x2, tmp_path, capsys, no_loading):
    from iclora.inference.flux2_ic_lora_inference import main as infer_flux2

    report = infer_flux2(["--lora_path", "none", "--base_model", "tiny-flux2", "--image_size", "64",
                          *_args(data_2x2 / "00000.png", tmp_path / "o")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert report.memory is not None and len(report.calls) == 1
    assert lines[-1] == (f"memory: peak ~{report.memory.peak:.1f} GiB on the GPU ({report.memory.peak_phase}), "
                         f"{report.memory.host:.0f} GiB host RAM (activations extrapolated from FLUX.1)")
    assert not (tmp_path / "o").exists()


def test_a_backend_without_a_memory_profile_gets_the_plan_and_no_estimate(data_2x2, tmp_path, capsys, no_loading,
                                                                          monkeypatch):
    from dataclasses import replace

    from iclora.backends import registry
    from iclora.inference.flux2_ic_lora_inference import main as infer_flux2

    monkeypatch.setitem(registry._SPECS, "flux2", replace(registry.backend_spec("flux2"), memory=None))
    report = infer_flux2(["--lora_path", "none", "--base_model", "tiny-flux2", "--image_size", "64",
                          *_args(data_2x2 / "00000.png", tmp_path / "o")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert report.memory is None and len(report.calls) == 1
    assert lines[-1] == "memory: no estimate: --backend flux2 has no measured activations yet"
    assert not (tmp_path / "o").exists()
