"""The Train tab's work, without any web code. A run is the training script itself
(src/training/train_<backend>_ic_lora.py), started as its own process in its own session:
closing the page, or stopping the app, leaves it running. What the page shows comes from the
files the run writes (train_log.jsonl, samples/, the script's output), so a page opened
later, or another app, finds the run again from its output folder alone.

    OUTPUT/app_run.json   pid, flags and command of the newest run the app started there
    OUTPUT/app_run.log    everything the script printed (a resumed run appends)

Stopping sends SIGINT, on which the trainer finishes its step, saves a checkpoint and exits;
resuming starts the same flags again with --resume_from_checkpoint latest.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..backends.lora_files import atomic_write_text
from ..backends.registry import backend_spec
from .workspace import Workspace, command_line, parse_flags

SRC = Path(__file__).resolve().parents[1]  # the package folder: iclora.training.x is SRC/training/x.py
RUN_FILE = "app_run.json"
LOG_FILE = "app_run.log"
PROCESSES: dict[int, subprocess.Popen] = {}  # the runs this app started: their exit status
_PROGRESS = re.compile(r"train:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")


@dataclass
class TrainSettings:
    """What the Train tab sets; blank (None / '' / 0) leaves the flag to the config file or
    the script's default."""

    data_dir: str = ""
    output_dir: str = ""
    backend: str = "sdxl"
    model_id: str = ""
    config: str = ""  # a YAML file of the workspace (--config); the fields below override it
    max_train_steps: int | None = None
    num_epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    lora_rank: int | None = None
    image_size: int | None = None
    grid: str = ""
    conditioning: str = ""
    validation_every: int | None = None
    save_every: int | None = None
    seed: int | None = None
    overwrite_output_dir: bool = False
    extra_flags: str = ""  # any other flags, as typed on a command line


@dataclass
class RunStatus:
    state: str  # 'none', 'running', 'finished', 'stopped'
    message: str
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    samples: list[Path] = field(default_factory=list)  # comparison sheets, oldest step first
    log_tail: str = ""
    command: str = ""


def script(backend: str, kind: str = "train") -> Path:
    """The file of the backend's train (or infer) script."""
    spec = backend_spec(backend)  # an unknown name: one line naming the choices
    module = spec.train_script if kind == "train" else spec.infer_script
    return SRC.joinpath(*module.split(".")[1:]).with_suffix(".py")


def train_argv(ws: Workspace, s: TrainSettings) -> list[str]:
    """The training script's flags (workspace paths made absolute; extra flags first, so the
    fields of the page win)."""
    try:
        argv = shlex.split(s.extra_flags)
    except ValueError as error:
        raise ValueError(f"extra flags: {error}") from None
    if s.config.strip():
        argv += ["--config", str(ws.path(s.config, "--config", must_exist=True))]
    argv += ["--data_dir", str(ws.path(s.data_dir, "--data_dir", must_exist=True))]
    argv += ["--output_dir", str(ws.path(s.output_dir, "--output_dir"))]
    if s.model_id.strip():
        argv += ["--model_id", ws.model(s.model_id, "--model_id")]
    for name in ("max_train_steps", "num_epochs", "batch_size", "learning_rate", "lora_rank", "image_size",
                 "validation_every", "save_every", "seed"):
        value = getattr(s, name)
        if value not in (None, "", 0):  # a blank number field may arrive as 0, which no flag here takes
            argv += [f"--{name}", str(int(value) if name != "learning_rate" else value)]
    for name in ("grid", "conditioning"):
        if getattr(s, name).strip():
            argv += [f"--{name}", getattr(s, name).strip()]
    if s.overwrite_output_dir:
        argv += ["--overwrite_output_dir"]
    return argv


def parse_run(ws: Workspace, backend: str, argv: list[str]):
    """The training command line's own parsing and checks, then every path the settings name
    (the config file's and the extra flags' too) checked to lie inside the workspace."""
    from ..training.config import TrainConfig

    defaults = training_defaults(backend)
    cfg = parse_flags(TrainConfig, argv, prog=script(backend).name, defaults=defaults)
    for name in ("data_dir", "output_dir", "cache_dir", "pretrained_vae", "resume_from_checkpoint"):
        value = getattr(cfg, name)
        if value and value != "latest":
            ws.inside(value, f"--{name}")
    for value in cfg.validation_image:
        ws.inside(value, "--validation_image")
    if Path(cfg.model_id).is_absolute():
        ws.inside(cfg.model_id, "--model_id")
    elif cfg.model_id != defaults.get("model_id"):
        ws.model(cfg.model_id, "--model_id")
    return cfg


def training_defaults(backend: str) -> dict:
    return backend_spec(backend).train_defaults


def start_run(ws: Workspace, s: TrainSettings) -> str:
    argv = train_argv(ws, s)
    cfg = parse_run(ws, s.backend, argv)
    out = Path(cfg.output_dir)
    _refuse_running(ws, out)
    if not cfg.overwrite_output_dir and not cfg.resume_from_checkpoint:
        from ..training.checkpoints import check_earlier_run

        check_earlier_run(out, None, overwrite=False, main=False)  # the command line's refusal, at once
    return _launch(ws, s.backend, argv, out)


