"""Faults and bad inputs, one table: what each does to the training CLI, the inference CLI
and the dataset check, the one line the user sees (or the correct success), the exit
status, and that nothing half-written is left behind.

Rows run in-process through `run_cli(main, argv)`, except the two that need a real
process: a SIGKILL while a checkpoint is written, and a SIGINT sent from outside. The
table is README's "Troubleshooting" section.

    pytest tests/test_faults.py
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_ARGS, toy_dataset
from iclora.backends.lora_files import COMFYUI_WEIGHT_NAME, LORA_WEIGHT_NAME, METADATA_NAME
from iclora.cli import run_cli
from iclora.data import load_composite, scan_folder
from iclora.inference.config import InferConfig
from iclora.inference.inpaint import check_inputs
from iclora.inference.sdxl_ic_lora_inference import main as infer_main
from iclora.panels import Grid
from iclora.training import checkpoints
from iclora.training.train_sdxl_ic_lora import main as train_main

REPO = Path(__file__).resolve().parents[1]
RUN = ["--max_train_steps", "6", "--save_every", "2"]  # 6 composites, batch 2: 3 steps an epoch
RESUME = "--resume_from_checkpoint latest"
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
INFER = ["--lora_path", "none", "--base_model", "tiny-sdxl", "--native_size", "--prompt", "a set",
         "--num_inference_steps", "2", "--guidance_scale", "1", "--seed", "1"]


@dataclass
class Ctx:
    tmp: Path
    data: Path
    monkeypatch: pytest.MonkeyPatch
    out: Path = field(init=False)

    def __post_init__(self):
        self.out = self.tmp / "out"

    def train_argv(self, *flags, data: Path | None = None) -> list[str]:
        return ["--data_dir", str(data or self.data), "--output_dir", str(self.out), *TINY_ARGS, *flags]

    def no_model(self) -> None:
        """The row's fault must be found before any model loads."""
        def refuse(*args, **kwargs):
            raise AssertionError("a model was loaded before the fault was found")
        self.monkeypatch.setattr("iclora.training.run_setup.load_backend", refuse)


@dataclass
class Row:
    name: str
    entry: str  # train | infer | data | train-process (the CLI script in a subprocess)
    prepare: Callable[[Ctx], list[str]]  # -> argv (data rows: unused)
    code: int  # exit status; 0 = success
    line: str = ""  # a substring of the one `error:` line ({out} is filled in)
    check: Callable | None = None  # (ctx, result) -> None: what must (not) be on disk


# ---- helpers ---------------------------------------------------------------------------------


def debris(folder: Path) -> list[str]:
    """Anything half-written: temporary, hidden, renamed-for-deletion or moved-aside files."""
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.suffix in (".tmp", ".deleting", ".old"))


def steps_saved(out: Path) -> list[int]:
    return [checkpoints.checkpoint_step(p) for p in checkpoints.find_checkpoints(out)]


def lora(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / LORA_WEIGHT_NAME)


def inject_loss(ctx: Ctx, at_call: int, make: Callable) -> None:
    """Replace the loss of the `at_call`-th micro-batch (0-based) by make(loss, pred)."""
    import iclora.training.trainer as trainer

    real, calls = trainer.masked_mse, iter(range(10**6))

    def masked_mse(pred, target, weight):
        loss = real(pred, target, weight)
        return make(loss, pred) if next(calls) == at_call else loss

    ctx.monkeypatch.setattr(trainer, "masked_mse", masked_mse)


def at_micro_step(ctx: Ctx, micro_step: int, action: Callable) -> None:
    import iclora.training.trainer as trainer

    real = trainer.Trainer._loss_step

    def loss_step(self, batch, step):
        if step == micro_step:
            action()
        return real(self, batch, step)

    ctx.monkeypatch.setattr(trainer.Trainer, "_loss_step", loss_step)


def fail_on_call(ctx: Ctx, owner, name: str, at_call: int, partial_arg: int | None = None) -> None:
    """Make `owner.name` raise ENOSPC on its `at_call`-th call (0-based), after writing a few
    bytes to its path argument as a real full disk would."""
    real, calls = getattr(owner, name), iter(range(10**6))

    def fake(*args, **kwargs):
        if next(calls) != at_call:
            return real(*args, **kwargs)
        if partial_arg is not None:
            Path(args[partial_arg]).write_bytes(b"half a file")
        raise ENOSPC

    ctx.monkeypatch.setattr(owner, name, fake)


