"""--compile: regional compilation of the denoiser's repeated blocks, in training and inference.

The fast tests compile with a counting backend that runs what dynamo captured as it is (no
code generation, ~2 s of tracing): they check what is compiled, that the compiled regions
are what runs at every denoiser call (also FLUX's per-token forward, which bypasses the
blocks' own forward), that saved and resumed state keeps its keys, and the reporting. The
slow ones compile for real (inductor) through the CLIs and compare with eager runs.

    pytest tests/test_compile.py
    pytest -m slow tests/test_compile.py      (inductor: 45-65 s each cold, 5-20 s with its cache)
"""

import os

# Before diffusers/huggingface_hub are imported: they read it once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import numpy as np
import pytest
import torch
import torch._dynamo
from accelerate import debug_launcher
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_ARGS, run_training
from iclora.backends import load_backend
from iclora.backends.flux_context import BLOCK_FORWARDS
from iclora.cli import run_cli
from iclora.compiling import compiled_block_counts
from iclora.inference import flux_ic_lora_inference, sdxl_ic_lora_inference
from iclora.training import train_flux_ic_lora, train_sdxl_ic_lora
from iclora.training.checkpoints import TRAINABLE_NAME

LORA = "pytorch_lora_weights.safetensors"
FLUX_ARGS = ["--model_id", "tiny-flux", "--image_size", "64", "--batch_size", "2", "--lora_rank", "4",
             "--lora_alpha", "8"]
INFER = ["--prompt", "a set", "--panels_to_inpaint", "2", "3", "--num_inference_steps", "3", "--seed", "1",
         "--guidance_scale", "2"]
# Blocks of the tiny models: SDXL 8 BasicTransformerBlocks; FLUX one double and one single block.
SDXL_BLOCKS, FLUX_BLOCKS = 8, 2


class CountingBackend:
    """A torch.compile backend that runs each captured graph unchanged and counts the calls."""

    def __init__(self):
        self.graphs = 0
        self.calls = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return graph_module.forward(*args)

        return run


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: dynamo keeps compiled code per code object for the
    whole process (and gives up recompiling after 8 variants)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def counting(monkeypatch):
    backend = CountingBackend()
    for module in ("iclora.training.run_setup", "iclora.inference.inpaint"):
        monkeypatch.setattr(f"{module}.COMPILE_OPTIONS", {"backend": backend})
    torch._dynamo.utils.counters.clear()
    return backend


def _flux_train(data, out, *flags):
    return train_flux_ic_lora.main(["--data_dir", str(data), "--output_dir", str(out), *FLUX_ARGS, *flags])


def _log(result) -> list[dict]:
    return [json.loads(line) for line in (result.final_dir.parent / "train_log.jsonl").read_text().splitlines()]


def _assert_same_keys_and_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


# ---- what is compiled ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, conditioning", [("tiny-sdxl", "context"), ("tiny-sdxl", "concat"),
                                                ("tiny-flux", "blend")])
def test_compile_blocks_compiles_the_repeated_blocks_and_keeps_parameter_names(name, conditioning):
    backend = load_backend(name.removeprefix("tiny-"), name, conditioning)
    backend.add_lora(4, 4, 0.0)
    backend.enable_gradient_checkpointing()
    names = [n for n, _ in backend.denoiser.named_parameters()]
    compiled = backend.compile_blocks(backend="eager")  # lazy: nothing compiles before a call
    repeated = set(type(backend.denoiser)._repeated_blocks)
    blocks = {n for n, m in backend.denoiser.named_modules() if type(m).__name__ in repeated}
    assert blocks and {n for n, m in backend.denoiser.named_modules() if m._compiled_call_impl is not None} == blocks
    assert compiled.blocks == compiled_block_counts(backend.denoiser) == backend.compiled.blocks
    assert sum(compiled.blocks.values()) == len(blocks)
    assert [n for n, _ in backend.denoiser.named_parameters()] == names  # no _orig_mod. prefix
    assert not any(n.startswith("_orig_mod") for n in backend.trainable_state_dict())


def test_flux_zero_mode_compiles_the_per_token_block_forwards():
    """The per-token forward never calls a block's own forward, so it compiles the functions it
    runs the blocks through, and leaves the blocks' forwards alone."""
    backend = load_backend("flux", "tiny-flux", "context", context_timestep="zero")
    backend.add_lora(4, 4, 0.0)
    compiled = backend.compile_blocks(backend="eager")
    assert compiled.blocks == {"FluxTransformerBlock": 1, "FluxSingleTransformerBlock": 1}
    assert compiled_block_counts(backend.transformer) == {}
    assert len(backend.denoiser.blocks) == 2 and backend.denoiser.blocks != BLOCK_FORWARDS
    assert backend.inpaint_pipeline().context_denoiser is backend.denoiser  # inference runs the same module


