"""--distributed fsdp: the denoiser sharded with FSDP2 over two CPU processes (gloo).

accelerate does not shard on a CPU, but iclora calls torch's `fully_shard` itself, so these
runs go through the same code a multi-GPU run does. Two processes come from accelerate's
`debug_launcher` (forked, ~3 s to start) and call the training entry point in-process; each
writes what it saw into a JSON file per rank for the test to judge.

    pytest tests/test_fsdp.py
    pytest -m slow tests/test_fsdp.py      (a signal and a non-finite loss on sharded runs, ~1 min)
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import errno
import json
import signal
from pathlib import Path
import traceback

import pytest
import torch
from accelerate import debug_launcher
from safetensors.torch import load_file

from conftest import TINY_ARGS
from iclora.cli import run_cli
from iclora.training import checkpoints, train_flux2_ic_lora, train_flux_ic_lora, train_sdxl_ic_lora
from iclora.training.config import TrainConfig

LORA = "pytorch_lora_weights.safetensors"
COMFYUI = "pytorch_lora_weights_comfyui.safetensors"


def _ranks(fn, *args) -> list[dict]:
    """Run fn(rank_record, *args) in two processes; returns each rank's record (what fn put in
    the dict it is given, plus the error line it stopped with, if any)."""
    out = args[0]
    debug_launcher(_rank_main, args=(fn, *args), num_processes=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _rank_main(fn, out, *args) -> None:
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    signal.alarm(240)  # a process left waiting at a barrier fails the test instead of hanging it
    AcceleratorState._reset_state(reset_partial_state=True)  # the parent's state is not distributed
    record: dict = {}
    try:
        fn(record, out, *args)
    except Exception as error:  # noqa: BLE001 - the test judges it
        record["error"] = f"{type(error).__name__}: {error}"
        record["trace"] = traceback.format_exc()[-2000:]
    finally:
        signal.alarm(0)
    rank = PartialState().process_index
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def _sdxl_runs(record, out, data) -> None:
    argv = ["--data_dir", str(data), *TINY_ARGS, "--learning_rate", "5e-3", "--save_every", "1", "--lora_alpha", "8"]
    run = lambda name, *flags: train_sdxl_ic_lora.main([*argv, "--output_dir", str(out / name), *flags])  # noqa: E731
    record["ddp"] = run("ddp", "--max_train_steps", "2").losses
    # Sample sheets need every process (each holds part of every block): rendered by all.
    record["straight"] = run("straight", "--max_train_steps", "2", "--distributed", "fsdp", "--validation_every", "2",
                             "--validation_inference_steps", "2").losses
    record["first"] = run("resumed", "--max_train_steps", "1", "--distributed", "fsdp").losses
    record["resumed"] = run("resumed", "--max_train_steps", "2", "--distributed", "fsdp",
                            "--resume_from_checkpoint", "latest").losses
    try:  # a sharded checkpoint continued with DDP
        run("straight", "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    except ValueError as error:
        record["switched"] = str(error)


def test_fsdp_resumes_exactly_and_exports_the_ddp_lora(data_2x2, tmp_path):
    """Tiny SDXL, concat (LoRA + the fully trained conv_in): FSDP2 over two processes trains as
    DDP does, its checkpoint holds no frozen weight, and a resumed run is the uninterrupted one."""
    ranks = _ranks(_sdxl_runs, tmp_path, data_2x2)
    for rank in ranks:
        assert "error" not in rank, rank.get("trace")
    straight, resumed, ddp = ranks[0]["straight"], ranks[0]["first"] + ranks[0]["resumed"], ranks[0]["ddp"]
    assert ranks[1]["straight"] == straight  # the loss gathered over both processes
    assert resumed == straight  # bit for bit
    assert straight == pytest.approx(ddp, rel=1e-5)
    final = lambda name: tmp_path / name / "final_model"  # noqa: E731
    for name in (LORA, COMFYUI, "conv_in.safetensors"):
        a, b = load_file(final("straight") / name), load_file(final("resumed") / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        d = load_file(final("ddp") / name)
        assert a.keys() == d.keys() and all(torch.allclose(a[k].float(), d[k].float(), atol=2e-3, rtol=1e-3) for k in a), name
    # The checkpoint: the trainable tensors and the optimizer sharded, no frozen weight.
    checkpoint = tmp_path / "straight" / "checkpoints" / "checkpoint-1"
    assert checkpoints.is_complete(checkpoint)
    assert not (checkpoint / checkpoints.TRAINABLE_NAME).exists() and not (checkpoint / "optimizer.bin").exists()
    shards = sorted(p.name for p in (checkpoint / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(checkpoint / "sharded")).read_metadata().state_dict_metadata.keys()
    model_keys = [k.removeprefix("model.") for k in keys if k.startswith("model.")]
    assert model_keys and all("lora_" in k or k.startswith("conv_in.") for k in model_keys)
    assert any(k.startswith("conv_in.") for k in model_keys)
    lora = load_file(checkpoint / LORA)
    assert len(lora) == len([k for k in model_keys if "lora_" in k])  # every LoRA tensor, whole
    assert "run settings differ (distributed fsdp -> ddp)" in ranks[0]["switched"]
    # Process r trains batches r, r + N, ... with noise drawn per (micro-batch, process): another
    # process count would not continue the run, so it is refused.
    with pytest.raises(ValueError, match=r"run settings differ \(num_processes 2 -> 1\)"):
        train_sdxl_ic_lora.main(["--data_dir", str(data_2x2), *TINY_ARGS, "--learning_rate", "5e-3", "--save_every", "1",
                                 "--lora_alpha", "8", "--output_dir", str(tmp_path / "ddp"), "--max_train_steps", "3",
                                 "--resume_from_checkpoint", "latest"])
    samples = tmp_path / "straight" / "samples"
    assert sorted(p.name for p in samples.glob("step_*")) == ["step_000000", "step_000002"]
    assert len(list((samples / "step_000002").glob("*.png"))) >= 1


def _flux_runs(record, out, data) -> None:
    argv = ["--data_dir", str(data), "--model_id", "tiny-flux", "--image_size", "64", "--batch_size", "1",
            "--gradient_accumulation_steps", "2", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "5e-3",
            "--max_train_steps", "2", "--gradient_checkpointing"]
    record["ddp"] = train_flux_ic_lora.main([*argv, "--output_dir", str(out / "ddp")]).losses
    record["fsdp"] = train_flux_ic_lora.main([*argv, "--output_dir", str(out / "fsdp"), "--distributed", "fsdp"]).losses
    record["bf16"] = train_flux_ic_lora.main([*argv, "--output_dir", str(out / "bf16"), "--distributed", "fsdp",
                                              "--mixed_precision", "bf16", "--max_train_steps", "1",
                                              "--save_every", "1"]).losses
    flux2 = [*argv, "--model_id", "tiny-flux2"]  # its per-token modulation hooks the root, around stock blocks
    record["flux2_ddp"] = train_flux2_ic_lora.main([*flux2, "--output_dir", str(out / "flux2_ddp")]).losses
    record["flux2_fsdp"] = train_flux2_ic_lora.main([*flux2, "--output_dir", str(out / "flux2_fsdp"),
                                                     "--distributed", "fsdp"]).losses


def test_fsdp_runs_flux_per_token_forward(data_2x2, tmp_path):
    """FLUX's default, context with clean tokens at timestep 0, runs its blocks through a
    per-token forward, not their own: FSDP2 gathers their weights there too (recomputed under
    checkpointing), and the LoRA is DDP's, gradients accumulated over two micro-batches too.
    FLUX.2 [klein] likewise."""
    ranks = _ranks(_flux_runs, tmp_path, data_2x2)
    for rank in ranks:
        assert "error" not in rank, rank.get("trace")
    for model in ("", "flux2_"):
        assert ranks[0][f"{model}fsdp"] == pytest.approx(ranks[0][f"{model}ddp"], rel=1e-5)
        for name in (LORA, COMFYUI):
            a = load_file(tmp_path / f"{model}fsdp" / "final_model" / name)
            d = load_file(tmp_path / f"{model}ddp" / "final_model" / name)
            assert a.keys() == d.keys() and all(torch.allclose(a[k].float(), d[k].float(), atol=2e-3, rtol=1e-3)
                                                for k in a), (model, name)
    # bf16 (a GPU's default with fsdp): the sharded base in bf16, the LoRA and AdamW's state in float32.
    import torch.distributed.checkpoint as dcp

    assert all(loss == loss for loss in ranks[0]["bf16"])
    phases = json.loads((tmp_path / "bf16" / "memory_phases.json").read_text())
    assert phases[-1]["models"]["transformer"]["dtype"] == "bfloat16"
    stored = dcp.FileSystemReader(str(tmp_path / "bf16" / "checkpoints" / "checkpoint-1" / "sharded")).read_metadata()
    tensors = {k: m.properties.dtype for k, m in stored.state_dict_metadata.items() if hasattr(m, "properties")}
    assert any(k.startswith("model.") for k in tensors) and any(k.startswith("optimizer.state.") for k in tensors)
    assert set(tensors.values()) == {torch.float32}, tensors
    meta = json.loads((tmp_path / "fsdp" / "final_model" / "iclora_config.json").read_text())
    assert meta["context_timestep"] == "zero" and meta["training_args"]["distributed"] == "fsdp"


@pytest.mark.parametrize("flags, expected", [
    ([], "error: --distributed fsdp needs several processes"),
    (["--compile"], "error: --distributed fsdp with --compile"),
    (["--mixed_precision", "fp16"], "error: --distributed fsdp with --mixed_precision fp16"),
    (["--use_8bit_adam"], "error: --distributed fsdp with --use_8bit_adam"),
])
def test_fsdp_refusals_are_one_line(data_2x2, tmp_path, capsys, flags, expected):
    with pytest.raises(SystemExit) as info:
        run_cli(train_sdxl_ic_lora.main, ["--data_dir", str(data_2x2), "--output_dir", str(tmp_path / "out"),
                                          *TINY_ARGS, "--distributed", "fsdp", *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err
    assert not (tmp_path / "out" / "final_model").exists()


def test_fsdp_with_quantize_is_refused():
    with pytest.raises(ValueError, match="--distributed fsdp with --quantize nf4"):
        TrainConfig(data_dir="d", backend="flux", distributed="fsdp", quantize="nf4")


def _full_disk_on_rank_one(record, out, data, mode) -> None:
    save = torch.save

    def no_space_on_rank_one(*args, **kwargs):  # the RNG state every process writes into a checkpoint
        if torch.distributed.get_rank() == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(*args, **kwargs)

    torch.save = no_space_on_rank_one  # a forked process of its own: undone with it
    train_sdxl_ic_lora.main(["--data_dir", str(data), "--output_dir", str(out / "run"), *TINY_ARGS,
                             "--max_train_steps", "1", "--save_every", "1", "--distributed", mode])


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_full_disk_on_one_process_stops_every_process_with_the_same_line(data_2x2, tmp_path, mode):
    """Before, the other process waited at the checkpoint's barrier for ever."""
    ranks = _ranks(_full_disk_on_rank_one, tmp_path, data_2x2, mode)
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    assert ranks[0]["error"] == ranks[1]["error"] == (
        f"RunStopped: step 1: could not write {checkpoint} (No space left on device); training stopped")
    assert not (tmp_path / "run" / "final_model").exists()
    assert not any((tmp_path / "run" / "checkpoints").iterdir())  # nothing half-written stays


