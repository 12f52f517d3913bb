"""The shared IC-LoRA trainer: one loop for every backend.

    setup()            data (validated before any model loads), backend + LoRA, optimizer,
                       accelerate, resume: run_setup.py
    train()            the loop; the per-batch math is `_loss_step`
    save_checkpoint()  resumable state every --save_every steps (and on SIGINT / SIGTERM),
                       plus the inference files
    save_final()       final_model/: the LoRA files + iclora_config.json

What the run will write is checked before any model loads (checkpoints.py); a non-finite
loss or gradient stops it at once, before the optimizer step, so nothing non-finite is ever
saved (guards.py).

Randomness that decides *what* is trained (masked panels, caption dropout, noise,
timesteps, and through the global RNG LoRA dropout and VAE sampling) comes from a generator
seeded by (seed, micro-batch, process), and the data order is a function of (seed, epoch):
a checkpoint records (epoch, micro-batches done in it, micro-batch count), so a resumed run
replays an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .. import __version__
from ..backends.base import with_clean_context
from ..backends.lora_files import METADATA_NAME, atomic_directory, atomic_save_file, atomic_write_text
from ..errors import RunStopped
from ..logs import progress_bar
from ..panels import Grid, panel_masks, sample_masked_panels
from . import checkpoints, distributed, run_setup
from .checkpoints import FINAL_NAME, TRAINABLE_NAME, find_checkpoints
from .config import TrainConfig
from .distributed import full_norm
from .guards import RESUME_HINT, Interrupted, StopSignals, agree, check_finite_weights, non_finite

logger = logging.getLogger(__name__)


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
    parts: dict | None = None,
) -> torch.Tensor:
    """The model math of one training step, from encoded inputs to the weighted loss.
    latents (B, C, h, w); mask (B, 1, h, w), 1 = masked panel. With `parts` (a dict), also
    puts there the unweighted MSE over the masked and over the visible latent pixels
    ("masked_loss", "visible_loss"; a kind the batch has none of is left out), for the log."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    noisy, timesteps, target = backend.noise_latents(latents, noise, generator)
    if backend.conditioning == "context":  # the visible panels enter clean, never noised
        noisy = with_clean_context(noisy, latents, mask)
    pred = backend.predict(noisy, timesteps, prompt_embeds, mask, masked_latents, batch)
    # Without a visible-panel weight (the default) the weights are the mask itself: three
    # elementwise ops fewer a step.
    weight = mask + visible_loss_weight * (1 - mask) if visible_loss_weight else mask
    if parts is not None:
        with torch.no_grad():
            squared = ((pred.float() - target.float()) ** 2).mean(1, keepdim=True)
            for name, where in (("masked_loss", mask.float()), ("visible_loss", 1 - mask.float())):
                if where.sum() > 0:
                    parts[name] = (squared * where).sum() / where.sum()
    return masked_mse(pred, target, weight.float())


