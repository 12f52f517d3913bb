"""What a training run writes, checked before it starts and written so a kill leaves no
half-made folder that counts.

    output_dir/
        checkpoints/checkpoint-N/   resumable state (accelerate's save_state + ours)
        final_model/                the LoRA users load
    while writing (removed by the next run when a kill left them):
        checkpoints/checkpoint-N.tmp/        a checkpoint being written
        checkpoints/.checkpoint-N.deleting/  a pruned checkpoint being removed
        .final_model.XXXX.tmp/, .final_model.old/   lora_files.atomic_directory's
        .checkpoints.deleting/               an earlier run's, going (--overwrite_output_dir)

A checkpoint is complete when every file it needs is there (`CHECKPOINT_FILES` plus one RNG
state per process); `trainer_state.json` is written last and records the process count.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..backends.lora_files import atomic_write_text, match_umask
from ..backends.registry import ByBackend
from .distributed import SHARDED_NAME, agree_on_error, load_sharded, save_sharded

logger = logging.getLogger(__name__)
TRAINABLE_NAME = "trainable.safetensors"
STATE_NAME = "trainer_state.json"
FINAL_NAME = "final_model"
# What accelerate's save_state writes for us (the denoiser itself is replaced by
# TRAINABLE_NAME through a save hook), besides random_states_<process>.pkl.
CHECKPOINT_FILES = (STATE_NAME, TRAINABLE_NAME, "optimizer.bin", "scheduler.bin")
# --distributed fsdp: the trainable tensors and the optimizer as one sharded checkpoint
# (distributed.save_sharded; its index is .metadata), the scheduler as accelerate writes it.
SHARDED_CHECKPOINT_FILES = (STATE_NAME, f"{SHARDED_NAME}/.metadata", "scheduler.bin")
_NAME = re.compile(r"checkpoint-(\d+)")

# LoRA parameters per unit of rank with our target modules, for the disk estimate made
# before any model is loaded: counted by adding the adapters to empty (meta-device) SDXL
# base and FLUX.1-dev architectures (each backend's spec). The built-in tiny models have ~18 k.
PARAMS_PER_RANK = ByBackend("params_per_rank")
CONV_PARAMS_PER_RANK = ByBackend("conv_params_per_rank")  # what --lora_convs adds
TINY_PARAMS_PER_RANK = 20_000
# Bytes on disk per trainable parameter: a checkpoint holds the float32 weights and AdamW's two
# moments (4 + 8; 8-bit Adam: 4 + 2) and two LoRA files (diffusers and ComfyUI, 2 + 2 at the
# default fp16 --save_precision), the final model the two LoRA files again (2 + 2).
BYTES_PER_PARAM = {False: 4 + 8 + 4 + 4, True: 4 + 2 + 4 + 4}
DISK_MARGIN = 1.1


def checkpoint_step(path: Path) -> int | None:
    match = _NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds every file a resume reads."""
    try:
        state = json.loads((folder / STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    processes = int(state.get("run", {}).get("num_processes", 1))
    files = SHARDED_CHECKPOINT_FILES if state.get("run", {}).get("distributed") == "fsdp" else CHECKPOINT_FILES
    needed = [*files, *(f"random_states_{i}.pkl" for i in range(processes))]
    return all((folder / name).is_file() for name in needed)


def find_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints under output_dir, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if checkpoint_step(p) is not None and p.is_dir()]
    return [p for p in sorted(found, key=checkpoint_step) if is_complete(p)]


def remove_folder(folder: Path) -> None:
    """Rename, then delete: a kill halfway leaves a `.deleting` folder no search counts."""
    doomed = folder.with_name(f".{folder.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(output_dir: Path, limit: int | None) -> None:
    """Keep the newest `limit` complete checkpoints (the one just written among them)."""
    if limit is None:
        return
    for old in find_checkpoints(output_dir)[:-limit]:
        remove_folder(old)


def clean_stale(output_dir: Path) -> list[str]:
    """Remove what killed runs left half-written; returns the names removed. A kill between
    atomic_directory's two renames leaves only `.final_model.old`: that is put back."""
    output_dir = Path(output_dir)
    removed = []
    old, final = output_dir / f".{FINAL_NAME}.old", output_dir / FINAL_NAME
    if old.is_dir() and not final.exists():
        os.replace(old, final)
    stale = [old, output_dir / ".checkpoints.deleting", *output_dir.glob(f".{FINAL_NAME}.*.tmp")]
    checkpoints = output_dir / "checkpoints"
    if checkpoints.is_dir():
        stale += [p for p in checkpoints.iterdir()
                  if re.fullmatch(r"checkpoint-\d+\.tmp|\.checkpoint-\d+\.deleting", p.name)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def prepare_output_dir(output_dir: Path) -> None:
    """The folder takes files, and what killed runs left half-written is gone."""
    check_output_dir(output_dir)
    removed = clean_stale(output_dir)
    if removed:
        logger.warning("removed what an interrupted run left half-written in %s: %s", output_dir, ", ".join(removed))


def resume_folder(wanted: str | None, output_dir: Path) -> Path | None:
    """The checkpoint --resume_from_checkpoint names ('latest': the newest complete one)."""
    if not wanted:
        return None
    if wanted == "latest":
        found = find_checkpoints(output_dir)
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting fresh", output_dir)
            return None
        return found[-1]
    path = Path(wanted)
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: not a checkpoint folder (no {STATE_NAME})")
    if not is_complete(path):
        raise ValueError(f"--resume_from_checkpoint {path}: incomplete checkpoint (files missing)")
    return path


def check_earlier_run(output_dir: Path, resume_dir: Path | None, overwrite: bool, main: bool) -> None:
    """Refuse to mix a new run with another's checkpoints or replace its final model, unless
    --overwrite_output_dir (then its checkpoints go now, its final model when this one is
    saved). Continuing a checkpoint of output_dir is the same run."""
    same_run = resume_dir is not None and output_dir.resolve() in resume_dir.resolve().parents
    earlier = [name for name, there in (("checkpoints", find_checkpoints(output_dir)),
                                        (f"{FINAL_NAME}/", (output_dir / FINAL_NAME).exists())) if there]
    if not earlier or same_run:
        return
    if not overwrite:
        hint = "continue it with --resume_from_checkpoint latest, " if "checkpoints" in earlier else ""
        raise ValueError(f"--output_dir {output_dir} holds {' and '.join(earlier)} of an earlier run: {hint}"
                         "choose another --output_dir, or pass --overwrite_output_dir to replace them")
    if main and (output_dir / "checkpoints").exists():
        remove_folder(output_dir / "checkpoints")


def check_output_dir(output_dir: Path) -> None:
    """The folder exists (created if need be), is a folder, and takes a file."""
    flag = f"--output_dir {output_dir}"
    existing = next(p for p in [output_dir, *output_dir.parents] if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag}: {existing} is a file, not a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test.", dir=output_dir)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"{flag}: not writable ({error.strerror or error})") from None


def estimate_trainable_params(backend: str, model_id: str, lora_rank: int, convs: bool = False) -> int:
    if model_id.startswith("tiny-"):
        per_rank = TINY_PARAMS_PER_RANK
    else:
        per_rank = PARAMS_PER_RANK[backend] + (CONV_PARAMS_PER_RANK[backend] if convs else 0)
    return per_rank * lora_rank


def check_free_space(output_dir: Path, params: int, eight_bit_adam: bool, how: str) -> None:
    """Refuse to start when one checkpoint and the final model would not fit on the disk."""
    needed = int(params * BYTES_PER_PARAM[eight_bit_adam] * DISK_MARGIN)
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise ValueError(
            f"--output_dir {output_dir}: {_size(free)} free, but a checkpoint and the final model need "
            f"about {_size(needed)} ({params:,} trainable parameters, {how})"
        )


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} TB"


def write_checkpoint(accelerator, folder: Path, state: dict, limit: int | None, extra_files=None,
                     save_state=None) -> None:
    """`save_state(tmp)` on every process into `folder`.tmp (default: accelerate's save_state),
    then `extra_files(tmp)` (main process), our state last, one rename; then prune. Raises
    OSError with one line, the same on every process (and removes the temporary folder), when
    writing fails on any of them."""
    main = accelerator.is_main_process
    tmp = folder.with_name(folder.name + ".tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    # Every process writes its own RNG state (and with FSDP its shard) into tmp: rename it only
    # once all have. A process that failed (its disk full) passes its error instead of waiting
    # at a barrier the others never leave, and every process stops with it.
    error = agree_on_error(accelerator, _attempt(save_state or (lambda path: accelerator.save_state(str(path))), tmp))
    if error is None and main:
        error = _attempt(_finish, tmp, folder, state, extra_files)
    error = agree_on_error(accelerator, error)
    if error is not None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not write {folder} ({error})")
    if main:
        prune(folder.parent.parent, limit)
    accelerator.wait_for_everyone()


def _attempt(write, *args) -> str | None:
    """None when `write(*args)` succeeds, else the reason in a few words."""
    try:
        write(*args)
    except Exception as error:
        return describe(error)
    return None


def _finish(tmp: Path, folder: Path, state: dict, extra_files) -> None:
    if extra_files is not None:
        extra_files(tmp)
    atomic_write_text(json.dumps(state), tmp / STATE_NAME)
    match_umask(tmp)  # the LoRA files diffusers wrote are 0600 (safetensors' temporary file)
    if folder.exists():
        remove_folder(folder)
    os.replace(tmp, folder)


def save_sharded_state(trainer, folder: Path) -> None:
    """--distributed fsdp, every process: its shard of the trainable tensors and optimizer, then
    what accelerate's save_state writes besides the model and optimizer (scheduler, this
    process's RNG state)."""
    from accelerate.checkpointing import save_accelerator_state

    accelerator = trainer.accelerator
    save_sharded(folder, trainer.backend.denoiser, trainer.optimizer)
    save_accelerator_state(str(folder), [], [], [trainer.lr_scheduler], [trainer.dataloader], accelerator.process_index,
                           accelerator.step, accelerator.scaler)


def load_sharded_state(trainer, folder: Path) -> None:
    """Inverse of `save_sharded_state`."""
    from accelerate.checkpointing import load_accelerator_state

    accelerator = trainer.accelerator
    load_sharded(folder, trainer.backend.denoiser, trainer.optimizer)
    load_accelerator_state(str(folder), [], [], [trainer.lr_scheduler], [trainer.dataloader], accelerator.process_index,
                           accelerator.scaler, map_location="cpu")


def describe(error: BaseException) -> str:
    """The reason in a few words: 'No space left on device', not a chained traceback."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