def _final_save_fails_on_rank_zero(record, out, data) -> None:
    import contextlib

    from iclora.training import trainer

    whole = trainer.atomic_directory

    @contextlib.contextmanager
    def no_space_on_rank_zero(final):  # the main process writes final_model/ alone
        if torch.distributed.get_rank() == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        with whole(final) as tmp:
            yield tmp

    trainer.atomic_directory = no_space_on_rank_zero
    train_sdxl_ic_lora.main(["--data_dir", str(data), "--output_dir", str(out / "run"), *TINY_ARGS,
                             "--max_train_steps", "1", "--distributed", "fsdp"])


def test_a_failed_final_save_stops_the_processes_that_did_not_write(data_2x2, tmp_path):
    """The main process writes the final model; the others used to wait at the barrier after it."""
    ranks = _ranks(_final_save_fails_on_rank_zero, tmp_path, data_2x2)
    final = tmp_path / "run" / "final_model"
    assert ranks[0]["error"] == ranks[1]["error"] == f"RunStopped: could not write {final} (No space left on device)"
    assert not final.exists()


def test_the_accelerate_examples_load_and_the_readme_launches_each():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
    readme = (folder.parents[1] / "README.md").read_text()
    loaded = {p.name: load_config_from_file(str(p)) for p in sorted(folder.glob("*.yaml"))}
    assert sorted(loaded) == ["multi_gpu_ddp.yaml", "multi_gpu_fsdp.yaml", "two_nodes.yaml"]
    for name, config in loaded.items():
        # iclora shards the model itself: every launch is accelerate's plain multi-GPU one.
        assert config.distributed_type.value == "MULTI_GPU", name
        assert f"--config_file examples/accelerate/{name}" in readme
    assert loaded["two_nodes.yaml"].num_machines == 2
    for rank in (0, 1):
        assert f"two_nodes.yaml --machine_rank {rank}" in readme
    assert "--distributed fsdp" in readme


