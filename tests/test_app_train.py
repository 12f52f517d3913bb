"""The web app's Train tab, at the level of its handlers: the page's settings become the
training script's flags, checked by its own parser; a run is the script in its own process,
found again from its output folder alone; stop (SIGINT, a checkpoint) and resume; a second
run into a busy or used output folder refused; paths outside the workspace refused.

    pytest tests/test_app_train.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time

import pytest

from conftest import toy_dataset
from iclora.app import train
from iclora.app.train import TrainSettings, resume_run, run_status, start_run, stop_run
from iclora.app.workspace import Workspace


@pytest.fixture
def ws(tmp_path) -> Workspace:
    toy_dataset(tmp_path / "data")
    return Workspace(tmp_path)


def settings(**overrides) -> TrainSettings:
    values = dict(data_dir="data", output_dir="runs/web", model_id="tiny-sdxl", image_size=64, batch_size=2,
                  lora_rank=4, extra_flags="--lora_alpha 4", max_train_steps=2)
    return TrainSettings(**{**values, **overrides})


def until(condition, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds} s")


def test_settings_become_the_scripts_flags(ws):
    argv = train.train_argv(ws, settings(learning_rate=3e-4, grid="2x2", conditioning="context", seed=5))
    assert argv[:2] == ["--lora_alpha", "4"]  # typed flags first: the fields win over them
    assert argv[argv.index("--data_dir") + 1] == str(ws.root / "data")
    assert argv[argv.index("--learning_rate") + 1] == "0.0003" and argv[argv.index("--seed") + 1] == "5"
    cfg = train.parse_run(ws, "sdxl", argv)
    assert (cfg.conditioning, cfg.lora_alpha, cfg.max_train_steps, cfg.model_id) == ("context", 4, 2, "tiny-sdxl")


def test_bad_settings_give_the_command_lines_line(ws):
    with pytest.raises(ValueError, match=r"^--grid: expected ROWSxCOLS such as 2x2 or 1x3, got '2by2'$"):
        start_run(ws, settings(grid="2by2"))
    with pytest.raises(ValueError, match="--lora_rank"):
        start_run(ws, settings(extra_flags="--lora_rank many"))
    with pytest.raises(FileNotFoundError, match="--data_dir nothing: no such file or folder"):
        start_run(ws, settings(data_dir="nothing"))
    (ws.root / "runs" / "old" / "final_model").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds final_model/ of an earlier run"):
        start_run(ws, settings(output_dir="runs/old"))
    assert not (ws.root / "runs" / "old" / train.RUN_FILE).exists()  # nothing started


def test_paths_outside_the_workspace_are_refused(ws, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (ws.root / "cfg.yaml").write_text(f"cache_dir: {outside}\n")
    cases = [settings(data_dir="../data"), settings(output_dir=str(outside)), settings(config="../cfg.yaml"),
             settings(extra_flags=f"--cache_dir {outside}"), settings(extra_flags="--validation_image ../x.png"),
             settings(config="cfg.yaml"), settings(extra_flags="--resume_from_checkpoint /etc")]
    for case in cases:
        with pytest.raises(ValueError, match="refused|outside the workspace"):
            start_run(ws, case)
    assert not any(outside.iterdir()) and not (ws.root / "runs").exists()


def test_run_stop_resume_and_the_refusals(ws):
    message = start_run(ws, settings(max_train_steps=30, save_every=1000))
    assert message.startswith("started (pid ") and "train_sdxl_ic_lora.py" in message
    until(lambda: train.read_losses(ws.root / "runs/web"))  # training has begun
    with pytest.raises(ValueError, match="a run is already writing there"):
        start_run(ws, settings(max_train_steps=30))
    train.PROCESSES.clear()  # the page and the app that started it are gone: the run is found from its files
    assert run_status(ws, "runs/web").state == "running"
    assert stop_run(ws, "runs/web").startswith("sent SIGINT")
    stopped = until(lambda: (s := run_status(ws, "runs/web")).state != "running" and s)
    assert stopped.state == "stopped", stopped.message
    assert "error: SIGINT at step" in stopped.message and "saved" in stopped.message
    step = stopped.losses[-1][0]
    assert (ws.root / f"runs/web/checkpoints/checkpoint-{step}").is_dir() and step < 30
    with pytest.raises(ValueError, match="no run of the app is running there"):
        stop_run(ws, "runs/web")

    assert resume_run(ws, "runs/web").startswith("started")
    done = until(lambda: (s := run_status(ws, "runs/web")).state != "running" and s, 180)
    assert done.state == "finished", done.message + "\n" + done.log_tail
    assert f"resumed from checkpoint-{step} at step {step}" in done.log_tail or "resumed" in (
        ws.root / "runs/web" / train.LOG_FILE).read_text()
    assert [s for s, _ in done.losses] == list(range(1, 31))  # one line per step, none twice
    assert "saved" in done.message and (ws.root / "runs/web/final_model").is_dir()
    with pytest.raises(ValueError, match="holds checkpoints and final_model/ of an earlier run"):
        start_run(ws, settings())