def optimizer_step(accelerator, optimizer, lr_scheduler, loss: torch.Tensor, max_grad_norm: float) -> None:
    """Backward, clip and step for one micro-batch (inside `accelerator.accumulate`). Raises
    FloatingPointError before the step when the gradient norm is not finite (with fp16 the
    grad scaler handles that itself: it skips the step and lowers the scale)."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        # The optimizer's own parameters: walking all 3 080 SDXL parameters for the trainable
        # ones took ~12 ms of host time per step (2-core CPU), paid in full by a GPU step
        # that is bound by kernel launches (benchmarks/RESULTS.md).
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # max_norm inf clips nothing but still returns the norm to check.
        norm = full_norm(accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf))
        if accelerator.scaler is None and norm is not None and not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"the gradient norm is {float(norm)}")
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def step_generator(seed: int, micro_step: int, process: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, micro_step, process]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


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
        self.first_step_seconds: float | None = None  # with --compile: this process's first step
        self.unconditional: dict[str, torch.Tensor] | None = None  # what a dropped caption is fed
        self.sharded = cfg.distributed == "fsdp"  # the denoiser sharded over the processes (distributed.py)

    # ---- set-up -------------------------------------------------------------------------
    def setup(self) -> None:
        """Data, outputs, backend + LoRA, caches, optimizer, accelerate, resume (run_setup.py)."""
        run_setup.setup(self)

    def record_memory(self, phase: str) -> None:
        """One record of the memory log (memory_log.py)."""
        self.memory.record(phase, self.backend, self.global_step)
        self._recorded_step = self.global_step

    def end_train_segment(self) -> None:
        """Before a sheet, a checkpoint or the final save: the training steps since the last
        record get their own ("train")."""
        if self.global_step > self._recorded_step:
            self.record_memory("train")

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
        accelerator = self.accelerator
        losses: list[float] = []
        progress = progress_bar(
            total=self.max_train_steps, initial=self.global_step, desc="train",
            disable=not accelerator.is_local_main_process,
        )
        self.backend.denoiser.train()
        self.monitor.start()
        try:
            with StopSignals() as signals:
                self._loop(losses, progress, signals)
        finally:
            progress.close()  # before any error line, so that line is the last one printed
        self.monitor.end()
        final_dir = self.save_final()
        accelerator.end_training()
        return TrainResult(final_dir, self.global_step, losses)

    def _loop(self, losses: list[float], progress, signals: StopSignals) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        stop = None  # the signal any rank received, acted on at the next step boundary
        while self.global_step < self.max_train_steps:
            # accelerate's loader re-sets the sampler's epoch from its own pass counter, which
            # restarts at 0 in a resumed run: set it there too.
            self.batch_sampler.set_epoch(self.epoch)
            self.dataloader.set_epoch(self.epoch)
            batches = self.dataloader
            if self.batches_in_epoch:
                batches = accelerator.skip_first_batches(self.dataloader, self.batches_in_epoch)
            running, parts = [], {"masked_loss": [], "visible_loss": []}
            for batch in batches:
                if not running:  # an optimizer step begins
                    step_started = time.perf_counter()
                with accelerator.accumulate(self.backend.denoiser):
                    if self.sharded:  # reduce-scatter once per optimizer step, as DDP's no_sync does
                        self.backend.denoiser.set_requires_gradient_sync(accelerator.sync_gradients)
                    self.loss_parts = {}
                    loss = self._loss_step(batch, self.micro_step)
                    for name, value in self.loss_parts.items():
                        parts[name].append(value)
                    finite, stop = agree(accelerator, loss, signals)
                    if not finite:
                        raise non_finite(self.global_step + 1, loss.item(), self.output_dir)
                    try:
                        optimizer_step(accelerator, self.optimizer, self.lr_scheduler, loss, cfg.max_grad_norm)
                    except FloatingPointError as error:
                        raise non_finite(self.global_step + 1, str(error), self.output_dir) from None
                self.micro_step += 1
                self.batches_in_epoch += 1
                running.append(loss.detach().float())
                if not accelerator.sync_gradients:
                    continue
                self.global_step += 1
                if not any(r["phase"] == "first step" for r in self.memory.records):
                    self.record_memory("first step")
                step_loss = accelerator.gather(torch.stack(running).mean()[None]).mean().item()
                running = []
                # This process's masked / visible MSE (unweighted), how completion and the
                # visible panels' denoising progress apart.
                extra = {name: round(torch.stack(values).mean().item(), 6) for name, values in parts.items() if values}
                parts = {"masked_loss": [], "visible_loss": []}
                losses.append(step_loss)
                progress.update(1)
                progress.set_postfix(epoch=self.epoch, loss=f"{step_loss:.4f}", lr=f"{self.lr_scheduler.get_last_lr()[0]:.2e}")
                if cfg.compile and self.first_step_seconds is None:
                    self.first_step_seconds = time.perf_counter() - step_started
                    logger.info("--compile: step %d took %.1f s, compiling the blocks' forward and backward included",
                                self.global_step, self.first_step_seconds)
                    extra["first_compiled_step_seconds"] = round(self.first_step_seconds, 3)
                self.monitor.step(step_loss, extra)
                if self.global_step % cfg.save_every == 0 or stop:
                    saved = self.save_checkpoint()
                    self.monitor.checkpoint()
                if stop:
                    name = signal.Signals(stop).name
                    raise Interrupted(f"{name} at step {self.global_step}: saved {saved}; {RESUME_HINT}", stop)
                if self.global_step >= self.max_train_steps:
                    break
            else:
                self.epoch, self.batches_in_epoch = self.epoch + 1, 0

    def _loss_step(self, batch: dict, micro_step: int) -> torch.Tensor:
        """One micro-batch: sample panel masks, noise the latents, weight the loss."""
        cfg, backend, device = self.cfg, self.backend, self.accelerator.device
        generator = step_generator(cfg.seed, micro_step, self.accelerator.process_index)
        # LoRA dropout and VAE latent sampling draw from the global RNG, which data loader
        # start-up also draws from: reseed it per micro-batch so a resumed run matches.
        torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))
        indices = batch["index"].tolist()
        height, width = self.records[indices[0]].size  # the batch's bucket

        captions, subsets = [], []
        for caption in batch["caption"]:
            masked = sample_masked_panels(self.grid.num_panels, cfg.mask_probability, cfg.max_masked_panels, generator)
            # Nothing masked is trained as everything masked: text -> whole image set. An
            # unmasked sample would let the model copy its answer from the conditioning.
            subsets.append(tuple(masked or range(self.grid.num_panels)))
            dropped = torch.rand((), generator=generator).item() < cfg.caption_dropout
            captions.append(None if dropped else caption)
        # Panel boundaries fall on latent pixels, so the masks are built at latent size directly:
        # exactly the pixel masks' area averages (latent_mask), at 1/64 of the pixels.
        f = backend.vae_scale_factor
        mask = panel_masks(subsets, self.grid, height // f, width // f).to(device, self.weight_dtype)  # (B, 1, h, w)

        embeds = self.prompt_embeds(captions, device)
        if self.latent_cache is not None:
            latents = self.latent_cache.latents(backend, indices, device).to(self.weight_dtype)  # (B, C, h, w)
            masked_latents = self.latent_cache.masked_latents(indices, subsets, device)
        else:
            pixels = batch["pixels"].to(device)  # (B, 3, H, W)
            latents = backend.codec.encode(pixels).to(self.weight_dtype)  # (B, C, h, w)
            pixel_mask = panel_masks(subsets, self.grid, height, width).to(device)  # (B, 1, H, W)
            masked_latents = backend.masked_image_latents(pixels, pixel_mask)
        return diffusion_loss(backend, latents, mask, masked_latents, embeds, batch, generator, cfg.visible_weight,
                              parts=getattr(self, "loss_parts", None))

    def prompt_embeds(self, captions: list[str | None], device) -> dict[str, torch.Tensor]:
        """The batch's text embeddings. A dropped caption (None) is fed what inference's
        unconditional branch is fed (`unconditional_prompt`: SDXL's zeros), so dropout trains
        the prediction classifier-free guidance subtracts; runs from checkpoints that do not
        record it feed the encoding of "" as they did."""
        if self.run_signature["dropped_caption"] == "empty":
            captions = ["" if c is None else c for c in captions]
        if self.prompt_cache:
            return self.prompt_cache.batch(captions, device)
        kept = [c for c in captions if c is not None]
        if len(kept) == len(captions):
            return self.backend.encode_prompt(captions)
        if self.unconditional is None:  # encoded once
            self.unconditional = self.backend.unconditional_prompt()
        encoded = self.backend.encode_prompt(kept) if kept else {}
        rows = list(itertools.accumulate((c is not None for c in captions), initial=0))  # row in `encoded`
        return {k: torch.stack([u[0] if c is None else encoded[k][rows[i]] for i, c in enumerate(captions)])
                for k, u in self.unconditional.items()}

    # ---- saving -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        folder = self.output_dir / "checkpoints" / f"checkpoint-{self.global_step}"
        self.end_train_segment()
        check_finite_weights(self.backend.trainable_parameters(), self.global_step, folder)
        state = {"global_step": self.global_step, "micro_step": self.micro_step, "epoch": self.epoch,
                 "batches_in_epoch": self.batches_in_epoch, "run": self.run_signature}
        gathered = self.gathered_trainable_state()
        save_state = (lambda tmp: checkpoints.save_sharded_state(self, tmp)) if self.sharded else None
        try:
            # Every checkpoint is a usable LoRA: the inference files go in beside the state.
            checkpoints.write_checkpoint(self.accelerator, folder, state, self.cfg.checkpoints_total_limit,
                                         extra_files=lambda tmp: self.save_inference_files(tmp, gathered),
                                         save_state=save_state)
        except OSError as error:
            raise RunStopped(f"step {self.global_step}: {error}; training stopped") from None
        self.record_memory("checkpoint")
        return folder

    def metadata(self) -> dict:
        backend = self.backend
        return {
            "iclora_version": __version__,
            "backend": backend.name,
            "base_model": backend.base_model,
            "grid": str(self.grid),
            "conditioning": backend.conditioning,
            "context_timestep": backend.context_timestep,
            "image_size": self.cfg.image_size,
            "bucket_by": self.cfg.bucket_by,
            # (width, height, composites) of each training size, most common first: a set
            # generated from text at inference takes the first one's aspect.
            "buckets": [[w, h, n] for (h, w), n in Counter(r.size for r in self.records).most_common()],
            "max_token_length": backend.max_token_length,
            "global_step": self.global_step,
            "training_args": {**dataclasses.asdict(self.cfg), "visible_loss_weight": self.cfg.visible_weight,
                              "timestep_sampling": self.cfg.sampling_scheme,
                              "timestep_shift": self.run_signature["timestep_shift"],
                              "lora_convs": self.run_signature["lora_convs"]},
        }

    def gathered_trainable_state(self) -> dict | None:
        """With a sharded denoiser, its trainable tensors whole on the main process (every
        process must call this); None when each process holds them whole already."""
        return distributed.full_trainable_state(self.backend.denoiser) if self.sharded else None

    def save_inference_files(self, folder: Path, gathered: dict | None = None) -> None:
        """The LoRA file(s), conv_in for concat and iclora_config.json (main process only);
        `gathered`: the sharded denoiser's trainable tensors, from gathered_trainable_state."""
        whole = contextlib.nullcontext() if gathered is None else distributed.gathered_into(self.backend.denoiser, gathered)
        with whole:
            self.backend.save_lora(folder, compat=self.cfg.output_kohya_format, dtype=self.save_dtype)
        atomic_write_text(json.dumps(self.metadata(), indent=2), folder / METADATA_NAME)

    def save_final(self) -> Path:
        final = self.output_dir / FINAL_NAME
        self.end_train_segment()
        check_finite_weights(self.backend.trainable_parameters(), self.global_step, final)
        gathered = self.gathered_trainable_state()
        self.accelerator.wait_for_everyone()
        error = None
        if self.accelerator.is_main_process:
            try:
                with atomic_directory(final) as tmp:
                    self.save_inference_files(tmp, gathered)
            except Exception as failure:
                error = checkpoints.describe(failure)
        # The barrier carries the main process's failure: the others stop with it, not wait.
        error = distributed.agree_on_error(self.accelerator, error)
        if error is not None:
            newest = find_checkpoints(self.output_dir)
            hint = f"; {RESUME_HINT} after freeing space" if newest else ""
            raise RunStopped(f"could not write {final} ({error}){hint}")
        self.record_memory("final save")
        return final


def train(cfg: TrainConfig) -> TrainResult:
    trainer = Trainer(cfg)
    trainer.setup()
    return trainer.train()
