"""The memory plan per phase: which models are on the training device, in which dtype, from
load to final save (output_dir/memory_phases.json), in the shipped FLUX example's settings.

The device is the CPU here, so the record is the backends' own (backends/placement.py): it
says "on the device" for what a GPU run would have there.

    pytest tests/test_memory_plan.py
"""

import json
from pathlib import Path

import pytest
import torch

from iclora.toy import make_dataset
from iclora.training.train_flux_ic_lora import main as train_flux

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flux_storyboard_3x1.yaml"
# The example on the tiny model: no NF4 or 8-bit Adam (CUDA only), a toy size and length;
# caches, sample sheets, checkpoints, bf16, masking and context conditioning as it has them.
TINY = ["--model_id", "tiny-flux", "--quantize", "none", "--no_use_8bit_adam", "--image_size", "96",
        "--max_train_steps", "2", "--gradient_accumulation_steps", "1", "--lr_warmup_steps", "0",
        "--save_every", "1", "--validation_every", "2", "--validation_inference_steps", "2"]


@pytest.fixture(scope="module")
def storyboards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("storyboards")
    make_dataset(folder, n=2, panel_size=32, grid=(3, 1))
    return folder


def _run(data, out, cache):
    train_flux(["--config", str(EXAMPLE), "--data_dir", str(data), "--output_dir", str(out),
                "--cache_dir", str(cache), *TINY])
    return json.loads((out / "memory_phases.json").read_text())


def _on(record, model):
    return record["models"][model]["on_device"]


@pytest.fixture(scope="module")
def runs(storyboards, tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    first = _run(storyboards, root / "first", root / "cache")
    again = _run(storyboards, root / "again", root / "cache")  # every entry cached now
    return first, again


def test_t5_and_the_transformer_never_share_the_device(runs):
    first, again = runs
    for records in runs:
        for r in records:
            assert not (_on(r, "text_encoder_2") and _on(r, "transformer")), r["phase"]
    phases = [r["phase"] for r in first]
    assert phases[:3] == ["load", "caching text embeddings", "caching latents"]
    for phase in ("sample sheet", "first step", "checkpoint", "train", "final save"):
        assert phase in phases
    assert phases[-1] == "final save"
    text, latents = first[1], first[2]
    assert _on(text, "text_encoder_2") and _on(text, "text_encoder") and not _on(text, "vae")
    assert _on(latents, "vae") and not _on(latents, "text_encoder_2")
    for r in first[3:]:  # training: the denoiser; T5 and CLIP never again
        assert _on(r, "transformer") and not _on(r, "text_encoder_2") and not _on(r, "text_encoder")
        assert _on(r, "vae") == (r["phase"] == "sample sheet")  # sheets decode; steps read cached latents


def test_with_everything_cached_the_encoders_never_reach_the_device(runs):
    _, again = runs
    assert [r["phase"] for r in again][:3] == ["load", "caching text embeddings", "caching latents"]
    for r in again:
        assert not _on(r, "text_encoder_2") and not _on(r, "text_encoder")
        assert _on(r, "vae") == (r["phase"] == "sample sheet")


def test_every_model_is_in_the_runs_16_bit_dtype(runs):
    first, _ = runs
    for r in first:
        for model in ("text_encoder", "text_encoder_2", "vae"):
            assert r["models"][model]["dtype"] == "bfloat16", (r["phase"], model)
    # The transformer's frozen weights too; its LoRA (trained in float32) is a small share.
    assert first[-1]["models"]["transformer"]["dtype"] == "bfloat16"
    assert all(r["host_peak_rss_gib"] >= r["host_rss_gib"] > 0 for r in first)


def test_quantize_still_passes_the_runs_dtype_to_the_loader(storyboards, tmp_path, monkeypatch):
    seen = {}

    def loader(name, model_id, conditioning, **options):
        seen.update(options)
        raise RuntimeError("stop after the load call")

    monkeypatch.setattr("iclora.training.run_setup.load_backend", loader)
    monkeypatch.setattr("iclora.training.run_setup.torch.cuda.is_available", lambda: True)
    with pytest.raises(RuntimeError, match="stop after"):
        train_flux(["--config", str(EXAMPLE), "--data_dir", str(storyboards), "--output_dir", str(tmp_path / "o"),
                    "--model_id", "tiny-flux", "--image_size", "96", "--no_use_8bit_adam"])
    assert seen["quantize"] == "nf4" and seen["dtype"] == torch.bfloat16


def test_quantized_weights_are_prepared_for_training_only(monkeypatch):
    """prepare_model_for_kbit_training upcasts the unquantized weights to float32: add_lora
    (training) calls it for a quantized transformer, loading (inference) does not."""
    from iclora.backends import flux
    from iclora.backends.tiny import TINY_MODELS

    calls = []
    monkeypatch.setattr(flux, "prepare_quantized", lambda t: calls.append(t))
    backend = flux.FluxBackend(TINY_MODELS["tiny-flux"](), "tiny-flux", "context")
    backend.add_lora(4, 4, 0.0)
    assert calls == []  # not quantized
    backend = flux.FluxBackend(TINY_MODELS["tiny-flux"](), "tiny-flux", "context")
    backend.quantized = True
    backend.add_lora(4, 4, 0.0)
    assert calls == [backend.transformer]