def first_run(ctx: Ctx, *flags: str) -> None:
    train_main(ctx.train_argv("--max_train_steps", "2", "--save_every", "1", *flags))


# ---- training: non-finite values -------------------------------------------------------------


def nan_learning_rate(ctx):
    return ctx.train_argv("--learning_rate", "1e6", "--max_train_steps", "8", "--save_every", "1",
                          "--checkpoints_total_limit", "2")


def check_nan_learning_rate(ctx, result):
    assert not (ctx.out / "final_model").exists()
    newest = checkpoints.find_checkpoints(ctx.out)[-1]  # kept, and finite
    assert all(torch.isfinite(t).all() for t in load_file(newest / checkpoints.TRAINABLE_NAME).values())


def nan_at_step_3(ctx):
    inject_loss(ctx, 2, lambda loss, pred: loss * float("nan"))
    return ctx.train_argv("--max_train_steps", "6", "--save_every", "1", "--checkpoints_total_limit", "2")


def _saved(ctx, steps):
    assert steps_saved(ctx.out) == steps and not (ctx.out / "final_model").exists()


def nan_gradient(ctx):
    # A finite loss (0 added) whose gradient is 0 * inf = nan: d sqrt(|x|)/dx at 0.
    inject_loss(ctx, 0, lambda loss, pred: loss + 0.0 * (pred.sum() - pred.sum().detach()).abs().sqrt())
    return ctx.train_argv(*RUN)


def nothing_written(ctx, result):
    assert not (ctx.out / "final_model").exists() and steps_saved(ctx.out) == []


# ---- training: signals and kills -------------------------------------------------------------


def sigterm_in_step_2(ctx):
    at_micro_step(ctx, 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    return ctx.train_argv(*RUN)


def resumes_exactly(saved_step: int):
    def check(ctx, result):
        assert not (ctx.out / "final_model").exists()
        assert steps_saved(ctx.out)[-1] == saved_step
        resumed = train_main(ctx.train_argv(*RUN, *RESUME.split()))
        assert resumed.global_step == 6
        straight = train_main(["--data_dir", str(ctx.data), "--output_dir", str(ctx.tmp / "straight"),
                               *TINY_ARGS, *RUN])
        assert resumed.losses == straight.losses[saved_step:]
        a, b = lora(resumed.final_dir), lora(straight.final_dir)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    return check


# The CLI in a real process, with a hook that says (through a marker file) when it reached
# the moment the test strikes, then waits there for the signal.
CHILD = r"""
import os, sys, time
from pathlib import Path
import iclora.training.trainer as trainer
from iclora.cli import run_cli
from iclora.training.train_sdxl_ic_lora import main
mode, marker, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
if mode == "kill-in-checkpoint-4":
    from safetensors.torch import save
    real = trainer.atomic_save_file
    def atomic_save_file(tensors, path, metadata=None):
        if "checkpoint-4.tmp" in str(path):
            data = save(tensors)
            Path(path).with_name("." + Path(path).name + ".tmp").write_bytes(data[: len(data) // 2])
            marker.touch()
            time.sleep(120)
        return real(tensors, path, metadata)
    trainer.atomic_save_file = atomic_save_file
else:  # interrupt-in-step-3
    real = trainer.Trainer._loss_step
    def loss_step(self, batch, step):
        if step == 2:
            marker.touch()
            time.sleep(5)  # the signal arrives mid-step; the step still completes
        return real(self, batch, step)
    trainer.Trainer._loss_step = loss_step
run_cli(main, argv)
"""


def strike(ctx: Ctx, mode: str, signum: int, argv: list[str]) -> tuple[int, str]:
    marker = ctx.tmp / "marker"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(marker), *argv], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), child.communicate()[1][-3000:]
    child.send_signal(signum)
    _, stderr = child.communicate(timeout=240)
    return child.returncode, stderr


def sigkill_in_checkpoint(ctx):
    return ["kill-in-checkpoint-4", signal.SIGKILL]


def sigint_in_step_3(ctx):
    return ["interrupt-in-step-3", signal.SIGINT]


