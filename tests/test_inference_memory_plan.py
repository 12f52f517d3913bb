"""Inference's memory plan (inference/memory_plan.py) through the CLIs' main(argv), tiny models:

- the images of a fixed seed are those the code before the plan made (every prompt then
  encoded inside the pipeline call, every model on the device for the whole run):
  tests/data/inference_plan_reference.safetensors, written by
  `python tests/test_inference_memory_plan.py --write` on that code (torch 2.13 CPU) and not
  to be rewritten by the code under test;
- --memory_log records each phase, and in the FLUX example's settings (NF4, bf16, context,
  3x1 storyboards) T5 and the transformer are never on the device together; quantized
  inference computes in bf16.

The device is the CPU here, so "on the device" is the backends' own record
(backends/placement.py): what a GPU run would have there.

    pytest tests/test_inference_memory_plan.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REFERENCE = Path(__file__).parent / "data" / "inference_plan_reference.safetensors"
STEPS = ["--num_inference_steps", "2", "--seed", "5", "--image_size", "64"]
# name -> (CLI module, flags): one input at batch 2 (images of one prompt), a folder of two
# inputs with their own prompts in one call, a negative prompt, each pipeline family.
CASES = {
    "sdxl_blend": ("sdxl", ["--base_model", "tiny-sdxl", "--conditioning", "blend", "--num_images", "2",
                            "--batch_size", "2", "--negative_prompt", "blurry"]),
    "sdxl_context_folder": ("sdxl", ["--base_model", "tiny-sdxl", "--conditioning", "context", "--batch_size", "2",
                                     "FOLDER"]),
    "flux_blend": ("flux", ["--base_model", "tiny-flux", "--conditioning", "blend", "--num_images", "2",
                            "--batch_size", "2"]),
    "flux_context_folder": ("flux", ["--base_model", "tiny-flux", "--conditioning", "context", "--batch_size", "2",
                                     "FOLDER"]),
    "flux_fill": ("flux", ["--base_model", "tiny-flux-fill", "--conditioning", "concat", "--guidance_scale", "30",
                           "--num_images", "2", "--batch_size", "2"]),
    "flux2_context": ("flux2", ["--base_model", "tiny-flux2", "--conditioning", "context", "--num_images", "2",
                                "--batch_size", "2", "--max_token_length", "128"]),
}


def _cli(family: str):
    import importlib

    return importlib.import_module(f"iclora.inference.{family}_ic_lora_inference")


def _inputs(folder: Path) -> Path:
    """Two 64x64 2x2 composites of fixed pixels with their own prompts (NAME.txt)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(["a red set", "a blue set of four"]):
        generator = torch.Generator().manual_seed(20 + i)
        pixels = torch.randint(0, 256, (64, 64, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy(), "RGB").save(folder / f"in{i}.png")
        (folder / f"in{i}.txt").write_text(prompt)
    return folder


def run_case(name: str, root: Path, extra: list[str] = ()) -> dict[str, np.ndarray]:
    """The case's composites, by file name, as (H, W, 3) uint8."""
    family, flags = CASES[name]
    inputs = _inputs(root / "inputs")
    out = root / name
    source = ["--input_dir", str(inputs)] if "FOLDER" in flags else ["--input_image", str(inputs / "in0.png")]
    argv = ["--lora_path", "none", "--prompt", "a set", "--panels_to_inpaint", "3", "--output_dir", str(out),
            *source, *STEPS, *[f for f in flags if f != "FOLDER"], *extra]
    _cli(family).main(argv)
    return {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in sorted(out.glob("*.png"))
            if "_panel" not in p.stem}


def write_reference(root: Path) -> None:
    from safetensors.torch import save_file

    tensors = {f"{name}/{stem}": torch.from_numpy(image.copy())
               for name in CASES for stem, image in run_case(name, root).items()}
    save_file(tensors, str(REFERENCE))
    print(f"wrote {len(tensors)} images to {REFERENCE}")


@pytest.mark.parametrize("name", list(CASES))
def test_a_seed_makes_the_images_it_made_before_the_plan(name, tmp_path):
    from safetensors.torch import load_file

    reference = {k.split("/", 1)[1]: v.numpy() for k, v in load_file(str(REFERENCE)).items()
                 if k.startswith(f"{name}/")}
    images = run_case(name, tmp_path, ["--memory_log", str(tmp_path / "memory.json")])
    assert sorted(images) == sorted(reference) and reference
    for stem, image in images.items():
        # Another CPU's summation order may move a channel by one; the plan moves none here.
        diff = np.abs(image.astype(int) - reference[stem].astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01, (stem, diff.max(), diff.mean())
    records = json.loads((tmp_path / "memory.json").read_text())
    phases = [r["phase"] for r in records]
    assert phases == ["load", "text encoding", "denoising", "VAE decode"], phases  # two images, one call
    for r in records:  # every backend (FLUX.2's one Qwen3 encoder too), by the parts its models make up
        on = {m["part"] for m in r["models"].values() if m["on_device"]}
        assert on == {"load": set(), "text encoding": {"text_encoders"}}.get(r["phase"], {"denoiser", "vae"}), r


def _on(record: dict, model: str) -> bool:
    return record["models"][model]["on_device"]


def test_flux_example_settings_keep_t5_and_the_transformer_apart(tmp_path, monkeypatch):
    """The FLUX example's inference: NF4 (bitsandbytes needs CUDA: here the tiny transformer
    loaded in bf16 and marked quantized, so that everything about it but the packed weights
    is the real path), bf16, context conditioning, a 3x1 storyboard at 2:3."""
    from iclora.backends import flux
    from iclora.toy import make_dataset

    real_load = flux.FluxBackend.from_pretrained.__func__
    seen: dict[str, list] = {"loaded": [], "inputs": []}

    def load(cls, model_id, conditioning=None, quantize=None, **options):
        seen["loaded"].append((quantize, options.get("dtype")))
        backend = real_load(cls, model_id, conditioning=conditioning, **options)
        backend.quantized = quantize is not None  # bitsandbytes would load it onto the GPU, as placement assumes
        # The image tokens' embedding: the first layer every denoising forward runs.
        backend.transformer.x_embedder.register_forward_pre_hook(lambda module, args: seen["inputs"].append(args[0].dtype))
        return backend

    def prepared(_):
        raise AssertionError("inference must not prepare the quantized transformer for training (float32 upcast)")

    monkeypatch.setattr(flux.FluxBackend, "from_pretrained", classmethod(load))
    monkeypatch.setattr(flux, "prepare_quantized", prepared)
    data = tmp_path / "data"
    make_dataset(data, n=1, panel_size=32, grid=(3, 1))
    log = tmp_path / "memory.json"
    _cli("flux").main(["--lora_path", "none", "--base_model", "tiny-flux", "--conditioning", "context",
                       "--quantize", "nf4", "--dtype", "bfloat16", "--grid", "3x1",
                       "--input_image", str(next(data.glob("*.png"))), "--prompt", "a storyboard",
                       "--panels_to_inpaint", "1", "2", "--num_images", "2", "--output_dir", str(tmp_path / "out"),
                       "--num_inference_steps", "2", "--memory_log", str(log)])
    assert seen["loaded"] == [("nf4", torch.bfloat16)]
    records = json.loads(log.read_text())
    assert [r["phase"] for r in records] == ["load", "text encoding", "denoising", "VAE decode",
                                             "denoising", "VAE decode"]  # --batch_size 1: two calls
    for r in records:
        assert not (_on(r, "text_encoder_2") and _on(r, "transformer")), r["phase"]
        assert not (_on(r, "text_encoder") and _on(r, "transformer")), r["phase"]
        assert all(m["dtype"] == "bfloat16" for m in r["models"].values()), r
        assert r["host_peak_rss_gib"] >= r["host_rss_gib"] > 0
    load, text, *calls = records
    assert _on(load, "transformer") and not _on(load, "text_encoder_2") and not _on(load, "vae")
    assert _on(text, "text_encoder_2") and _on(text, "text_encoder") and not _on(text, "transformer")
    for r in calls:
        assert _on(r, "transformer") and _on(r, "vae") and not _on(r, "text_encoder_2")
    # Quantized inference computes in bf16: every denoising step's input.
    assert seen["inputs"] and set(seen["inputs"]) == {torch.bfloat16}


def test_sdxl_text_encoders_leave_before_the_unet_runs(tmp_path):
    log = tmp_path / "memory.json"
    run_case("sdxl_context_folder", tmp_path, ["--memory_log", str(log)])
    records = json.loads(log.read_text())
    assert [r["phase"] for r in records] == ["load", "text encoding", "denoising", "VAE decode"]
    assert not any(_on(r, "unet") for r in records[:2])
    assert all(_on(r, "text_encoder") and _on(r, "text_encoder_2") for r in records[1:2])
    for r in records[2:]:
        assert _on(r, "unet") and _on(r, "vae") and not _on(r, "text_encoder") and not _on(r, "text_encoder_2")


def test_a_memory_log_that_cannot_be_written_is_refused_before_loading(tmp_path, capsys):
    from iclora.cli import run_cli

    inputs = _inputs(tmp_path / "inputs")
    (tmp_path / "file").write_text("")
    for target, says in [(tmp_path, "a folder; give the JSON file to write"), (tmp_path / "file" / "m.json", "is a file")]:
        argv = ["--lora_path", "none", "--base_model", "tiny-sdxl", "--input_image", str(inputs / "in0.png"),
                "--prompt", "a set", "--output_dir", str(tmp_path / "out"), "--memory_log", str(target)]
        with pytest.raises(SystemExit):
            run_cli(_cli("sdxl").main, argv)
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --memory_log") and says in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_inference_memory_plan.py --write")
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        write_reference(Path(folder))
