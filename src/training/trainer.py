"""The shared IC-LoRA trainer: one loop for every backend.

    setup()            data (validated before any model loads), backend + LoRA, optimizer,
                       accelerate, resume
    train()            the loop; the per-batch math is `_loss_step`
    save_checkpoint()  resumable state every --save_every steps
    save_final()       final_model/: diffusers-format LoRA + iclora_config.json

Randomness that decides *what* is trained (masked panels, caption dropout, noise,
timesteps, and through the global RNG LoRA dropout and VAE sampling) comes from a generator
seeded by (seed, micro-batch, process), and the data order is a function of (seed, epoch):
a checkpoint records (epoch, micro-batches done in it, micro-batch count), so a resumed run
replays an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .. import __version__
from ..backends import BACKENDS, load_backend
from ..backends.lora_files import METADATA_NAME, atomic_directory, atomic_save_file, atomic_write_text
from ..data import BucketBatchSampler, CompositeDataset, collate, scan_folder
from ..panels import Grid, latent_mask, panel_mask, sample_masked_panels
from .cache import build_caches
from .config import TrainConfig

logger = logging.getLogger(__name__)
TRAINABLE_NAME = "trainable.safetensors"
STATE_NAME = "trainer_state.json"
# Settings a checkpoint can only be resumed with unchanged: they decide the model, the data
# order or what a step means. (max_train_steps / num_epochs may grow on resume.)
RESUME_KEYS = ("backend", "model_id", "conditioning", "grid", "image_size", "batch_size",
               "gradient_accumulation_steps", "lora_rank", "lora_alpha", "max_token_length", "seed")


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean squared error weighted per latent pixel; weight (B, 1, h, w) broadcasts over C."""
    squared = (pred.float() - target.float()) ** 2 * weight
    return squared.sum() / (weight.sum() * pred.shape[1]).clamp_min(1e-8)


def diffusion_loss(
    backend,
    latents: torch.Tensor,
    mask: torch.Tensor,
    masked_latents: torch.Tensor | None,
    prompt_embeds: dict[str, torch.Tensor],
    batch: dict,
    generator: torch.Generator,
    visible_loss_weight: float = 0.0,
) -> torch.Tensor:
    """The model math of one training step, from encoded inputs to the weighted loss.
    latents (B, C, h, w); mask (B, 1, h, w), 1 = masked panel."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    noisy, timesteps, target = backend.noise_latents(latents, noise, generator)
    pred = backend.predict(noisy, timesteps, prompt_embeds, mask, masked_latents, batch)
    weight = mask + visible_loss_weight * (1 - mask)
    return masked_mse(pred, target, weight.float())


def optimizer_step(accelerator, optimizer, lr_scheduler, loss: torch.Tensor, max_grad_norm: float) -> None:
    """Backward, clip and step for one micro-batch (inside `accelerator.accumulate`)."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm > 0:
        # The optimizer's own parameters: walking all 3 080 SDXL parameters for the trainable
        # ones took ~12 ms of host time per step (2-core CPU), paid in full by a GPU step
        # that is bound by kernel launches (benchmarks/RESULTS.md).
        params = [p for group in optimizer.param_groups for p in group["params"]]
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def step_generator(seed: int, micro_step: int, process: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, micro_step, process]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def backend_class(name: str) -> type:
    """The backend's class, whose attributes (pixel quantum, preferred precision) are known
    before any weights are loaded."""
    import importlib

    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


