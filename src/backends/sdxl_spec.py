"""What shared code knows of the SDXL backend (backends/sdxl.py) before loading it."""

from __future__ import annotations

from .registry import BackendSpec, MemoryProfile, register


def tokenizer_pair(model_id: str) -> tuple:
    """The tokenizers of text_encoder and text_encoder_2 (SDXL's and FLUX.1's layout)."""
    from .tiny import is_tiny, tiny_tokenizers

    if is_tiny(model_id):
        return tiny_tokenizers(model_id)
    from transformers import AutoTokenizer

    from ..hub import model_source

    source = model_source(model_id)
    return (AutoTokenizer.from_pretrained(source, subfolder="tokenizer"),
            AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2"))


def caption_tokenizers(model_id: str, max_token_length: int | None) -> list[tuple[str, object, int]]:
    from .sdxl_prompt import DEFAULT_MAX_TOKEN_LENGTH

    first, second = tokenizer_pair(model_id)
    limit = max_token_length or DEFAULT_MAX_TOKEN_LENGTH
    return [("text_encoder (CLIP)", first, limit), ("text_encoder_2 (CLIP)", second, limit)]


SDXL_UNET_PARAMS = 2_567_463_684  # stabilityai/stable-diffusion-xl-base-1.0's UNet, whose rows the fit is of


def memory_parts() -> dict:
    """The models the memory estimate builds on the meta device (prepare/memory.py)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .sdxl_lora import CONCAT_CHANNELS, LORA_TARGET_MODULES

    def extra_lora(unet, conditioning: str) -> int:  # concat trains the widened conv_in in full
        if conditioning != "concat":
            return 0
        conv = unet.conv_in
        return conv.out_channels * (CONCAT_CHANNELS * conv.kernel_size[0] * conv.kernel_size[1] + 1)

    def shape(unet, parameters: int) -> tuple[float, dict]:
        # A UNet's activations go with its channel widths: about the square root of its parameters.
        return (parameters / SDXL_UNET_PARAMS) ** 0.5, {}

    return {"denoiser": ("unet", UNet2DConditionModel),
            "text_encoders": [("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)],
            "lora_targets": LORA_TARGET_MODULES, "extra_lora": extra_lora, "shape": shape,
            "shard_units": lambda unet: [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]}


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
    # Every ResNet block's two 3x3 convs (no other UNet layer has these names), on by default.
    # The LoRA's attention layers leave the UNet's full-resolution stage (down_blocks.0 and the
    # last up block have no attention) as it was; on the known-answer toys the convs are what
    # let SDXL read the visible panels on bases where attention alone did not, and they
    # completed better on every SDXL member measured (RESULTS.md, *--lora_convs*).
    lora_conv_targets=("conv1", "conv2"),
    lora_convs=True,
    conv_params_per_rank=327_040,
    caption_tokenizers=caption_tokenizers,
    # Activations per latent pixel: fp16 1024² batch 1 -> 4, 7.53 -> 10.44 GiB reserved;
    # bf16 1024² without checkpointing, 15.36 GiB. The VAE stays float32; classifier-free
    # guidance runs the UNet on twice the batch.
    memory=MemoryProfile(memory_parts, activations=0.97 / 16384, unchecked_activations=9.74 / 16384,
                         vae_float32=True, guidance_doubles_batch=True),
    lora_prefix="unet",
    comfyui_converter="iclora.backends.lora_formats:sdxl_comfyui_file",
    merged_export="iclora.backends.sdxl_export:export_unet",
))