# ---- training --------------------------------------------------------------------------------------


@pytest.mark.parametrize("conditioning", ["context", "concat"])
def test_sdxl_training_runs_the_compiled_blocks(conditioning, data_2x2, tmp_path, counting):
    flags = ["--conditioning", conditioning, "--max_train_steps", "2", "--gradient_checkpointing"]
    eager = run_training(data_2x2, tmp_path / "eager", *flags)
    compiled = run_training(data_2x2, tmp_path / "compiled", *flags, "--compile")
    # Every block call of every forward, and of the checkpoint's recompute in the backward.
    assert counting.calls == 2 * 2 * SDXL_BLOCKS
    assert not torch._dynamo.utils.counters["graph_break"]
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-6)
    _assert_same_keys_and_close(load_file(eager.final_dir / LORA), load_file(compiled.final_dir / LORA), 1e-6)
    log = _log(compiled)
    assert log[0]["first_compiled_step_seconds"] > 0 and "first_compiled_step_seconds" not in log[1]
    meta = json.loads((compiled.final_dir / "iclora_config.json").read_text())
    assert meta["training_args"]["compile"] is True


@pytest.mark.parametrize("flags", [[], ["--conditioning", "blend"]])
def test_flux_training_runs_the_compiled_blocks(flags, data_2x2, tmp_path, counting):
    """Default FLUX training (context, zero) runs its blocks through the per-token forward."""
    flags = [*flags, "--max_train_steps", "2", "--gradient_checkpointing"]
    eager = _flux_train(data_2x2, tmp_path / "eager", *flags)
    compiled = _flux_train(data_2x2, tmp_path / "compiled", *flags, "--compile")
    assert counting.calls == 2 * 2 * FLUX_BLOCKS
    assert not torch._dynamo.utils.counters["graph_break"]
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-6)
    _assert_same_keys_and_close(load_file(eager.final_dir / LORA), load_file(compiled.final_dir / LORA), 1e-6)


def test_compiled_run_checkpoints_and_resumes_exactly(data_2x2_six, tmp_path, counting):
    flags = ["--save_every", "2", "--learning_rate", "5e-3", "--compile"]
    straight = run_training(data_2x2_six, tmp_path / "a", *flags, "--max_train_steps", "4")
    run_training(data_2x2_six, tmp_path / "b", *flags, "--max_train_steps", "2")
    resumed = run_training(data_2x2_six, tmp_path / "b", *flags, "--max_train_steps", "4",
                           "--resume_from_checkpoint", "latest")
    assert resumed.losses == straight.losses[2:]
    a, b = load_file(straight.final_dir / LORA), load_file(resumed.final_dir / LORA)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    eager = run_training(data_2x2_six, tmp_path / "eager", "--save_every", "2", "--max_train_steps", "2")
    state = load_file(tmp_path / "b" / "checkpoints" / "checkpoint-2" / TRAINABLE_NAME)
    assert state.keys() == load_file(eager.final_dir.parent / "checkpoints" / "checkpoint-2" / TRAINABLE_NAME).keys()