def killed_then_resumed(ctx, result):
    assert (ctx.out / "checkpoints" / "checkpoint-4.tmp").is_dir()  # what the kill left...
    assert steps_saved(ctx.out) == [2]  # ...does not count
    resumes_exactly(2)(ctx, result)  # and is removed by the resumed run (no debris)


# ---- training: the output folder -------------------------------------------------------------


def output_dir_is_a_file(ctx):
    ctx.no_model()
    ctx.tmp.joinpath("taken").write_text("a file")
    ctx.out = ctx.tmp / "taken" / "run"
    return ctx.train_argv(*RUN)


def output_dir_read_only(ctx):
    ctx.no_model()
    ctx.monkeypatch.setattr(checkpoints.tempfile, "mkstemp", _raise(OSError(errno.EROFS, os.strerror(errno.EROFS))))
    return ctx.train_argv(*RUN)


def _raise(error):
    def fake(*args, **kwargs):
        raise error
    return fake


def disk_too_small(ctx):
    ctx.no_model()
    usage = namedtuple("usage", "total used free")
    ctx.monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 4096, 4096))
    return ctx.train_argv(*RUN)


def another_runs_final_model(ctx):
    ctx.no_model()
    (ctx.out / "final_model").mkdir(parents=True)
    (ctx.out / "final_model" / "my_notes.txt").write_text("keep me")
    return ctx.train_argv(*RUN)


def kept_untouched(ctx, result):
    assert (ctx.out / "final_model" / "my_notes.txt").read_text() == "keep me"


def overwrite_output_dir(ctx):
    first_run(ctx)
    (ctx.out / "final_model" / "my_notes.txt").write_text("replaced by request")
    return ctx.train_argv("--max_train_steps", "1", "--save_every", "5", "--overwrite_output_dir")


def replaced(ctx, result):
    assert sorted(p.name for p in result.final_dir.iterdir()) == sorted(
        ["conv_in.safetensors", LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME, METADATA_NAME])
    assert steps_saved(ctx.out) == []  # the earlier run's checkpoints went too: no mixing


def stale_temporaries(ctx):
    for name in ("checkpoints/checkpoint-4.tmp", "checkpoints/.checkpoint-2.deleting", ".final_model.k3j9.tmp",
                 ".checkpoints.deleting/checkpoint-1"):
        (ctx.out / name).mkdir(parents=True)
        (ctx.out / name / "trainer_state.json").write_text("{}")
    return ctx.train_argv("--max_train_steps", "1", "--save_every", "5")


def killed_between_final_renames(ctx):
    ctx.no_model()
    (ctx.out / ".final_model.old").mkdir(parents=True)  # the previous final_model, moved aside
    (ctx.out / ".final_model.old" / LORA_WEIGHT_NAME).write_text("previous weights")
    return ctx.train_argv(*RUN)


def put_back(ctx, result):
    assert (ctx.out / "final_model" / LORA_WEIGHT_NAME).read_text() == "previous weights"


def checkpoint_missing_weights(ctx):
    first_run(ctx)
    (ctx.out / "checkpoints" / "checkpoint-2" / checkpoints.TRAINABLE_NAME).unlink()  # a kill mid-prune, say
    return ctx.train_argv("--max_train_steps", "3", "--save_every", "5", *RESUME.split())


def resumed_from_step_1(ctx, result):
    assert result.global_step == 3 and len(result.losses) == 2


def resume_incomplete_by_name(ctx):
    first_run(ctx)
    (ctx.out / "checkpoints" / "checkpoint-2" / "optimizer.bin").unlink()
    return ctx.train_argv("--max_train_steps", "3", "--resume_from_checkpoint", str(ctx.out / "checkpoints" / "checkpoint-2"))


def full_disk_in_checkpoint(ctx):
    import iclora.backends.lora_files as lora_files

    real = lora_files.save_file

    def save_file(tensors, path, *args, **kwargs):  # the second checkpoint's first file
        if "checkpoint-4" not in str(path):
            return real(tensors, path, *args, **kwargs)
        Path(path).write_bytes(b"half a file")
        raise ENOSPC

    ctx.monkeypatch.setattr(lora_files, "save_file", save_file)
    return ctx.train_argv(*RUN)


