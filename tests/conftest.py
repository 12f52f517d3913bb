"""Shared fixtures: offline hub, small toy datasets, tiny training runs.

    pytest tests/test_panels.py tests/test_data.py tests/test_train_sdxl.py
"""

import os

# Before diffusers/huggingface_hub are imported (they read these once, at import): the hub
# is unreachable, and a lookup takes ~24 s to fail.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny models' ops are too small to gain from threads, and on a busy 2-core machine
# spinning OpenMP threads make every test several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The toy captions are longer than CLIP's 77 tokens: keep the truncation warnings out.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from pathlib import Path

import pytest

from iclora.toy import make_dataset

# The smallest settings the tiny SDXL trains at: 64 px composites (32 px panels, 4 latent
# pixels each), rank-4 LoRA, two samples a batch.
TINY_ARGS = [
    "--model_id", "tiny-sdxl", "--image_size", "64", "--batch_size", "2",
    "--lora_rank", "4", "--lora_alpha", "4",
]


def toy_dataset(folder: Path, n: int = 4, grid: tuple[int, int] = (2, 2), panel_size: int = 32, seed: int = 0) -> Path:
    make_dataset(folder, n, seed=seed, panel_size=panel_size, grid=grid)
    return folder


# Set by the stack itself, once a process: pytest names the running test; torch writes its
# default inductor cache folder into the environment the first time it is asked for it.
PROCESS_ENV = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"}


@pytest.fixture(autouse=True)
def leaves_no_global_state():
    """Every test leaves os.environ and the root logger's handlers and level as it found them
    (it fails otherwise, naming what changed: monkeypatch.setenv undoes itself), and finds the
    global RNGs as the test before found them: they are put back after each test, since
    training reseeds them by design."""
    import logging
    import random

    import numpy as np
    import torch

    def root_handlers():  # pytest's own capture handlers come and go with each test phase
        return [h for h in logging.getLogger().handlers if not type(h).__module__.startswith("_pytest")]

    env, handlers, level = dict(os.environ), root_handlers(), logging.getLogger().level
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(rng[0])
    np.random.set_state(rng[1])
    torch.set_rng_state(rng[2])
    changed = sorted(k for k in env.keys() | os.environ.keys()
                     if env.get(k) != os.environ.get(k) and k not in PROCESS_ENV)
    for key in changed:  # put back first: one offender must not fail the tests after it
        if key in env:
            os.environ[key] = env[key]
        else:
            del os.environ[key]
    added, root = [h for h in root_handlers() if h not in handlers], logging.getLogger()
    for handler in added:
        root.removeHandler(handler)
    level_changed, root.level = root.level != level, level
    assert not changed, f"the test left os.environ changed: {changed}"
    assert not added, f"the test left handlers on the root logger: {added}"
    assert not level_changed, "the test left the root logger's level changed"


@pytest.fixture(scope="session")
def data_2x2(tmp_path_factory) -> Path:
    """Four 64x64 toy composites (2x2 grid of 32 px panels) with captions. Read-only."""
    return toy_dataset(tmp_path_factory.mktemp("data_2x2"))


