"""The --dry_run memory estimate for FLUX.2 [klein] (parameters from the full-size configs on
the meta device, activations extrapolated from FLUX.1's and said so) and under
--distributed fsdp (per process, the denoiser's parts sharded over WORLD_SIZE).

    pytest tests/test_memory_estimate_flux2_fsdp.py
"""

import json
import re
from dataclasses import replace

import pytest

from conftest import load_benchmark
from iclora.backends.tiny import save_tiny_model
from iclora.prepare.memory import GIB, Settings, estimate, model_sizes
from iclora.toy import make_dataset
from iclora.training.train_flux2_ic_lora import main as train_flux2
from iclora.training.train_flux_ic_lora import main as train_flux

LINE = re.compile(r"memory: peak (~?)(\d+\.\d) GiB on the GPU \(([a-z ]+)\)( per process \(fsdp over (\d+)\))?, "
                  r"(\d+) GiB host RAM( \(activations extrapolated from FLUX\.1\))?")

# The public Qwen3 text encoders of [klein] base-4B (Qwen3-4B) and base-9B (Qwen3-8B).
QWEN3 = {
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
               layer_types=["full_attention"] * 36, max_window_layers=36),
    "9b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
               layer_types=["full_attention"] * 36, max_window_layers=36),
}


def full_size_flux2_folder(size: str, folder):
    """A diffusers folder with the public [klein] configs (the weights stay the tiny model's):
    the VAE's are AutoencoderKLFlux2's defaults (FLUX.2's VAE)."""
    import inspect

    from diffusers import AutoencoderKLFlux2

    memory_models = load_benchmark("memory_models")
    save_tiny_model("tiny-flux2", folder)
    transformer = {"4b": memory_models.FLUX2_KLEIN_4B_TRANSFORMER_CONFIG,
                   "9b": memory_models.FLUX2_KLEIN_9B_TRANSFORMER_CONFIG}[size]
    tiny_qwen = json.loads((folder / "text_encoder" / "config.json").read_text())
    configs = {"transformer": transformer, "text_encoder": {**tiny_qwen, **QWEN3[size]},
               "vae": {**json.loads((folder / "vae" / "config.json").read_text()),
                       **{name: p.default for name, p in inspect.signature(AutoencoderKLFlux2.__init__).parameters.items()
                          if p.default is not inspect.Parameter.empty}}}
    for key, config in configs.items():
        (folder / key / "config.json").write_text(json.dumps(config))
    return folder


def _bf16(batch=1, checkpointing=True, quantize=None, processes=1):
    return Settings(1024, 1024, batch, 1, 16, "bf16", quantize, checkpointing, False, True, True, "context", None,
                    False, processes)


@pytest.mark.parametrize("size,params,per_rank", [("4b", (3.8e9, 3.95e9), 1_505_280), ("9b", (9.0e9, 9.15e9), 2_719_744)])
def test_full_size_klein_parameters_are_exact_and_activations_extrapolated(tmp_path, size, params, per_rank):
    sizes = model_sizes("flux2", str(full_size_flux2_folder(size, tmp_path / size)), 16, "context")
    assert params[0] < sizes.denoiser < params[1]  # 3.88 B / 9.08 B parameters
    assert sizes.lora == 16 * per_rank  # the spec's disk-space figure, counted again on the meta device
    assert {"4b": (3.9e9, 4.1e9), "9b": (8.1e9, 8.3e9)}[size][0] < sizes.text_encoders[0] < {"4b": 4.1e9, "9b": 8.3e9}[size]
    checkpointed, unchecked = estimate(sizes, _bf16()), estimate(sizes, _bf16(checkpointing=False))
    # The parameter part is the count x 2 bytes: what checkpointing cannot change.
    no_activations = estimate(replace(sizes, scale=0.0), replace(_bf16(), conditioning="blend"))
    lora_state = sizes.lora * 16 / GIB  # float32 weights, gradients and AdamW's two moments
    assert no_activations.gpu["first step"] == pytest.approx(sizes.denoiser * 2 / GIB + lora_state + 0.22, abs=0.01)
    assert unchecked.gpu["first step"] > checkpointed.gpu["first step"] > no_activations.gpu["first step"]
    assert checkpointed.extrapolated == "activations extrapolated from FLUX.1"
    match = LINE.fullmatch(checkpointed.line())
    assert match and match[1] == "~" and match[7] and not match[4]
    if size == "4b":  # bf16 with checkpointing and cached text embeddings fits 16 GB (the README's row)
        assert checkpointed.peak < 16


