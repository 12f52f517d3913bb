"""FLUX.1 backend: FluxTransformer2DModel on rectified flow, CLIP + T5 text encoders.

Latents cross the contract as (B, C, h, w). Only `predict` turns them into the
transformer's token sequence of 2x2 latent patches (diffusers' `_pack_latents`, one token
per patch, 4C channels) and back, so panel boundaries must fall on 2 latent pixels:
`pixel_quantum` = 2 * vae_scale_factor = 16.

Conditioning:
    blend   FLUX.1-dev (transformer in_channels = 4C): the input is the packed noisy
            latents only; FluxInpaintPipeline blends the visible panels back each step.
    context FLUX.1-dev (in_channels = 4C): visible tokens enter clean, masked ones noisy;
            with context_timestep 'zero' the clean tokens are modulated as timestep 0
            (flux_context.py). FluxContextPipeline never re-noises them at inference.
    concat  FLUX.1-Fill-dev (in_channels = 4C + 4C + 4 f^2): per token [noisy latents,
            masked-image latents, mask], exactly as FluxFillPipeline builds it. Its mask
            channels are the *pixel* mask cut into f x f blocks; we rebuild that from the
            latent mask by nearest upsampling, which is exact because training panel masks
            are aligned to latent pixels.

Training choices, and why:
    sigma    logit-normal (mean 0, std 1), continuous, as diffusers'
             train_dreambooth_lora_flux.py with --weighting_scheme logit_normal and
             ai-toolkit's default ("sigmoid") timesteps. With --timestep_shift resolution
             each drawn sigma is moved as the scheduler moves inference's schedule for the
             composite's token count (`inference_shift`: mu from calculate_shift, as
             the SD3 paper's section 5.3.2 and SimpleTuner's flux_schedule_auto_shift do);
             diffusers' FLUX scripts apply no shift in training.
    guidance the guidance embedding is fed 1.0 (TRAIN_GUIDANCE), as ai-toolkit does
             (cfg_scale 1.0), which trained the official IC-LoRAs; diffusers' script
             feeds --guidance_scale 3.5. Inference still runs at 3.5 (dev) / 30 (Fill).

Beside this file: flux_latents.py (the token layout, VAE scaling), flux_loading.py (the
components, quantized or not), flux_lora.py (LoRA targets and files), flux_context.py (the
context conditioning's pipeline and per-token timesteps).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FluxFillPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from peft import LoraConfig

from ..panels import latent_mask
from .base import TimestepSampling, visible_reset_callback
from .placement import PARTS, Placement
from ..compiling import CompiledBlocks, compiled_block_counts
from .flux_context import CONTEXT_TIMESTEPS, ContextDenoiser, FluxContextPipeline, clean_token_mask, shift_mu
from .flux_latents import FluxLatents, fill_mask_channels, pack, unpack
from .latents import LatentMethods
from . import flux_lora
from .flux_loading import QUANTIZE_CONFIGS, load_components, prepare_quantized
from .flux_spec import SPEC
from .flux_lora import LORA_TARGET_MODULES
from .trainable import TransformerWeights

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512  # T5 tokens, FLUX.1-dev's maximum
TRAIN_GUIDANCE = 1.0  # guidance-embedding input during training (see the module docstring)


def inference_shift(scheduler, sigmas: torch.Tensor, image_seq_len: int) -> torch.Tensor:
    """`sigmas` in [0, 1] moved as `scheduler` moves an inference schedule for an image of
    `image_seq_len` packed tokens: its time shift with mu from `calculate_shift` where it
    shifts by resolution (FLUX.1-dev: exp(mu) ~ 3.2 at 1024 x 1024), else its fixed shift."""
    config = scheduler.config
    if config.get("use_dynamic_shifting"):
        return scheduler.time_shift(shift_mu(config, image_seq_len), 1.0, sigmas)
    shift = config.get("shift", 1.0)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FluxBackend(TransformerWeights, LatentMethods, Placement):
    name = "flux"
    lora_module = flux_lora  # save_lora / comfyui_state / load_lora (TransformerWeights)
    vae_scale_factor = 8
    pixel_quantum = 16  # a packed 2x2 patch of latent pixels
    native_image_size = 1024  # FluxPipeline's default_sample_size 128 latents
    preferred_mixed_precision = SPEC.preferred_mixed_precision
    max_token_length = 75  # CLIP tokens read (CLIP gives only the pooled embedding; T5 reads 512)
    timestep_sampling = TimestepSampling(SPEC.timestep_sampling)  # SD3's, as diffusers' FLUX scripts train
    compiled: CompiledBlocks | None = None  # until compile_blocks
    part_modules = {"denoiser": ("transformer",), "text_encoders": ("text_encoder", "text_encoder_2"), "vae": ("vae",)}

    def __init__(
        self, components: dict[str, Any], base_model: str, conditioning: str | None, context_timestep: str | None = None
    ):
        if conditioning is None:  # a bare base model: use it the way it was built
            fill_channels = 2 * 4 * components["vae"].config.latent_channels + 4 * 8**2
            conditioning = "concat" if components["transformer"].config.in_channels == fill_channels else "blend"
        if conditioning not in ("blend", "concat", "context"):
            raise ValueError(f"--conditioning: expected blend, concat or context, got {conditioning!r}")
        if context_timestep is not None and (conditioning != "context" or context_timestep not in CONTEXT_TIMESTEPS):
            raise ValueError(
                f"--context_timestep {context_timestep}: expected one of {', '.join(CONTEXT_TIMESTEPS)}, "
                "with --conditioning context"
            )
        self.context_timestep = (context_timestep or CONTEXT_TIMESTEPS[0]) if conditioning == "context" else None
        self.base_model = base_model
        self.conditioning = conditioning
        self.transformer: FluxTransformer2DModel = components["transformer"]
        self.vae: AutoencoderKL = components["vae"]
        self.text_encoder = components["text_encoder"]
        self.text_encoder_2 = components["text_encoder_2"]
        self.tokenizer = components["tokenizer"]
        self.tokenizer_2 = components["tokenizer_2"]
        self.scheduler = components["scheduler"]
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.pixel_quantum = 2 * self.vae_scale_factor
        self.quantized = getattr(self.transformer, "hf_quantizer", None) is not None

        packed = 4 * self.vae.config.latent_channels
        fill = 2 * packed + 4 * self.vae_scale_factor**2
        channels = self.transformer.config.in_channels
        if conditioning == "concat" and channels != fill:
            raise ValueError(
                f"--conditioning concat needs a FLUX.1-Fill base (transformer with {fill} input channels); "
                f"{base_model} has {channels}: use --conditioning blend"
            )
        if conditioning in ("blend", "context") and channels != packed:
            raise ValueError(
                f"--conditioning {conditioning} needs a FLUX.1 base with {packed} transformer input channels; "
                f"{base_model} has {channels} (a FLUX.1-Fill model?): use --conditioning concat"
            )
        # Per-token modulation runs through its own forward; the wrapper keeps it the module
        # a distributed wrapper calls.
        self.denoiser = ContextDenoiser(self.transformer) if self.context_timestep == "zero" else self.transformer
        for module in (self.transformer, self.vae, self.text_encoder, self.text_encoder_2):
            module.requires_grad_(False)
        pipeline = {"concat": FluxFillPipeline, "blend": FluxInpaintPipeline, "context": FluxContextPipeline}[conditioning]
        self._pipe = pipeline(**self._components())
        if conditioning == "context":  # its loop runs training's prediction
            self._pipe.context_timestep = self.context_timestep
            self._pipe.predict = self.predict
            if self.context_timestep == "zero":
                self._pipe.context_denoiser = self.denoiser
        self._checked_prompts: set[str] = set()
        self._clip_warned = False

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        conditioning: str | None = "blend",
        variant: str | None = None,
        vae: str | None = None,
        quantize: str | None = None,
        context_timestep: str | None = None,
        max_token_length: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> "FluxBackend":
        """Load from a hub id, a local diffusers folder, or a built-in tiny model id. `dtype`:
        load the transformer (unless quantized: bf16 around the 4/8-bit weights) and the text
        encoders in it (FLUX.1-dev and its T5 in float32 would take ~67 GB of host memory first)."""
        if max_token_length not in (None, cls.max_token_length):
            raise ValueError(f"--max_token_length {max_token_length} is for SDXL: FLUX's CLIP reads 75 tokens")
        if quantize is not None:
            if quantize not in QUANTIZE_CONFIGS:
                raise ValueError(f"--quantize: expected one of {', '.join(QUANTIZE_CONFIGS)}, got {quantize!r}")
            if not torch.cuda.is_available():
                raise ValueError(f"--quantize {quantize} needs a CUDA GPU (bitsandbytes 4/8-bit weights); none was found")
        components = load_components(model_id, variant, vae, quantize, dtype)
        return cls(components, model_id, conditioning, context_timestep)

    def _components(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler, "vae": self.vae, "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer, "text_encoder_2": self.text_encoder_2, "tokenizer_2": self.tokenizer_2,
            "transformer": self.transformer,
        }

    # ---- set-up -------------------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float, dropout: float, convs: bool = False) -> None:
        if convs:
            raise ValueError(f"--lora_convs: {SPEC.label}'s transformer has no conv layers for the LoRA")
        config = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
            target_modules=LORA_TARGET_MODULES,
        )
        if self.quantized:  # training only: inference keeps the unquantized leftovers in bf16
            prepare_quantized(self.transformer)
        self.transformer.add_adapter(config)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def fully_trained_parameters(self) -> list[torch.nn.Parameter]:
        return []  # LoRA only: FLUX.1-Fill's x_embedder already reads the mask channels

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def shard_units(self) -> list[torch.nn.Module]:
        if self.context_timestep == "zero":
            self.denoiser.per_token_methods()  # the forward FSDP2 must also gather the blocks' weights for
        return [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]

    def compile_blocks(self, **options: Any) -> CompiledBlocks:
        if self.context_timestep == "zero":
            # The per-token forward never calls the blocks' own forward (flux_context.py).
            self.denoiser.compile_blocks(**options)
            blocks = {type(stack[0]).__name__: len(stack)
                      for stack in (self.transformer.transformer_blocks, self.transformer.single_transformer_blocks)
                      if len(stack)}
        else:
            self.transformer.compile_repeated_blocks(**options)
            blocks = compiled_block_counts(self.transformer)
        self.compiled = CompiledBlocks(blocks, self.denoiser)
        return self.compiled

    def to(self, device: torch.device, dtype: torch.dtype, parts=PARTS) -> None:
        """The training device and the run's dtype: every frozen weight is cast where it lies
        (the trainable ones to float32), then `parts` move onto the device; the others stay
        where they are (`place` moves them later)."""
        if dtype == torch.float16:
            logger.warning("FLUX.1 is made for bf16; fp16 activations can overflow: prefer --mixed_precision bf16")
        if torch.device(device).type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled():
            # cuDNN's fused attention failed in the backward of full-size FLUX.1 in bf16
            # (CUDA illegal memory access; torch 2.11+cu130 on an H100, plain diffusers code
            # too): training attends through flash / memory-efficient SDPA instead.
            torch.backends.cuda.enable_cudnn_sdp(False)
            logger.info("FLUX training: cuDNN scaled-dot-product attention disabled for this process")
        self._on_device()  # the load's own placement, before the device is set
        self.device = torch.device(device)
        # The FLUX VAE is fine in bf16; fp16 gains little over float32 and risks overflow.
        self.vae.to(dtype=dtype if dtype == torch.bfloat16 else torch.float32)
        self.text_encoder.to(dtype=dtype)
        self.text_encoder_2.to(dtype=dtype)
        if dtype == torch.float16:
            # T5 v1.1 overflows in fp16 unless these layers (`wo`) stay float32, which is what
            # transformers does when it loads T5 in fp16; a plain .to() would undo that.
            keep = set(getattr(self.text_encoder_2, "_keep_in_fp32_modules", None) or [])
            for name, module in self.text_encoder_2.named_modules():
                if name.rsplit(".", 1)[-1] in keep:
                    module.to(torch.float32)
        # bitsandbytes weights keep their dtype (casting is refused); they move as they are.
        if not self.quantized:
            self.transformer.to(dtype=dtype)
        for part in parts:
            self.place(part, True)
        for p in self.trainable_parameters():
            p.data = p.data.float()

    # ---- training math -------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        self._warn_truncation(prompts)  # the pipeline's own notices, every call, are filtered (logs.py)
        embeds, pooled, _ = self._pipe.encode_prompt(
            prompts, device=self.text_encoder_2.device, num_images_per_prompt=1, max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        # text ids are all zeros in FLUX.1: predict() rebuilds them, they are not cached.
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}  # (B, 512, D), (B, D_clip)

    def unconditional_prompt(self) -> dict[str, torch.Tensor]:
        # The FLUX pipelines' negative prompt defaults to "" (true CFG); FLUX.1-dev itself is guidance-distilled.
        return self.encode_prompt([""])

    def _warn_truncation(self, prompts: list[str]) -> None:
        """Say once (not every step, as the pipeline does) that CLIP reads only the start of
        long prompts, and once per prompt that T5 cuts one."""
        for prompt in set(prompts) - self._checked_prompts:
            self._checked_prompts.add(prompt)
            t5 = len(self.tokenizer_2(prompt, truncation=False).input_ids) - 1
            if t5 > MAX_SEQUENCE_LENGTH - 1:
                logger.warning("prompt of %d T5 tokens is cut to %d: %.60s...", t5, MAX_SEQUENCE_LENGTH - 1, prompt)
            if not self._clip_warned and len(self.tokenizer(prompt, truncation=False).input_ids) - 2 > self.max_token_length:
                self._clip_warned = True
                logger.warning("prompts longer than %d CLIP tokens: CLIP's pooled embedding reads their start, "
                               "T5 reads %d tokens (said once)", self.max_token_length, MAX_SEQUENCE_LENGTH)

    @property
    def codec(self) -> FluxLatents:
        return FluxLatents(self.vae)

    def _scale(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.normalise(latents)

    def masked_image_latents(self, pixels: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor | None:
        if self.conditioning != "concat":
            return None
        # As FluxFillPipeline: binarized mask, masked pixels become 0 (mid-grey) in [-1, 1].
        # The posterior mean, not a sample (the pipeline samples; the FLUX VAE's std is tiny).
        return self.codec.encode_mean(pixels * (pixel_mask < 0.5))

    def noise_latents(self, latents, noise, generator):
        sigmas = self.timestep_sampling.draw(latents.shape[0], generator)  # (B,); 1 = pure noise
        if self.timestep_sampling.shift == "resolution":  # the packed sequence: one token per 2x2 latent patch
            sigmas = inference_shift(self.scheduler, sigmas, latents.shape[-2] * latents.shape[-1] // 4)
        sigmas = sigmas.to(latents.device)
        s = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
        noisy = (1.0 - s) * latents + s * noise  # rectified flow: straight line from data to noise
        return noisy, sigmas * 1000, noise - latents  # timesteps on the scheduler's 0..1000 scale; velocity

    def predict(self, noisy, timesteps, prompt_embeds, mask, masked_latents, batch):
        b, _, h, w = noisy.shape
        device, dtype = noisy.device, noisy.dtype
        tokens = pack(noisy)  # (B, h/2 * w/2, 4C)
        if self.conditioning == "concat":
            pixel_mask = F.interpolate(mask.to(dtype), scale_factor=self.vae_scale_factor, mode="nearest")  # (B, 1, H, W)
            tokens = torch.cat(
                [tokens, pack(masked_latents.to(device, dtype)), pack(fill_mask_channels(pixel_mask, self.vae_scale_factor))],
                dim=2,
            )  # (B, h/2 * w/2, 4C + 4C + 4 f^2): FluxFillPipeline's order
        text = prompt_embeds["prompt_embeds"].to(device, dtype)  # (B, T, D)
        guidance = None
        if self.transformer.config.guidance_embeds:
            # Inference's context loop gives the distilled guidance value in `batch`.
            guidance = torch.full((b,), batch.get("guidance", TRAIN_GUIDANCE), device=device, dtype=torch.float32)
        extra = {}
        if self.context_timestep == "zero":  # clean tokens modulated as timestep 0
            extra["clean_tokens"] = clean_token_mask(mask)  # (B, N, 1)
        else:
            extra["return_dict"] = False
        out = self.denoiser(
            **extra,
            hidden_states=tokens,
            timestep=(timesteps / 1000).to(device, dtype),
            guidance=guidance,
            pooled_projections=prompt_embeds["pooled_prompt_embeds"].to(device, dtype),
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=device, dtype=dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype),
        )[0]  # (B, h/2 * w/2, 4C)
        return unpack(out, h, w, self.vae_scale_factor)  # (B, C, h, w)

    # ---- inference -----------------------------------------------------------------------
    def visible_reset(self, pipe, images: list, masks: torch.Tensor, seeds: list[int]) -> dict[str, Any]:
        """For concat (FLUX.1-Fill) inference: after every step the visible panels' tokens are
        reset to the input's noised to the next sigma, the input itself after the last, as
        FluxInpaintPipeline does for 4-channel-layout transformers (see SDXLBackend's: the same
        arguments)."""
        if self.conditioning != "concat":
            return {}
        device, dtype = pipe._execution_device, pipe.transformer.dtype
        height, width = masks.shape[-2:]
        pixels = pipe.image_processor.preprocess(images, height=height, width=width).to(device, pipe.vae.dtype)
        # One input at a time, as the pipeline encodes them.
        clean = FluxLatents(pipe.vae).encode_mean(pixels, one_at_a_time=True).to(dtype)  # (b, C, h, w)
        masked = latent_mask(masks.to(device), self.vae_scale_factor).to(dtype)  # (b, 1, h, w), soft
        masked = pack(masked.expand(-1, clean.shape[1], -1, -1))  # (b, N, 4C), as the latents' tokens
        clean = pack(clean)
        noise = torch.cat([torch.randn((1, *clean.shape[1:]), generator=torch.Generator("cpu").manual_seed(seed))
                           for seed in seeds]).to(device, dtype)  # (B, N, 4C)

        return visible_reset_callback(clean, noise, masked, lambda scheduler, x, n, t: scheduler.scale_noise(x, t, n))

    def pipeline_prompt(self, prompt: str, negative_prompt: str | None, guidance_scale: float) -> dict[str, Any]:
        """The prompt as the inpaint pipeline takes it (FLUX's own encoding reads 512 T5 tokens)."""
        self._warn_truncation([prompt])
        return {"prompt": prompt, **({"negative_prompt": negative_prompt} if negative_prompt is not None else {})}

    def encoded_pipeline_prompt(self, prompt: str, negative_prompt: str | None, guidance_scale: float) -> dict[str, Any]:
        """The prompt as embeddings, encoded here as the pipeline would (no text encoder runs
        in the pipeline call)."""
        kwargs = self.encode_prompt([prompt])
        if negative_prompt is not None:
            negative = self.encode_prompt([negative_prompt])
            kwargs["negative_prompt_embeds"] = negative["prompt_embeds"]
            kwargs["negative_pooled_prompt_embeds"] = negative["pooled_prompt_embeds"]
        return kwargs

    def inpaint_pipeline(self) -> FluxInpaintPipeline | FluxFillPipeline:
        return self._pipe

