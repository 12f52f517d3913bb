"""SDXL backend: UNet2DConditionModel, two CLIP text encoders, DDPM-style noise.

With `concat` conditioning the UNet sees 9 input channels (noisy latent, mask, masked-image
latent), the SDXL inpainting layout; a 4-channel base gets its `conv_in` widened, trained
fully beside the LoRA (sdxl_lora.py: the widening and the LoRA's and conv_in's files).
"""

from __future__ import annotations

import logging
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionXLInpaintPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention import BasicTransformerBlock
from peft import LoraConfig
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..panels import latent_mask
from .base import TimestepSampling, visible_reset_callback
from .placement import PARTS, Placement
from ..compiling import CompiledBlocks, compiled_block_counts
from .lora_files import COMFYUI_WEIGHT_NAME, CONV_IN_WEIGHT_NAME  # noqa: F401 (callers import the file name from here)
from .sdxl_lora import (  # noqa: F401 (LORA_TARGET_MODULES: callers import it from here)
    CONCAT_CHANNELS, LORA_TARGET_MODULES, SDXLLoraFiles, lora_targets, widen_conv_in,
)
from .latents import LatentMethods
from .sdxl_context import SDXLContextPipeline
from .sdxl_latents import SDXLLatents
from .sdxl_spec import SPEC
from .sdxl_prompt import DEFAULT_MAX_TOKEN_LENGTH, encode_long_prompt, token_count
from .tiny import TINY_MODELS, is_tiny
from .trainable import load_trainable_state, trainable_state

logger = logging.getLogger(__name__)

KOHYA_WEIGHT_NAME = COMFYUI_WEIGHT_NAME  # the kohya-key file; its name before it was written by default


