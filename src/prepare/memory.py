"""How much GPU and host memory a training run needs, estimated before anything loads.

    memory: peak 13.9 GiB on the GPU (first step), 21 GiB host RAM

The model's size comes from its own configs, built on the meta device (no weights read):
parameter counts per model, the denoiser's linear layers (what bitsandbytes quantizes) and
the LoRA the settings add (the backends' target modules at --lora_rank). The phases follow
the run's memory plan (backends/placement.py, training/memory_log.py):

    load          a quantized denoiser (bitsandbytes loads it onto the GPU); nothing else
    caching       one encoder on the GPU, the denoiser off it
    first step    the denoiser, the encoders not cached, LoRA weights, gradients and the
                  optimizer's state (float32 AdamW: 8 bytes a parameter; 8-bit: 2), and the
                  step's activations
    sample sheet  the same weights plus the VAE, and the sampler's activations

Inference (prepare/memory_inference.py, `inference_estimate`) has its own phases, those of its
memory plan (inference/memory_plan.py): "load" (a quantized denoiser), "text encoding" (the
text encoders alone), "denoising" (the denoiser, the LoRA and the VAE, and the sampler's
activations, twice the batch under SDXL's classifier-free guidance) and "VAE decode" (the
same weights and the VAE's activations, one tile and one image at a time with
--vae_tiling); with --cpu_offload each model alone, "text encoding" the larger encoder.

Activations per latent pixel (SDXL) or token (FLUX, text tokens included) and a fixed
allocator overhead are fitted to the peak reserved memory measured on an H100
(benchmarks/RESULTS.md, "GPU memory and speed"): SDXL fp16 1024² batch 1 and 4 with
checkpointing, SDXL bf16 without; FLUX.1-dev NF4 at 1024² and 1024x1536 and bf16, with
checkpointing. What no measured row covers is extrapolated and named so in ESTIMATED; a
backend with no row of its own (FLUX.2: FLUX.1's activations scaled, flux2_spec.py) marks
its line `peak ~N.N GiB ... (activations extrapolated from FLUX.1)`. With --distributed fsdp
the denoiser's parts are per process (`fsdp over N`, N from WORLD_SIZE).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

GIB = 2**30
ALLOCATOR_OVERHEAD = 0.22  # GiB reserved beyond what the terms count (both families' fits agree)
# Activations per unit: each backend's spec (BackendSpec.memory, backends/*_spec.py).
SDXL_VAE_PARAMS = 83_653_863  # its VAE (FLUX.1's is the same size), whose activations VAE_BYTES_PER_PIXEL is of
NO_CHECKPOINTING_FACTOR = 10.0  # SDXL's measured ratio, applied to FLUX (no row measured)
SAMPLING_SHARE = 0.25  # the sampler's activations against a checkpointed training step's (estimate)
VAE_BYTES_PER_PIXEL = 2560  # float32 VAE encode/decode peak per image pixel (estimate; half in 16-bit)
HOST_BASELINE = 2.5  # GiB: Python, torch and the CUDA libraries (estimate)
NF4_BYTES = 0.5 + 1 / 64 + 4 / 64 / 256  # 4-bit weights, double-quantized absmax per 64, per 256
INT8_BYTES = 1.0 + 4 / 4096  # row-wise scales
ESTIMATED = ("FLUX without --gradient_checkpointing", "--context_timestep zero's per-token modulation",
             "VAE encode/decode and sampler activations", "host RAM")


@dataclass
class ModelSizes:
    backend: str
    denoiser: int  # parameters
    denoiser_linear: int  # of them in nn.Linear weights (what bitsandbytes quantizes)
    lora: int  # LoRA parameters at `rank` (plus SDXL concat's fully trained conv_in)
    rank: int
    text_encoders: list[int]
    vae: int
    blocks: dict[str, int]  # FLUX: double / single blocks and the hidden width
    scale: float = 1.0  # activations against the full-size model's the fit was made on
    shard_block: int = 0  # parameters of the largest block --distributed fsdp shards (gathers whole while it runs)
    shard_root: int = 0  # parameters outside those blocks (FSDP2's root unit: gathered for the whole step)

    @property
    def vae_scale(self) -> float:
        """The VAE's activations against a full-size VAE's: about the square root of its
        parameters (its channel widths), 1 for the SDXL and FLUX.1 VAEs."""
        return min(1.0, (self.vae / SDXL_VAE_PARAMS) ** 0.5)


def _lora_params(model, targets, rank: int, conv_targets=()) -> int:
    """The LoRA's weights: rank x (in + out) per targeted Linear; per targeted Conv2d, a
    down conv of the layer's kernel (rank x in x k x k) and a 1x1 up conv (out x rank), as PEFT
    builds them."""
    import torch

    def hit(name, names) -> bool:
        return bool(re.fullmatch(names, name) if isinstance(names, str)
                    else any(name == t or name.endswith("." + t) for t in names))

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and hit(name, targets):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Conv2d) and conv_targets and hit(name, conv_targets):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            total += rank * (module.in_channels * kernel + module.out_channels)
    return total


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _profile(backend: str):
    from ..backends.registry import backend_spec

    return backend_spec(backend).memory


def model_sizes(backend: str, model_id: str, rank: int, conditioning: str, convs: bool = False) -> ModelSizes:
    """Parameter counts from the configs of `model_id` (a local diffusers folder, a hub id whose
    configs are in the local cache, or a tiny id), the models built on the meta device; with
    `convs` the LoRA on the spec's conv layers too (--lora_convs).
    Raises OSError when a config cannot be read."""
    import torch

    from ..backends.tiny import TINY_MODELS, is_tiny

    parts = _profile(backend).parts()  # the backend's model classes and LoRA targets
    key, Denoiser = parts["denoiser"]
    from diffusers import AutoencoderKL
    from transformers import AutoConfig

    Vae = parts.get("vae", AutoencoderKL)

    if is_tiny(model_id):
        models = TINY_MODELS[model_id]()  # a few MB, built in code
        denoiser, vae = models[key], models["vae"]
        encoders = [models[sub] for sub, _ in parts["text_encoders"]]
    else:
        with torch.device("meta"):
            denoiser = Denoiser.from_config(Denoiser.load_config(model_id, subfolder=key))
            vae = Vae.from_config(Vae.load_config(model_id, subfolder="vae"))
            encoders = [cls._from_config(AutoConfig.from_pretrained(model_id, subfolder=sub))
                        for sub, cls in parts["text_encoders"]]
    from ..backends.registry import backend_spec

    conv_targets = backend_spec(backend).lora_conv_targets if convs else ()
    lora = (_lora_params(denoiser, parts["lora_targets"], rank, conv_targets)
            + parts["extra_lora"](denoiser, conditioning))
    params = _count(denoiser)
    scale, blocks = parts["shape"](denoiser, params)
    linear = sum(m.weight.numel() for m in denoiser.modules() if isinstance(m, torch.nn.Linear))
    units = [_count(unit) for unit in parts.get("shard_units", lambda d: [])(denoiser)] or [0]
    return ModelSizes(backend, params, linear, lora, rank, [_count(e) for e in encoders], _count(vae), blocks, scale,
                      max(units), params - sum(units))


@dataclass
class Settings:
    """What the estimate reads from a TrainConfig (replaced one by one for the suggestions)."""

    height: int
    width: int
    batch_size: int
    accumulation: int
    rank: int
    precision: str  # "fp16", "bf16", "no"
    quantize: str | None
    checkpointing: bool
    adam8bit: bool
    cache_text: bool
    cache_latents: bool
    conditioning: str
    context_timestep: str | None
    sampling: bool
    processes: int = 1  # --distributed fsdp: the processes the denoiser is sharded over (1: not sharded)


@dataclass
class Estimate:
    gpu: dict[str, float]  # phase -> peak reserved GiB
    host: float  # GiB
    extrapolated: str = ""  # where unmeasured activation figures come from (the line marks the peak '~')
    processes: int = 1  # --distributed fsdp: figures per process, sharded over this many

    @property
    def peak_phase(self) -> str:
        return max(self.gpu, key=self.gpu.get)

    @property
    def peak(self) -> float:
        return self.gpu[self.peak_phase]

    def line(self) -> str:
        approx, per = ("~" if self.extrapolated else ""), self.processes > 1
        return (f"memory: peak {approx}{self.peak:.1f} GiB on the GPU ({self.peak_phase})"
                + (f" per process (fsdp over {self.processes})" if per else "") + f", {self.host:.0f} GiB host RAM"
                + (f" ({self.extrapolated})" if self.extrapolated else ""))


def _weights(sizes: ModelSizes, s: Settings) -> dict[str, float]:
    """GiB of each part's weights as the run holds them."""
    half = 4 if s.precision == "no" else 2
    if s.quantize:
        packed = NF4_BYTES if s.quantize == "nf4" else INT8_BYTES
        # Quantized linears; the rest float32 after QLoRA preparation (training).
        denoiser = sizes.denoiser_linear * packed + (sizes.denoiser - sizes.denoiser_linear) * 4
    else:
        denoiser = sizes.denoiser * half
    vae_bytes = 4 if _profile(sizes.backend).vae_float32 or s.precision != "bf16" else 2  # SDXL's VAE stays float32
    return {"denoiser": denoiser / GIB, "text_encoders": sum(sizes.text_encoders) * half / GIB,
            "vae": sizes.vae * vae_bytes / GIB, "vae_bytes": vae_bytes}