def resume_run(ws: Workspace, output_dir: str) -> str:
    """The newest run the app started in `output_dir`, again, from its latest checkpoint."""
    out = ws.path(output_dir, "--output_dir")
    record = read_record(out)
    if record is None:
        raise ValueError(f"--output_dir {output_dir}: no run was started there from the app ({RUN_FILE} missing)")
    _refuse_running(ws, out)
    argv = list(record["argv"])
    if "--resume_from_checkpoint" in argv:
        i = argv.index("--resume_from_checkpoint")
        del argv[i : i + 2]
    argv = [a for a in argv if a != "--overwrite_output_dir"] + ["--resume_from_checkpoint", "latest"]
    parse_run(ws, record["backend"], argv)
    return _launch(ws, record["backend"], argv, out)


def stop_run(ws: Workspace, output_dir: str) -> str:
    out = ws.path(output_dir, "--output_dir")
    record = read_record(out)
    if record is None or not is_running(record["pid"]):
        raise ValueError(f"--output_dir {output_dir}: no run of the app is running there")
    os.kill(record["pid"], signal.SIGINT)
    return (f"sent SIGINT to the run (pid {record['pid']}): it finishes its step, saves a checkpoint and stops; "
            "Resume continues it")


def _refuse_running(ws: Workspace, out: Path) -> None:
    record = read_record(out)
    if record is not None and is_running(record["pid"]):
        raise ValueError(f"--output_dir {ws.relative(out)}: a run is already writing there (pid {record['pid']}); "
                         "stop it first, or choose another output folder")


def _launch(ws: Workspace, backend: str, argv: list[str], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    path = script(backend)
    with open(out / LOG_FILE, "ab") as log:  # the child keeps its own handle
        process = subprocess.Popen(
            [sys.executable, str(path), *argv], cwd=ws.root, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,  # its own session: the page and the app may go
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    PROCESSES[process.pid] = process
    command = command_line(f"src/training/{path.name}", argv)
    record = {"pid": process.pid, "backend": backend, "argv": argv, "command": command, "started": time.time()}
    atomic_write_text(json.dumps(record, indent=2), out / RUN_FILE)
    return f"started (pid {process.pid}): {command}"


def read_record(out: Path) -> dict | None:
    try:
        return json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_running(pid: int) -> bool:
    if pid in PROCESSES:
        return PROCESSES[pid].poll() is None
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")  # a reused pid is some other program
    if cmdline.exists():
        return "_ic_lora.py" in cmdline.read_bytes().decode(errors="replace") and _not_zombie(pid)
    return True


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def run_status(ws: Workspace, output_dir: str) -> RunStatus:
    """What the run in `output_dir` is doing, from its files."""
    out = ws.path(output_dir, "--output_dir")
    record = read_record(out)
    losses = read_losses(out)
    samples = sorted(out.glob("samples/step_*/*_comparison.png"))
    raw = read_tail(out / LOG_FILE)
    lines = log_lines(raw)
    tail = "\n".join(lines[-12:])
    if record is None:
        state = "none" if not losses else "finished"
        message = f"no run started from the app in {output_dir}" + (f"; {len(losses)} logged steps" if losses else "")
        return RunStatus(state, message, losses, samples, tail)
    progress = _PROGRESS.findall(raw)
    step = f"step {progress[-1][0]} of {progress[-1][1]}" if progress else f"step {losses[-1][0]}" if losses else "loading"
    last_loss = f", loss {losses[-1][1]:.4f}" if losses else ""
    if is_running(record["pid"]):
        state, message = "running", f"running (pid {record['pid']}): {step}{last_loss}"
    else:
        errors = [line for line in lines if line.startswith("error:")]
        code = PROCESSES[record["pid"]].returncode if record["pid"] in PROCESSES else None
        finished = code == 0 or (code is None and not errors and (out / "final_model").is_dir())
        state = "finished" if finished else "stopped"
        ending = next((line for line in reversed(lines) if line.startswith("saved ")), "") if finished else (
            errors[-1] if errors else f"exit status {code}")
        message = f"{state}: {step}{last_loss}; {ending}".rstrip("; ")
    return RunStatus(state, message, losses, samples, tail, record.get("command", ""))


def read_losses(out: Path) -> list[tuple[int, float]]:
    """(step, loss) of every line of train_log.jsonl (a line being written is skipped)."""
    points = []
    try:
        text = (out / "train_log.jsonl").read_text()
    except OSError:
        return points
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            points.append((int(entry["step"]), float(entry["loss"])))
        except (ValueError, KeyError, TypeError):
            continue
    return points


def read_tail(path: Path, limit: int = 200_000) -> str:
    """The last `limit` bytes of the script's output ('' before it wrote any)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - limit))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def log_lines(text: str) -> list[str]:
    """The output as a terminal shows it: a progress bar's redraws (\\r) collapse to the newest."""
    return [line.rsplit("\r", 1)[-1].strip() for line in text.split("\n") if line.rsplit("\r", 1)[-1].strip()]
