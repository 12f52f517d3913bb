"""The VAE at inference, through the SDXL CLI (tiny models): --vae_tiling and --pretrained_vae.

The tiny VAE does not reconstruct and, random, has no locality: its tiled decode differs
from the untiled one far more than a real VAE's. So the tiled images are checked against
diffusers' own tiled decode of the untiled run's latents (what the tiling itself changes,
and nothing else), and the tiles are made small (32 px) so that tiling really happens.

    pytest tests/test_inference_vae.py
"""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from iclora.backends.tiny import save_tiny_model
from iclora.cli import run_cli
from iclora.inference import inpaint
from iclora.inference import vae as vae_module
from iclora.inference.flux_ic_lora_inference import main as flux_main
from iclora.inference.sdxl_ic_lora_inference import main as infer_main
from iclora.inference.vae import memory_settings
from iclora.training.train_sdxl_ic_lora import main as train_main

ROOT = Path(__file__).resolve().parents[1]
INPUT = ROOT / "data" / "sample" / "00001.png"  # 128x128
TILE = 32  # pixels; the tiny VAE's own tile is its sample_size, 128, the whole image
# The bare tiny base at the input's size: 128 px, 2 steps, no guidance.
BARE = ["--lora_path", "none", "--base_model", "tiny-sdxl", "--native_size", "--prompt", "a set",
        "--num_inference_steps", "2", "--guidance_scale", "1", "--seed", "5"]


def record(out: Path, stem: str) -> dict:
    return json.loads((out / f"{stem}_inference.json").read_text())


@pytest.fixture
def vae_spy(monkeypatch):
    """Small tiles on every loaded VAE; every decode's (vae, latents in, float images out),
    and how often the tiled paths and the per-image `_decode` ran."""
    seen = {"decode": [], "tiled_decode": 0, "tiled_encode": 0, "_decode_batches": []}
    real_load = inpaint.load_pipeline

    def load(plan):
        backend, pipe = real_load(plan)
        pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = TILE, TILE // 8
        return backend, pipe

    decode, _decode = AutoencoderKL.decode, AutoencoderKL._decode
    tiled_decode, tiled_encode = AutoencoderKL.tiled_decode, AutoencoderKL._tiled_encode

    def spy_decode(self, z, *a, **k):
        out = decode(self, z, *a, **k)
        sample = out[0] if isinstance(out, tuple) else out.sample
        seen["decode"].append((self, z.detach().clone(), sample.detach().clone()))
        return out

    def spy__decode(self, z, *a, **k):
        seen["_decode_batches"].append(z.shape[0])
        return _decode(self, z, *a, **k)

    def count(name, real):
        def wrapper(*a, **k):
            seen[name] += 1
            return real(*a, **k)
        return wrapper

    monkeypatch.setattr(inpaint, "load_pipeline", load)
    monkeypatch.setattr(AutoencoderKL, "decode", spy_decode)
    monkeypatch.setattr(AutoencoderKL, "_decode", spy__decode)
    monkeypatch.setattr(AutoencoderKL, "tiled_decode", count("tiled_decode", tiled_decode))
    monkeypatch.setattr(AutoencoderKL, "_tiled_encode", count("tiled_encode", tiled_encode))
    return seen


def test_auto_rule_by_pixels_and_batch():
    assert memory_settings("auto", 1024, 1024, 1) == {"tiling": False, "slicing": False}
    assert memory_settings("auto", 1024, 1024, 4) == {"tiling": False, "slicing": True}  # 4 images at once
    assert memory_settings("auto", 512, 512, 4) == {"tiling": False, "slicing": False}  # one 1024² worth
    assert memory_settings("auto", 1024, 2048, 1) == {"tiling": False, "slicing": False}  # 2 x 1024², not more
    assert memory_settings("auto", 1536, 1536, 1) == {"tiling": True, "slicing": False}
    assert memory_settings("on", 64, 64, 1) == {"tiling": True, "slicing": True}
    assert memory_settings("off", 4096, 4096, 8) == {"tiling": False, "slicing": False}


@pytest.mark.parametrize("backend", ["sdxl", "flux"])
def test_tiled_images_differ_from_untiled_ones_only_by_the_tiling(backend, tmp_path, vae_spy):
    """Text -> set: the input's latents are blended in nowhere (every panel masked), so the
    denoised latents are the same with and without tiling, and the tiled image is diffusers'
    tiled decode of them."""
    main = flux_main if backend == "flux" else infer_main
    common = [*BARE, "--panels_to_inpaint", "all", "--width", "128", "--height", "128",
              "--base_model", f"tiny-{backend}"]
    main([*common, "--vae_tiling", "off", "--output_dir", str(tmp_path / "off")])
    assert vae_spy["tiled_decode"] == 0
    main([*common, "--vae_tiling", "on", "--output_dir", str(tmp_path / "on")])
    assert vae_spy["tiled_decode"] == 1
    (vae, z_off, off), (_, z_on, on) = vae_spy["decode"]
    assert torch.equal(z_on, z_off)
    assert (on - off).abs().max() > 0.01, "tiling changed nothing: it did not happen"
    with torch.no_grad():
        vae.disable_tiling()
        torch.testing.assert_close(off, vae.decode(z_off).sample, rtol=0, atol=1e-5)
        torch.testing.assert_close(on, vae.tiled_decode(z_off).sample, rtol=0, atol=1e-5)
    assert record(tmp_path / "on", "generated")["resolved"]["vae"] == {"mode": "on", "tiling": True, "slicing": True}
    assert record(tmp_path / "off", "generated")["resolved"]["vae"] == {"mode": "off", "tiling": False,
                                                                         "slicing": False}


