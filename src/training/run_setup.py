"""Setting up a training run: what `Trainer.setup` does, in this order.

    data        scanned and validated before any model loads
    accelerate  a fresh Accelerator, the seed, the run's dtypes and the run settings a
                checkpoint records (RESUME_KEYS, UNRECORDED)
    outputs     the output folder, the checkpoint to resume and whether its settings match,
                free space (check_outputs)
    model       backend + LoRA in the run's dtype, then the caches with only their encoder on
                the device, then the placement for training
    optimizer   its parameter groups, the data loader, the schedule, `accelerator.prepare`
    resume      the checkpoint's state and where in the data it stopped

The functions take the `Trainer` (trainer.py) and set the attributes its loop reads
(`trainer.backend`, `trainer.optimizer`, ...), as the Monitor reads them.
"""

from __future__ import annotations

import json
import logging
import math

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler

from .. import hub
from ..backends import backend_class, load_backend
from ..backends.base import TimestepSampling
from ..backends.lora_files import SAVE_DTYPES
from ..compiling import COMPILE_OPTIONS, check_compilable
from ..cpu import set_cpu_threads
from ..data import BucketBatchSampler, CompositeDataset, collate, scan_folder
from . import checkpoints, distributed
from .checkpoints import STATE_NAME
from .cache import build_caches
from .config import TrainConfig, without_cuda
from .memory_log import MemoryLog
from .monitor import Monitor

logger = logging.getLogger(__name__)
# Settings a checkpoint can only be resumed with unchanged: everything that decides the
# model, the data order or the math of a step, the optimizer's and the schedule's included
# (their state is restored from the checkpoint, so a new value would be recorded but not
# used). What may change: max_train_steps / num_epochs, save_every, checkpoints_total_limit,
# output options, cache_text_embeddings, gradient_checkpointing, compile, num_workers.
RESUME_KEYS = ("backend", "model_id", "variant", "pretrained_vae", "quantize", "conditioning", "context_timestep",
               "grid", "image_size", "batch_size", "gradient_accumulation_steps", "learning_rate", "conv_in_learning_rate",
               "lr_scheduler",
               "lr_warmup_steps", "weight_decay", "max_grad_norm", "use_8bit_adam", "lora_rank", "lora_alpha",
               "lora_dropout", "lora_convs", "mask_probability", "max_masked_panels", "timestep_sampling", "logit_mean", "logit_std",
               "visible_loss_weight", "caption_dropout",
               "cache_latents", "max_token_length", "seed", "timestep_shift", "bucket_by", "distributed")
# Run settings that checkpoints record only since they exist: a checkpoint without one was
# trained with this value. A resumed run keeps the checkpoint's value unless its flag is set
# (not 'auto'; then the two must agree), so a later change of default never changes a resumed run.
UNRECORDED = {
    "timestep_shift": "none",
    "bucket_by": "longest",
    "distributed": "ddp",
    "lora_convs": False,
    # Internal choices without a flag, changed since; how the newer runs do it is in `setup`.
    "decay_fully_trained": True,  # AdamW's weight decay on conv_in too (see parameter_groups)
    "dropped_caption": "empty",  # a dropped caption trained as the encoding of "" (see Trainer.prompt_embeds)
}


def parameter_groups(backend, cfg: TrainConfig, decay_fully_trained: bool = False) -> list:
    """What the optimizer updates: the LoRA, at --weight_decay, and in a group of their own
    the fully trained parameters (SDXL concat's conv_in) without weight decay: decay would pull
    its pretrained channels toward zero, not toward the base, and a LoRA's decay only pulls
    toward the base because its product starts at zero. --conv_in_learning_rate sets that
    group's rate (the schedule scales both). `decay_fully_trained`: one group, decayed
    throughout (how checkpoints that do not record it were trained)."""
    params = backend.trainable_parameters()
    full = {id(p) for p in backend.fully_trained_parameters()}
    if not full or (decay_fully_trained and cfg.conv_in_learning_rate is None):
        return params
    group = {"params": [p for p in params if id(p) in full]}
    if cfg.conv_in_learning_rate is not None:
        group["lr"] = cfg.conv_in_learning_rate
    if not decay_fully_trained:
        group["weight_decay"] = 0.0
    return [{"params": [p for p in params if id(p) not in full]}, group]


