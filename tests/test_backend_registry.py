"""The backend registry: shared code takes backend names and defaults from the registered
specs, so a new backend is one spec, without edits to the trainer, inference or commands."""

from __future__ import annotations

import re
import subprocess
import sys
import types

import pytest

from iclora import commands
from iclora.backends.registry import BackendSpec, backend_names, backend_spec, register, unregister
from iclora.cli import build_parser, parse_config
from iclora.inference import planning
from iclora.inference.config import InferConfig
from iclora.training import checkpoints, monitor
from iclora.training.config import TrainConfig

THIRD = BackendSpec(
    name="toy3",
    label="Toy3",
    backend_class="toy3_backend:Toy3Backend",
    train_defaults={"backend": "toy3", "model_id": "someone/toy3-base", "lora_rank": 8, "lora_alpha": 4,
                    "conditioning": "context"},
    infer_defaults={"backend": "toy3", "num_inference_steps": 4, "guidance_scale": 1.0},
    train_script="toy3_scripts",
    infer_script="toy3_scripts",
    preferred_mixed_precision="bf16",
    params_per_rank=1_234,
    timestep_sampling="logit_normal",
    timestep_shift="resolution",
    resolution_shift=True,
    conditionings=("blend", "context"),
    max_token_lengths=(75,),
    max_token_length_refusal="--max_token_length is for --backend sdxl: Toy3 reads its own tokens",
)


@pytest.fixture
def third(monkeypatch):
    """THIRD registered, with a script module that records the flags it is run with."""
    calls = []
    scripts = types.ModuleType("toy3_scripts")
    scripts.main = lambda argv, prog: calls.append((list(argv), prog))
    monkeypatch.setitem(sys.modules, "toy3_scripts", scripts)
    register(THIRD)
    yield calls
    unregister("toy3")


def _choices(config_cls) -> list[str]:
    parser = build_parser(config_cls, "prog", "")
    return next(a.choices for a in parser._actions if a.dest == "backend")


def test_the_built_in_backends_are_registered_in_order():
    assert backend_names()[:2] == ("sdxl", "flux")
    assert backend_spec("flux").default_model == "black-forest-labs/FLUX.1-dev"
    with pytest.raises(ValueError, match=r"--backend: unknown backend 'nope' \(choose from sdxl, flux"):
        backend_spec("nope")


def test_a_registered_spec_is_a_backend_choice_with_its_own_defaults(third, tmp_path):
    assert _choices(TrainConfig)[-1] == "toy3" and _choices(InferConfig)[-1] == "toy3"
    cfg = parse_config(TrainConfig, ["--data_dir", str(tmp_path)], "prog", defaults=THIRD.train_defaults)
    assert (cfg.backend, cfg.model_id, cfg.lora_rank, cfg.conditioning) == ("toy3", "someone/toy3-base", 8, "context")
    assert (cfg.sampling_scheme, cfg.shift_scheme) == ("logit_normal", "resolution")
    assert checkpoints.estimate_trainable_params("toy3", "someone/toy3-base", 8) == 8 * 1_234
    assert planning.DEFAULT_BASES["toy3"] == "someone/toy3-base"
    assert monitor._inference_defaults("toy3")["num_inference_steps"] == 4
    # What the spec refuses, in one line each.
    with pytest.raises(ValueError, match=re.escape("--conditioning concat: --backend toy3 trains blend | context")):
        TrainConfig(data_dir=str(tmp_path), backend="toy3", conditioning="concat")
    with pytest.raises(ValueError, match="Toy3 reads its own tokens"):
        TrainConfig(data_dir=str(tmp_path), backend="toy3", conditioning="context", max_token_length=150)
    with pytest.raises(ValueError, match="Toy3 reads its own tokens"):
        InferConfig(lora_path="none", prompt="a", backend="toy3", max_token_length=150)
    # SDXL's messages name the backends whose spec allows the setting, the third one too.
    with pytest.raises(ValueError, match=re.escape("--timestep_shift resolution is for --backend flux | flux2 | toy3: SDXL's")):
        TrainConfig(data_dir=str(tmp_path), timestep_shift="resolution")


def test_the_iclora_command_runs_the_registered_backends_scripts(third):
    commands.dispatch(["train", "--backend", "toy3", "--data_dir", "d"])
    commands.dispatch(["infer", "--backend=toy3", "--lora_path", "none"])
    assert third == [(["--backend", "toy3", "--data_dir", "d"], "iclora train"),
                     (["--backend=toy3", "--lora_path", "none"], "iclora infer")]


def test_an_unregistered_backend_is_no_choice_again(tmp_path):
    register(THIRD)
    unregister("toy3")
    assert "toy3" not in _choices(TrainConfig)
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--data_dir", str(tmp_path), "--backend", "toy3"], "prog")


def test_the_sdxl_command_line_never_imports_flux_code():
    """Parsing, the defaults, the registry and the SDXL backend class leave FLUX's modules unimported."""
    code = (
        "import sys\n"
        "from iclora.training.train_sdxl_ic_lora import DEFAULTS\n"
        "from iclora.cli import parse_config\n"
        "from iclora.training.config import TrainConfig\n"
        "cfg = parse_config(TrainConfig, ['--data_dir', '.'], 'p', defaults=DEFAULTS)\n"
        "import iclora.commands, iclora.inference.planning, iclora.training.checkpoints\n"
        "assert 'diffusers' not in sys.modules, 'diffusers imported by the registry'\n"
        "from iclora.backends import backend_class\n"
        "backend_class(cfg.backend)\n"
        "print(sorted(m for m in sys.modules if m.startswith('iclora.backends.flux') and not m.endswith('_spec')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_shared_code_compares_no_backend_names():
    """What differs per backend lives in its spec: outside backends/ and the per-backend
    command shells, no code compares against a backend's name or imports its module."""
    from pathlib import Path

    import iclora

    src = Path(iclora.__file__).parent
    names = "|".join(re.escape(n) for n in backend_names())
    quoted = rf"[\"'](?:{names})[\"']"
    compared = re.compile(rf"(?:==|!=|\bin)\s*[(\[{{]?\s*{quoted}|{quoted}\s*[,)\]}}]*\s*(?:==|!=)")
    imported = re.compile(rf"backends\.(?:{names})(?:_[a-z]+)?\s+import|from \.(?:{names}) import")
    shells = re.compile(r"train_\w+_ic_lora\.py|\w+_ic_lora_inference\.py")
    found = []
    for path in sorted(src.rglob("*.py")):
        relative = path.relative_to(src)
        if relative.parts[0] == "backends" or shells.fullmatch(path.name):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if compared.search(line) or imported.search(line):
                found.append(f"{relative}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
