"""Training on several processes: DDP (accelerate's, the default) or FSDP2 (--distributed fsdp).

    ddp   every process holds the whole denoiser; accelerate wraps it in DistributedDataParallel
          and averages the gradients. The fastest choice when the base fits one card.
    fsdp  torch's FSDP2 (`fully_shard`) shards the denoiser over the processes, one unit per
          repeated block (`backend.shard_units()`: SDXL's transformer blocks, FLUX.1's double and
          single blocks) plus the rest at the root: each process stores 1/N of the frozen base,
          and a block's weights are gathered only while it runs. The frozen base is kept in the
          run's dtype (bf16 on a GPU), the LoRA in float32 (what the optimizer updates), computed
          in the run's dtype, its gradients reduced in float32 (MixedPrecisionPolicy).

The sharding is done here, not by accelerate's FSDP plugin: accelerate does not shard on a CPU
(it falls back to DDP), so its path could not be tested without GPUs, and its `save_state`
writes the whole frozen base into every checkpoint. accelerate still launches the processes,
shards the data and runs gradient accumulation: launch with a plain multi-GPU config
(examples/accelerate/). The text encoders and the VAE stay unsharded and off the sharded
module (cache them with --cache_text_embeddings / --cache_latents to free their memory).

Checkpoints under FSDP (`save_sharded` / `load_sharded`) hold only what training needs: the
trainable tensors and the optimizer's state as a sharded torch.distributed.checkpoint (each
process writes its shard), never the frozen base; scheduler, RNG and data position as with DDP.
The inference files are written whole by the main process from the trainable tensors gathered
on every process (`full_trainable_state`, `gathered_into`).

A failure on one process (a full disk) must stop every process with the same line, not leave
the others waiting at a barrier: `agree_on_error` is the barrier, and it carries the error.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
SHARDED_NAME = "sharded"  # the checkpoint's folder of torch.distributed.checkpoint files
DCP_OPTIONS = dict(ignore_frozen_params=True)  # the base never enters a checkpoint


def check_launch(accelerator, distributed: str) -> None:
    """Refuse a launch --distributed cannot serve, in one line, before any model loads."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(f"accelerate is configured for {accelerator.distributed_type.value}: iclora shards the "
                         "denoiser itself with --distributed fsdp; launch with a multi-GPU accelerate config "
                         "(examples/accelerate/multi_gpu_fsdp.yaml)")
    if distributed == "fsdp" and accelerator.num_processes < 2:
        raise ValueError("--distributed fsdp needs several processes (accelerate launch --num_processes N ...); "
                         "a single process trains the whole model: leave --distributed ddp")


def shard(backend, device: torch.device, param_dtype: torch.dtype) -> int:
    """fully_shard the denoiser in place: each of `backend.shard_units()`, then the rest at the
    root. Returns the number of units. The optimizer must be built afterwards (sharding replaces
    the parameters by DTensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if not hasattr(backend, "shard_units"):
        raise ValueError(f"--distributed fsdp: --backend {backend.name} does not name the blocks to shard yet; "
                         "use --distributed ddp")
    units = list(backend.shard_units())
    for module in [*units, backend.denoiser]:
        dtypes = {p.dtype for p in module.parameters() if p.requires_grad}
        if len(dtypes) > 1:  # FSDP2 refuses it ("uniform original parameter dtype"), less clearly
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
            raise ValueError(f"--distributed fsdp: the trainable weights of {type(module).__name__} mix dtypes "
                             f"({names}); FSDP2 needs one dtype per sharded block")
    # FSDP2 warns when a unit returns a view (FLUX's single blocks return slices of one tensor):
    # an in-place op on it would skip the gradient's hook. Nothing here writes into a block's
    # output (the tests compare FSDP's LoRA with DDP's), so the warning only worries.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for module in units:
        fully_shard(module, mesh=mesh, mp_policy=policy)
        # Methods the backend runs the unit through instead of its forward (FLUX's per-token one).
        for name in getattr(module, "fsdp_forward_methods", ()):
            register_fsdp_forward_method(module, name)
    fully_shard(backend.denoiser, mesh=mesh, mp_policy=policy)
    return len(units)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (DTensor); a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full_norm(norm):
    """clip_grad_norm_'s result over sharded gradients is a DTensor: the norm of the whole."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def count_non_finite(params) -> int:
    """Trainable tensors holding a NaN or an infinity, counted over every process's shards."""
    bad = torch.tensor(float(sum(not bool(torch.isfinite(local(p)).all()) for p in params)))
    if dist.is_available() and dist.is_initialized() and any(hasattr(p, "to_local") for p in params):
        device = next((local(p).device for p in params), bad.device)
        bad = bad.to(device)
        dist.all_reduce(bad)
    return int(bad.item())


def agree_on_error(accelerator, error: str | None) -> str | None:
    """A barrier that carries a failure: every process passes its error (None when it has
    none) and gets the first one any process had, so all stop with the same line."""
    if accelerator.num_processes == 1:
        return error
    errors: list = [None] * accelerator.num_processes
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def _state_dicts(denoiser, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, optim = get_state_dict(denoiser, optimizer, options=StateDictOptions(**DCP_OPTIONS))
    return {"model": model, "optimizer": optim}


def save_sharded(folder: Path, denoiser, optimizer) -> None:
    """The trainable tensors and the optimizer's state, each process its shard (collective)."""
    import torch.distributed.checkpoint as dcp

    with _first_failure():
        dcp.save(_state_dicts(denoiser, optimizer.optimizer), checkpoint_id=str(Path(folder) / SHARDED_NAME))


def load_sharded(folder: Path, denoiser, optimizer) -> None:
    """Inverse of `save_sharded` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state_dicts(denoiser, optimizer.optimizer)
    with _first_failure():
        dcp.load(state, checkpoint_id=str(Path(folder) / SHARDED_NAME))
    # Not strict: the frozen weights are not in it (dcp.load has refused a checkpoint that lacks
    # any trainable tensor: `state` names them all).
    set_state_dict(denoiser, optimizer.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=StateDictOptions(strict=False, **DCP_OPTIONS))


@contextlib.contextmanager
def _first_failure():
    """torch.distributed.checkpoint raises, on every process, a BaseException holding each
    failed process's error and traceback: raise the first process's error itself instead."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as error:
        raise next(iter(error.failures.values()))[0] from None


def full_trainable_state(denoiser) -> dict[str, torch.Tensor]:
    """The trainable tensors whole, on the host of the main process ({} elsewhere). Collective:
    every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, **DCP_OPTIONS)
    return get_model_state_dict(denoiser, options=options)


@contextlib.contextmanager
def gathered_into(denoiser, state: dict[str, torch.Tensor]):
    """While active, the trainable parameters of `denoiser` are the whole tensors of `state`
    (from `full_trainable_state`), so the backend's own LoRA writers read them as they read an
    unsharded model; the sharded ones are put back after."""
    swapped = []
    try:
        for name, value in state.items():
            path, _, attr = name.rpartition(".")
            module = denoiser.get_submodule(path)
            swapped.append((module, attr, module._parameters[attr]))
            module._parameters[attr] = torch.nn.Parameter(value, requires_grad=True)
        yield
    finally:
        for module, attr, param in reversed(swapped):
            module._parameters[attr] = param