def test_auto_switches_tiling_and_slicing_on_by_size_and_batch(tmp_path, vae_spy, monkeypatch):
    common = [*BARE, "--input_image", str(INPUT), "--num_images", "2", "--batch_size", "2"]
    infer_main([*common, "--output_dir", str(tmp_path / "default")])  # 2 x 128² is far below both thresholds
    assert (vae_spy["tiled_encode"], vae_spy["tiled_decode"], vae_spy["_decode_batches"]) == (0, 0, [2])
    assert record(tmp_path / "default", "00001")["resolved"]["vae"] == {"mode": "auto", "tiling": False,
                                                                         "slicing": False}
    monkeypatch.setattr(vae_module, "AUTO_SLICE_PIXELS", 128 * 128)  # a batch of 2 at 128² now exceeds it
    vae_spy["_decode_batches"].clear()
    infer_main([*common, "--output_dir", str(tmp_path / "sliced")])
    assert (vae_spy["tiled_decode"], vae_spy["_decode_batches"]) == (0, [1, 1])  # one image at a time
    (_, z_plain, plain), (_, z_sliced, sliced) = vae_spy["decode"]
    torch.testing.assert_close(z_sliced, z_plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(sliced, plain, rtol=0, atol=1e-5)  # slicing changes nothing but memory
    assert record(tmp_path / "sliced", "00001")["resolved"]["vae"]["slicing"] is True
    monkeypatch.setattr(vae_module, "AUTO_TILE_PIXELS", 100 * 100)  # a 128² image now exceeds it
    infer_main([*common, "--output_dir", str(tmp_path / "tiled")])
    assert vae_spy["tiled_encode"] > 0 and vae_spy["tiled_decode"] > 0  # the input's encoding too
    assert record(tmp_path / "tiled", "00001")["resolved"]["vae"] == {"mode": "auto", "tiling": True,
                                                                       "slicing": True}


@pytest.fixture(scope="module")
def vae_lora(tmp_path_factory) -> tuple[Path, Path]:
    """A LoRA trained with --pretrained_vae (the tiny VAE with other weights), and that VAE."""
    base = tmp_path_factory.mktemp("other_base")
    save_tiny_model("tiny-sdxl", base, seed=1)
    result = train_main([
        "--data_dir", str(ROOT / "data" / "sample"), "--output_dir", str(tmp_path_factory.mktemp("vae_lora")),
        "--model_id", "tiny-sdxl", "--pretrained_vae", str(base / "vae"), "--image_size", "128",
        "--max_train_steps", "1", "--batch_size", "1", "--lora_rank", "4",
    ])
    return Path(result.final_dir), base / "vae"


def test_pretrained_vae_comes_from_the_lora_record(vae_lora, tmp_path, monkeypatch):
    lora, vae_folder = vae_lora
    loaded = []
    real_load = inpaint.load_pipeline

    def load(plan):
        backend, pipe = real_load(plan)
        loaded.append(pipe.vae)
        return backend, pipe

    monkeypatch.setattr(inpaint, "load_pipeline", load)
    common = [*BARE[5:], "--lora_path", str(lora), "--input_image", str(INPUT)]
    infer_main([*common, "--output_dir", str(tmp_path / "recorded")])
    infer_main([*common, "--pretrained_vae", "none", "--output_dir", str(tmp_path / "base")])
    saved = next(iter((vae_folder).glob("*.safetensors")))
    weight = "decoder.conv_out.weight"
    assert torch.equal(loaded[0].state_dict()[weight], load_file(saved)[weight])
    assert not torch.equal(loaded[1].state_dict()[weight], load_file(saved)[weight])
    assert record(tmp_path / "recorded", "00001")["resolved"]["pretrained_vae"] == str(vae_folder)
    assert record(tmp_path / "base", "00001")["resolved"]["pretrained_vae"] is None
    a = (tmp_path / "recorded" / "00001_0.png").read_bytes()
    assert a != (tmp_path / "base" / "00001_0.png").read_bytes()


@pytest.mark.parametrize("flags, message", [
    (["--pretrained_vae", "{tmp}/missing"], "--pretrained_vae {tmp}/missing: no such folder"),
    (["--vae_tiling", "sometimes"], "--vae_tiling"),
])
def test_vae_flag_errors_are_one_line(flags, message, tmp_path, capsys):
    argv = [*BARE, "--input_image", str(INPUT), "--output_dir", str(tmp_path / "out"),
            *[f.format(tmp=tmp_path) for f in flags]]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(infer_main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message.format(tmp=tmp_path) in err[-1], err[-3:]
    assert not (tmp_path / "out").exists()


def test_a_recorded_vae_that_is_gone_is_one_clear_error(vae_lora, tmp_path, capsys):
    lora, _ = vae_lora
    moved = tmp_path / "lora"
    moved.mkdir()
    for file in lora.iterdir():
        (moved / file.name).write_bytes(file.read_bytes())
    meta = json.loads((moved / "iclora_config.json").read_text())
    meta["training_args"]["pretrained_vae"] = str(tmp_path / "vae_elsewhere")
    (moved / "iclora_config.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit):
        run_cli(infer_main, [*BARE[5:], "--lora_path", str(moved), "--input_image", str(INPUT), "--output_dir",
                             str(tmp_path / "out")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    gone = tmp_path / "vae_elsewhere"
    assert line.startswith(f"error: --lora_path {moved}: its training used --pretrained_vae {gone}")
    assert "--pretrained_vae none" in line