@pytest.fixture(scope="session")
def data_2x2_six(tmp_path_factory) -> Path:
    """Six composites: with batch 2 an epoch is 3 batches, so 4 steps cross an epoch."""
    return toy_dataset(tmp_path_factory.mktemp("data_2x2_six"), n=6, seed=1)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A fresh, writable dataset of four composites, for tests that damage it."""
    return toy_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """The tiny SDXL saved as a diffusers pipeline folder (as a downloaded checkpoint)."""
    from iclora.backends.tiny import save_tiny_model

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    save_tiny_model("tiny-sdxl", folder)
    return folder


def run_training(data: Path, out: Path, *flags: str):
    """The training entry point, in-process, on tiny settings (later flags override
    TINY_ARGS); returns its TrainResult."""
    from iclora.training.train_sdxl_ic_lora import main

    return main(["--data_dir", str(data), "--output_dir", str(out), *TINY_ARGS, *flags])


@pytest.fixture
def train(tmp_path):
    """`train(data, *flags, out=None)`: run_training into a fresh folder under tmp_path
    unless `out` is given."""
    counter = iter(range(1000))

    def run(data: Path, *flags: str, out: Path | None = None):
        return run_training(data, out or tmp_path / f"out{next(counter)}", *flags)

    return run


@pytest.fixture(scope="session")
def reference_run(data_2x2, tmp_path_factory):
    """Two steps with the tiny defaults on data_2x2, run once: the run other settings that
    must not change the result (seed 42 spelled out, a model folder, checkpointing, ...)
    are compared with."""
    return run_training(data_2x2, tmp_path_factory.mktemp("reference"), "--max_train_steps", "2")


@pytest.fixture
def make_trainer(tmp_path):
    """A set-up Trainer (models loaded) for tests that look inside it after training."""
    from iclora.cli import parse_config
    from iclora.training.config import TrainConfig
    from iclora.training.train_sdxl_ic_lora import DEFAULTS
    from iclora.training.trainer import Trainer

    counter = iter(range(1000))

    def build(data: Path, *flags: str):
        argv = ["--data_dir", str(data), "--output_dir", str(tmp_path / f"trainer{next(counter)}"), *TINY_ARGS, *flags]
        trainer = Trainer(parse_config(TrainConfig, argv, prog="test", defaults=DEFAULTS))
        trainer.setup()
        return trainer

    return build


@pytest.fixture
def spy(monkeypatch):
    """Record what the SDXL backend is asked during training: the latent masks, whether
    masked-image latents came, the denoiser input's shape, the timesteps and the prompts."""
    from iclora.backends.sdxl import SDXLBackend

    calls = {"mask": [], "masked_latents": [], "noisy_shape": [], "prompts": [], "timesteps": []}
    predict, encode_prompt = SDXLBackend.predict, SDXLBackend.encode_prompt

    def spy_predict(self, noisy, timesteps, prompt_embeds, mask, masked_latents, batch):
        calls["mask"].append(mask.detach().clone())
        calls["masked_latents"].append(masked_latents)
        calls["noisy_shape"].append(tuple(noisy.shape))
        calls["timesteps"].append(timesteps.detach().clone())
        return predict(self, noisy, timesteps, prompt_embeds, mask, masked_latents, batch)

    def spy_encode_prompt(self, prompts):
        calls["prompts"].append(list(prompts))
        return encode_prompt(self, prompts)

    monkeypatch.setattr(SDXLBackend, "predict", spy_predict)
    monkeypatch.setattr(SDXLBackend, "encode_prompt", spy_encode_prompt)
    return calls


@pytest.fixture
def decoded(monkeypatch):
    """Every latent batch the VAE decodes, (B, C, h, w): one entry per pipeline call, the
    float result before it becomes 8-bit pixels."""
    from diffusers import AutoencoderKL

    seen = []
    decode = AutoencoderKL.decode

    def spy(self, z, *args, **kwargs):
        seen.append(z.detach().clone())
        return decode(self, z, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "decode", spy)
    return seen


def assert_batched_equals_single(batched: list, single: list, batched_pngs: list, single_pngs: list) -> None:
    """Image i of the batched calls is the one-image call's image i: the latents within
    float rounding (another draw of noise would differ by ~1), the 8-bit pixels within 2.
    Calls may be of different sizes: images are compared one by one, in call order."""
    import numpy as np
    import torch
    from PIL import Image

    rows = lambda calls: [z for call in calls for z in call]  # noqa: E731
    assert len(rows(batched)) == len(rows(single))
    for i, (a, b) in enumerate(zip(rows(batched), rows(single))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3, msg=lambda m, i=i: f"image {i}: {m}")
    for a, b in zip(batched_pngs, single_pngs, strict=True):
        with Image.open(a) as x, Image.open(b) as y:
            assert np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max() <= 2, (a, b)


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def markdown_rows(text: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in `text`, as {header: cell}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
