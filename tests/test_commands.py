"""The `iclora` command (train | infer | prepare | convert) runs the scripts' own entry
functions, and a script run by path imports the src/ beside it whatever else is installed.

    pytest tests/test_commands.py
"""

import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from iclora.commands import COMMANDS, dispatch, main, pick_backend
from iclora.inference import flux_ic_lora_inference, sdxl_ic_lora_inference
from iclora.training import train_flux_ic_lora, train_sdxl_ic_lora
from iclora.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_installs_the_iclora_command():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["iclora"].split(":")
    assert getattr(importlib.import_module(module), function) is main


def test_help_lists_every_command_on_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for command in ("train", "infer", "prepare", "convert", "ui"):
        [line] = [line for line in lines if line.split()[:1] == [command]]
        assert len(line.split()) > 3, line  # says what the command does


@pytest.mark.parametrize("argv, usage", [
    (["train", "--help"], "usage: iclora train"),
    (["train", "--backend", "flux", "--help"], "usage: iclora train"),
    (["infer", "--help"], "usage: iclora infer"),
    (["prepare", "compose", "--help"], "usage: iclora prepare compose"),
    (["prepare", "caption", "--help"], "usage: iclora prepare caption"),
    (["convert", "--help"], "usage: iclora convert"),
    (["ui", "--help"], "usage: iclora ui"),
])
def test_each_command_shows_its_scripts_flags(argv, usage, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(usage)
    if argv[0] == "train":
        assert all(f"--{f.name}" in out for f in dataclasses.fields(TrainConfig))


@pytest.mark.parametrize("argv, message", [
    ([], "expected a command (train | infer | prepare | convert | ui); iclora --help lists them"),
    (["trian", "--data_dir", "d"], "got 'trian' (did you mean train?)"),
    (["train", "--data_dir", "d", "--max_train_step", "3"], "(did you mean --max_train_steps?)"),
    (["train", "--data_dir", "d", "--backend", "sd3"], "--backend"),
])
def test_mistakes_are_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err


@pytest.fixture
def parsed_only(monkeypatch):
    """The config each train / infer command would run, with nothing trained or generated."""
    monkeypatch.setattr("iclora.prepare.check.dry_run", lambda cfg: cfg)  # train --dry_run returns its config
    monkeypatch.setattr("iclora.inference.inpaint.run", lambda cfg: [cfg])  # infer prints the files it returns


@pytest.mark.parametrize("script, flags", [
    (train_sdxl_ic_lora, []),
    (train_sdxl_ic_lora, ["--backend", "sdxl"]),
    (train_flux_ic_lora, ["--backend", "flux"]),
    (train_flux_ic_lora, ["--backend=flux"]),
    (train_flux_ic_lora, ["--backend", "sdxl", "--backend", "flux"]),  # the last one, as argparse reads it
])
def test_train_runs_the_backends_script(script, flags, parsed_only):
    argv = ["--data_dir", "d", "--dry_run", *flags]
    assert dispatch(["train", *argv]) == script.main(argv)


def test_train_takes_the_backend_from_the_config_file(tmp_path, parsed_only):
    config = tmp_path / "run.yaml"
    config.write_text("backend: flux\ndata_dir: d\n")
    cfg = dispatch(["train", "--config", str(config), "--dry_run"])
    assert cfg == train_flux_ic_lora.main(["--config", str(config), "--dry_run"])
    assert (cfg.backend, cfg.lora_rank, cfg.model_id) == ("flux", 16, train_flux_ic_lora.DEFAULTS["model_id"])
    example = REPO / "examples" / "flux_storyboard_3x1.yaml"
    assert dispatch(["train", "--config", str(example), "--dry_run"]).backend == "flux"


def test_infer_takes_the_backend_from_the_lora(tmp_path, parsed_only):
    lora = tmp_path / "final_model"
    lora.mkdir()
    (lora / "iclora_config.json").write_text(json.dumps({"backend": "flux", "grid": "2x2"}))
    argv = ["--lora_path", str(lora), "--input_image", "in.png", "--prompt", "p"]
    assert pick_backend(argv, from_lora=True) == "flux"
    [cfg] = dispatch(["infer", *argv])
    assert [cfg] == flux_ic_lora_inference.main(argv)
    assert (cfg.backend, cfg.guidance_scale, cfg.num_inference_steps) == ("flux", 3.5, 20)
    # --backend wins; a foreign file, no LoRA and the base model alone are SDXL's defaults
    assert dispatch(["infer", *argv, "--backend", "sdxl"]) == sdxl_ic_lora_inference.main([*argv, "--backend", "sdxl"])
    assert pick_backend(["--lora_path", str(tmp_path / "x.safetensors")], from_lora=True) == "sdxl"
    assert pick_backend(["--lora_path", "none"], from_lora=True) == "sdxl"
    assert pick_backend(["--lora_path", str(lora)]) == "sdxl"  # train has no LoRA to read


def test_prepare_compose_writes_what_the_module_writes(tmp_path, capsys):
    for group in ("a", "b"):
        for i, colour in enumerate(((255, 0, 0), (0, 0, 255))):
            (tmp_path / "photos" / group).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), colour).save(tmp_path / "photos" / group / f"{i}.png")
    flags = ["--input_dir", str(tmp_path / "photos"), "--grid", "1x2", "--panel_width", "32"]
    dispatch(["prepare", "compose", *flags, "--output_dir", str(tmp_path / "cmd")])
    from iclora.prepare.__main__ import main as prepare_main

    prepare_main(["compose", *flags, "--output_dir", str(tmp_path / "module")])
    made = sorted(p.name for p in (tmp_path / "cmd").iterdir())
    assert made == ["a.png", "b.png"]
    for name in made:
        assert (tmp_path / "cmd" / name).read_bytes() == (tmp_path / "module" / name).read_bytes()


def test_python_dash_m_iclora_is_the_command():
    done = subprocess.run([sys.executable, "-m", "iclora", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(f"  {c}" in done.stdout for c in COMMANDS)


@pytest.mark.parametrize("script", ["src/convert.py", "src/training/train_sdxl_ic_lora.py",
                                    "src/inference/flux_ic_lora_inference.py"])
def test_a_script_run_by_path_imports_the_src_beside_it(script, tmp_path):
    """Another checkout installed for the same Python (here first on the path, as an editable
    install would be found): the script still runs this checkout's code."""
    other = tmp_path / "other_checkout"
    shutil.copytree(REPO / "src", other / "iclora", ignore=shutil.ignore_patterns("__pycache__"))
    (other / "iclora" / "__init__.py").write_text('raise ImportError("the other checkout was imported")\n')
    (other / "iclora" / "cli.py").write_text('raise ImportError("the other checkout was imported")\n')
    env = {**os.environ, "PYTHONPATH": str(other), "HF_HUB_OFFLINE": "1"}
    found = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('iclora').origin)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert found.stdout.strip() == str(other / "iclora" / "__init__.py")  # what `import iclora` would get
    done = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"usage: {Path(script).name}" in done.stdout
