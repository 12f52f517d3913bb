"""Training configuration: the one source of flags, defaults, help and validation."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ..backends.registry import ByBackend, backend_names, backend_spec
from ..compiling import unsupported as compile_unsupported
from ..panels import Grid, parse_panels

logger = logging.getLogger(__name__)
# --report_to NAME needs one of these modules (accelerate's trackers import them).
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}

# Each backend's own defaults, read from its spec (iclora.backends.*_spec): how noise levels
# are drawn, whether --timestep_shift auto moves them, the visible panels' loss weight with concat.
TIMESTEP_SAMPLING_DEFAULTS = ByBackend("timestep_sampling")
TIMESTEP_SHIFT_DEFAULTS = ByBackend("timestep_shift")
CONCAT_VISIBLE_LOSS_WEIGHT = ByBackend("concat_visible_loss_weight")


@dataclass
class TrainConfig:
    """In-Context LoRA training on composite images with randomly masked panels."""

    data_dir: str
    """Folder of composite images (png/jpg/jpeg/webp) with same-stem .txt captions."""
    output_dir: str = "output"
    """Where checkpoints and final_model/ are written."""
    overwrite_output_dir: bool = False
    """Start a new run in an output_dir that holds another run's final_model/ or checkpoints (they are replaced)."""
    # The choices are the registered backends, read when the parser is built (the annotation
    # is evaluated then, not at import), so a backend registered later is a choice too.
    backend: Literal[backend_names()] = "sdxl"
    """Model family."""
    model_id: str = "stabilityai/stable-diffusion-xl-base-1.0"
    """Hub id, local diffusers folder, or a built-in tiny model (tiny-sdxl, tiny-sdxl-inpaint, tiny-flux, tiny-flux-fill, tiny-flux2)."""
    variant: Optional[str] = None
    """Weight variant to load from model_id (e.g. fp16)."""
    pretrained_vae: Optional[str] = None
    """A separate VAE folder or hub id (e.g. an fp16-safe SDXL VAE)."""
    num_epochs: int = 100
    """Passes over the data (ignored when max_train_steps is set)."""
    max_train_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides num_epochs)."""
    batch_size: int = 4
    """Samples per device per micro-batch (one aspect bucket per batch)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 1e-4
    """Peak learning rate."""
    conv_in_learning_rate: Optional[float] = None
    """SDXL --conditioning concat: learning rate of the fully trained conv_in (default: --learning_rate)."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    """Learning-rate schedule (diffusers.optimization.get_scheduler)."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 1e-2
    """AdamW weight decay of the LoRA (the fully trained conv_in of SDXL concat has none: it would pull the pretrained channels toward zero)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    use_8bit_adam: bool = False
    """bitsandbytes AdamW8bit instead of torch AdamW."""
    lora_rank: int = 64
    """LoRA rank."""
    lora_alpha: int = 64
    """LoRA alpha (scale = alpha / rank)."""
    lora_dropout: float = 0.1
    """Dropout on the LoRA branch."""
    lora_convs: Optional[bool] = None
    """SDXL: also train the LoRA on every ResNet block's two 3x3 convs (LoCon, kohya's conv_dim), at --lora_rank
    and --lora_alpha; the files ComfyUI, A1111/Forge, kohya and diffusers read carry them. --no_lora_convs: attention
    and feed-forward layers only. Default: on for SDXL on a new run; when resuming, the checkpoint's choice (off for
    checkpoints that do not record it)."""
    image_size: int = 1024
    """Training size in pixels: the composite's longer side (--bucket_by longest) or the side of a square of its area (area); the aspect ratio is kept."""
    bucket_by: Literal["longest", "area"] = "longest"
    """How --image_size sizes each composite: 'longest' side = image_size, or 'area' ≈ image_size² pixels (a 1x3 strip then trains at the pixels of a 2x2 composite, not a third of them). Either way every panel boundary falls on a latent pixel; --dry_run prints the sizes."""
    grid: str = "2x2"
    """Panel layout ROWSxCOLS (2x2, 1x2, 1x3, 2x1, ...)."""
    allow_crop: bool = False
    """Train composites whose shape differs so much from the grid that fitting them crops more than 5% of a side."""
    conditioning: Literal["concat", "blend", "context", "reference"] = "concat"
    """concat: mask + masked-image latents as extra input channels; blend: latent blending (LoRA only);
    context: visible panels enter the denoiser clean, masked ones noisy (LoRA only, 4-channel bases);
    reference (FLUX.2): the masked-image latents as reference tokens beside the noisy composite (LoRA only)."""
    context_timestep: Optional[Literal["zero", "shared"]] = None
    """With --conditioning context: modulate the clean panels' tokens as timestep 0 ('zero', FLUX only;
    its default) or with the shared current timestep ('shared', SDXL's only choice)."""
    mask_probability: float = 0.7
    """Chance that a sample has 1..max_masked_panels panels masked (else it is trained as text -> whole set)."""
    max_masked_panels: int = 2
    """Most panels masked in one sample (at least one always stays visible)."""
    timestep_sampling: Optional[Literal["uniform", "logit_normal"]] = None
    """How each sample's noise level is drawn (default: the backend's own, uniform for SDXL, logit_normal for FLUX)."""
    logit_mean: float = 0.0
    """With logit_normal sampling: the normal's mean; above 0 spends more steps at high noise."""
    logit_std: float = 1.0
    """With logit_normal sampling: the normal's standard deviation."""
    timestep_shift: Literal["auto", "none", "resolution"] = "auto"
    """FLUX: 'resolution' moves each drawn noise level as inference moves its schedule for the composite's token
    count (the scheduler's time shift, mu from the pipeline's calculate_shift: about 3.2x at 1024x1024), so training
    spends its steps at the noise levels inference visits; 'none' uses the draw as it is. 'auto': the backend's
    default (none), or when resuming, the checkpoint's choice (none for checkpoints that do not record one)."""
    visible_loss_weight: Optional[float] = None
    """Loss weight of visible panels relative to masked ones (default: 0.5 with SDXL concat, where denoising the
    visible panels from the masked-image input teaches the widened conv_in to read it; 0 otherwise: masked panels only)."""
    caption_dropout: float = 0.0
    """Chance of training a sample unconditioned, on what inference's unconditional branch is fed (SDXL: zero embeddings, as its pipeline gives classifier-free guidance for an empty prompt; FLUX: the encoding of "")."""
    max_token_length: Optional[int] = None
    """SDXL: CLIP tokens read from each caption, 75, 150 or 225 (chunks of 75 encoded separately and concatenated, as kohya's sd-scripts; default 150). Recorded with the LoRA for inference. FLUX's CLIP reads 75 (its T5 reads 512)."""
    cache_text_embeddings: bool = False
    """Encode every caption once (kept on disk under --cache_dir) and move the text encoders off the GPU."""
    cache_latents: bool = False
    """Encode every composite once (its VAE posterior; for concat also the masked-image latents of every panel subset training draws), kept on disk under --cache_dir, and move the VAE off the GPU."""
    cache_dir: Optional[str] = None
    """Folder of the caches (default: output_dir/cache); entries are keyed by file content and settings, so runs can share it."""
    dry_run: bool = False
    """Check the data and settings and print what training would see (buckets, crops, caption tokens, markers, steps) and the memory it needs per phase (estimated from the model's configs), then exit without loading the denoiser."""
    gpu_memory_gib: Optional[float] = None
    """GPU memory the --dry_run estimate must fit in (default: the current GPU's, or 16 without one)."""
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = None
    """Mixed precision (default on CUDA: fp16 for SDXL, bf16 for FLUX; no on CPU)."""
    gradient_checkpointing: bool = False
    """Trade compute for memory in the denoiser."""
    compile: bool = False
    """torch.compile the denoiser's repeated blocks (regional compilation: SDXL's transformer blocks, FLUX's double and single blocks), with the LoRA and checkpointing in place; the first step compiles them (its seconds are logged and in train_log.jsonl)."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """With several processes (accelerate launch): 'ddp' keeps the whole denoiser on every GPU (fastest when the
    base fits one card); 'fsdp' shards it over the GPUs with FSDP2, block by block (a base too large for one card),
    training in bf16 unless --mixed_precision says otherwise, the LoRA in float32."""
    quantize: Optional[Literal["nf4", "int8"]] = None
    """Load the frozen denoiser quantized through bitsandbytes (QLoRA; CUDA only)."""
    save_precision: Optional[Literal["fp16", "bf16", "fp32"]] = None
    """Dtype of the LoRA weights in every LoRA file written (the final model's and each checkpoint's, the ComfyUI file too;
    default fp16, bf16 when training in bf16). SDXL concat's conv_in (100 KB) and the checkpoints' trainable state stay
    float32: a resume is exact."""
    output_kohya_format: bool = True
    """Also write pytorch_lora_weights_comfyui.safetensors, the file ComfyUI, A1111/Forge and kohya load in full (SDXL: kohya keys; FLUX: with .alpha keys)."""
    save_every: int = 1000
    """Write a resumable checkpoint every this many optimizer steps."""
    checkpoints_total_limit: Optional[int] = None
    """Keep at most this many checkpoints (oldest removed first)."""
    resume_from_checkpoint: Optional[str] = None
    """A checkpoint folder, or 'latest' for the newest one in output_dir/checkpoints."""
    num_workers: int = 0
    """DataLoader worker processes."""
    seed: int = 42
    """Seed for weights, data order, masks, noise and timesteps."""
    validation_image: list[str] = field(default_factory=list)
    """Composites to complete in sample sheets during training (default: the first training composite)."""
    validation_prompt: Optional[str] = None
    """Prompt of the sample sheets (default: each validation image's same-stem .txt caption)."""
    validation_panels: list[Union[int, str]] = field(default_factory=list)
    """Panels the sample sheets regenerate, row-major from 0 (default: every panel but the first)."""
    validation_every: Optional[int] = None
    """Render sample sheets into output_dir/samples/step_N/ at step 0, every N steps and at the end
    (with --validation_image but no N: at step 0 and at the end)."""
    validation_inference_steps: int = 20
    """Denoising steps of each sample."""
    validation_guidance_scale: Optional[float] = None
    """Guidance of the samples (default: the inference script's, 7.5 for SDXL and 3.5 for FLUX)."""
    report_to: Optional[Literal["tensorboard", "wandb"]] = None
    """Also log loss, learning rate and sample sheets to this tracker (pip install 'iclora[tensorboard]')."""

    @property
    def visible_weight(self) -> float:
        if self.visible_loss_weight is not None:
            return self.visible_loss_weight
        return CONCAT_VISIBLE_LOSS_WEIGHT[self.backend] if self.conditioning == "concat" else 0.0

    @property
    def sampling_scheme(self) -> str:
        return self.timestep_sampling or TIMESTEP_SAMPLING_DEFAULTS[self.backend]

    @property
    def shift_scheme(self) -> str:
        return TIMESTEP_SHIFT_DEFAULTS[self.backend] if self.timestep_shift == "auto" else self.timestep_shift

    @property
    def validating(self) -> bool:
        return bool(self.validation_every or self.validation_image)

    def __post_init__(self) -> None:
        self.grid = str(Grid.parse(self.grid))  # '2×2' or ' 2X2' is recorded as 2x2
        self._check_backend()
        positive = ["num_epochs", "batch_size", "gradient_accumulation_steps", "lora_rank", "lora_alpha",
                    "image_size", "save_every", "max_masked_panels"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ["mask_probability", "caption_dropout", "lora_dropout"]:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must be between 0 and 1, got {getattr(self, name)}")
        for name in ["learning_rate", "lr_warmup_steps", "weight_decay", "max_grad_norm", "visible_loss_weight",
                     "num_workers"]:
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name} must not be negative, got {getattr(self, name)}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError(f"--max_train_steps must be at least 1, got {self.max_train_steps}")
        if self.context_timestep and self.conditioning != "context":
            raise ValueError(f"--context_timestep {self.context_timestep} needs --conditioning context")
        if self.conv_in_learning_rate is not None:
            if not backend_spec(self.backend).concat_trains_conv_in or self.conditioning != "concat":
                raise ValueError(f"--conv_in_learning_rate is for --backend {_names_with('concat_trains_conv_in')} "
                                 "--conditioning concat (the only mode that trains conv_in in full)")
            if self.conv_in_learning_rate < 0:
                raise ValueError(f"--conv_in_learning_rate must not be negative, got {self.conv_in_learning_rate}")
        if self.logit_std <= 0:
            raise ValueError(f"--logit_std must be positive, got {self.logit_std}")
        if self.sampling_scheme == "uniform" and (self.logit_mean or self.logit_std != 1.0):
            raise ValueError(f"--logit_mean / --logit_std shape --timestep_sampling logit_normal; --backend {self.backend} "
                             "samples uniformly unless it is given")
        if self.timestep_shift == "resolution" and not backend_spec(self.backend).resolution_shift:
            raise ValueError(f"--timestep_shift resolution is for --backend {_names_with('resolution_shift')}: "
                             f"{backend_spec(self.backend).label}'s noise schedule does not depend on the image size")
        if self.conditioning == "context" and self.visible_loss_weight:
            raise ValueError(
                "--visible_loss_weight must be 0 with --conditioning context: the visible panels are clean inputs there, "
                "with nothing to denoise"
            )
        lengths = backend_spec(self.backend).max_token_lengths  # the backend's own (FLUX.2: Qwen3 tokens)
        if self.max_token_length is not None and self.max_token_length not in lengths:
            raise ValueError(backend_spec(self.backend).max_token_length_refusal
                             or f"--max_token_length must be 75, 150 or 225, got {self.max_token_length}")
        if self.compile and (problem := compile_unsupported(self.quantize, self.gradient_checkpointing)):
            raise ValueError(problem)
        if self.distributed == "fsdp":
            self._check_fsdp()
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise ValueError(f"--gpu_memory_gib must be positive, got {self.gpu_memory_gib}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"--checkpoints_total_limit must be at least 1, got {self.checkpoints_total_limit}")
        self._check_monitoring()

    @property
    def convs(self) -> bool:
        """--lora_convs as a new run takes it (a resumed run: see run_setup.check_resumable)."""
        return backend_spec(self.backend).lora_convs if self.lora_convs is None else self.lora_convs

    def _check_backend(self) -> None:
        spec = backend_spec(self.backend)
        if self.conditioning not in spec.conditionings:
            raise ValueError(f"--conditioning {self.conditioning}: --backend {self.backend} trains "
                             f"{' | '.join(spec.conditionings)}")
        if self.lora_convs and not spec.lora_conv_targets:
            raise ValueError(f"--lora_convs is for --backend {_names_with('lora_conv_targets')}: {spec.label}'s "
                             "denoiser has no conv layers for the LoRA")

    def _check_fsdp(self) -> None:
        if self.quantize:
            raise ValueError(f"--distributed fsdp with --quantize {self.quantize}: bitsandbytes' quantized weights are not "
                             "sharded (integer storage); a quantized base fits one card: use --distributed ddp")
        if self.mixed_precision == "fp16":
            raise ValueError("--distributed fsdp with --mixed_precision fp16: fp16 needs a gradient scaler that knows the "
                             "shards; use bf16 (the default with fsdp) or no")
        if self.use_8bit_adam:
            raise ValueError("--distributed fsdp with --use_8bit_adam: bitsandbytes' optimizer does not update sharded "
                             "weights; leave it out (each GPU holds 1/N of AdamW's float32 state)")
        if self.compile:
            raise ValueError("--distributed fsdp with --compile: compiling the sharded blocks is not supported; "
                             "leave out --compile or use --distributed ddp")

    def _check_monitoring(self) -> None:
        for name in ["validation_every", "validation_inference_steps"]:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.validation_guidance_scale is not None and self.validation_guidance_scale < 0:
            raise ValueError(f"--validation_guidance_scale must not be negative, got {self.validation_guidance_scale}")
        if self.validation_panels:
            panels = parse_panels(self.validation_panels, Grid.parse(self.grid), "--validation_panels")
            if len(panels) == Grid.parse(self.grid).num_panels:
                raise ValueError("--validation_panels must leave at least one panel visible")
        if self.report_to and not any(importlib.util.find_spec(m) for m in TRACKER_MODULES[self.report_to]):
            raise ValueError(
                f"--report_to {self.report_to}: {TRACKER_MODULES[self.report_to][0]} is not installed "
                f"(pip install {TRACKER_MODULES[self.report_to][0]})"
            )


def _names_with(attribute: str) -> str:
    """The backends whose spec sets `attribute`, as a --backend value in a message."""
    return " | ".join(name for name in backend_names() if getattr(backend_spec(name), attribute))


def without_cuda(cfg: TrainConfig) -> TrainConfig:
    """CUDA-only settings fall back on a machine without CUDA, one notice each, so a config
    written for a GPU (examples/) still runs, slowly, on a CPU."""
    import torch

    if torch.cuda.is_available():
        return cfg
    changes: dict = {}
    if cfg.mixed_precision == "fp16":
        logger.warning("--mixed_precision fp16 needs CUDA: training in float32 on the CPU")
        changes["mixed_precision"] = "no"
    if cfg.quantize:
        logger.warning("--quantize %s needs CUDA (bitsandbytes 4/8-bit loading): loading the base unquantized", cfg.quantize)
        changes["quantize"] = None
    return dataclasses.replace(cfg, **changes) if changes else cfg