def _two_process_runs(argv: list[str], out, counting) -> None:
    """One rank of `debug_launcher` (forked: the counting backend comes along): an eager and a
    compiled run of `argv`, their losses and the compiled blocks' calls written per rank."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the parent's state is not distributed
    eager = train_flux_ic_lora.main([*argv, "--output_dir", str(out / "eager")])
    compiled = train_flux_ic_lora.main([*argv, "--output_dir", str(out / "compiled"), "--compile"])
    state = PartialState()
    record = {"processes": state.num_processes, "calls": counting.calls, "eager": eager.losses,
              "compiled": compiled.losses}
    (out / f"rank{state.process_index}.json").write_text(json.dumps(record))


def test_two_process_training_runs_the_compiled_blocks(data_2x2, tmp_path, counting):
    """DDP around FLUX's per-token denoiser (the default FLUX training), two CPU processes."""
    argv = ["--data_dir", str(data_2x2), *FLUX_ARGS, "--max_train_steps", "2", "--gradient_checkpointing"]
    debug_launcher(_two_process_runs, args=(argv, tmp_path, counting), num_processes=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["processes"] == 2
        assert rank["calls"] == 2 * 2 * FLUX_BLOCKS  # this rank's micro-batches, forward and recompute
        assert rank["compiled"] == pytest.approx(rank["eager"], rel=1e-6)
    assert ranks[0]["compiled"] == ranks[1]["compiled"]  # the gathered loss
    _assert_same_keys_and_close(load_file(tmp_path / "eager" / "final_model" / LORA),
                                load_file(tmp_path / "compiled" / "final_model" / LORA), 1e-6)


def test_compile_without_a_cpu_compiler_is_one_error_line(data_2x2, tmp_path, capsys, monkeypatch):
    # The compiler lookup fails as it does on a machine without one. Patching it, not inductor's
    # `config.cpp.cxx`: on torch 2.13 a config entry set and then undone by monkeypatch reads as
    # missing afterwards, which broke every later --compile test.
    from torch._inductor import cpp_builder, exc

    def no_compiler():
        raise exc.InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(SystemExit) as info:
        run_cli(train_sdxl_ic_lora.main, ["--data_dir", str(data_2x2), "--output_dir", str(tmp_path), *TINY_ARGS,
                                          "--compile"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --compile on the CPU needs a C++ compiler")
    assert not (tmp_path / "final_model").exists()


def test_compile_with_quantize_and_checkpointing_is_one_error_line(data_2x2, tmp_path, capsys):
    """bitsandbytes' layers change their state at their first call: the checkpoint's recompute
    of a compiled block would not match its forward (measured in benchmarks/train_memory.py)."""
    with pytest.raises(SystemExit) as info:
        run_cli(train_flux_ic_lora.main, ["--data_dir", str(data_2x2), "--output_dir", str(tmp_path), *FLUX_ARGS,
                                          "--quantize", "nf4", "--gradient_checkpointing", "--compile"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --compile with --quantize nf4 and --gradient_checkpointing")


# ---- inference -------------------------------------------------------------------------------------


def _pixels(folder, stem="00001") -> np.ndarray:
    return np.asarray(Image.open(folder / f"{stem}_0.png")).astype(np.int16)


@pytest.mark.parametrize("backend", ["sdxl", "flux"])
def test_inference_runs_the_compiled_blocks_and_reports_the_first_step(backend, data_2x2, tmp_path, counting):
    train, infer, blocks = ((train_sdxl_ic_lora.main, sdxl_ic_lora_inference.main, SDXL_BLOCKS) if backend == "sdxl"
                            else (train_flux_ic_lora.main, flux_ic_lora_inference.main, FLUX_BLOCKS))
    args = TINY_ARGS if backend == "sdxl" else FLUX_ARGS
    lora = train(["--data_dir", str(data_2x2), "--output_dir", str(tmp_path / "lora"), *args, "--max_train_steps", "1",
                  "--conditioning", "context"]).final_dir
    argv = ["--lora_path", str(lora), "--input_image", str(data_2x2 / "00001.png"), *INFER]
    infer([*argv, "--output_dir", str(tmp_path / "eager")])
    infer([*argv, "--output_dir", str(tmp_path / "compiled"), "--compile"])
    assert counting.calls == 3 * blocks  # every denoising step (SDXL: both guidance halves in one batch)
    assert np.abs(_pixels(tmp_path / "eager") - _pixels(tmp_path / "compiled")).max() <= 1
    record = json.loads((tmp_path / "compiled" / "00001_inference.json").read_text())
    assert record["arguments"]["compile"] is True
    assert sum(record["resolved"]["compile"]["blocks"].values()) == blocks
    assert record["resolved"]["compile"]["first_call_seconds"] > 0
    assert "compile" not in json.loads((tmp_path / "eager" / "00001_inference.json").read_text())["resolved"]


# ---- with inductor, against eager ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sdxl", "flux"])
def test_compiled_training_and_inference_equal_eager(backend, data_2x2, tmp_path):
    """Inductor-compiled blocks (LoRA dropout 0.1 included, gradient checkpointing) train and
    complete what eager ones do, to float rounding."""
    train, infer = ((train_sdxl_ic_lora.main, sdxl_ic_lora_inference.main) if backend == "sdxl"
                    else (train_flux_ic_lora.main, flux_ic_lora_inference.main))
    args = [*(TINY_ARGS if backend == "sdxl" else FLUX_ARGS), "--conditioning", "context", "--max_train_steps", "3",
            "--gradient_checkpointing", "--cache_text_embeddings", "--learning_rate", "1e-3"]
    runs, images = {}, {}
    for mode in ("eager", "compiled"):
        flag = ["--compile"] if mode == "compiled" else []
        runs[mode] = train(["--data_dir", str(data_2x2), "--output_dir", str(tmp_path / mode), *args, *flag])
        infer(["--lora_path", str(runs[mode].final_dir), "--input_image", str(data_2x2 / "00001.png"), *INFER,
               "--output_dir", str(tmp_path / f"{mode}_out"), *flag])
        images[mode] = _pixels(tmp_path / f"{mode}_out")
    assert runs["compiled"].losses == pytest.approx(runs["eager"].losses, rel=1e-5)
    _assert_same_keys_and_close(load_file(runs["eager"].final_dir / LORA), load_file(runs["compiled"].final_dir / LORA),
                                1e-5)
    assert np.abs(images["eager"] - images["compiled"]).max() <= 1