def setup(trainer) -> None:
    cfg = trainer.cfg = without_cuda(trainer.cfg)
    backend_cls = backend_class(cfg.backend)
    records = scan_folder(cfg.data_dir, cfg.image_size, trainer.grid, backend_cls.pixel_quantum, cfg.allow_crop,
                          cfg.bucket_by)
    model_source = hub.model_source(cfg.model_id)  # before anything is written: an id no one serves fails here
    vae_source = hub.model_source(cfg.pretrained_vae, "--pretrained_vae") if cfg.pretrained_vae else None
    trainer.monitor = Monitor(trainer, records)
    # FSDP trains in bf16 on a GPU: fp16 would need a gradient scaler that knows the shards.
    preferred = "bf16" if cfg.distributed == "fsdp" else backend_cls.preferred_mixed_precision
    mixed = cfg.mixed_precision or (preferred if torch.cuda.is_available() else "no")
    # accelerate keeps process-wide state that refuses a second in-process run with other
    # settings (e.g. mixed precision): start each run from a clean one, keeping the
    # distributed set-up (PartialState).
    AcceleratorState._reset_state()
    GradientState._reset_state()
    trainer.accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(trainer.output_dir), logging_dir=str(trainer.output_dir / "logs")),
        log_with=cfg.report_to,
    )
    distributed.check_launch(trainer.accelerator, cfg.distributed)
    trainer.sharded = cfg.distributed == "fsdp"
    set_seed(cfg.seed)
    set_cpu_threads(cfg.model_id, trainer.accelerator.device)
    trainer.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    trainer.save_dtype = SAVE_DTYPES[cfg.save_precision or ("bf16" if mixed == "bf16" else "fp16")]
    trainer.run_signature = {k: getattr(cfg, k) for k in RESUME_KEYS}
    trainer.run_signature["max_token_length"] = cfg.max_token_length or backend_cls.max_token_length  # the default, spelled out
    trainer.run_signature["visible_loss_weight"] = cfg.visible_weight
    trainer.run_signature["timestep_shift"] = cfg.shift_scheme
    trainer.run_signature["lora_convs"] = cfg.convs
    trainer.run_signature.update(decay_fully_trained=False, dropped_caption="unconditional")
    trainer.run_signature.update(mixed_precision=mixed, num_samples=len(records),
                                 num_processes=trainer.accelerator.num_processes)
    check_outputs(trainer)
    if cfg.compile:
        check_compilable(trainer.accelerator.device)

    options = {"variant": cfg.variant, "vae": vae_source}
    if cfg.quantize:
        options["quantize"] = cfg.quantize
    if cfg.context_timestep:
        options["context_timestep"] = cfg.context_timestep
    if cfg.max_token_length:
        options["max_token_length"] = cfg.max_token_length
    if trainer.weight_dtype != torch.float32:
        # Frozen weights load in it, the text encoders too when the denoiser is quantized:
        # no float32 copy on the host.
        options["dtype"] = trainer.weight_dtype
    trainer.backend = load_backend(cfg.backend, model_source, cfg.conditioning, **options)
    trainer.backend.base_model = cfg.model_id  # the id is recorded, not the cache folder it may load from
    trainer.backend.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, convs=trainer.run_signature["lora_convs"])
    trainer.backend.timestep_sampling = TimestepSampling(cfg.sampling_scheme, cfg.logit_mean, cfg.logit_std,
                                                         trainer.run_signature["timestep_shift"])
    if trainer.accelerator.is_main_process:  # now exactly: the estimate was made before loading
        checkpoints.check_free_space(trainer.output_dir, sum(p.numel() for p in trainer.backend.trainable_parameters()),
                                     cfg.use_8bit_adam, "counted")
    if cfg.gradient_checkpointing:
        trainer.backend.enable_gradient_checkpointing()
    # The memory plan: every weight in its run dtype where it was loaded (the host; a
    # quantized denoiser on the GPU), then the caches encode with only their encoder on
    # the device, and only then does the denoiser join what training still needs.
    trainer.backend.to(trainer.accelerator.device, trainer.weight_dtype, parts=())
    trainer.memory = MemoryLog(trainer.output_dir, trainer.accelerator.device, trainer.accelerator.is_main_process)
    trainer._recorded_step = 0
    trainer.record_memory("load")
    if cfg.compile:  # after the LoRA and checkpointing: the compiled blocks run both
        compiled = trainer.backend.compile_blocks(**COMPILE_OPTIONS)
        logger.info("--compile: %s compiled; the first step compiles them",
                    ", ".join(f"{n} {name}" for name, n in compiled.blocks.items()))

    trainer.records = records
    dataset = CompositeDataset(records)
    trainer.prompt_cache, trainer.latent_cache = build_caches(
        cfg, trainer.backend, records, dataset, trainer.grid, trainer.accelerator.device, trainer.run_signature["dropped_caption"],
        trainer.monitor.prompts(), trainer.record_memory)
    if trainer.prompt_cache is not None:
        trainer.monitor.prompt_arguments = trainer.prompt_cache.pipeline_arguments
    trainer.backend.place("denoiser", True)
    trainer.backend.place("text_encoders", trainer.prompt_cache is None)  # else never again during training
    trainer.backend.place("vae", trainer.latent_cache is None)
    if trainer.latent_cache is not None:  # the pixels are never used: do not decode them each step
        dataset = CompositeDataset(records, pixels=False)

    if trainer.sharded:  # before the optimizer: sharding replaces the parameters
        units = distributed.shard(trainer.backend, trainer.accelerator.device, trainer.weight_dtype)
        logger.info("--distributed fsdp: the denoiser sharded over %d processes in %d blocks and the root",
                    trainer.accelerator.num_processes, units)
    params = parameter_groups(trainer.backend, cfg, trainer.run_signature["decay_fully_trained"])
    if cfg.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    else:
        # The fused kernel updates every tensor in one launch (CUDA only).
        fused = trainer.accelerator.device.type == "cuda"
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)

    trainer.batch_sampler = BucketBatchSampler(records, cfg.batch_size, cfg.seed)
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_sampler=trainer.batch_sampler, collate_fn=collate, num_workers=cfg.num_workers
    )
    processes = trainer.accelerator.num_processes
    trainer.steps_per_epoch = max(1, math.ceil(len(trainer.batch_sampler) / processes / cfg.gradient_accumulation_steps))
    trainer.max_train_steps = cfg.max_train_steps or cfg.num_epochs * trainer.steps_per_epoch
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * processes, num_training_steps=trainer.max_train_steps * processes,
    )
    if trainer.sharded:  # sharded already: accelerate would wrap it in DDP
        trainer.optimizer, trainer.dataloader, trainer.lr_scheduler = trainer.accelerator.prepare(
            optimizer, dataloader, lr_scheduler)
    else:
        trainer.backend.denoiser, trainer.optimizer, trainer.dataloader, trainer.lr_scheduler = trainer.accelerator.prepare(
            trainer.backend.denoiser, optimizer, dataloader, lr_scheduler
        )
        trainer.accelerator.register_save_state_pre_hook(trainer._save_hook)
        trainer.accelerator.register_load_state_pre_hook(trainer._load_hook)
    if trainer.resume_dir is not None:
        if trainer.sharded:
            checkpoints.load_sharded_state(trainer, trainer.resume_dir)
        else:
            trainer.accelerator.load_state(str(trainer.resume_dir))
        state = json.loads((trainer.resume_dir / STATE_NAME).read_text())
        trainer.global_step, trainer.micro_step = state["global_step"], state["micro_step"]
        trainer.epoch, trainer.batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        if trainer.batches_in_epoch >= len(trainer.dataloader):  # saved at the end of an epoch
            trainer.epoch, trainer.batches_in_epoch = trainer.epoch + 1, 0
        logger.info("resumed from %s at step %d", trainer.resume_dir.name, trainer.global_step)


