"""What only a CUDA GPU can check: QLoRA (bitsandbytes NF4 / int8 FLUX transformer) through
the training and inference CLIs, and mixed-precision training of both backends on the GPU.

    python -m pytest -m gpu tests/test_gpu.py        (needs CUDA; ~1 min on one H100)

Marked `gpu` and excluded from the default run; without CUDA the module is skipped as a
whole (nothing here can run on a CPU: bitsandbytes 4/8-bit weights and fp16 autocast are
CUDA features). The CPU-side behaviour of the same flags is tested in test_train_flux.py.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from iclora.backends.flux import FluxBackend  # noqa: E402
from iclora.inference import flux_ic_lora_inference as flux_infer  # noqa: E402
from iclora.inference import sdxl_ic_lora_inference as sdxl_infer  # noqa: E402
from iclora.panels import Grid, panel_box  # noqa: E402
from iclora.toy import make_dataset  # noqa: E402
from iclora.training import train_flux_ic_lora, train_sdxl_ic_lora  # noqa: E402

LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    make_dataset(folder, n=4, panel_size=64)  # 128 x 128 composites
    return folder


def _flux_train(data, out, *extra):
    return train_flux_ic_lora.main([
        "--data_dir", str(data), "--output_dir", str(out), "--model_id", "tiny-flux", "--image_size", "128",
        "--batch_size", "2", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "5e-3",
        "--save_every", "2", "--seed", "0", "--gradient_checkpointing", "--cache_text_embeddings",
        "--cache_latents", *extra,
    ])


def _panels(path, indices):
    image = np.asarray(Image.open(path).convert("RGB"))
    boxes = [panel_box(i, Grid(2, 2), image.shape[1], image.shape[0]) for i in indices]
    return [image[t:b, l:r] for l, t, r, b in boxes]


@pytest.mark.parametrize("mode, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_load_freezes_bitsandbytes_layers_and_trains_only_lora(mode, layer):
    backend = FluxBackend.from_pretrained("tiny-flux", quantize=mode)
    assert backend.quantized
    kinds = {type(m).__name__ for m in backend.transformer.modules()}
    assert layer in kinds
    assert not any(p.requires_grad for p in backend.transformer.parameters())
    backend.add_lora(4, 4, 0.0)
    trainable = [n for n, p in backend.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_qlora_trains_resumes_and_its_lora_loads_unquantized(data, tmp_path, mode):
    straight = _flux_train(data, tmp_path / "straight", "--max_train_steps", "4", "--quantize", mode)
    assert straight.global_step == 4 and all(np.isfinite(straight.losses))
    assert not torch.backends.cuda.cudnn_sdp_enabled()  # FLUX trains without cuDNN attention (see FluxBackend.to)
    lora = load_file(straight.final_dir / LORA)
    assert lora and all(".lora_" in k for k in lora)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in lora.items())  # B starts at zero
    meta = json.loads((straight.final_dir / "iclora_config.json").read_text())
    assert meta["base_model"] == "tiny-flux"

    # Exact resume of a quantized run: 2 steps, then 2 more from the checkpoint.
    _flux_train(data, tmp_path / "resumed", "--max_train_steps", "2", "--quantize", mode)
    resumed = _flux_train(data, tmp_path / "resumed", "--max_train_steps", "4", "--quantize", mode,
                          "--resume_from_checkpoint", "latest")
    np.testing.assert_allclose(resumed.losses, straight.losses[2:], rtol=1e-3, atol=1e-5)
    got = load_file(resumed.final_dir / LORA)
    for key, value in lora.items():
        torch.testing.assert_close(got[key], value, rtol=1e-3, atol=1e-5)

    # A LoRA trained on the quantized base is a plain LoRA: it loads into the bf16 base.
    backend = FluxBackend.from_pretrained("tiny-flux")
    backend.transformer.to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    cfg = backend.transformer.config
    inputs = dict(
        hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 7, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.6]), guidance=torch.tensor([1.0]), txt_ids=torch.zeros(7, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
    )
    inputs = {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() and k not in ("txt_ids", "img_ids") else v.dtype)
              for k, v in inputs.items()}
    with torch.no_grad():
        before = backend.transformer(**inputs, return_dict=False)[0]
        backend.load_lora(straight.final_dir)
        after = backend.transformer(**inputs, return_dict=False)[0]
    assert torch.isfinite(after).all() and not torch.allclose(before, after)


def test_quantized_flux_inference_keeps_visible_panels(data, tmp_path):
    trained = _flux_train(data, tmp_path / "lora", "--max_train_steps", "2", "--quantize", "nf4")
    source = data / "00001.png"
    files = flux_infer.main([
        "--lora_path", str(trained.final_dir), "--input_image", str(source), "--prompt", "a set",
        "--panels_to_inpaint", "2", "3", "--num_inference_steps", "3", "--quantize", "nf4", "--seed", "3",
        "--output_dir", str(tmp_path / "out"),
    ])
    out = tmp_path / "out" / "00001_0.png"
    assert out in files
    for kept, given in zip(_panels(out, [0, 1]), _panels(source, [0, 1])):
        assert np.array_equal(kept, given)
    assert not np.array_equal(_panels(out, [2])[0], _panels(source, [2])[0])
    record = json.loads((tmp_path / "out" / "00001_inference.json").read_text())
    assert record["arguments"]["quantize"] == "nf4"


def test_flux_inference_on_cuda_runs_in_bfloat16(data, tmp_path):
    """FLUX.1 overflows in float16: on CUDA its default inference dtype is bfloat16."""
    trained = _flux_train(data, tmp_path / "lora", "--max_train_steps", "2")
    from iclora.inference.config import InferConfig
    from iclora.inference.inpaint import check_inputs, load_pipeline

    plan = check_inputs(InferConfig(lora_path=str(trained.final_dir), prompt="a set", backend="flux",
                                    input_image=str(data / "00001.png")))
    from iclora.inference.memory_plan import denoiser_on_device

    backend, pipe = load_pipeline(plan)
    assert pipe.transformer.dtype == torch.bfloat16 and backend.device.type == "cuda"
    denoiser_on_device(backend, pipe)  # as generation places it for the pipeline calls
    assert pipe.transformer.device.type == "cuda" and pipe.text_encoder_2.device.type == "cpu"


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_sdxl_trains_on_cuda_with_8bit_adam_and_infers(data, tmp_path, precision):
    result = train_sdxl_ic_lora.main([
        "--data_dir", str(data), "--output_dir", str(tmp_path / "lora"), "--model_id", "tiny-sdxl-inpaint",
        "--image_size", "128", "--batch_size", "2", "--lora_rank", "4", "--max_train_steps", "3",
        "--mixed_precision", precision, "--use_8bit_adam", "--gradient_checkpointing", "--learning_rate", "1e-3",
    ])
    assert result.global_step == 3 and all(np.isfinite(result.losses))
    lora = load_file(result.final_dir / LORA)
    assert all(torch.isfinite(v).all() for v in lora.values())
    source = data / "00002.png"
    sdxl_infer.main([
        "--lora_path", str(result.final_dir), "--input_image", str(source), "--prompt", "a set",
        "--panels_to_inpaint", "3", "--num_inference_steps", "3", "--output_dir", str(tmp_path / "out"),
    ])
    out = tmp_path / "out" / "00002_0.png"
    for kept, given in zip(_panels(out, [0, 1, 2]), _panels(source, [0, 1, 2])):
        assert np.array_equal(kept, given)


def test_quantized_run_keeps_t5_and_the_transformer_apart(data, tmp_path):
    """The memory plan with a real NF4 transformer (loaded onto the GPU by bitsandbytes): it
    leaves the GPU while T5 encodes the captions, T5 leaves before training, and every
    phase has its GPU peak recorded."""
    out = tmp_path / "plan"
    _flux_train(data, out, "--max_train_steps", "2", "--quantize", "nf4", "--validation_every", "2",
                "--validation_inference_steps", "2")
    records = json.loads((out / "memory_phases.json").read_text())
    load = records[0]["models"]
    assert load["transformer"]["on_device"] and load["transformer"]["dtype"].startswith("nf4")
    assert load["text_encoder_2"]["dtype"] == "bfloat16" and not load["text_encoder_2"]["on_device"]
    assert records[1]["phase"] == "caching text embeddings"
    assert records[1]["models"]["text_encoder_2"]["on_device"] and not records[1]["models"]["transformer"]["on_device"]
    for r in records:
        assert not (r["models"]["text_encoder_2"]["on_device"] and r["models"]["transformer"]["on_device"]), r["phase"]
        assert r["gpu_peak_reserved_gib"] > 0
    assert {"first step", "sample sheet", "checkpoint", "final save"} <= {r["phase"] for r in records}


def test_quantized_inference_keeps_t5_and_the_nf4_transformer_apart(data, tmp_path):
    """The memory plan with a real NF4 transformer: it leaves the GPU while T5 encodes and
    comes back for the denoising; each phase's record says so, with GPU peaks."""
    trained = _flux_train(data, tmp_path / "lora", "--max_train_steps", "2", "--quantize", "nf4")
    log = tmp_path / "memory.json"
    flux_infer.main(["--lora_path", str(trained.final_dir), "--input_image", str(data / "00001.png"),
                     "--prompt", "a set", "--panels_to_inpaint", "3", "--num_inference_steps", "2", "--quantize", "nf4",
                     "--output_dir", str(tmp_path / "out"), "--memory_log", str(log)])
    records = json.loads(log.read_text())
    assert [r["phase"] for r in records] == ["load", "text encoding", "denoising", "VAE decode"]
    on = lambda r, m: r["models"][m]["on_device"]  # noqa: E731
    for r in records:
        assert not (on(r, "text_encoder_2") and on(r, "transformer")), r["phase"]
        assert r["gpu_peak_reserved_gib"] > 0
    assert on(records[0], "transformer") and on(records[1], "text_encoder_2") and on(records[2], "transformer")
    assert records[2]["models"]["transformer"]["dtype"].startswith("nf4+")


def test_quantized_inference_computes_in_bfloat16(data, tmp_path):
    """No float32 upcast of the unquantized weights at inference (that is training's QLoRA prep)."""
    trained = _flux_train(data, tmp_path / "lora", "--max_train_steps", "2", "--quantize", "nf4")
    from iclora.inference.config import InferConfig
    from iclora.inference.inpaint import check_inputs, load_pipeline

    plan = check_inputs(InferConfig(lora_path=str(trained.final_dir), prompt="a set", backend="flux", quantize="nf4",
                                    input_image=str(data / "00001.png")))
    backend, pipe = load_pipeline(plan)
    floats = {p.dtype for p in pipe.transformer.parameters() if p.is_floating_point()}
    assert floats == {torch.bfloat16}
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
