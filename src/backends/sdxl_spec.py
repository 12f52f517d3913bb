"""What shared code knows of the SDXL backend (backends/sdxl.py) before loading it."""

from .registry import BackendSpec, register

SPEC = register(BackendSpec(
    name="sdxl",
    label="SDXL",
    backend_class="iclora.backends.sdxl:SDXLBackend",
    train_defaults={"backend": "sdxl", "model_id": "stabilityai/stable-diffusion-xl-base-1.0", "lora_rank": 64,
                    "lora_alpha": 64},
    infer_defaults={"backend": "sdxl", "num_inference_steps": 50, "guidance_scale": 7.5},
    train_script="iclora.training.train_sdxl_ic_lora",
    infer_script="iclora.inference.sdxl_ic_lora_inference",
    preferred_mixed_precision="fp16",
    params_per_rank=2_616_320,
    timestep_sampling="uniform",
    # With concat the visible panels count half as much as the masked ones: on the harder
    # known-answer toy (benchmarks/RESULTS.md) the widened conv_in then reads the visible
    # colour far better.
    concat_visible_loss_weight=0.5,
    concat_trains_conv_in=True,
))