class SDXLBackend(LatentMethods, SDXLLoraFiles, Placement):
    name = "sdxl"
    vae_scale_factor = 8
    pixel_quantum = 8
    native_image_size = 1024  # SDXL's own generation size (128 latents)
    preferred_mixed_precision = SPEC.preferred_mixed_precision
    quantized = False  # SDXL loads unquantized (from_pretrained refuses --quantize)
    compiled: CompiledBlocks | None = None  # until compile_blocks
    max_token_length = DEFAULT_MAX_TOKEN_LENGTH  # unless from_pretrained is given one
    timestep_sampling = TimestepSampling(SPEC.timestep_sampling)  # DDPM's own: every t alike
    part_modules = {"denoiser": ("unet",), "text_encoders": ("text_encoder", "text_encoder_2"), "vae": ("vae",)}

    def __init__(
        self, components: dict[str, Any], base_model: str, conditioning: str | None, context_timestep: str | None = None,
        max_token_length: int | None = None,
    ):
        self.base_model = base_model
        self.max_token_length = max_token_length or DEFAULT_MAX_TOKEN_LENGTH
        self.conditioning = conditioning
        self.unet: UNet2DConditionModel = components["unet"]
        self.vae: AutoencoderKL = components["vae"]
        self.text_encoder = components["text_encoder"]
        self.text_encoder_2 = components["text_encoder_2"]
        self.tokenizer = components["tokenizer"]
        self.tokenizer_2 = components["tokenizer_2"]
        self.inference_scheduler = components["scheduler"]
        # Training always uses the DDPM forward process of the model's own beta schedule.
        self.noise_scheduler = DDPMScheduler.from_config(self.inference_scheduler.config)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.pixel_quantum = self.vae_scale_factor

        base_channels = self.base_in_channels = self.unet.config.in_channels
        if conditioning is None:  # a bare base model: use it the way it was built
            conditioning = self.conditioning = "concat" if base_channels == CONCAT_CHANNELS else "blend"
        self._base_conv_in = None
        if conditioning == "concat":
            if base_channels not in (4, CONCAT_CHANNELS):
                raise ValueError(f"--model_id {base_model}: UNet has {base_channels} input channels, expected 4 or 9")
            # The inpainting base's own conv_in: the ComfyUI file carries the trained one as a
            # difference against it.
            if base_channels == CONCAT_CHANNELS:
                conv = self.unet.conv_in
                self._base_conv_in = (conv.weight.detach().float().clone(), conv.bias.detach().float().clone())
            widen_conv_in(self.unet, CONCAT_CHANNELS)
        elif conditioning in ("blend", "context"):
            if base_channels != 4:
                raise ValueError(
                    f"--conditioning {conditioning} needs a 4-channel UNet, {base_model} has {base_channels}: "
                    "use --conditioning concat"
                )
        else:
            raise ValueError(f"--conditioning: expected concat, blend or context, got {conditioning!r}")
        if context_timestep not in (None, "shared") or (context_timestep and conditioning != "context"):
            # The UNet takes one timestep per sample: clean panels share the current t.
            raise ValueError(
                f"--context_timestep {context_timestep}: SDXL supports only 'shared', with --conditioning context"
            )
        self.context_timestep = "shared" if conditioning == "context" else None
        self.denoiser = self.unet
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            module.requires_grad_(False)
        pipeline = SDXLContextPipeline if conditioning == "context" else StableDiffusionXLInpaintPipeline
        self._prompt_pipe = pipeline(**self._components())
        if conditioning == "context":  # its loop runs training's prediction
            self._prompt_pipe.predict = self.predict
        self._checked_prompts: set[str] = set()

    @classmethod
    def from_pretrained(
        cls, model_id: str, conditioning: str | None = "concat", variant: str | None = None, vae: str | None = None,
        quantize: str | None = None, context_timestep: str | None = None, max_token_length: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> "SDXLBackend":
        """Load from a hub id, a local diffusers folder, or a built-in tiny model id. `dtype`:
        load the UNet and text encoders in it (not float32 first: half the host memory)."""
        if quantize:
            # The SDXL UNet (2.6 B parameters) trains in 16 GB in fp16 with checkpointing and
            # 8-bit Adam; a 4/8-bit base buys little and costs speed.
            raise ValueError(f"--quantize {quantize} is for the flux backend; SDXL runs unquantized")
        if is_tiny(model_id):
            if not model_id.startswith("tiny-sdxl"):
                raise ValueError(f"--model_id {model_id} is not an SDXL model")
            components = TINY_MODELS[model_id]()
            if vae:
                components["vae"] = AutoencoderKL.from_pretrained(vae)
        else:
            kw = {"variant": variant} if variant else {}
            weights = {**kw, "torch_dtype": dtype} if dtype else kw  # the VAE stays float32 (see to())
            components = {
                "unet": UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", **weights),
                "vae": AutoencoderKL.from_pretrained(vae) if vae else AutoencoderKL.from_pretrained(model_id, subfolder="vae", **kw),
                "text_encoder": CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder", **weights),
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(model_id, subfolder="text_encoder_2",
                                                                              **weights),
                "tokenizer": CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer"),
                "tokenizer_2": CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer_2"),
                "scheduler": _load_scheduler(model_id),
            }
        return cls(components, model_id, conditioning, context_timestep, max_token_length)

    def _components(self) -> dict[str, Any]:
        return {
            "vae": self.vae, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
            "tokenizer": self.tokenizer, "tokenizer_2": self.tokenizer_2, "unet": self.unet,
            "scheduler": self.inference_scheduler,
        }

    # ---- set-up -------------------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float, dropout: float, convs: bool = False) -> None:
        config = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
            target_modules=lora_targets(convs),
        )
        self.unet.add_adapter(config)
        if self.conditioning == "concat":
            self.unet.conv_in.requires_grad_(True)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def fully_trained_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.unet.conv_in.parameters()) if self.conditioning == "concat" else []

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def shard_units(self) -> list[torch.nn.Module]:
        # The transformer blocks hold most of the UNet's weights and run one after another.
        return [m for m in self.unet.modules() if isinstance(m, BasicTransformerBlock)]

    def compile_blocks(self, **options: Any) -> CompiledBlocks:
        # The UNet's forward calls its transformer blocks as modules (the context pipeline's
        # loop too), checkpointed or not: compiling the blocks compiles what runs.
        self.unet.compile_repeated_blocks(**options)
        self.compiled = CompiledBlocks(compiled_block_counts(self.unet), self.denoiser)
        return self.compiled

    def to(self, device: torch.device, dtype: torch.dtype, parts=PARTS) -> None:
        """As FluxBackend.to: cast where they lie, then `parts` onto the device."""
        self._on_device()
        self.device = torch.device(device)
        # The VAE stays float32: SDXL's VAE overflows in float16.
        self.vae.to(dtype=torch.float32)
        self.text_encoder.to(dtype=dtype)
        self.text_encoder_2.to(dtype=dtype)
        self.unet.to(dtype=dtype)
        for part in parts:
            self.place(part, True)
        for p in self.trainable_parameters():
            p.data = p.data.float()

    # ---- training math -------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        self._warn_truncation(prompts)
        return encode_long_prompt(
            list(prompts), [self.tokenizer, self.tokenizer_2], [self.text_encoder, self.text_encoder_2],
            self.max_token_length, self.text_encoder_2.device,
        )  # (B, L + 2, D), (B, D2)

    def unconditional_prompt(self) -> dict[str, torch.Tensor]:
        empty = self.encode_prompt([""])
        if self._prompt_pipe.config.force_zeros_for_empty_prompt:  # as the pipeline feeds guidance without a negative prompt
            return {k: torch.zeros_like(v) for k, v in empty.items()}
        return empty

    def _warn_truncation(self, prompts: list[str]) -> None:
        """Warn once per prompt that the text encoders read only --max_token_length tokens."""
        limit = self.max_token_length
        for prompt in set(prompts) - self._checked_prompts:
            self._checked_prompts.add(prompt)
            length = token_count(self.tokenizer, prompt)
            if length > limit:
                logger.warning("prompt of %d tokens is cut to --max_token_length %d: %.60s...", length, limit, prompt)

    @property
    def codec(self) -> SDXLLatents:
        return SDXLLatents(self.vae)

    def masked_image_latents(self, pixels: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor | None:
        if self.conditioning != "concat":
            return None
        # As StableDiffusionXLInpaintPipeline: masked pixels become 0 (mid-grey) in [-1, 1].
        return self.codec.encode_mean(pixels * (pixel_mask < 0.5))

    def noise_latents(self, latents, noise, generator):
        steps = self.noise_scheduler.config.num_train_timesteps
        if self.timestep_sampling.scheme == "uniform":
            timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator)
        else:  # a noise level u in [0, 1) -> DDPM's t (999 = the noisiest)
            u = self.timestep_sampling.draw(latents.shape[0], generator)
            timesteps = (u * steps).long().clamp(0, steps - 1)
        timesteps = timesteps.to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return noisy, timesteps, target

    def predict(self, noisy, timesteps, prompt_embeds, mask, masked_latents, batch):
        if self.conditioning == "concat":
            noisy = torch.cat([noisy, mask.to(noisy.dtype), masked_latents.to(noisy.dtype)], dim=1)  # (B, 9, h, w)
        height, width = noisy.shape[-2] * self.vae_scale_factor, noisy.shape[-1] * self.vae_scale_factor
        target_size = torch.tensor([height, width], device=noisy.device).expand(noisy.shape[0], 2)
        time_ids = torch.cat(
            [batch["original_size"].to(noisy.device), batch["crop_top_left"].to(noisy.device), target_size], dim=1
        )  # (B, 6): SDXL micro-conditioning
        dtype = prompt_embeds["pooled_prompt_embeds"].dtype
        return self.denoiser(
            noisy,
            timesteps,
            encoder_hidden_states=prompt_embeds["prompt_embeds"].to(noisy.device),
            added_cond_kwargs={
                "text_embeds": prompt_embeds["pooled_prompt_embeds"].to(noisy.device),
                "time_ids": time_ids.to(dtype),
            },
            return_dict=False,
        )[0]

    # ---- weights -------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.unet)

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(self.unet, state)

    def visible_reset(self, pipe, images: list, masks: torch.Tensor, seeds: list[int]) -> dict[str, Any]:
        """For concat inference: after every step, the visible panels' latents are reset to the
        input's noised to the next timestep, the input itself after the last (the 9-channel
        UNet then sees there what training showed it: q(x_t | x_0) of the input). diffusers'
        inpaint pipeline does this for 4-channel UNets only; ComfyUI's InpaintModelConditioning
        does it by default (noise_mask). Without it the visible latents follow the model's
        own unsupervised predictions and drift into another picture that the LoRA copies from.
        `images` and `masks` (b, 1, H, W): one for every seed, or one per seed. The noise is
        each image's own, from its seed. Returns the pipeline call's kwargs."""
        if self.conditioning != "concat":
            return {}
        device, dtype = pipe._execution_device, pipe.unet.dtype
        height, width = masks.shape[-2:]
        pixels = pipe.image_processor.preprocess(images, height=height, width=width).to(device, torch.float32)
        # One input at a time, as the pipeline encodes them.
        clean = SDXLLatents(pipe.vae).encode_mean(pixels, one_at_a_time=True).to(dtype)  # (b, 4, h, w)
        masked = latent_mask(masks.to(device), self.vae_scale_factor).to(dtype)  # (b, 1, h, w), soft
        noise = torch.cat([torch.randn((1, *clean.shape[1:]), generator=torch.Generator("cpu").manual_seed(seed))
                           for seed in seeds]).to(device, dtype)  # (B, 4, h, w)

        return visible_reset_callback(clean, noise, masked, lambda scheduler, x, n, t: scheduler.add_noise(x, n, t))

    def pipeline_prompt(self, prompt: str, negative_prompt: str | None, guidance_scale: float) -> dict[str, Any]:
        """The prompt as the inpaint pipeline's embeddings, made by encode_prompt: inference
        reads a prompt exactly as training did (the pipeline itself would cut it at 77)."""
        embeds = self.encode_prompt([prompt])
        kwargs = dict(embeds)
        if guidance_scale > 1 or negative_prompt is not None:  # (> 1: diffusers' classifier-free guidance)
            negative = self.unconditional_prompt() if negative_prompt is None else self.encode_prompt([negative_prompt])
            kwargs["negative_prompt_embeds"] = negative["prompt_embeds"]
            kwargs["negative_pooled_prompt_embeds"] = negative["pooled_prompt_embeds"]
        return kwargs

    encoded_pipeline_prompt = pipeline_prompt  # embeddings already

    def inpaint_pipeline(self) -> StableDiffusionXLInpaintPipeline:
        return self._prompt_pipe


def _load_scheduler(model_id: str):
    """The scheduler class the model folder names (EulerDiscreteScheduler for SDXL base)."""
    config = DDPMScheduler.load_config(model_id, subfolder="scheduler")  # any scheduler class reads the file
    return getattr(diffusers, config["_class_name"]).from_config(config)