def _activations(sizes: ModelSizes, s: Settings) -> float:
    """GiB of one training step's activations."""
    latent_pixels = (s.height // 8) * (s.width // 8)
    profile = _profile(sizes.backend)
    if profile.text_tokens is None:
        units = latent_pixels
    else:
        units = latent_pixels // 4 + profile.text_tokens  # image tokens (2x2 patches) + the text's
    per = profile.quantized_activations if s.quantize and profile.quantized_activations else profile.activations
    if not s.checkpointing:
        per = profile.unchecked_activations or per * NO_CHECKPOINTING_FACTOR
    extra = 0.0
    if profile.per_token_modulation and s.conditioning == "context" and s.context_timestep in (None, "zero"):
        # Per-token modulation: (B, N, width) tensors, 6 per double block and 3 per single
        # block; with checkpointing one block's, held ~3x through its backward.
        b = sizes.blocks
        tensor = s.batch_size * (latent_pixels // 4) * b["width"] * 2 / GIB
        count = (profile.modulation_tensors(b, s.checkpointing) if profile.modulation_tensors
                 else 6 * 3 if s.checkpointing else 6 * b["double"] + 3 * b["single"])
        extra = tensor * count
    factor = 2 if s.precision == "no" else 1
    return (per * sizes.scale * units * s.batch_size + extra) * factor


def estimate(sizes: ModelSizes, s: Settings) -> Estimate:
    w = _weights(sizes, s)
    lora = sizes.lora * (4 + 4 + (2 if s.adam8bit else 8)) / GIB  # float32 weights, gradients, Adam
    pixels = s.height * s.width
    vae_act = pixels * VAE_BYTES_PER_PIXEL * sizes.vae_scale * (w["vae_bytes"] / 4) / GIB
    step_act = _activations(sizes, s)
    denoiser = w["denoiser"]
    if s.processes > 1:
        # --distributed fsdp: each process stores 1/N of the denoiser, the LoRA, its gradients and the
        # optimizer's state; the root unit stays gathered through the step and a block's weights while it
        # runs, two at once as FSDP2 prefetches the next block's all-gather. Activations, the text encoders
        # and the VAE are not sharded, nor host RAM (each process loads the whole base before sharding).
        gathered = (sizes.shard_root + 2 * sizes.shard_block) * (4 if s.precision == "no" else 2) / GIB
        denoiser, lora = denoiser / s.processes + gathered, lora / s.processes
    resident = denoiser + lora + (0 if s.cache_text else w["text_encoders"]) + (0 if s.cache_latents else w["vae"])
    gpu = {"load": (w["denoiser"] if s.quantize else 0.0) + ALLOCATOR_OVERHEAD}
    if s.cache_text:
        gpu["caching"] = w["text_encoders"] + 0.1 + ALLOCATOR_OVERHEAD
    if s.cache_latents:
        gpu["caching"] = max(gpu.get("caching", 0.0), w["vae"] + vae_act + ALLOCATOR_OVERHEAD)
    train = resident + step_act + (0 if s.cache_latents else vae_act / 2) + ALLOCATOR_OVERHEAD
    gpu["first step"] = train
    if s.sampling:
        sample_act = max(step_act * SAMPLING_SHARE / (1 if s.checkpointing else NO_CHECKPOINTING_FACTOR), vae_act)
        # The VAE comes back if latents are cached; the text encoders never (prompts encoded once).
        gpu["sample sheet"] = resident + (w["vae"] if s.cache_latents else 0.0) + sample_act + ALLOCATOR_OVERHEAD
    host = HOST_BASELINE + sum(v for k, v in w.items() if k in ("text_encoders", "vae"))
    if not s.quantize:
        host += w["denoiser"]
    elif s.cache_text or s.cache_latents:
        host += w["denoiser"]  # a quantized denoiser waits on the host while encoders run
    return Estimate({k: round(v, 2) for k, v in gpu.items()}, host, _profile(sizes.backend).extrapolated, s.processes)


def settings_of(cfg, height: int, width: int, cuda: bool) -> Settings:
    """The Settings of a TrainConfig at the largest bucket (height x width)."""
    from ..backends import backend_class

    precision = cfg.mixed_precision or (("bf16" if cfg.distributed == "fsdp" else
                                          backend_class(cfg.backend).preferred_mixed_precision) if cuda else "no")
    # accelerate launch tells each process the run's size in WORLD_SIZE (as prepare/check.py reads it).
    processes = int(os.environ.get("WORLD_SIZE", "1")) if cfg.distributed == "fsdp" else 1
    return Settings(height, width, cfg.batch_size, cfg.gradient_accumulation_steps, cfg.lora_rank, precision,
                    cfg.quantize, cfg.gradient_checkpointing, cfg.use_8bit_adam, cfg.cache_text_embeddings,
                    cfg.cache_latents, cfg.conditioning, cfg.context_timestep, cfg.validating, processes)


# Changes that lower the estimate, tried in this order (each kept once tried): (flag, applies, change)
CHANGES = [
    ("--gradient_checkpointing", lambda s, b: not s.checkpointing, lambda s: replace(s, checkpointing=True)),
    ("--use_8bit_adam", lambda s, b: not s.adam8bit and s.processes == 1, lambda s: replace(s, adam8bit=True)),
    ("--cache_text_embeddings", lambda s, b: not s.cache_text, lambda s: replace(s, cache_text=True)),
    ("--cache_latents", lambda s, b: not s.cache_latents, lambda s: replace(s, cache_latents=True)),
    ("--quantize nf4", lambda s, b: _profile(b).suggest_quantize and not s.quantize and s.processes == 1,
     lambda s: replace(s, quantize="nf4")),
]


def fit(sizes: ModelSizes, s: Settings, budget: float) -> tuple[list[str], Estimate]:
    """The flags that bring the estimate under `budget` GiB, tried in order (CHANGES, then
    batch 1 with accumulation, a lower rank, a smaller image), and the estimate with them."""
    flags, current = [], estimate(sizes, s)
    steps = [(f, c) for f, ok, c in CHANGES if ok(s, sizes.backend)]
    if s.batch_size > 1:
        acc = s.batch_size * s.accumulation
        steps.append((f"--batch_size 1 --gradient_accumulation_steps {acc}",
                      lambda s: replace(s, batch_size=1, accumulation=acc)))
    if s.rank > 16:
        steps.append(("--lora_rank 16 --lora_alpha 16", lambda s: replace(s, rank=16)))
    for flag, change in steps:
        if current.peak <= budget:
            break
        s = change(s)
        if flag.startswith("--lora_rank"):
            sizes = replace(sizes, lora=sizes.lora * 16 // sizes.rank, rank=16)
        flags.append(flag)
        current = estimate(sizes, s)
    side = max(s.height, s.width)
    while current.peak > budget and side > 512:
        side -= 256
        scale = side / max(s.height, s.width)
        s = replace(s, height=int(s.height * scale) // 16 * 16, width=int(s.width * scale) // 16 * 16)
        current = estimate(sizes, s)
        flags = [f for f in flags if not f.startswith("--image_size")] + [f"--image_size {side}"]
    return flags, current


def default_budget() -> float:
    """The current GPU's memory in GiB, or 16 without one."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    return 16.0


def estimable(backend: str) -> bool:
    """Whether measured activations exist for `backend` (what the estimate is fitted to)."""
    from ..backends.registry import backend_names

    return backend in backend_names() and _profile(backend) is not None


def report(cfg, buckets) -> Estimate | None:
    """Print the estimate line for the dry run's largest bucket, and when it does not fit
    --gpu_memory_gib the flags that would; None when the model's configs cannot be read."""
    import torch

    if not estimable(cfg.backend):
        print(f"memory: no estimate: --backend {cfg.backend} has no measured activations yet")
        return None
    height, width = max(buckets, key=lambda hw: hw[0] * hw[1])
    budget = cfg.gpu_memory_gib if cfg.gpu_memory_gib is not None else default_budget()
    from ..hub import model_source

    try:
        sizes = model_sizes(cfg.backend, model_source(cfg.model_id), cfg.lora_rank, cfg.conditioning, cfg.convs)
    except (OSError, ValueError) as error:
        print(f"memory: no estimate: the configs of --model_id {cfg.model_id} cannot be read ({error})")
        return None
    s = settings_of(cfg, height, width, torch.cuda.is_available())
    current = estimate(sizes, s)
    print(f"memory per phase (GiB on the GPU, {height}x{width}, estimated): "
          + ", ".join(f"{k} {v:.1f}" for k, v in current.gpu.items()))
    if current.peak > budget:
        flags, fitted = fit(sizes, s, budget)
        if fitted.peak <= budget:
            print(f"does not fit --gpu_memory_gib {budget:.0f}: add {' '.join(flags)} "
                  f"(estimate {fitted.peak:.1f} GiB, {fitted.peak_phase})")
        else:
            print(f"does not fit --gpu_memory_gib {budget:.0f}, nor with {' '.join(flags)} "
                  f"({fitted.peak:.1f} GiB): use a larger GPU")
    print(current.line())
    return current