def first_checkpoint_only(ctx, result):
    assert steps_saved(ctx.out) == [2] and not (ctx.out / "final_model").exists()


def full_disk_in_final_model(ctx):
    from iclora.backends.sdxl import SDXLBackend

    real = SDXLBackend.save_lora

    def save_lora(self, directory, **kwargs):  # checkpoints hold these files too: fail only the final one
        if not Path(directory).name.startswith(".final_model"):
            return real(self, directory, **kwargs)
        (Path(directory) / LORA_WEIGHT_NAME).write_bytes(b"half")
        raise ENOSPC

    ctx.monkeypatch.setattr(SDXLBackend, "save_lora", save_lora)
    return ctx.train_argv(*RUN)


def checkpoints_survive(ctx, result):
    assert steps_saved(ctx.out) == [2, 4, 6] and not (ctx.out / "final_model").exists()


def ctrl_c_while_loading(ctx):
    ctx.monkeypatch.setattr("iclora.training.run_setup.load_backend", _raise(KeyboardInterrupt()))
    return ctx.train_argv(*RUN)


# ---- training: resuming with other settings --------------------------------------------------


def resume_other_learning_rate(ctx):
    first_run(ctx)
    return ctx.train_argv("--max_train_steps", "4", "--learning_rate", "1e-3", *RESUME.split())


def resume_longer(ctx):
    first_run(ctx)
    return ctx.train_argv("--max_train_steps", "4", "--save_every", "3", "--checkpoints_total_limit", "1", *RESUME.split())


def longer_recorded(ctx, result):
    import json

    meta = json.loads((result.final_dir / METADATA_NAME).read_text())
    assert meta["global_step"] == 4 and meta["training_args"]["max_train_steps"] == 4
    assert steps_saved(ctx.out) == [3]


# ---- the dataset check -----------------------------------------------------------------------


def _composite(path: Path, image: Image.Image, caption: bytes | None = b"a set", **save) -> Path:
    image.save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_bytes(caption)
    return path


def truncated_jpeg(ctx):
    ctx.no_model()
    rng = np.random.default_rng(0)
    path = _composite(ctx.data / "cut.jpg", Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return ctx.train_argv(*RUN)


def bad_captions(ctx):
    ctx.no_model()
    _composite(ctx.data / "latin.png", Image.new("RGB", (64, 64)), "café".encode("latin-1"))
    _composite(ctx.data / "wide16.png", Image.new("RGB", (64, 64)), "a set".encode("utf-16"))
    return ctx.train_argv(*RUN)


def needle_composite(ctx):
    ctx.no_model()
    _composite(ctx.data / "needle.png", Image.new("RGB", (10000, 10)))
    return ctx.train_argv(*RUN)


def data_allow_crop_and_bom(ctx):
    _composite(ctx.data / "needle.png", Image.new("RGB", (10000, 10)), "\ufeffa needle".encode("utf-8"))
    records = {r.image.name: r for r in scan_folder(ctx.data, 64, Grid(2, 2), 8, allow_crop=True)}
    assert records["needle.png"].caption == "a needle"  # BOM dropped
    assert records["needle.png"].size == (16, 64)
    return []


# Image modes as training and inference read them: (image, pixel (0, 0) as 8-bit RGB)
MODES = {
    "16-bit grey 32768": (Image.fromarray(np.full((64, 64), 32768, np.uint16)), (128, 128, 128)),
    "16-bit grey 65535": (Image.fromarray(np.full((64, 64), 65535, np.uint16)), (255, 255, 255)),
    "16-bit grey 300": (Image.fromarray(np.full((64, 64), 300, np.uint16)), (1, 1, 1)),
    "palette": (Image.new("RGB", (64, 64), (200, 10, 30)).quantize(4), (200, 10, 30)),
    "palette, transparent": (None, (255, 255, 255)),
    "grey + alpha 0": (Image.new("LA", (64, 64), (40, 0)), (255, 255, 255)),
    "grey + alpha 255": (Image.new("LA", (64, 64), (40, 255)), (40, 40, 40)),
    "RGBA half alpha": (Image.new("RGBA", (64, 64), (0, 0, 200, 128)), (127, 127, 228)),
    "grey": (Image.new("L", (64, 64), 77), (77, 77, 77)),
    "1-bit": (Image.new("1", (64, 64), 1), (255, 255, 255)),
    "CMYK": (Image.new("CMYK", (64, 64), (0, 255, 255, 0)), (255, 0, 0)),
}


def _transparent_palette() -> Image.Image:
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 255, 0] * 256)
    image.info["transparency"] = 0
    return image