def _stopped(record, out, data, case) -> None:
    flags = ["--max_train_steps", "4", "--save_every", "1"]
    if case == "nan":
        flags += ["--learning_rate", "1e6"]
    else:  # SIGTERM reaches one process in its first step
        from iclora.training import trainer

        loss = trainer.diffusion_loss

        def terminated_on_rank_one(*args, **kwargs):
            if torch.distributed.get_rank() == 1 and not record.get("sent"):
                record["sent"] = True
                os.kill(os.getpid(), signal.SIGTERM)
            return loss(*args, **kwargs)

        trainer.diffusion_loss = terminated_on_rank_one
    train_sdxl_ic_lora.main(["--data_dir", str(data), "--output_dir", str(out / "run"), *TINY_ARGS, *flags,
                             "--distributed", "fsdp"])


@pytest.mark.slow
def test_a_signal_on_one_process_saves_a_sharded_checkpoint_and_stops_both(data_2x2, tmp_path):
    ranks = _ranks(_stopped, tmp_path, data_2x2, "sigterm")
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    assert ranks[0]["error"] == ranks[1]["error"] == (
        f"Interrupted: SIGTERM at step 1: saved {checkpoint}; continue with the same command and "
        "--resume_from_checkpoint latest")
    assert checkpoints.is_complete(checkpoint) and not (tmp_path / "run" / "final_model").exists()


