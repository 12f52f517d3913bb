"""FLUX.2 [klein] end to end on tiny-flux2 through the CLI entry points a user calls:
training in context and blend mode, exact resume, caches, concat refused, completion that
keeps the visible panels, the `iclora` command, and a distilled base's defaults.

    pytest tests/test_flux2_cli.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from iclora.cli import run_cli
from iclora.inference import flux2_ic_lora_inference as infer
from iclora.panels import Grid, panel_box
from iclora.toy import make_dataset
from iclora.training import train_flux2_ic_lora as train

GRID = Grid(2, 2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux2_data")
    make_dataset(folder, n=4, panel_size=32)  # 64 x 64 composites: 2 x 2 tokens a panel
    return folder


def _train(data, output_dir, *extra):
    return train.main([
        "--data_dir", str(data), "--output_dir", str(output_dir), "--model_id", "tiny-flux2",
        "--image_size", "64", "--batch_size", "2", "--lora_rank", "4", "--lora_alpha", "8",
        "--learning_rate", "5e-3", "--save_every", "2", "--seed", "0", "--max_token_length", "128", *extra,
    ])


@pytest.fixture(scope="module")
def context_run(data, tmp_path_factory):
    """4 steps of context training (the default), text embeddings and latents cached on disk."""
    return _train(data, tmp_path_factory.mktemp("context"), "--max_train_steps", "4", "--cache_text_embeddings",
                  "--cache_latents")


def _lora(folder):
    return load_file(folder / "pytorch_lora_weights.safetensors")


def test_context_training_saves_an_anchored_lora(context_run):
    assert context_run.global_step == 4 and all(np.isfinite(context_run.losses))
    meta = json.loads((context_run.final_dir / "iclora_config.json").read_text())
    assert (meta["backend"], meta["conditioning"], meta["context_timestep"]) == ("flux2", "context", "zero")
    assert meta["max_token_length"] == 128
    keys = set(_lora(context_run.final_dir))
    for module in ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0",
                   "transformer_blocks.0.ff_context.linear_out", "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
                   "single_transformer_blocks.0.attn.to_out"]:
        assert f"transformer.{module}.lora_A.weight" in keys, module
    assert not any(k.startswith(("transformer.proj_out.", "transformer.x_embedder.")) for k in keys)
    cache = context_run.final_dir.parent / "cache"
    assert any(cache.rglob("*.safetensors"))  # both caches on disk


def test_resume_replays_an_uninterrupted_run(context_run, data, tmp_path):
    args = ["--cache_text_embeddings", "--cache_latents", "--cache_dir", str(context_run.final_dir.parent / "cache")]
    halfway = _lora(_train(data, tmp_path, "--max_train_steps", "2", *args).final_dir)
    resumed = _train(data, tmp_path, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *args)
    expected, got = _lora(context_run.final_dir), _lora(resumed.final_dir)
    assert not all(torch.equal(expected[k], halfway[k]) for k in expected)  # steps 3-4 did train
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_blend_training_with_sample_sheets(data, tmp_path):
    result = _train(data, tmp_path, "--max_train_steps", "2", "--conditioning", "blend", "--validation_every", "2",
                    "--validation_inference_steps", "1")
    assert result.global_step == 2 and all(np.isfinite(result.losses))
    assert json.loads((result.final_dir / "iclora_config.json").read_text())["conditioning"] == "blend"
    for step in ("step_000000", "step_000002"):
        assert any((tmp_path / "samples" / step).glob("*.png")), step


def test_a_nan_loss_stops_training_in_one_line(data, tmp_path, monkeypatch, capsys):
    import iclora.training.trainer as trainer

    real, calls = trainer.masked_mse, iter(range(100))
    monkeypatch.setattr(trainer, "masked_mse",
                        lambda *a: real(*a) * (float("nan") if next(calls) == 1 else 1.0))
    with pytest.raises(SystemExit) as stop:
        run_cli(train.main, ["--data_dir", str(data), "--output_dir", str(tmp_path), "--model_id", "tiny-flux2",
                             "--image_size", "64", "--batch_size", "2", "--lora_rank", "4", "--max_train_steps", "3",
                             "--max_token_length", "128"])
    assert stop.value.code == 1
    assert "step 2: the loss is nan" in capsys.readouterr().err
    assert not (tmp_path / "final_model").exists()


def test_reference_training_with_cached_latents_and_its_completion(data, tmp_path):
    result = _train(data, tmp_path / "run", "--max_train_steps", "2", "--conditioning", "reference", "--cache_latents")
    assert result.global_step == 2 and all(np.isfinite(result.losses))
    assert json.loads((result.final_dir / "iclora_config.json").read_text())["conditioning"] == "reference"
    source = data / "00003.png"
    infer.main(["--lora_path", str(result.final_dir), "--input_image", str(source), "--prompt", "a set",
                "--panels_to_inpaint", "3", "--seed", "2", "--num_inference_steps", "2", "--output_dir", str(tmp_path / "out")])
    out = tmp_path / "out" / "00003_0.png"
    for kept, given in zip(_panels(out, [0, 1, 2]), _panels(source, [0, 1, 2])):
        assert np.array_equal(kept, given)
    assert not np.array_equal(_panels(out, [3])[0], _panels(source, [3])[0])


def test_concat_is_refused_in_one_line(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(train.main, ["--data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--model_id", "tiny-flux2",
                             "--conditioning", "concat"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --conditioning concat") and "\n" not in err
    assert not (tmp_path / "out").exists()


def _panels(path, indices):
    image = np.asarray(Image.open(path))
    return [image[t:b, l:r] for l, t, r, b in (panel_box(i, GRID, image.shape[1], image.shape[0]) for i in indices)]


def test_inference_completes_masked_panels_and_keeps_visible_ones(context_run, data, tmp_path):
    source = data / "00001.png"
    args = ["--lora_path", str(context_run.final_dir), "--input_image", str(source), "--prompt", "a set",
            "--panels_to_inpaint", "1", "3", "--seed", "7", "--num_inference_steps", "2"]
    first = infer.main(args + ["--output_dir", str(tmp_path / "a")])
    again = infer.main(args + ["--output_dir", str(tmp_path / "b")])
    pngs = lambda files: [p.read_bytes() for p in files if p.suffix == ".png"]  # noqa: E731
    assert pngs(first) and pngs(first) == pngs(again)
    out = tmp_path / "a" / "00001_0.png"
    for kept, given in zip(_panels(out, [0, 2]), _panels(source, [0, 2])):
        assert np.array_equal(kept, given)
    assert not np.array_equal(_panels(out, [1])[0], _panels(source, [1])[0])
    record = json.loads((tmp_path / "a" / "00001_inference.json").read_text())
    assert record["resolved"]["backend"] == "flux2" and record["resolved"]["conditioning"] == "context"


def test_iclora_command_runs_flux2(context_run, data, tmp_path):
    from iclora.commands import dispatch

    result = dispatch(["train", "--backend", "flux2", "--data_dir", str(data), "--output_dir", str(tmp_path / "t"),
                       "--model_id", "tiny-flux2", "--image_size", "64", "--batch_size", "2", "--lora_rank", "4",
                       "--max_train_steps", "1", "--max_token_length", "128"])
    assert result.global_step == 1
    files = dispatch(["infer", "--lora_path", str(result.final_dir), "--input_image", str(data / "00002.png"),
                      "--prompt", "a set", "--panels_to_inpaint", "3", "--num_inference_steps", "1", "--seed", "1",
                      "--output_dir", str(tmp_path / "i")])
    assert (tmp_path / "i" / "00002_0.png") in files


def test_distilled_base_gets_its_steps_and_guidance(context_run, data, tmp_path):
    from iclora.backends.tiny import save_tiny_model

    base = tmp_path / "distilled"
    save_tiny_model("tiny-flux2", base)
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    infer.main(["--lora_path", str(context_run.final_dir), "--base_model", str(base), "--input_image",
                str(data / "00001.png"), "--prompt", "a set", "--panels_to_inpaint", "3", "--seed", "1",
                "--output_dir", str(tmp_path / "out")])
    arguments = json.loads((tmp_path / "out" / "00001_inference.json").read_text())["arguments"]
    assert (arguments["num_inference_steps"], arguments["guidance_scale"]) == (4, 1.0)
    infer.main(["--lora_path", str(context_run.final_dir), "--input_image", str(data / "00001.png"),
                "--prompt", "a set", "--panels_to_inpaint", "3", "--seed", "1", "--num_inference_steps", "1",
                "--output_dir", str(tmp_path / "base")])
    arguments = json.loads((tmp_path / "base" / "00001_inference.json").read_text())["arguments"]
    assert arguments["guidance_scale"] == 4.0  # the base's own CFG


def test_batched_and_folder_inference(context_run, data, tmp_path):
    args = ["--lora_path", str(context_run.final_dir), "--prompt", "a set", "--panels_to_inpaint", "3", "--seed", "5",
            "--num_inference_steps", "2", "--num_images", "2"]
    single = infer.main(args + ["--input_image", str(data / "00001.png"), "--output_dir", str(tmp_path / "one")])
    batched = infer.main(args + ["--input_image", str(data / "00001.png"), "--output_dir", str(tmp_path / "two"),
                                 "--batch_size", "2"])
    for name in ("00001_0.png", "00001_1.png"):
        a, b = (np.asarray(Image.open(folder / name), dtype=np.int16) for folder in (tmp_path / "one", tmp_path / "two"))
        assert np.abs(a - b).max() <= 2, name
    assert {p.name for p in single} == {p.name for p in batched}
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("00001.png", "00002.png"):
        (folder / name).write_bytes((data / name).read_bytes())
    infer.main(args + ["--input_dir", str(folder), "--output_dir", str(tmp_path / "folder"), "--batch_size", "4"])
    for stem in ("00001", "00002"):
        assert (tmp_path / "folder" / f"{stem}_1.png").exists()


def test_compile_targets_the_stock_blocks_in_context_mode():
    from iclora.backends.flux2 import Flux2Backend

    backend = Flux2Backend.from_pretrained("tiny-flux2", conditioning="context")
    compiled = backend.compile_blocks()  # compiles lazily: nothing runs here
    assert compiled.blocks == {"Flux2TransformerBlock": 1, "Flux2SingleTransformerBlock": 1}


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_inference_without_cuda_is_one_clear_error(context_run, data, tmp_path, capsys, mode):
    if torch.cuda.is_available():
        pytest.skip("the error is for machines without CUDA")
    with pytest.raises(SystemExit) as stop:
        run_cli(infer.main, ["--lora_path", str(context_run.final_dir), "--input_image", str(data / "00001.png"),
                             "--prompt", "p", "--panels_to_inpaint", "3", "--quantize", mode,
                             "--output_dir", str(tmp_path / "q")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: --quantize {mode} needs a CUDA GPU (bitsandbytes 4/8-bit weights); none was found"


def test_dry_run_counts_qwen3_tokens_with_the_chat_template(data, tmp_path, capsys):
    train.main(["--data_dir", str(data), "--output_dir", str(tmp_path), "--model_id", "tiny-flux2", "--image_size", "64",
                "--max_token_length", "256", "--dry_run"])
    out = capsys.readouterr().out
    # The tiny tokenizer reads a byte a token: the template (25 bytes) leaves 231 of 256 for the caption.
    assert "text_encoder (Qwen3; the chat template takes 25 more): reads 231;" in out
    assert "(--max_token_length 512 reads longer captions)" in out
    assert out.strip().splitlines()[-1].endswith("GiB host RAM (activations extrapolated from FLUX.1)")
    assert not any(tmp_path.iterdir())