def check_outputs(trainer) -> None:
    """Before any model loads: the output folder takes files and has room, no other run's
    results are in the way, and what killed runs left half-written is gone."""
    cfg, main = trainer.cfg, trainer.accelerator.is_main_process
    if main:
        checkpoints.prepare_output_dir(trainer.output_dir)
    trainer.accelerator.wait_for_everyone()
    trainer.resume_dir = checkpoints.resume_folder(cfg.resume_from_checkpoint, trainer.output_dir)
    if trainer.resume_dir is not None:
        check_resumable(trainer, json.loads((trainer.resume_dir / STATE_NAME).read_text()))
    checkpoints.check_earlier_run(trainer.output_dir, trainer.resume_dir, cfg.overwrite_output_dir, main)
    if main:
        convs = trainer.run_signature["lora_convs"]
        params = checkpoints.estimate_trainable_params(cfg.backend, cfg.model_id, cfg.lora_rank, convs)
        checkpoints.check_free_space(trainer.output_dir, params, cfg.use_8bit_adam,
                                     f"estimated for --lora_rank {cfg.lora_rank}" + (" with --lora_convs" if convs else ""))
    trainer.accelerator.wait_for_everyone()


def check_resumable(trainer, state: dict) -> None:
    saved = {**UNRECORDED, **state.get("run", {})}
    for key in UNRECORDED:
        if getattr(trainer.cfg, key, None) in (None, "auto"):  # no flag, or not given: what the checkpoint used
            trainer.run_signature[key] = saved[key]
    changed = [f"{k} {saved[k]} -> {v}" for k, v in trainer.run_signature.items() if k in saved and saved[k] != v]
    if changed:
        raise ValueError(f"--resume_from_checkpoint {trainer.resume_dir}: run settings differ ({'; '.join(changed)}); "
                         "resume with the checkpoint's settings (the run length, saving, text-embedding caching, "
                         "gradient checkpointing, compiling and workers may change)")