@pytest.mark.slow
def test_a_non_finite_loss_stops_both_sharded_processes_at_the_same_step(data_2x2, tmp_path):
    ranks = _ranks(_stopped, tmp_path, data_2x2, "nan")
    steps = [rank["error"].split(":")[1] for rank in ranks]
    assert all(rank["error"].startswith("NonFinite: step ") for rank in ranks) and steps[0] == steps[1], ranks
    assert not (tmp_path / "run" / "final_model").exists()


def test_launches_and_models_fsdp_cannot_serve_are_one_line_refusals():
    """accelerate's own FSDP / DeepSpeed (GPU-only settings, so the launch is faked) and
    trainable weights of two dtypes in one block (FSDP2's own error names no flag)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from iclora.training.distributed import check_launch, shard

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ValueError, match=f"^accelerate is configured for {kind.value}: .*multi_gpu_fsdp.yaml"):
            check_launch(SimpleNamespace(distributed_type=kind, num_processes=2), "ddp")
    check_launch(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, num_processes=2), "fsdp")
    block = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to(torch.bfloat16))
    backend = SimpleNamespace(name="sdxl", shard_units=lambda: [block], denoiser=torch.nn.Sequential(block))
    with pytest.raises(ValueError, match=r"^--distributed fsdp: the trainable weights of Sequential mix dtypes "
                                         r"\(bfloat16, float32\)"):
        shard(backend, torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="^--distributed fsdp: --backend flux2 does not name the blocks to shard"):
        shard(SimpleNamespace(name="flux2"), torch.device("cpu"), torch.bfloat16)
