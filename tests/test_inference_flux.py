"""FLUX.1 panel inpainting through the shared inference code and its CLI (tiny models)."""

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import assert_batched_equals_single
from iclora.inference import flux_ic_lora_inference as cli
from iclora.inference.inpaint import check_inputs, load_pipeline
from iclora.inference.config import InferConfig
from iclora.panels import Grid, panel_box
from iclora.toy import make_dataset
from iclora.training import train_flux_ic_lora

STEPS = ["--num_inference_steps", "3"]


@pytest.fixture(scope="module")
def flux_loras(tmp_path_factory):
    """A blend LoRA on tiny-flux and a concat LoRA on tiny-flux-fill, a few steps each."""
    data = tmp_path_factory.mktemp("flux_data")
    make_dataset(data, 4, seed=0, panel_size=64)
    loras = {}
    for model_id, conditioning in [("tiny-flux", "blend"), ("tiny-flux-fill", "concat")]:
        out = tmp_path_factory.mktemp(conditioning)
        result = train_flux_ic_lora.main([
            "--data_dir", str(data), "--output_dir", str(out), "--model_id", model_id,
            "--conditioning", conditioning, "--image_size", "128", "--batch_size", "2", "--lora_rank", "4",
            "--lora_alpha", "8", "--max_train_steps", "2", "--learning_rate", "1e-2",
        ])
        loras[conditioning] = result.final_dir
    return data, loras


def _panels(path, indices):
    image = np.asarray(Image.open(path))
    boxes = [panel_box(i, Grid(2, 2), image.shape[1], image.shape[0]) for i in indices]
    return [image[t:b, l:r] for l, t, r, b in boxes]


@pytest.mark.parametrize("conditioning", ["blend", "concat"])
def test_visible_panels_are_kept_and_seed_reproduces(flux_loras, tmp_path, conditioning):
    data, loras = flux_loras
    source = data / "00001.png"
    args = ["--lora_path", str(loras[conditioning]), "--input_image", str(source), "--prompt", "a set",
            "--panels_to_inpaint", "1", "3", "--seed", "7", *STEPS]
    first = cli.main(args + ["--output_dir", str(tmp_path / "a")])
    again = cli.main(args + ["--output_dir", str(tmp_path / "b")])
    pngs = lambda files: [p.read_bytes() for p in files if p.suffix == ".png"]  # noqa: E731
    assert pngs(first) and pngs(first) == pngs(again)

    out = tmp_path / "a" / "00001_0.png"
    for kept, given in zip(_panels(out, [0, 2]), _panels(source, [0, 2])):
        assert np.array_equal(kept, given)
    assert not np.array_equal(_panels(out, [1])[0], _panels(source, [1])[0])
    record = json.loads((tmp_path / "a" / "00001_inference.json").read_text())
    assert record["resolved"]["backend"] == "flux"
    assert record["resolved"]["conditioning"] == conditioning
    assert record["arguments"]["guidance_scale"] == 3.5  # FLUX.1-dev's distilled guidance
    assert record["images"] == [{"file": "00001_0.png", "seed": 7}]