def test_the_dry_run_of_tiny_flux2_prints_an_extrapolated_estimate(tmp_path, capsys):
    data = tmp_path / "data"
    make_dataset(data, n=2, panel_size=32)
    report = train_flux2(["--data_dir", str(data), "--output_dir", str(tmp_path / "o"), "--model_id", "tiny-flux2",
                          "--image_size", "64", "--dry_run"])
    match = LINE.fullmatch(capsys.readouterr().out.strip().splitlines()[-1])
    assert match and match[1] == "~" and match[7] and float(match[2]) < 1
    assert report.memory.peak == pytest.approx(float(match[2]), abs=0.05)
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    from test_memory_estimate import full_size_folder

    return full_size_folder("flux", tmp_path_factory.mktemp("full") / "flux")


def test_fsdp_dry_run_divides_the_sharded_parts_by_world_size(flux_folder, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    make_dataset(data, n=2, panel_size=256, grid=(2, 2))
    args = ["--data_dir", str(data), "--output_dir", str(tmp_path / "o"), "--model_id", str(flux_folder),
            "--image_size", "1024", "--batch_size", "1", "--quantize", "none", "--mixed_precision", "bf16", "--gradient_checkpointing",
            "--cache_text_embeddings", "--cache_latents", "--gpu_memory_gib", "80", "--dry_run"]
    whole = train_flux(args).memory
    line = LINE.fullmatch(capsys.readouterr().out.strip().splitlines()[-1])
    assert line and not line[4] and not line[1]  # one process, measured activations: no marks
    sizes = model_sizes("flux", str(flux_folder), 16, "context")
    gathered = (sizes.shard_root + 2 * sizes.shard_block) * 2 / GIB  # the root and two blocks in flight
    assert sizes.shard_block == 339_831_296 and sizes.shard_root == 64_124_992  # a double block; embedders, norm_out
    sharded = sizes.denoiser * 2 / GIB + sizes.lora * 16 / GIB  # frozen bf16 base, LoRA, gradients, AdamW
    for n in (2, 4):
        monkeypatch.setenv("WORLD_SIZE", str(n))
        per_process = train_flux(args + ["--distributed", "fsdp"]).memory
        line = LINE.fullmatch(capsys.readouterr().out.strip().splitlines()[-1])
        assert line and line[5] == str(n) and float(line[2]) == round(per_process.peak, 1)
        saved = whole.gpu["first step"] - per_process.gpu["first step"]
        assert saved == pytest.approx(sharded * (1 - 1 / n) - gathered, abs=0.02)
    assert per_process.peak < 16 < whole.peak  # FLUX.1-dev in bf16 over 4 processes fits 16 GB cards
    # Under fsdp the flags it refuses (8-bit Adam, bitsandbytes) are never suggested.
    monkeypatch.setenv("WORLD_SIZE", "2")
    train_flux([a for a in args if a not in ("--gradient_checkpointing",)][:-3]
               + ["--no_gradient_checkpointing", "--gpu_memory_gib", "8", "--distributed", "fsdp", "--dry_run"])
    out = capsys.readouterr().out
    hint = next(line for line in out.splitlines() if line.startswith("does not fit --gpu_memory_gib 8"))
    assert "--gradient_checkpointing" in hint and "--use_8bit_adam" not in hint and "--quantize" not in hint