def image_modes(ctx):
    for name, (image, expected) in MODES.items():
        image = _transparent_palette() if image is None else image
        path = ctx.tmp / f"{name.replace(' ', '_').replace(',', '')}.{'jpg' if image.mode == 'CMYK' else 'png'}"
        image.save(path, **({"transparency": 0} if name == "palette, transparent" else {}))
        pixels, _ = load_composite(path, (64, 64))  # training, (3, H, W) in [-1, 1]
        trained = tuple(int(round(v)) for v in ((pixels[:, 0, 0] + 1) * 127.5).tolist())
        plan = check_inputs(InferConfig(lora_path="none", prompt="p", input_image=str(path),
                                        output_dir=str(ctx.tmp / "o")))
        inferred = plan.image.getpixel((0, 0))  # inference
        tolerance = 3 if path.suffix == ".jpg" else 1
        for got in (trained, inferred):
            assert max(abs(a - b) for a, b in zip(got, expected)) <= tolerance, (name, got, expected)
    return []


# ---- inference -------------------------------------------------------------------------------


def _input_image(ctx, name="in.png") -> Path:
    path = ctx.tmp / name
    Image.fromarray(np.full((128, 128), 32768, np.uint16)).save(path)  # 16-bit mid-grey
    return path


def stale_outputs(ctx):
    path = _input_image(ctx)
    infer_main([*INFER, "--input_image", str(path), "--output_dir", str(ctx.out), "--num_images", "2", "--save_comparison"])
    (ctx.out / "in_x_0.png").write_bytes(b"another input's output")  # not ours to remove
    return [*INFER, "--input_image", str(path), "--output_dir", str(ctx.out), "--num_images", "1"]


def exactly_this_run(ctx, result):
    assert sorted(p.name for p in ctx.out.iterdir()) == [
        "in_0.png", "in_0_panel2.png", "in_0_panel3.png", "in_inference.json", "in_x_0.png"]
    with Image.open(ctx.out / "in_0.png") as image:  # the 16-bit input, pasted back as 128 grey
        assert image.getpixel((10, 10)) == (128, 128, 128)


def full_disk_in_outputs(ctx):
    path = _input_image(ctx)
    fail_on_call(ctx, Image.Image, "save", 1, partial_arg=1)
    return [*INFER, "--input_image", str(path), "--output_dir", str(ctx.out), "--num_images", "2"]


def no_outputs(ctx, result):
    assert list(ctx.out.iterdir()) == []


# ---- the table -------------------------------------------------------------------------------

