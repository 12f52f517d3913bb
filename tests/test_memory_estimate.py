"""The --dry_run memory estimate: full-size configs built on the meta device against the peak
reserved memory measured on an H100 (benchmarks/RESULTS.md), the suggestions when a setting
does not fit, and the line on the tiny models.

    pytest tests/test_memory_estimate.py
"""

import json
import re
from pathlib import Path

import pytest

from conftest import load_benchmark
from iclora.backends.tiny import save_tiny_model
from iclora.prepare.memory import Settings, estimate, model_sizes
from iclora.toy import make_dataset
from iclora.training.train_flux_ic_lora import main as train_flux
from iclora.training.train_sdxl_ic_lora import main as train_sdxl

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flux_storyboard_3x1.yaml"
LINE = re.compile(r"memory: peak (\d+\.\d) GiB on the GPU \(([a-z ]+)\), (\d+) GiB host RAM")


def full_size_folder(model: str, folder: Path) -> Path:
    """A diffusers folder whose configs are the public full-size ones (the weights stay the
    tiny model's: the estimate must read configs only)."""
    load_benchmark("memory_models")  # imported by name by inference_models
    inference_models = load_benchmark("inference_models")
    save_tiny_model(f"tiny-{model}", folder)
    denoiser = {"sdxl": "unet", "flux": "transformer"}[model]
    configs = {denoiser: inference_models.DENOISER_CONFIGS[model], "vae": inference_models.PUBLIC[model]["vae"]}
    for key in ("text_encoder", "text_encoder_2"):
        tiny = json.loads((folder / key / "config.json").read_text())
        configs[key] = {**tiny, **inference_models.PUBLIC[model][key]}
    for key, config in configs.items():
        (folder / key / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    return {m: full_size_folder(m, root / m) for m in ("sdxl", "flux")}


def _settings(size, bs, rank, precision, quantize, ckpt, adam8bit, conditioning="concat"):
    h, w = size
    return Settings(h, w, bs, 1, rank, precision, quantize, ckpt, adam8bit, True, True, conditioning, None, False)


# The measured rows (benchmarks/RESULTS.md, peak reserved GiB; text embeddings and latents
# precomputed, as with both caches).
ROWS = [
    ("sdxl", _settings((1024, 1024), 1, 64, "fp16", None, True, True), 7.53),
    ("sdxl", _settings((1024, 1024), 4, 64, "fp16", None, True, True), 10.44),
    ("sdxl", _settings((1024, 1024), 1, 16, "bf16", None, False, False), 15.36),
    ("flux", _settings((1024, 1024), 1, 16, "bf16", "nf4", True, True, "blend"), 11.51),
    ("flux", _settings((1536, 1024), 1, 16, "bf16", "nf4", True, True, "blend"), 13.71),
    ("flux", _settings((1024, 1024), 1, 16, "bf16", None, True, False, "blend"), 26.69),
]


@pytest.mark.parametrize("model,settings,measured", ROWS)
def test_full_size_estimate_is_within_5_percent_of_each_measured_row(folders, model, settings, measured):
    conditioning = settings.conditioning
    sizes = model_sizes(model, str(folders[model]), settings.rank, conditioning)
    expected = {"sdxl": 2_567_463_684, "flux": 11_901_408_320}[model]
    assert sizes.denoiser == expected  # the public architecture, counted on the meta device
    got = estimate(sizes, settings).gpu["first step"]
    assert abs(got - measured) / measured < 0.05, (got, measured)


def test_full_size_t5_and_host_ram(folders):
    sizes = model_sizes("flux", str(folders["flux"]), 16, "context")
    assert 4.7e9 < sizes.text_encoders[1] < 4.8e9  # T5-XXL's encoder: 4.76 B parameters
    s = _settings((1536, 1024), 1, 16, "bf16", "nf4", True, True, "context")
    est = estimate(sizes, s)
    assert 8.5 < est.gpu["caching"] < 9.5  # T5 in bf16 alone, the transformer off the GPU
    assert est.peak < 15  # the FLUX example's goal
    assert 15 < est.host < 32


def _storyboards(tmp_path):
    data = tmp_path / "data"
    make_dataset(data, n=2, panel_size=256, grid=(3, 1))  # 256x768: the least --image_size 1536 takes
    return data


def test_dry_run_of_the_flux_example_on_full_size_configs(folders, tmp_path, capsys):
    data = _storyboards(tmp_path)
    args = ["--config", str(EXAMPLE), "--data_dir", str(data), "--output_dir", str(tmp_path / "o"),
            "--model_id", str(folders["flux"]), "--image_size", "1536", "--dry_run"]
    report = train_flux(args)
    lines = capsys.readouterr().out.strip().splitlines()
    match = LINE.fullmatch(lines[-1])
    assert match and float(match[1]) == round(report.memory.peak, 1) and report.memory.peak < 15
    assert not (tmp_path / "o").exists()

    # Without caches, checkpointing or NF4 it does not fit 16 GiB: the flags that would.
    train_flux(args + ["--no_cache_text_embeddings", "--no_cache_latents", "--no_gradient_checkpointing",
                       "--quantize", "none", "--gpu_memory_gib", "16"])
    out = capsys.readouterr().out.strip().splitlines()
    assert float(LINE.fullmatch(out[-1])[1]) > 16
    hint = next(line for line in out if line.startswith("does not fit --gpu_memory_gib 16: add"))
    for flag in ("--gradient_checkpointing", "--cache_text_embeddings", "--quantize nf4"):
        assert flag in hint
    assert float(re.search(r"estimate (\d+\.\d) GiB", hint)[1]) <= 16


def test_dry_run_on_a_tiny_model_is_small_and_ends_with_the_line(tmp_path, capsys):
    data = tmp_path / "data"
    make_dataset(data, n=2, panel_size=32)
    train_sdxl(["--data_dir", str(data), "--output_dir", str(tmp_path / "o"), "--model_id", "tiny-sdxl",
                "--image_size", "64", "--dry_run"])
    match = LINE.fullmatch(capsys.readouterr().out.strip().splitlines()[-1])
    assert match and float(match[1]) < 1 and 1 <= int(match[3]) < 8


def test_unreadable_configs_say_so(tmp_path, capsys):
    data = tmp_path / "data"
    make_dataset(data, n=2, panel_size=32)
    folder = tmp_path / "model"
    save_tiny_model("tiny-sdxl", folder)
    (folder / "unet" / "config.json").unlink()
    report = train_sdxl(["--data_dir", str(data), "--model_id", str(folder), "--image_size", "64", "--dry_run"])
    assert report.memory is None
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"memory: no estimate: the configs of --model_id {folder}")


def test_gpu_memory_gib_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_sdxl(["--data_dir", str(tmp_path), "--gpu_memory_gib", "0", "--dry_run"])
    assert "--gpu_memory_gib must be positive" in capsys.readouterr().err