@dataclass
class TrainResult:
    final_dir: Path
    global_step: int
    losses: list[float] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.grid = Grid.parse(cfg.grid)
        self.output_dir = Path(cfg.output_dir)
        self.global_step = 0
        self.micro_step = 0  # micro-batches trained so far
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches of self.epoch already trained

    # ---- set-up -------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        backend_cls = backend_class(cfg.backend)
        records = scan_folder(cfg.data_dir, cfg.image_size, self.grid, backend_cls.pixel_quantum)
        mixed = cfg.mixed_precision or (backend_cls.preferred_mixed_precision if torch.cuda.is_available() else "no")
        # accelerate keeps process-wide state that refuses a second in-process run with other
        # settings (e.g. mixed precision): start each run from a clean one, keeping the
        # distributed set-up (PartialState).
        AcceleratorState._reset_state()
        GradientState._reset_state()
        self.accelerator = Accelerator(
            mixed_precision=mixed,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir)),
        )
        set_seed(cfg.seed)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
        self.run_signature = {k: getattr(cfg, k) for k in RESUME_KEYS}
        self.run_signature["max_token_length"] = cfg.max_token_length or backend_cls.max_token_length  # the default, spelled out
        self.run_signature.update(num_samples=len(records), num_processes=self.accelerator.num_processes)
        self.resume_dir = self._find_resume_dir()
        if self.resume_dir is not None:
            self._check_resumable(json.loads((self.resume_dir / STATE_NAME).read_text()))
        elif _checkpoints(self.output_dir):
            raise ValueError(
                f"--output_dir {self.output_dir} holds checkpoints of an earlier run: continue it with "
                "--resume_from_checkpoint latest, or choose another --output_dir"
            )

        options = {"variant": cfg.variant, "vae": cfg.pretrained_vae}
        if cfg.quantize:
            options["quantize"] = cfg.quantize
        if cfg.max_token_length:
            options["max_token_length"] = cfg.max_token_length
        self.backend = load_backend(cfg.backend, cfg.model_id, cfg.conditioning, **options)
        self.backend.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        if cfg.gradient_checkpointing:
            self.backend.enable_gradient_checkpointing()
        self.backend.to(self.accelerator.device, self.weight_dtype)

        dataset = CompositeDataset(records)
        self.prompt_cache, self.latent_cache = build_caches(
            cfg, self.backend, records, dataset, self.grid, self.accelerator.device)

        params = self.backend.trainable_parameters()
        if cfg.use_8bit_adam:
            import bitsandbytes as bnb

            optimizer = bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        else:
            # The fused kernel updates every tensor in one launch (CUDA only).
            fused = self.accelerator.device.type == "cuda"
            optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)

        self.batch_sampler = BucketBatchSampler(records, cfg.batch_size, cfg.seed)
        dataloader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.batch_sampler, collate_fn=collate, num_workers=cfg.num_workers
        )
        processes = self.accelerator.num_processes
        self.steps_per_epoch = max(1, math.ceil(len(self.batch_sampler) / processes / cfg.gradient_accumulation_steps))
        self.max_train_steps = cfg.max_train_steps or cfg.num_epochs * self.steps_per_epoch
        lr_scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer,
            num_warmup_steps=cfg.lr_warmup_steps * processes, num_training_steps=self.max_train_steps * processes,
        )
        self.backend.denoiser, self.optimizer, self.dataloader, self.lr_scheduler = self.accelerator.prepare(
            self.backend.denoiser, optimizer, dataloader, lr_scheduler
        )
        self.accelerator.register_save_state_pre_hook(self._save_hook)
        self.accelerator.register_load_state_pre_hook(self._load_hook)
        if self.resume_dir is not None:
            self.accelerator.load_state(str(self.resume_dir))
            state = json.loads((self.resume_dir / STATE_NAME).read_text())
            self.global_step, self.micro_step = state["global_step"], state["micro_step"]
            self.epoch, self.batches_in_epoch = state["epoch"], state["batches_in_epoch"]
            if self.batches_in_epoch >= len(self.dataloader):  # saved at the end of an epoch
                self.epoch, self.batches_in_epoch = self.epoch + 1, 0
            logger.info("resumed from %s at step %d", self.resume_dir, self.global_step)

    def _check_resumable(self, state: dict) -> None:
        saved = state.get("run", {})
        changed = [f"{k} {saved[k]} -> {v}" for k, v in self.run_signature.items() if k in saved and saved[k] != v]
        if changed:
            raise ValueError(f"--resume_from_checkpoint {self.resume_dir}: run settings differ ({'; '.join(changed)})")

    def _find_resume_dir(self) -> Path | None:
        wanted = self.cfg.resume_from_checkpoint
        if not wanted:
            return None
        if wanted == "latest":
            found = _checkpoints(self.output_dir)
            if not found:
                logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting fresh", self.output_dir)
                return None
            return found[-1]
        path = Path(wanted)
        if not (path / STATE_NAME).is_file():
            raise FileNotFoundError(f"--resume_from_checkpoint {path}: not a checkpoint folder (no {STATE_NAME})")
        return path

    def _save_hook(self, models, weights, output_dir) -> None:
        # Save only what is trained: a full SDXL/FLUX state per checkpoint would be GBs.
        if self.accelerator.is_main_process:
            atomic_save_file(self.backend.trainable_state_dict(), Path(output_dir) / TRAINABLE_NAME)
        weights.clear()

    def _load_hook(self, models, input_dir) -> None:
        self.backend.load_trainable_state_dict(load_file(Path(input_dir) / TRAINABLE_NAME))
        models.clear()

    # ---- the loop -----------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg, accelerator = self.cfg, self.accelerator
        losses: list[float] = []
        progress = tqdm(
            total=self.max_train_steps, initial=self.global_step, desc="train",
            disable=not accelerator.is_local_main_process,
        )
        self.backend.denoiser.train()
        while self.global_step < self.max_train_steps:
            # accelerate's loader re-sets the sampler's epoch from its own pass counter, which
            # restarts at 0 in a resumed run: set it there too.
            self.batch_sampler.set_epoch(self.epoch)
            self.dataloader.set_epoch(self.epoch)
            batches = self.dataloader
            if self.batches_in_epoch:
                batches = accelerator.skip_first_batches(self.dataloader, self.batches_in_epoch)
            running = []
            for batch in batches:
                with accelerator.accumulate(self.backend.denoiser):
                    loss = self._loss_step(batch, self.micro_step)
                    optimizer_step(accelerator, self.optimizer, self.lr_scheduler, loss, cfg.max_grad_norm)
                self.micro_step += 1
                self.batches_in_epoch += 1
                running.append(loss.detach().float())
                if not accelerator.sync_gradients:
                    continue
                self.global_step += 1
                step_loss = accelerator.gather(torch.stack(running).mean()[None]).mean().item()
                running = []
                losses.append(step_loss)
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{self.lr_scheduler.get_last_lr()[0]:.2e}")
                if self.global_step % cfg.save_every == 0:
                    self.save_checkpoint()
                if self.global_step >= self.max_train_steps:
                    break
            else:
                self.epoch, self.batches_in_epoch = self.epoch + 1, 0
        progress.close()
        final_dir = self.save_final()
        accelerator.end_training()
        return TrainResult(final_dir, self.global_step, losses)

    def _loss_step(self, batch: dict, micro_step: int) -> torch.Tensor:
        """One micro-batch: sample panel masks, noise the latents, weight the loss."""
        cfg, backend, device = self.cfg, self.backend, self.accelerator.device
        generator = step_generator(cfg.seed, micro_step, self.accelerator.process_index)
        # LoRA dropout and VAE latent sampling draw from the global RNG, which data loader
        # start-up also draws from: reseed it per micro-batch so a resumed run matches.
        torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))
        pixels = batch["pixels"].to(device)  # (B, 3, H, W)
        batch_size, _, height, width = pixels.shape

        masks, captions, subsets = [], [], []
        for caption in batch["caption"]:
            masked = sample_masked_panels(self.grid.num_panels, cfg.mask_probability, cfg.max_masked_panels, generator)
            # Nothing masked is trained as everything masked: text -> whole image set. An
            # unmasked sample would let the model copy its answer from the conditioning.
            subsets.append(tuple(masked or range(self.grid.num_panels)))
            masks.append(panel_mask(list(subsets[-1]), self.grid, height, width))
            dropped = torch.rand((), generator=generator).item() < cfg.caption_dropout
            captions.append("" if dropped else caption)
        pixel_mask = torch.stack(masks).to(device)  # (B, 1, H, W)

        embeds = self.prompt_cache.batch(captions, device) if self.prompt_cache else backend.encode_prompt(captions)
        if self.latent_cache is not None:
            indices = batch["index"].tolist()
            latents = self.latent_cache.latents(backend, indices, device).to(self.weight_dtype)  # (B, C, h, w)
            masked_latents = self.latent_cache.masked_latents(indices, subsets, device)
        else:
            latents = backend.encode_image(pixels).to(self.weight_dtype)  # (B, C, h, w)
            masked_latents = backend.masked_image_latents(pixels, pixel_mask)
        mask = latent_mask(pixel_mask, backend.vae_scale_factor).to(latents.dtype)  # (B, 1, h, w)
        return diffusion_loss(backend, latents, mask, masked_latents, embeds, batch, generator, cfg.visible_loss_weight)

    # ---- saving -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        accelerator = self.accelerator
        final = self.output_dir / "checkpoints" / f"checkpoint-{self.global_step}"
        tmp = final.with_name(final.name + ".tmp")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        # Every rank writes its own RNG state into tmp: rename it only once all have.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"global_step": self.global_step, "micro_step": self.micro_step, "epoch": self.epoch,
                     "batches_in_epoch": self.batches_in_epoch, "run": self.run_signature}
            atomic_write_text(json.dumps(state), tmp / STATE_NAME)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._prune_checkpoints()
        accelerator.wait_for_everyone()
        return final

    def _prune_checkpoints(self) -> None:
        limit = self.cfg.checkpoints_total_limit
        if limit is None:
            return
        for old in _checkpoints(self.output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def metadata(self) -> dict:
        backend = self.backend
        return {
            "iclora_version": __version__,
            "backend": backend.name,
            "base_model": backend.base_model,
            "grid": str(self.grid),
            "conditioning": backend.conditioning,
            "image_size": self.cfg.image_size,
            "max_token_length": backend.max_token_length,
            "global_step": self.global_step,
            "training_args": dataclasses.asdict(self.cfg),
        }

    def save_final(self) -> Path:
        final = self.output_dir / "final_model"
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            with atomic_directory(final) as tmp:
                self.backend.save_lora(tmp, kohya=self.cfg.output_kohya_format)
                atomic_write_text(json.dumps(self.metadata(), indent=2), tmp / METADATA_NAME)
        self.accelerator.wait_for_everyone()
        return final


def _checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints under output_dir, oldest first."""
    found = sorted(output_dir.glob("checkpoints/checkpoint-*"), key=_checkpoint_step)
    return [p for p in found if (p / STATE_NAME).is_file()]


def _checkpoint_step(path: Path) -> int:
    match = re.search(r"checkpoint-(\d+)$", path.name)
    return int(match.group(1)) if match else -1


def train(cfg: TrainConfig) -> TrainResult:
    trainer = Trainer(cfg)
    trainer.setup()
    return trainer.train()