ROWS = [
    # training: non-finite values
    Row("loss NaN from --learning_rate 1e6", "train", nan_learning_rate, 1,
        ": the loss is nan; training stopped before the optimizer step, no final model written and the newest "
        "checkpoint", check_nan_learning_rate),
    Row("loss NaN at step 3", "train", nan_at_step_3, 1,
        "step 3: the loss is nan; training stopped before the optimizer step, no final model written and the newest "
        "checkpoint, {out}/checkpoints/checkpoint-2, is kept", lambda ctx, r: _saved(ctx, [1, 2])),
    Row("gradient NaN at step 1", "train", nan_gradient, 1,
        "step 1: the gradient norm is nan; training stopped before the optimizer step, no final model written and "
        "no checkpoint was written", nothing_written),
    # training: signals and kills
    Row("SIGKILL while checkpoint-4 is written, then resume", "train-process", sigkill_in_checkpoint, -9, "",
        killed_then_resumed),
    Row("SIGINT (Ctrl-C) in step 3, then resume", "train-process", sigint_in_step_3, 130,
        f"SIGINT at step 3: saved {{out}}/checkpoints/checkpoint-3; continue with the same command and {RESUME}",
        resumes_exactly(3)),
    Row("SIGTERM in step 2, then resume", "train", sigterm_in_step_2, 143,
        f"SIGTERM at step 2: saved {{out}}/checkpoints/checkpoint-2; continue with the same command and {RESUME}",
        resumes_exactly(2)),
    Row("Ctrl-C while the model loads", "train", ctrl_c_while_loading, 130,
        "interrupted; nothing more was written", nothing_written),
    # training: the output folder
    Row("--output_dir inside a file", "train", output_dir_is_a_file, 2, "taken is a file, not a folder"),
    Row("--output_dir read-only", "train", output_dir_read_only, 2, "not writable (Read-only file system)"),
    Row("disk too small for a checkpoint", "train", disk_too_small, 2,
        "4.0 KB free, but a checkpoint and the final model need about"),
    Row("another run's final_model/", "train", another_runs_final_model, 2,
        "holds final_model/ of an earlier run: choose another --output_dir, or pass --overwrite_output_dir",
        kept_untouched),
    Row("--overwrite_output_dir", "train", overwrite_output_dir, 0, "", replaced),
    Row("temporary folders of killed runs", "train", stale_temporaries, 0, ""),
    Row("kill between final_model's renames", "train", killed_between_final_renames, 2,
        "holds final_model/ of an earlier run", put_back),
    Row("latest checkpoint lacks its weights", "train", checkpoint_missing_weights, 0, "", resumed_from_step_1),
    Row("incomplete checkpoint named", "train", resume_incomplete_by_name, 2,
        "checkpoint-2: incomplete checkpoint (files missing)"),
    Row("full disk writing a checkpoint", "train", full_disk_in_checkpoint, 1,
        "step 4: could not write {out}/checkpoints/checkpoint-4 (No space left on device); training stopped",
        first_checkpoint_only),
    Row("full disk writing final_model", "train", full_disk_in_final_model, 1,
        f"could not write {{out}}/final_model (No space left on device); continue with the same command and {RESUME} "
        "after freeing space",
        checkpoints_survive),
    # training: resuming with other settings
    Row("resume with another --learning_rate", "train", resume_other_learning_rate, 2,
        "run settings differ (learning_rate 0.0001 -> 0.001); resume with the checkpoint's settings"),
    Row("resume with a longer run", "train", resume_longer, 0, "", longer_recorded),
    # the dataset check
    Row("truncated JPEG", "train", truncated_jpeg, 2, "cut.jpg: unreadable image (OSError: image file is truncated"),
    Row("latin-1 and UTF-16 captions", "train", bad_captions, 2,
        "2 bad file(s): latin.txt: not UTF-8 text (byte 0xe9 at offset 3); wide16.txt: not UTF-8 text (byte 0xff"),
    Row("10000x10 composite", "train", needle_composite, 2,
        "needle.png: 10000x10 would be cropped to 0.4% of its width to fit 64x16 for the 2x2 grid (--allow_crop"),
    Row("10000x10 with --allow_crop, caption with BOM", "data", data_allow_crop_and_bom, 0),
    Row("16-bit, palette, alpha, grey, CMYK pixels", "data", image_modes, 0),
    # inference
    Row("second run with fewer outputs (16-bit input)", "infer", stale_outputs, 0, "", exactly_this_run),
    Row("full disk writing outputs", "infer", full_disk_in_outputs, 2,
        "could not write in_0_panel2.png (No space left on device)", no_outputs),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_fault(row, tmp_path, monkeypatch, capsys):
    data = toy_dataset(tmp_path / "data", n=6, seed=1)
    ctx = Ctx(tmp_path, data, monkeypatch)
    argv = row.prepare(ctx)
    capsys.readouterr()
    result = None
    if row.entry == "train-process":
        mode, signum = argv
        code, stderr = strike(ctx, mode, signum, ctx.train_argv(*RUN))
    elif row.entry == "data":
        code, stderr = 0, ""
    else:
        main = train_main if row.entry == "train" else infer_main
        results = []
        try:
            run_cli(lambda a: results.append(main(a)), argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        result = results[0] if results else None
        stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == row.code, stderr[-3000:]
    if row.line:
        assert len(errors) == 1, errors
        assert row.line.format(out=ctx.out) in errors[0]
        assert stderr.rstrip().splitlines()[-1] == errors[0]  # the last thing printed
    else:
        assert errors == []
    monkeypatch.undo()
    if row.check:
        row.check(ctx, result)
    if ctx.out.exists():
        assert debris(ctx.out) == []
