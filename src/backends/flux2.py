"""FLUX.2 [klein] backend: Flux2Transformer2DModel on rectified flow, one Qwen3 text encoder.

Latents cross the contract as the transformer reads them: the VAE's latents patchified 2x2
and batch-norm normalised, (B, 4C, H/16, W/16), one latent pixel per token
(flux2_latents.py), so `vae_scale_factor` = `pixel_quantum` = 16.

Conditioning:
    context  (default) visible tokens enter clean, modulated as timestep 0 per token, masked
             ones noisy at t, at the grid's own 4-axis RoPE positions; a different mask per
             sample (flux2_context.py). 'shared' context_timestep: clean tokens at t.
    blend    the whole composite noisy; inference resets the visible region to the input
             noised to the next sigma after every step.
    reference  the editing layout: the whole composite noisy, and the composite with its
             masked panels blanked (the masked-image latents, posterior mean) appended as
             reference tokens with RoPE t = 10, as Flux2KleinPipeline feeds a reference image;
             one shared t for all tokens, as that pipeline. Twice the image tokens.
    concat   refused: there is no FLUX.2 Fill model (no mask input channels).

Training choices: sigma drawn logit-normal as FLUX.1; with --timestep_shift resolution moved
by the scheduler's time shift at the pipeline's own mu (`compute_empirical_mu` for the
composite's token count at the pipeline's default 50 steps). Base models have no guidance
embedding and train and sample with none (`guidance=None`, as Flux2KleinPipeline); their
inference uses true CFG at 4 with "" as the negative prompt. Distilled [klein] models (the
pipeline config's `is_distilled`) sample in 4 steps without CFG (flux2_spec.DISTILLED_DEFAULTS).

Prompts: Flux2KleinPipeline's own encoding (the chat template, hidden states of Qwen3 layers
9, 18 and 27 stacked per token), read to --max_token_length tokens (template included; the
pipeline's 512 by default).

Beside this file: flux2_latents.py (the latent codec and position ids), flux2_context.py
(per-token modulation and the inference loop), flux2_loading.py (the components), flux2_lora.py
(LoRA targets and files).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from peft import LoraConfig

from ..compiling import CompiledBlocks, compiled_block_counts
from . import flux2_latents as codec
from .flux2_latents import Flux2Latents
from .latents import LatentMethods
from . import flux2_lora
from .base import TimestepSampling
from .flux2_context import CONTEXT_TIMESTEPS, ContextDenoiser, Flux2ContextPipeline, clean_token_mask
from .flux2_loading import QUANTIZE_CONFIGS, load_components, prepare_quantized
from .flux2_lora import LORA_TARGET_MODULES
from .flux2_spec import MAX_SEQUENCE_LENGTH, SPEC
from .placement import PARTS, Placement
from .trainable import TransformerWeights

logger = logging.getLogger(__name__)

REFERENCE_T = 10  # RoPE t of the first reference image (Flux2KleinPipeline._prepare_image_ids: scale 10)
SHIFT_STEPS = 50  # the pipeline's default step count, at which --timestep_shift resolution takes mu


class Flux2Backend(TransformerWeights, LatentMethods, Placement):
    name = "flux2"
    lora_module = flux2_lora  # save_lora / comfyui_state / load_lora (TransformerWeights)
    vae_scale_factor = 16  # pixels per contract latent pixel (a 2x2 patch of VAE latents)
    pixel_quantum = 16
    native_image_size = 1024  # Flux2KleinPipeline's default_sample_size 128 VAE latents
    preferred_mixed_precision = "bf16"
    max_token_length = MAX_SEQUENCE_LENGTH
    timestep_sampling = TimestepSampling("logit_normal")
    compiled: CompiledBlocks | None = None
    quantized = False
    part_modules = {"denoiser": ("transformer",), "text_encoders": ("text_encoder",), "vae": ("vae",)}

    def __init__(self, components: dict[str, Any], base_model: str, conditioning: str | None,
                 context_timestep: str | None = None, max_token_length: int | None = None, distilled: bool = False):
        conditioning = conditioning or "blend"  # a bare base or a foreign LoRA: stock latent blending
        if conditioning == "concat":
            raise ValueError("--conditioning concat: FLUX.2 [klein] has no Fill model (no mask input channels); "
                             "use --conditioning context, blend or reference")
        if conditioning not in ("blend", "context", "reference"):
            raise ValueError(f"--conditioning: expected context, blend or reference, got {conditioning!r}")
        if context_timestep is not None and (conditioning != "context" or context_timestep not in CONTEXT_TIMESTEPS):
            raise ValueError(f"--context_timestep {context_timestep}: expected one of {', '.join(CONTEXT_TIMESTEPS)}, "
                             "with --conditioning context")
        self.conditioning = conditioning
        self.context_timestep = (context_timestep or CONTEXT_TIMESTEPS[0]) if conditioning == "context" else None
        self.base_model = base_model
        self.max_token_length = max_token_length or MAX_SEQUENCE_LENGTH
        self.distilled = distilled
        self.transformer = components["transformer"]
        self.vae = components["vae"]
        self.text_encoder = components["text_encoder"]
        self.tokenizer = components["tokenizer"]
        self.scheduler = components["scheduler"]
        self.vae_scale_factor = self.pixel_quantum = 2 * 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.quantized = getattr(self.transformer, "hf_quantizer", None) is not None
        packed = 4 * self.vae.config.latent_channels
        if self.transformer.config.in_channels != packed:
            raise ValueError(f"--model_id {base_model}: transformer with {self.transformer.config.in_channels} input "
                             f"channels; FLUX.2 [klein] reads {packed} (4 x the VAE's latent channels)")
        self.denoiser = ContextDenoiser(self.transformer) if self.context_timestep == "zero" else self.transformer
        for module in (self.transformer, self.vae, self.text_encoder):
            module.requires_grad_(False)
        self._pipe = Flux2ContextPipeline(**self._components(), is_distilled=distilled)
        self._pipe.predict = self.predict
        self._pipe.conditioning = conditioning
        self._pipe.max_sequence_length = self.max_token_length
        self._checked_prompts: set[str] = set()

    @classmethod
    def from_pretrained(cls, model_id: str, conditioning: str | None = "context", variant: str | None = None,
                        vae: str | None = None, quantize: str | None = None, context_timestep: str | None = None,
                        max_token_length: int | None = None, dtype: torch.dtype | None = None) -> "Flux2Backend":
        """Load from a hub id, a local diffusers folder or `tiny-flux2`. `dtype`: the transformer
        (bf16 around 4/8-bit weights when quantized) and Qwen3 load in it."""
        if max_token_length is not None and max_token_length not in SPEC.max_token_lengths:
            raise ValueError(SPEC.max_token_length_refusal)
        if quantize is not None:
            if quantize not in QUANTIZE_CONFIGS:
                raise ValueError(f"--quantize: expected one of {', '.join(QUANTIZE_CONFIGS)}, got {quantize!r}")
            if not torch.cuda.is_available():
                raise ValueError(f"--quantize {quantize} needs a CUDA GPU (bitsandbytes 4/8-bit weights); none was found")
        components, distilled = load_components(model_id, variant, vae, quantize, dtype)
        return cls(components, model_id, conditioning, context_timestep, max_token_length, distilled)

    def _components(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler, "vae": self.vae, "text_encoder": self.text_encoder,
                "tokenizer": self.tokenizer, "transformer": self.transformer}

    # ---- set-up -------------------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float, dropout: float, convs: bool = False) -> None:
        if convs:
            raise ValueError(f"--lora_convs: {SPEC.label}'s transformer has no conv layers for the LoRA")
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                            target_modules=LORA_TARGET_MODULES)
        if self.quantized:
            prepare_quantized(self.transformer)
        self.transformer.add_adapter(config)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def fully_trained_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def shard_units(self) -> list[torch.nn.Module]:
        # The stock blocks run in every mode (the per-token modulation hooks modules of the root).
        return [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]

    def compile_blocks(self, **options: Any) -> CompiledBlocks:
        # The per-token modulation hooks modules outside the blocks: the stock blocks run (and compile) in every mode.
        self.transformer.compile_repeated_blocks(**options)
        self.compiled = CompiledBlocks(compiled_block_counts(self.transformer), self.denoiser)
        return self.compiled

    def to(self, device: torch.device, dtype: torch.dtype, parts=PARTS) -> None:
        if dtype == torch.float16:
            logger.warning("FLUX.2 is made for bf16; fp16 activations can overflow: prefer --mixed_precision bf16")
        self._on_device()
        self.device = torch.device(device)
        self.vae.to(dtype=dtype if dtype == torch.bfloat16 else torch.float32)
        self.text_encoder.to(dtype=dtype)
        if not self.quantized:
            self.transformer.to(dtype=dtype)
        for part in parts:
            self.place(part, True)
        for p in self.trainable_parameters():
            p.data = p.data.float()

    # ---- training math -------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        self._warn_truncation(prompts)
        embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            self.text_encoder, self.tokenizer, prompts, device=self.text_encoder.device,
            max_sequence_length=self.max_token_length,
        )
        return {"prompt_embeds": embeds}  # (B, L, 3 x Qwen3 hidden); text ids are rebuilt in predict

    def unconditional_prompt(self) -> dict[str, torch.Tensor]:
        return self.encode_prompt([""])  # the pipeline's negative prompt

    def prompt_tokens(self, prompt: str) -> int:
        """Qwen3 tokens the pipeline feeds for `prompt`, chat template included."""
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)
        return len(self.tokenizer(text).input_ids)

    def _warn_truncation(self, prompts: list[str]) -> None:
        for prompt in set(prompts) - self._checked_prompts:
            self._checked_prompts.add(prompt)
            if (n := self.prompt_tokens(prompt)) > self.max_token_length:
                logger.warning("prompt of %d Qwen3 tokens (chat template included) is cut to --max_token_length %d: "
                               "%.60s...", n, self.max_token_length, prompt)

    @property
    def codec(self) -> Flux2Latents:
        """The latent codec around the VAE (flux2_latents.py): (B, 4C, H/16, W/16) latents, the
        posterior on the VAE's own grid (B, 2C, H/8, W/8). encode_image, latent_distribution and
        sample_latents go through it (LatentMethods)."""
        return Flux2Latents(self.vae)

    @torch.no_grad()
    def masked_image_latents(self, pixels: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor | None:
        """'reference': the composite with its masked panels blanked to mid-grey (0 in [-1, 1],
        as FLUX.1-Fill's masked image), the posterior mean, normalised: (B, 4C, h, w)."""
        if self.conditioning != "reference":
            return None
        blanked = pixels * (pixel_mask.to(pixels.device) < 0.5)
        return self.codec.encode_mean(blanked)

    def noise_latents(self, latents, noise, generator):
        sigmas = self.timestep_sampling.draw(latents.shape[0], generator)  # (B,); 1 = pure noise
        if self.timestep_sampling.shift == "resolution":
            mu = compute_empirical_mu(latents.shape[-2] * latents.shape[-1], SHIFT_STEPS)
            sigmas = self.scheduler.time_shift(mu, 1.0, sigmas)
        sigmas = sigmas.to(latents.device)
        s = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
        noisy = (1.0 - s) * latents + s * noise
        return noisy, sigmas * 1000, noise - latents  # scheduler's 0..1000 timesteps; velocity target

    def predict(self, noisy, timesteps, prompt_embeds, mask, masked_latents, batch):
        _, _, h, w = noisy.shape
        device, dtype = noisy.device, noisy.dtype
        text = prompt_embeds["prompt_embeds"].to(device, dtype)  # (B, L, D)
        inputs = dict(
            hidden_states=codec.to_tokens(noisy),  # (B, h * w, 4C)
            encoder_hidden_states=text,
            timestep=(timesteps / 1000).to(device, dtype),
            img_ids=codec.image_ids(noisy),  # (B, h * w, 4): the grid's own positions
            txt_ids=codec.text_ids(text),
            guidance=None,  # [klein]: no guidance embedding, as the pipeline calls it
        )
        if self.conditioning == "reference":  # [composite, reference] as the editing pipeline lays them out
            reference = masked_latents.to(device, dtype)  # (B, 4C, h, w)
            inputs["hidden_states"] = torch.cat([inputs["hidden_states"], codec.to_tokens(reference)], dim=1)
            inputs["img_ids"] = torch.cat([inputs["img_ids"], codec.image_ids(reference, t=REFERENCE_T)], dim=1)
        if self.context_timestep == "zero":
            out = self.denoiser(clean_token_mask(mask), **inputs)[0]
        else:
            out = self.denoiser(**inputs, return_dict=False)[0]
        return codec.from_tokens(out[:, : h * w], h, w)  # (B, 4C, h, w): the composite's tokens

    # ---- inference -----------------------------------------------------------------------
    def visible_reset(self, pipe, images: list, masks: torch.Tensor, seeds: list[int]) -> dict[str, Any]:
        return {}  # Flux2ContextPipeline keeps the visible panels itself (clean or re-noised)

    def pipeline_prompt(self, prompt: str, negative_prompt: str | None, guidance_scale: float) -> dict[str, Any]:
        """Embeddings, encoded as training encodes them (--max_token_length); the negative
        prompt defaults to "", the pipeline's own."""
        return self.encoded_pipeline_prompt(prompt, negative_prompt, guidance_scale)

    def encoded_pipeline_prompt(self, prompt: str, negative_prompt: str | None, guidance_scale: float) -> dict[str, Any]:
        kwargs = self.encode_prompt([prompt])
        if negative_prompt is not None or (guidance_scale > 1 and not self.distilled):
            kwargs["negative_prompt_embeds"] = self.encode_prompt([negative_prompt or ""])["prompt_embeds"]
        return kwargs

    def inpaint_pipeline(self) -> Flux2ContextPipeline:
        return self._pipe
