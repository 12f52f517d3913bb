"""Inference configuration: the one source of flags, defaults, help and validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ..backends.registry import backend_names, backend_spec
from ..panels import Grid


@dataclass
class InferConfig:
    """Inpaint chosen panels of a composite (or generate a whole image set) with an IC-LoRA."""

    lora_path: str
    """Folder with pytorch_lora_weights.safetensors (+ iclora_config.json), a single .safetensors file, or 'none'."""
    prompt: Optional[str] = None
    """One prompt describing all panels, e.g. '[TOP-LEFT] ... [BOTTOM-RIGHT] ...' (with --input_dir: for every
    image without its own .txt)."""
    input_image: Optional[str] = None
    """The composite whose visible panels condition the result (optional with --panels_to_inpaint all)."""
    input_dir: Optional[str] = None
    """A folder of composites to run with one model load: each NAME.png with its prompt in NAME.txt (else
    --prompt) and an optional free-form mask NAME_mask.png; outputs per image plus folder_summary.json."""
    panels_to_inpaint: list[Union[int, str]] = field(default_factory=lambda: [2, 3])
    """Panel indices to regenerate, row-major from 0 (top-left), or 'all'."""
    mask_image: Optional[str] = None
    """A free-form mask the size of the input (white = regenerate) used instead of panel indices."""
    output_dir: str = "inference_output"
    """Where images and the JSON record are written."""
    negative_prompt: Optional[str] = None
    """What to steer away from (needs guidance_scale > 1)."""
    num_inference_steps: int = 50
    """Denoising steps."""
    guidance_scale: float = 7.5
    """Classifier-free guidance (FLUX.1-dev: the distilled guidance value)."""
    num_images: int = 1
    """Images to make, each with its own seed (seed, seed + 1, ...)."""
    batch_size: int = 1
    """Images per pipeline call: --num_images run in ceil(num_images / batch_size) calls, faster where memory
    allows (with --input_dir: the images of all inputs of one working size). Image i keeps seed + i and, up to
    float rounding, the image a batch of 1 makes."""
    seed: Optional[int] = None
    """Seed of the first image (random when not given; always recorded in the JSON)."""
    use_gradient_mask: bool = False
    """Feather the mask edges instead of a hard panel boundary."""
    gradient_width: int = 20
    """Width in pixels of the feathered band (with --use_gradient_mask)."""
    strength: float = 1.0
    """1.0 starts from pure noise; below 1 starts from the noised input (SDEdit)."""
    # The registered backends, read when the parser is built (see training/config.py).
    backend: Literal[backend_names()] = "sdxl"
    """Model family."""
    base_model: Optional[str] = None
    """Base model id or folder (default: the base recorded with the LoRA, else stabilityai/stable-diffusion-xl-base-1.0)."""
    variant: Optional[str] = None
    """Weight variant of the base model (e.g. fp16)."""
    grid: Optional[str] = None
    """Panel layout ROWSxCOLS (default: the LoRA's recorded grid, else 2x2)."""
    conditioning: Optional[Literal["concat", "blend", "context", "reference"]] = None
    """How the visible panels condition the model (default: the LoRA's recorded mode)."""
    context_timestep: Optional[Literal["zero", "shared"]] = None
    """With context conditioning: how clean panels are modulated (default: the LoRA's recorded choice)."""
    image_size: Optional[int] = None
    """Longer side of the working size: the input is resized to the size training gives such a composite,
    denoised there and resized back, the visible panels pasted from the original (default: the LoRA's recorded
    image_size, else the base model's own size, 1024 for SDXL and FLUX.1)."""
    native_size: bool = False
    """Denoise at the input's own size (rounded to the grid) instead of the trained size."""
    width: Optional[int] = None
    """Width of a generated image set when there is no input image (default: the working size, the aspect
    training saw most)."""
    height: Optional[int] = None
    """Height of a generated image set when there is no input image (default: the working size, the aspect
    training saw most)."""
    allow_crop: bool = False
    """Centre-crop an input whose shape training would refuse at the LoRA's --image_size (more than 5% of a side
    cropped) to the shape training gives it, instead of refusing it (as training's --allow_crop)."""
    blend_visible: bool = True
    """With concat conditioning: reset the visible panels to the input noised to the current step after every
    step, as training shows them (ComfyUI's noise_mask); --no_blend_visible leaves them to the model."""
    save_comparison: bool = False
    """Also write one side-by-side image: input | mask | outputs, with captions."""
    cpu_offload: bool = False
    """diffusers' model offload: every model on the CPU, each moved to the GPU only while it runs. Not needed to keep
    the text encoders and the denoiser apart (inference never has them on the GPU together); it lowers the peak
    further, to the largest single model's, at the cost of moving the denoiser every pipeline call."""
    memory_log: Optional[str] = None
    """Write the run's memory plan to this JSON file: per phase (load, text encoding, then denoising and VAE decode
    per pipeline call) where each model is and in which dtype, the peak GPU memory (CUDA) and the host RSS."""
    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None
    """Weights dtype (default on CUDA: the backend's own, float16 for SDXL and bfloat16 for FLUX; float32 on CPU)."""
    max_token_length: Optional[int] = None
    """SDXL: CLIP tokens read from the prompt, 75, 150 or 225 (default: the LoRA's recorded value, else 75)."""
    quantize: Optional[Literal["nf4", "int8"]] = None
    """Load the FLUX transformer quantized through bitsandbytes (CUDA only; FLUX.1 in bf16 needs ~24 GB)."""
    pretrained_vae: Optional[str] = None
    """A separate VAE folder or hub id, as training's --pretrained_vae (default: the one recorded with the LoRA;
    'none': the base model's own)."""
    vae_tiling: Literal["auto", "on", "off"] = "auto"
    """Run the VAE in tiles (one large image) and slices (a batch, one image at a time) to bound its memory:
    'auto' tiles images of more than 2 x 1024x1024 pixels and slices calls of several images whose pixels together
    exceed 1024x1024."""
    compile: bool = False
    """torch.compile the denoiser's repeated blocks after the LoRA is loaded (regional compilation); the first denoising step compiles them (its seconds are logged and in the JSON)."""
    dry_run: bool = False
    """Check the inputs and settings and print the plan (inputs, working sizes, pipeline calls) and the GPU and host memory it needs (estimated from the base model's configs), then exit: no weights loaded, nothing written."""
    gpu_memory_gib: Optional[float] = None
    """GPU memory the --dry_run estimate must fit in (default: the current GPU's, or 16 without one)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"--strength must be in (0, 1], got {self.strength}")
        for name in ["num_images", "batch_size", "num_inference_steps"]:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ["gradient_width", "guidance_scale"]:
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must not be negative, got {getattr(self, name)}")
        for name in ["width", "height"]:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if int(self.num_inference_steps * self.strength) < 1:
            raise ValueError(
                f"--strength {self.strength} x --num_inference_steps {self.num_inference_steps} leaves no denoising step"
            )
        if self.input_image and (self.width or self.height):
            raise ValueError("--width/--height set the size of a generated set; with --input_image the output keeps its size")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"--image_size must be at least 1, got {self.image_size}")
        if self.native_size and self.image_size is not None:
            raise ValueError("--native_size denoises at the input's own size: give it without --image_size")
        if self.grid is not None:
            self.grid = str(Grid.parse(self.grid))  # '2×2' or ' 2X2' is read as 2x2
        if self.max_token_length is not None and self.max_token_length not in backend_spec(self.backend).max_token_lengths:
            raise ValueError(backend_spec(self.backend).max_token_length_refusal
                             or f"--max_token_length must be 75, 150 or 225, got {self.max_token_length}")
        if self.input_dir and (self.input_image or self.mask_image):
            raise ValueError("--input_dir runs a whole folder: give it without --input_image / --mask_image")
        if self.prompt is None and not self.input_dir:
            raise ValueError("--prompt is required (with --input_dir, NAME.txt beside each image can give it)")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("--prompt must not be empty")
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise ValueError(f"--gpu_memory_gib must be positive, got {self.gpu_memory_gib}")