def test_fill_transformer_sees_the_visible_panels_as_training_does(flux_loras, tmp_path, monkeypatch):
    """FLUX.1-Fill (concat): after every step the visible tokens are the input's noised to
    the next sigma, as training feeds them; with --no_blend_visible the model's own."""
    import torch

    from iclora.backends.flux import pack
    from iclora.inference import inpaint

    data, loras = flux_loras
    source = data / "00001.png"
    seen, pipes, real_load = [], [], inpaint.load_pipeline

    def load(plan):
        backend, pipe = real_load(plan)
        pipe.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["hidden_states"].clone()), with_kwargs=True)
        pipes.append(pipe)
        return backend, pipe

    monkeypatch.setattr(inpaint, "load_pipeline", load)
    args = ["--lora_path", str(loras["concat"]), "--input_image", str(source), "--prompt", "a set",
            "--seed", "5", "--num_inference_steps", "4"]
    cli.main(args + ["--output_dir", str(tmp_path / "on")])
    reset, seen[:] = list(seen), []
    cli.main(args + ["--output_dir", str(tmp_path / "off"), "--no_blend_visible"])
    free, pipe = list(seen), pipes[-1]

    image = torch.from_numpy(np.asarray(Image.open(source).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        clean = pipe.vae.encode(image / 127.5 - 1).latent_dist.mode()
    clean = pack((clean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor)  # (1, 64 tokens, 4C)
    reset, free = ([x[..., : clean.shape[-1]] for x in run] for run in (reset, free))  # the latents' channels
    noise = torch.randn(clean.shape, generator=torch.Generator("cpu").manual_seed(5))
    sigmas = pipe.scheduler.sigmas  # the run's, resolution shift included
    visible = (slice(None), slice(0, 32))  # the top half of the 8 x 8 tokens: panels 0 and 1
    assert len(reset) == len(free) == 4
    torch.testing.assert_close(reset[0], free[0])  # the first step: pure noise in both
    for k in range(1, 4):
        expected = (1 - sigmas[k]) * clean + sigmas[k] * noise
        torch.testing.assert_close(reset[k][visible], expected[visible], atol=5e-4, rtol=1e-3)
        assert (free[k][visible] - expected[visible]).abs().max() > 1e-2


@pytest.mark.parametrize("conditioning, flags", [("blend", []), ("concat", ["--strength", "0.6"])])
def test_batched_images_are_the_one_image_calls_images(flux_loras, tmp_path, decoded, conditioning, flags):
    """FluxInpaintPipeline / FluxFillPipeline with one generator per image: image i of a
    batch is the image its seed makes alone (each generator samples its own input copy)."""
    data, loras = flux_loras
    args = ["--lora_path", str(loras[conditioning]), "--input_image", str(data / "00001.png"), "--prompt", "a set",
            "--panels_to_inpaint", "1", "3", "--num_images", "3", "--seed", "7", *STEPS, *flags]
    single_files = cli.main(args + ["--output_dir", str(tmp_path / "single")])
    single = list(decoded)
    decoded.clear()
    batched_files = cli.main(args + ["--output_dir", str(tmp_path / "batched"), "--batch_size", "3"])
    assert [z.shape[0] for z in single] == [1, 1, 1] and [z.shape[0] for z in decoded] == [3]
    images = lambda files: [p for p in files if p.name in {f"00001_{i}.png" for i in range(3)}]  # noqa: E731
    assert_batched_equals_single(decoded, single, images(batched_files), images(single_files))
    record = json.loads((tmp_path / "batched" / "00001_inference.json").read_text())
    assert record["arguments"]["batch_size"] == 3 and [i["seed"] for i in record["images"]] == [7, 8, 9]


def test_soft_mask_reaches_the_flux_pipeline_unbinarized(flux_loras):
    data, loras = flux_loras
    cfg = InferConfig(lora_path=str(loras["blend"]), prompt="a set", input_image=str(data / "00001.png"),
                      backend="flux", use_gradient_mask=True, gradient_width=30)
    plan = check_inputs(cfg)
    band = plan.mask[(plan.mask > 0) & (plan.mask < 1)]
    assert band.numel() > 0
    _, pipe = load_pipeline(plan)
    processed = pipe.mask_processor.preprocess(plan.mask[None], height=128, width=128)
    assert ((processed > 0) & (processed < 1)).any()


def test_single_lora_file_from_elsewhere_and_text_to_image_set(flux_loras, tmp_path):
    data, loras = flux_loras
    # A lone .safetensors (no iclora_config.json beside it): the base and the trained size come
    # from the flags (without --image_size it would work at FLUX's native 1024).
    lone = tmp_path / "elsewhere" / "my_flux_lora.safetensors"
    lone.parent.mkdir()
    save_file(load_file(loras["blend"] / "pytorch_lora_weights.safetensors"), lone)
    files = cli.main(["--lora_path", str(lone), "--base_model", "tiny-flux", "--prompt", "a set",
                      "--panels_to_inpaint", "all", "--width", "128", "--height", "128", "--image_size", "128",
                      "--seed", "1",
                      "--save_comparison", "--output_dir", str(tmp_path / "out"), *STEPS])
    names = sorted(p.name for p in files)
    assert names == sorted(["generated_0.png", *[f"generated_0_panel{k}.png" for k in range(4)],
                            "generated_comparison.png", "generated_inference.json"])
    assert Image.open(tmp_path / "out" / "generated_0.png").size == (128, 128)


def test_flux_lora_refused_by_the_sdxl_entry_point(flux_loras, tmp_path):
    from iclora.cli import run_cli
    from iclora.inference import sdxl_ic_lora_inference

    _, loras = flux_loras
    with pytest.raises(SystemExit) as exit_info:
        run_cli(sdxl_ic_lora_inference.main, ["--lora_path", str(loras["blend"]), "--prompt", "p",
                                              "--panels_to_inpaint", "all", "--output_dir", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_inference_without_cuda_is_one_clear_error(flux_loras, tmp_path, capsys, mode):
    from iclora.cli import run_cli

    data, loras = flux_loras
    with pytest.raises(SystemExit) as exit_info:
        run_cli(cli.main, ["--lora_path", str(loras["blend"]), "--input_image", str(data / "00001.png"),
                           "--prompt", "p", "--panels_to_inpaint", "3", "--quantize", mode,
                           "--output_dir", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: --quantize {mode} needs a CUDA GPU (bitsandbytes 4/8-bit weights); none was found"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("guidance, warned", [(3.5, True), (30.0, False)])
def test_fill_base_at_dev_guidance_is_warned(flux_loras, caplog, guidance, warned):
    data, loras = flux_loras
    cfg = InferConfig(lora_path=str(loras["concat"]), prompt="a set", input_image=str(data / "00001.png"),
                      backend="flux", guidance_scale=guidance)
    with caplog.at_level("WARNING", logger="iclora.inference.inpaint"):
        load_pipeline(check_inputs(cfg))
    assert any("pass --guidance_scale 30" in r.getMessage() for r in caplog.records) == warned
