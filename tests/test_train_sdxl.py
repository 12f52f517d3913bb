"""The SDXL IC-LoRA training command, run in-process on the tiny SDXL.

Flags and defaults, errors before any model loads, what is trained and what stays frozen,
the loss weighting, resuming, buckets, the files written, and loading the result into a
stock diffusers pipeline.

    pytest tests/test_train_sdxl.py
"""

import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import TINY_ARGS, toy_dataset
from iclora.backends.lora_files import LORA_WEIGHT_NAME, METADATA_NAME
from iclora.backends.sdxl import CONV_IN_WEIGHT_NAME, KOHYA_WEIGHT_NAME, LORA_TARGET_MODULES, SDXLBackend, widen_conv_in
from iclora.backends.tiny import build_tiny_sdxl_components
from iclora.cli import build_parser, parse_config, run_cli
from iclora.data import DatasetError
from iclora.panels import Grid, panel_mask
from iclora.training.config import TrainConfig
from iclora.training.train_sdxl_ic_lora import DEFAULTS, main
from iclora.training.trainer import masked_mse

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "src" / "training" / "train_sdxl_ic_lora.py"
EXAMPLE = REPO / "examples" / "sdxl_2x2.yaml"


def _parse(argv):
    return parse_config(TrainConfig, argv, prog="train_sdxl_ic_lora.py", defaults=DEFAULTS)


def _lora(result) -> dict[str, torch.Tensor]:
    return load_file(result.final_dir / LORA_WEIGHT_NAME)


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- flags, defaults, config files ---------------------------------------------------------------


def test_defaults():
    namespace = build_parser(TrainConfig, "train_sdxl_ic_lora.py", "", DEFAULTS).parse_args(["--data_dir", "d"])
    cfg = _parse(["--data_dir", "d"])
    expected = {
        "output_dir": "output", "model_id": "stabilityai/stable-diffusion-xl-base-1.0", "num_epochs": 100,
        "batch_size": 4, "learning_rate": 1e-4, "lora_rank": 64, "lora_alpha": 64, "lora_dropout": 0.1,
        "image_size": 1024, "mask_probability": 0.7, "max_masked_panels": 2, "save_every": 1000, "seed": 42,
        "grid": "2x2", "conditioning": "concat", "caption_dropout": 0.0, "backend": "sdxl",
        "max_train_steps": None, "gradient_accumulation_steps": 1, "lr_warmup_steps": 0,
        "resume_from_checkpoint": None, "use_8bit_adam": False, "gradient_checkpointing": False,
        "mixed_precision": None, "visible_loss_weight": None,
    }
    for name, value in expected.items():
        assert getattr(cfg, name) == value, name
        assert namespace[name] == value, name
        assert type(getattr(cfg, name)) is type(value), name
    # Resolved by the conditioning: concat weights the visible panels half, the others not at all.
    assert cfg.visible_weight == 0.5
    assert _parse(["--data_dir", "d", "--conditioning", "blend"]).visible_weight == 0.0
    assert _parse(["--data_dir", "d", "--visible_loss_weight", "0"]).visible_weight == 0.0
    assert _parse(["--data_dir", "d", "--backend", "flux"]).visible_weight == 0.0  # FLUX.1-Fill: no gain measured


def test_data_dir_is_required(capsys):
    with pytest.raises(SystemExit) as info:
        _parse(["--batch_size", "2"])
    assert info.value.code == 2
    assert "data_dir" in capsys.readouterr().err


# A value other than the default for every flag.
NON_DEFAULTS = {
    "data_dir": "some/data", "output_dir": "some/out", "backend": "flux", "model_id": "my/model",
    "variant": "fp16", "pretrained_vae": "my/vae", "num_epochs": 7, "max_train_steps": 33, "batch_size": 3,
    "gradient_accumulation_steps": 5, "learning_rate": 3e-5, "lr_scheduler": "cosine", "lr_warmup_steps": 11,
    "weight_decay": 0.5, "max_grad_norm": 0.25, "use_8bit_adam": True, "lora_rank": 12, "lora_alpha": 24,
    "lora_dropout": 0.2, "image_size": 768, "grid": "1x3", "conditioning": "blend", "mask_probability": 0.4,
    "max_masked_panels": 1, "visible_loss_weight": 0.1, "caption_dropout": 0.05, "max_token_length": 75, "cache_text_embeddings": True, "cache_latents": True,
    "cache_dir": "some/cache", "dry_run": True, "gpu_memory_gib": 24.0,
    "mixed_precision": "bf16", "gradient_checkpointing": True, "compile": False, "quantize": "nf4", "output_kohya_format": False, "save_precision": "bf16", "save_every": 9,
    "checkpoints_total_limit": 2, "resume_from_checkpoint": "latest", "num_workers": 2, "seed": 123,
    "overwrite_output_dir": True, "allow_crop": True, "context_timestep": None,
    "validation_image": ["v1.png", "v2.png"], "validation_prompt": "a prompt", "validation_panels": [0, 2],
    "validation_every": 50, "validation_inference_steps": 7, "validation_guidance_scale": 2.5,
    "report_to": "tensorboard", "conv_in_learning_rate": None, "timestep_sampling": "logit_normal",
    "logit_mean": 0.5, "logit_std": 1.5, "timestep_shift": "resolution", "bucket_by": "area", "distributed": "ddp",
    "lora_convs": False,
}
# Flags that only go with another setting: context_timestep needs --conditioning context,
# which refuses a visible-panel loss; --compile refuses --quantize with checkpointing.
CONTEXT_NON_DEFAULTS = {**NON_DEFAULTS, "conditioning": "context", "context_timestep": "zero", "visible_loss_weight": 0.0,
                        "compile": True, "gradient_checkpointing": False}
# conv_in_learning_rate needs SDXL concat, the one mode that trains conv_in in full.
# --timestep_shift resolution is FLUX's. --distributed fsdp refuses --quantize and 8-bit Adam.
# --lora_convs (on) is SDXL's.
CONCAT_NON_DEFAULTS = {**NON_DEFAULTS, "backend": "sdxl", "conditioning": "concat", "conv_in_learning_rate": 1e-3,
                       "timestep_shift": "none", "distributed": "fsdp", "quantize": None, "use_8bit_adam": False,
                       "lora_convs": True}


def test_non_defaults_cover_every_flag():
    defaults = dataclasses.asdict(_parse(["--data_dir", "x"]))
    assert NON_DEFAULTS.keys() == defaults.keys()
    changed = {k for k in NON_DEFAULTS if NON_DEFAULTS[k] != defaults[k]}
    for values in [CONTEXT_NON_DEFAULTS, CONCAT_NON_DEFAULTS]:
        changed |= {k for k in values if values[k] != defaults[k]}
    assert changed - {"data_dir"} == defaults.keys() - {"data_dir"}


@pytest.mark.parametrize("values", [NON_DEFAULTS, CONTEXT_NON_DEFAULTS, CONCAT_NON_DEFAULTS])
def test_every_flag_settable_from_yaml(tmp_path, values):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(values))
    assert dataclasses.asdict(_parse(["--config", str(config)])) == values


def _cli_words(values: dict) -> list[str]:
    words = []
    for name, value in values.items():
        if value is None:  # the default of an optional flag
            continue
        if value is True:
            words.append(f"--{name}")
        elif value is False:
            words.append(f"--no_{name}")
        elif isinstance(value, list):
            words += [f"--{name}", *map(str, value)]
        else:
            words += [f"--{name}", str(value)]
    return words


def test_every_flag_settable_on_the_command_line():
    assert dataclasses.asdict(_parse(_cli_words(NON_DEFAULTS))) == NON_DEFAULTS
    assert dataclasses.asdict(_parse(_cli_words(CONTEXT_NON_DEFAULTS))) == CONTEXT_NON_DEFAULTS
    switches = _parse(["--data_dir", "x", "--use_8bit_adam", "--no_use_8bit_adam", "--gradient_checkpointing"])
    assert switches.use_8bit_adam is False and switches.gradient_checkpointing is True


def test_command_line_overrides_yaml_wherever_written(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data_dir": "from/yaml", "batch_size": 7, "lora_rank": 8}))
    for argv in (["--config", str(config), "--batch_size", "3"], ["--batch_size", "3", "--config", str(config)],
                 ["--batch_size", "3", f"--config={config}"]):
        cfg = _parse(argv)
        assert (cfg.batch_size, cfg.lora_rank, cfg.data_dir, cfg.lora_alpha) == (3, 8, "from/yaml", 64), argv


def test_yaml_errors_are_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data_dir: x\nbatch_sise: 2\n")
    with pytest.raises(SystemExit) as info:
        _parse(["--config", str(config)])
    assert info.value.code == 2
    config.write_text("data_dir: x\nmask_probability: 2.0\n")
    with pytest.raises(SystemExit):
        _parse(["--config", str(config)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2
    assert "batch_sise" in errors[0]
    assert "--mask_probability must be between 0 and 1, got 2.0" in errors[1]


def test_example_config_parses():
    cfg = _parse(["--config", str(EXAMPLE)])
    text = EXAMPLE.read_text()
    written = yaml.safe_load(text)
    assert set(written) == {f.name for f in dataclasses.fields(TrainConfig)}  # documents every flag
    assert dataclasses.asdict(cfg) == written
    assert (cfg.model_id, cfg.image_size, cfg.grid, cfg.backend) == (
        "stabilityai/stable-diffusion-xl-base-1.0", 1024, "2x2", "sdxl")
    assert text.count("\n#") > 10  # documented
    cfg = _parse(["--config", str(EXAMPLE), "--data_dir", "elsewhere", "--image_size", "512"])
    assert (cfg.data_dir, cfg.image_size, cfg.grid) == ("elsewhere", 512, "2x2")


@pytest.mark.parametrize("flag, value, message", [
    ("--mask_probability", "1.5", "--mask_probability must be between 0 and 1, got 1.5"),
    ("--grid", "3", "--grid: expected ROWSxCOLS"),
    ("--grid", "1x1", "--grid: a composite needs at least 2 panels"),
    ("--batch_size", "0", "--batch_size must be at least 1, got 0"),
    ("--conditioning", "inpaint", "conditioning"),
    ("--lora_dropout", "-0.1", "--lora_dropout must be between 0 and 1"),
    ("--image_size", "big", "image_size"),
    ("--max_train_steps", "0", "--max_train_steps must be at least 1"),
    ("--mixed_precision", "fp8", "mixed_precision"),
    ("--learning_rate", "-1", "--learning_rate must not be negative"),
    ("--max_token_length", "100", "--max_token_length must be 75, 150 or 225"),
    ("--logit_mean", "1", "--logit_mean / --logit_std shape --timestep_sampling logit_normal"),
    ("--logit_std", "0", "--logit_std must be positive"),
    ("--timestep_sampling", "sigmoid", "timestep_sampling"),
])
def test_bad_flag_values_give_one_error_line(flag, value, message, capsys, monkeypatch):
    monkeypatch.setattr("iclora.training.trainer.train", _no_training)
    with pytest.raises(SystemExit) as info:
        run_cli(main, ["--data_dir", "d", flag] + ([] if value is None else [value]))
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert message in errors[0]
    if flag == "--conditioning":
        assert "inpaint" in errors[0] and "concat" in errors[0]  # the value and the choices, one line


def _no_training(cfg):
    raise AssertionError("training started despite a bad flag")


# ---- errors before any model loads ---------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr("iclora.training.run_setup.load_backend", refuse)


def test_data_problems_are_all_listed_before_loading(data_dir, tmp_path, no_model, capsys):
    (data_dir / "00001.txt").unlink()
    (data_dir / "x.png").write_bytes(b"garbage, not a png")
    (data_dir / "x.txt").write_text("a caption")
    Image.new("RGB", (16, 16)).save(data_dir / "small.png")
    (data_dir / "small.txt").write_text("a caption")
    argv = ["--data_dir", str(data_dir), "--output_dir", str(tmp_path / "out"), *TINY_ARGS]
    with pytest.raises(DatasetError) as info:
        main(argv)
    message = str(info.value)
    for part in ("00001.png: no caption file", "x.png: unreadable image", "small.png: 16x16 is too small"):
        assert part in message
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {message}"]
    assert not (tmp_path / "out" / "final_model").exists()


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "no such folder"),
    (lambda d: d, "no images"),
])
def test_missing_or_empty_folder(make, message, tmp_path, no_model, capsys):
    with pytest.raises(SystemExit):
        run_cli(main, ["--data_dir", str(make(tmp_path)), "--output_dir", str(tmp_path / "o"), *TINY_ARGS])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --data_dir") and message in line


def test_resume_from_a_nonexistent_checkpoint(data_2x2, tmp_path, no_model, capsys):
    missing = tmp_path / "no" / "checkpoint-5"
    argv = ["--data_dir", str(data_2x2), "--output_dir", str(tmp_path / "o"), *TINY_ARGS,
            "--resume_from_checkpoint", str(missing)]
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        main(argv)
    with pytest.raises(SystemExit) as info:
        run_cli(main, argv)
    assert info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: --resume_from_checkpoint {missing}")


def test_blend_on_a_9_channel_model_is_refused(data_2x2, train):
    with pytest.raises(ValueError, match="--conditioning blend needs a 4-channel UNet"):
        train(data_2x2, "--model_id", "tiny-sdxl-inpaint", "--conditioning", "blend", "--max_train_steps", "1")


# ---- training runs: what each flag does ------------------------------------------------------------


def _debris(folder: Path) -> list[str]:
    """Temporary or hidden files left anywhere under `folder`."""
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_output_files(data_2x2, train, tmp_path):
    out = tmp_path / "run"
    result = train(data_2x2, "--max_train_steps", "5", "--save_every", "2", out=out)
    assert result.global_step == 5 and len(result.losses) == 5
    assert all(0 < loss < 10 for loss in result.losses)
    assert result.final_dir == out / "final_model"
    assert sorted(p.name for p in result.final_dir.iterdir()) == [
        CONV_IN_WEIGHT_NAME, METADATA_NAME, LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME]

    lora = _lora(result)
    assert lora and all(k.startswith("unet.") for k in lora)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora)
    for target in LORA_TARGET_MODULES:  # every targeted layer kind is in the file
        assert any(f".{target}.lora_A.weight" in k for k in lora), target
    assert all(v.dtype == torch.float16 for v in lora.values())  # the default --save_precision
    with safe_open(str(result.final_dir / LORA_WEIGHT_NAME), "pt") as f:
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (adapter["unet.r"], adapter["unet.lora_alpha"]) == (4, 4)
    assert adapter["unet.lora_dropout"] == 0  # dropout is for training; loaders would keep it on

    conv = load_file(result.final_dir / CONV_IN_WEIGHT_NAME)
    assert conv["conv_in.weight"].shape == (32, 9, 3, 3) and conv["conv_in.bias"].shape == (32,)

    meta = json.loads((result.final_dir / METADATA_NAME).read_text())
    assert meta["base_model"] == "tiny-sdxl" and meta["grid"] == "2x2" and meta["conditioning"] == "concat"
    assert meta["backend"] == "sdxl" and meta["global_step"] == 5 and meta["image_size"] == 64
    assert meta["training_args"]["max_train_steps"] == 5 and meta["training_args"]["lora_rank"] == 4
    assert meta["training_args"]["data_dir"] == str(data_2x2)

    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert _debris(out) == []

    # A fresh run into the same folder would mix its checkpoints with these: refused.
    with pytest.raises(ValueError, match="checkpoints and final_model/ of an earlier run.*--resume_from_checkpoint latest"):
        train(data_2x2, "--max_train_steps", "1", out=out)
    # Continuing it replaces final_model/ and leaves no debris.
    again = train(data_2x2, "--max_train_steps", "6", "--resume_from_checkpoint", "latest", out=out)
    assert json.loads((again.final_dir / METADATA_NAME).read_text())["global_step"] == 6
    assert _debris(out) == []


def test_resume_refuses_changed_run_settings(data_2x2, train, tmp_path):
    out = tmp_path / "run"
    train(data_2x2, "--max_train_steps", "2", "--save_every", "2", out=out)
    with pytest.raises(ValueError, match=r"run settings differ \(batch_size 2 -> 1\)"):
        train(data_2x2, "--max_train_steps", "4", "--batch_size", "1", "--resume_from_checkpoint", "latest", out=out)


def test_checkpoints_total_limit(data_2x2, train, tmp_path):
    train(data_2x2, "--max_train_steps", "2", "--save_every", "1", "--checkpoints_total_limit", "1",
          out=tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-2"]


def test_blend_writes_no_conv_in_and_feeds_no_masked_latents(data_2x2, train, spy):
    result = train(data_2x2, "--conditioning", "blend", "--max_train_steps", "2")
    assert sorted(p.name for p in result.final_dir.iterdir()) == [METADATA_NAME, LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME]
    assert json.loads((result.final_dir / METADATA_NAME).read_text())["conditioning"] == "blend"
    assert spy["masked_latents"] == [None, None]


def test_concat_feeds_masked_latents_and_captions(data_2x2, train, spy):
    train(data_2x2, "--max_train_steps", "2")
    assert [tuple(m.shape) for m in spy["masked_latents"]] == [(2, 4, 8, 8)] * 2
    prompts = [p for batch in spy["prompts"] for p in batch]
    assert len(prompts) == 4 and all(p.startswith("A set of four panels") for p in prompts)  # no caption dropout


def _panel_sets(mask: torch.Tensor, grid: Grid) -> list[set[int]]:
    """The panels each latent mask (B, 1, h, w) covers; fails if it is not a union of panels."""
    sets = []
    for m in mask:
        h, w = m.shape[-2:]
        covered = {i for i in range(grid.num_panels) if panel_mask([i], grid, h, w).bool().logical_and(m > 0.5).any()}
        assert torch.equal(m, panel_mask(sorted(covered), grid, h, w)), "mask is not a union of whole panels"
        sets.append(covered)
    return sets


@pytest.mark.parametrize("grid, image_size, latent_hw", [((1, 2), 64, (4, 8)), ((1, 3), 96, (4, 12)), ((2, 1), 64, (8, 4))])
def test_grids(grid, image_size, latent_hw, tmp_path, train, spy):
    data = toy_dataset(tmp_path / "data", n=4, grid=grid)
    text = f"{grid[0]}x{grid[1]}"
    result = train(data, "--grid", text, "--image_size", str(image_size), "--max_train_steps", "4",
                   "--mask_probability", "1.0", "--max_masked_panels", "5")
    assert result.global_step == 4
    assert json.loads((result.final_dir / METADATA_NAME).read_text())["grid"] == text
    assert {shape[-2:] for shape in spy["noisy_shape"]} == {latent_hw}
    g = Grid(*grid)
    for mask in spy["mask"]:
        for panels in _panel_sets(mask, g):
            assert 1 <= len(panels) < g.num_panels  # masked, and never every panel


def test_mask_probability_and_max_masked_panels(data_2x2, train, spy):
    train(data_2x2, "--mask_probability", "0", "--max_train_steps", "2")
    # Nothing masked is trained as text -> whole set: the loss covers every panel.
    assert all(m.eq(1).all() for m in spy["mask"])
    spy["mask"].clear()
    train(data_2x2, "--mask_probability", "1", "--max_masked_panels", "1", "--max_train_steps", "4")
    sets = [s for mask in spy["mask"] for s in _panel_sets(mask, Grid(2, 2))]
    assert len(sets) == 8 and all(len(s) == 1 for s in sets)


def test_caption_dropout(data_2x2, train, spy):
    train(data_2x2, "--caption_dropout", "1", "--max_train_steps", "2")
    # No caption is encoded: the UNet is fed the unconditional embeddings (tests/test_train_details.py),
    # encoded once from "" for their shape.
    assert spy["prompts"] == [[""]]


def test_num_epochs_and_batch_size(data_2x2, train, spy):
    assert train(data_2x2, "--num_epochs", "2").global_step == 4  # 4 samples / batch 2, twice
    assert [s[0] for s in spy["noisy_shape"]] == [2, 2, 2, 2]
    spy["noisy_shape"].clear()
    assert train(data_2x2, "--num_epochs", "1", "--batch_size", "3").global_step == 2  # batches of 3 and 1
    assert sorted(s[0] for s in spy["noisy_shape"]) == [1, 3]


def test_gradient_accumulation(data_2x2, train, spy):
    result = train(data_2x2, "--gradient_accumulation_steps", "2", "--batch_size", "1", "--max_train_steps", "3")
    assert result.global_step == 3 and len(result.losses) == 3
    assert len(spy["mask"]) == 6  # two micro-batches per optimizer step


def test_conv_in_learning_rate(data_2x2, train, reference_run):
    conv_in = lambda result: load_file(result.final_dir / CONV_IN_WEIGHT_NAME)  # noqa: E731
    held = train(data_2x2, "--max_train_steps", "2", "--conv_in_learning_rate", "0")
    untrained = train(data_2x2, "--max_train_steps", "2", "--learning_rate", "0")
    _assert_same_tensors(conv_in(held), conv_in(untrained))  # conv_in kept as widened ...
    assert all(v.abs().max() > 0 for k, v in _lora(held).items() if "lora_B" in k)  # ... while the LoRA trains
    # The default learning rate given to conv_in on its own changes nothing.
    same = train(data_2x2, "--max_train_steps", "2", "--conv_in_learning_rate", "1e-4")
    assert same.losses == reference_run.losses
    _assert_same_tensors(conv_in(same), conv_in(reference_run))


def test_conv_in_learning_rate_needs_concat(capsys, monkeypatch):
    monkeypatch.setattr("iclora.training.trainer.train", _no_training)
    with pytest.raises(SystemExit) as info:
        run_cli(main, ["--data_dir", "d", "--conditioning", "blend", "--conv_in_learning_rate", "1e-3"])
    assert info.value.code == 2
    assert "error: --conv_in_learning_rate is for --backend sdxl --conditioning concat" in capsys.readouterr().err


def test_timestep_sampling(data_2x2, train, spy):
    train(data_2x2, "--max_train_steps", "4")
    uniform = torch.cat(spy["timesteps"])
    spy["timesteps"].clear()
    train(data_2x2, "--max_train_steps", "4", "--timestep_sampling", "logit_normal", "--logit_mean", "3")
    high = torch.cat(spy["timesteps"])
    assert high.dtype == uniform.dtype == torch.int64 and len(high) == len(uniform) == 8
    assert 0 <= int(uniform.min()) and int(high.max()) <= 999
    # sigmoid(N(3, 1)) > 0.5 for 99.9 % of draws: every step lands in the noisier half.
    assert int(high.min()) >= 500 and high.float().mean() > uniform.float().mean()


def test_learning_rate_and_lora_shapes(data_2x2, train):
    frozen = _lora(train(data_2x2, "--learning_rate", "0", "--max_train_steps", "2"))
    assert all(v.eq(0).all() for k, v in frozen.items() if "lora_B" in k)  # PEFT init: B = 0
    trained = _lora(train(data_2x2, "--learning_rate", "1e-3", "--max_train_steps", "2", "--lora_rank", "8"))
    assert all(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)
    a = next(v for k, v in trained.items() if "lora_A" in k)
    assert a.shape[0] == 8


def test_seed(data_2x2, train, reference_run):
    again = train(data_2x2, "--max_train_steps", "2", "--seed", "42")  # the default, spelled out
    assert again.losses == reference_run.losses
    _assert_same_tensors(_lora(again), _lora(reference_run))
    assert train(data_2x2, "--max_train_steps", "2", "--seed", "7").losses != reference_run.losses


def test_mixed_precision(data_2x2, train, make_trainer, reference_run):
    default = reference_run
    assert train(data_2x2, "--max_train_steps", "2", "--mixed_precision", "no").losses == default.losses  # CPU
    trainer = make_trainer(data_2x2, "--max_train_steps", "2", "--mixed_precision", "bf16")
    unet = trainer.backend.unet
    assert unet.conv_in.weight.dtype == torch.float32  # trained: kept in float32
    assert unet.time_embedding.linear_1.weight.dtype == torch.bfloat16  # frozen: bf16
    assert trainer.backend.vae.dtype == torch.float32
    bf16 = trainer.train()
    assert bf16.losses != default.losses  # bf16 really ran
    assert bf16.losses == pytest.approx(default.losses, abs=0.05)
    assert all(v.dtype == torch.bfloat16 for v in _lora(bf16).values())  # --save_precision follows a bf16 run


def test_mixed_precision_loads_the_frozen_weights_in_it(data_2x2, tiny_sdxl_dir, make_trainer, monkeypatch):
    from iclora.training import run_setup

    asked, real = [], run_setup.load_backend
    monkeypatch.setattr(run_setup, "load_backend", lambda *a, **k: asked.append(k) or real(*a, **k))
    trainer = make_trainer(data_2x2, "--model_id", str(tiny_sdxl_dir), "--max_train_steps", "1", "--mixed_precision", "bf16")
    assert asked[-1]["dtype"] == torch.bfloat16
    assert trainer.backend.unet.conv_in.weight.dtype == torch.float32  # trained in float32 all the same
    make_trainer(data_2x2, "--model_id", str(tiny_sdxl_dir), "--max_train_steps", "1")
    assert "dtype" not in asked[-1]  # float32 on the CPU: loaded as saved


def test_gradient_checkpointing_changes_memory_not_math(data_2x2, make_trainer, reference_run):
    plain = reference_run  # LoRA dropout 0.1: checkpointing must replay the same dropout masks
    trainer = make_trainer(data_2x2, "--max_train_steps", "2", "--gradient_checkpointing")
    assert trainer.backend.unet.is_gradient_checkpointing
    checkpointed = trainer.train()
    assert checkpointed.losses == pytest.approx(plain.losses, abs=1e-6)
    for key, value in _lora(plain).items():
        assert torch.allclose(value, _lora(checkpointed)[key], atol=1e-6), key


def test_use_8bit_adam(data_2x2, make_trainer):
    import bitsandbytes as bnb

    trainer = make_trainer(data_2x2, "--max_train_steps", "2", "--use_8bit_adam", "--learning_rate", "1e-3")
    assert isinstance(trainer.optimizer.optimizer, bnb.optim.AdamW8bit)
    result = trainer.train()
    assert result.global_step == 2
    assert all(v.abs().max() > 0 for k, v in _lora(result).items() if "lora_B" in k)


def test_lr_warmup_steps(data_2x2, make_trainer):
    trainer = make_trainer(data_2x2, "--max_train_steps", "2", "--lr_warmup_steps", "4", "--learning_rate", "1e-3",
                           "--gradient_accumulation_steps", "2", "--batch_size", "1")
    trainer.train()
    # 2 of 4 warm-up steps, for the LoRA and for concat's conv_in (its own group: no weight decay)
    assert trainer.lr_scheduler.get_last_lr() == pytest.approx([0.5e-3, 0.5e-3])


def test_model_id_folder_trains_like_the_builtin(data_2x2, tiny_sdxl_dir, train, reference_run):
    folder = train(data_2x2, "--max_train_steps", "2", "--model_id", str(tiny_sdxl_dir))
    assert folder.losses == reference_run.losses
    assert json.loads((folder.final_dir / METADATA_NAME).read_text())["base_model"] == str(tiny_sdxl_dir)


def test_9_channel_inpainting_base_trains(data_2x2, train):
    result = train(data_2x2, "--model_id", "tiny-sdxl-inpaint", "--max_train_steps", "2")
    assert result.global_step == 2
    assert load_file(result.final_dir / CONV_IN_WEIGHT_NAME)["conv_in.weight"].shape[1] == 9


# ---- resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [
    # 3 batches an epoch: resumes mid-epoch, then crosses into epoch 1
    ("--lora_dropout", "0.1"),
    # 3 micro-batches an epoch, 2 accumulated: step 2 ends the epoch with a lone micro-batch
    ("--lora_dropout", "0.3", "--gradient_accumulation_steps", "2"),
    # 6 micro-batches an epoch, 2 accumulated: resumes mid-epoch on an accumulation boundary
    ("--lora_dropout", "0.1", "--gradient_accumulation_steps", "2", "--batch_size", "1"),
])
def test_resume_is_exact(flags, data_2x2_six, train, tmp_path):
    straight = train(data_2x2_six, "--max_train_steps", "4", "--save_every", "2", *flags, out=tmp_path / "straight")
    first = train(data_2x2_six, "--max_train_steps", "2", "--save_every", "2", *flags, out=tmp_path / "first")
    assert first.losses == straight.losses[:2]
    checkpoint = tmp_path / "first" / "checkpoints" / "checkpoint-2"
    # an explicit checkpoint, continued in another folder; then `latest` in the first folder
    for out, resume in ((tmp_path / "second", str(checkpoint)), (tmp_path / "first", "latest")):
        second = train(data_2x2_six, "--max_train_steps", "4", "--save_every", "2", *flags,
                       "--resume_from_checkpoint", resume, out=out)
        assert second.global_step == 4
        assert second.losses == straight.losses[2:], resume
        _assert_same_tensors(_lora(second), _lora(straight))
        _assert_same_tensors(load_file(second.final_dir / CONV_IN_WEIGHT_NAME),
                             load_file(straight.final_dir / CONV_IN_WEIGHT_NAME))


def test_resume_latest_without_checkpoints_starts_fresh(data_2x2, train, reference_run):
    resumed = train(data_2x2, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    assert resumed.losses == reference_run.losses


# ---- what is trained, what stays frozen --------------------------------------------------------------


def _unet_base_weights(unet) -> dict[str, torch.Tensor]:
    """The UNet's own weights with PEFT's wrapping undone (`x.base_layer.weight` -> `x.weight`)."""
    return {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if ".lora_" not in k}


@pytest.mark.parametrize("conditioning", ["concat", "blend"])
def test_only_lora_and_conv_in_change(conditioning, data_2x2, make_trainer):
    trainer = make_trainer(data_2x2, "--conditioning", conditioning, "--max_train_steps", "3",
                           "--learning_rate", "1e-2")
    assert type(trainer.optimizer.optimizer) is torch.optim.AdamW  # without --use_8bit_adam
    trainable = {n for n, p in trainer.backend.unet.named_parameters() if p.requires_grad}
    extra = {"conv_in.weight", "conv_in.bias"} if conditioning == "concat" else set()
    assert {n for n in trainable if ".lora_" not in n} == extra
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable - extra)
    trainer.train()
    backend, fresh = trainer.backend, build_tiny_sdxl_components()

    for name in ("vae", "text_encoder", "text_encoder_2"):
        _assert_same_tensors(getattr(backend, name).state_dict(), fresh[name].state_dict())
    trained, base = _unet_base_weights(backend.unet), fresh["unet"].state_dict()
    assert trained.keys() == base.keys()
    changed = {k for k in base if not torch.equal(trained[k], base[k])}
    if conditioning == "concat":
        assert changed <= {"conv_in.weight", "conv_in.bias"}
        weight = trained["conv_in.weight"]
        assert weight.shape == (32, 9, 3, 3)
        assert weight[:, 4:].abs().max() > 0  # the new channels learned something
    else:
        assert changed == set()
    lora_b = [v for k, v in backend.unet.state_dict().items() if ".lora_B." in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)


def _unet_inputs(channels: int, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, channels, 8, 8, generator=g)
    kwargs = {
        "encoder_hidden_states": torch.randn(batch, 77, 96, generator=g),  # 32 + 64: both text encoders
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        },
    }
    return sample, torch.tensor([10, 700][:batch]), kwargs


@torch.no_grad()
def test_step_zero_reproduces_the_base_model():
    base = build_tiny_sdxl_components()["unet"]
    wide = build_tiny_sdxl_components()["unet"]
    widen_conv_in(wide, 9)
    assert wide.conv_in.in_channels == 9 and wide.config.in_channels == 9
    assert wide.conv_in.weight[:, 4:].eq(0).all()
    sample, t, kwargs = _unet_inputs(4)
    expected = base(sample, t, **kwargs).sample
    for seed in (1, 2):  # whatever the mask and masked-image channels hold
        extra = torch.randn(2, 5, 8, 8, generator=torch.Generator().manual_seed(seed)) * 3
        assert torch.equal(wide(torch.cat([sample, extra], 1), t, **kwargs).sample, expected)

    # The backend's UNet with a fresh LoRA (B = 0) on the widened conv_in is the base model too.
    backend = SDXLBackend.from_pretrained("tiny-sdxl", conditioning="concat")
    backend.add_lora(4, 16, 0.0)
    extra = torch.randn(2, 5, 8, 8)
    out = backend.unet(torch.cat([sample, extra], 1), t, **kwargs).sample
    assert torch.allclose(out, expected, atol=1e-6)


# ---- the loss ---------------------------------------------------------------------------------------


def test_masked_mse_weights_latent_pixels():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ones = torch.ones(2, 1, 8, 8)
    assert torch.allclose(masked_mse(pred, target, ones), torch.nn.functional.mse_loss(pred, target))
    mask = torch.stack([panel_mask([3], Grid(2, 2), 8, 8), panel_mask([0, 1], Grid(2, 2), 8, 8)])  # (B, 1, h, w)
    inside = mask.expand_as(pred).bool()
    expected = ((pred - target)[inside] ** 2).mean()
    assert torch.allclose(masked_mse(pred, target, mask), expected)
    # visible pixels with weight w count w times as much as masked ones
    weight = mask + 0.25 * (1 - mask)
    squared = (pred - target) ** 2
    expected = (squared * weight).sum() / (weight.sum() * 4)
    assert torch.allclose(masked_mse(pred, target, weight), expected)
    # prediction errors where the weight is 0 do not count; where it is 1 they do
    assert torch.equal(masked_mse(pred + 5 * (1 - mask), target, mask), masked_mse(pred, target, mask))
    assert masked_mse(pred + 0.1 * mask, target, mask) != masked_mse(pred, target, mask)
    assert masked_mse(target, target, torch.zeros_like(mask)) == 0  # no division by zero


def test_loss_ignores_visible_panels_unless_weighted(data_2x2, make_trainer):
    trainer = make_trainer(data_2x2, "--mask_probability", "1", "--lora_dropout", "0", "--visible_loss_weight", "0")
    batch = next(iter(trainer.dataloader))
    backend = trainer.backend
    predict = backend.predict

    def loss_with(region: str, delta: float) -> float:
        def perturbed(noisy, timesteps, embeds, mask, masked_latents, batch):
            out = predict(noisy, timesteps, embeds, mask, masked_latents, batch)
            where = (1 - mask) if region == "visible" else mask
            return out + delta * where

        backend.predict = perturbed
        try:
            with torch.no_grad():
                return trainer._loss_step(batch, micro_step=0).item()
        finally:
            backend.predict = predict

    reference = loss_with("visible", 0.0)
    assert loss_with("visible", 0.0) == reference  # the step is a pure function of (seed, micro-step)
    assert loss_with("masked", 1.0) != pytest.approx(reference, abs=1e-3)
    assert loss_with("visible", 3.0) == pytest.approx(reference, abs=1e-6)
    trainer.cfg.visible_loss_weight = 0.5  # now errors in visible panels count, half as much
    weighted = loss_with("visible", 0.0)
    assert weighted != pytest.approx(reference, abs=1e-4)
    assert loss_with("visible", 3.0) != pytest.approx(weighted, abs=1e-3)


# ---- aspect buckets ---------------------------------------------------------------------------------


def test_mixed_aspect_ratios_train_in_buckets(tmp_path, train, spy):
    data = tmp_path / "mixed"
    data.mkdir()
    for i in range(3):
        Image.new("RGB", (128, 128), (200, 40 * i, 30)).save(data / f"square{i}.png")
        Image.new("RGB", (128, 192), (30, 40 * i, 200)).save(data / f"tall{i}.png")
    for image in data.glob("*.png"):
        image.with_suffix(".txt").write_text(f"a set, {image.stem}")
    result = train(data, "--image_size", "64", "--max_train_steps", "4")  # one epoch: 2 + 2 batches
    assert result.global_step == 4
    shapes = Counter(shape[-2:] for shape in spy["noisy_shape"])
    assert shapes == {(8, 8): 2, (8, 6): 2}  # 64x64 and 48x64 composites, never mixed


# ---- a stock diffusers pipeline loads the result ---------------------------------------------------------


@pytest.mark.parametrize("conditioning", ["blend", "concat"])
def test_stock_diffusers_pipeline_loads_the_lora(conditioning, data_2x2, tiny_sdxl_dir, make_trainer):
    from diffusers import StableDiffusionXLPipeline

    # alpha != rank: loading must honour the saved alpha, not assume alpha = rank.
    trainer = make_trainer(data_2x2, "--conditioning", conditioning, "--lora_rank", "4", "--lora_alpha", "16",
                           "--learning_rate", "1e-2", "--max_train_steps", "3", "--output_kohya_format")
    result = trainer.train()
    ours = trainer.backend.unet.eval()
    with torch.no_grad():  # the LoRA weights as the fp16 file holds them (the default --save_precision)
        for name, param in ours.named_parameters():
            if ".lora_" in name:
                param.copy_(param.half().float())

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    channels = 9 if conditioning == "concat" else 4
    if conditioning == "concat":
        widen_conv_in(pipe.unet, 9)
    sample, t, kwargs = _unet_inputs(channels)
    with torch.no_grad():
        base = pipe.unet(sample, t, **kwargs).sample
        pipe.load_lora_weights(str(result.final_dir))
        if conditioning == "concat":
            conv = load_file(result.final_dir / CONV_IN_WEIGHT_NAME)
            pipe.unet.conv_in.weight.copy_(conv["conv_in.weight"])
            pipe.unet.conv_in.bias.copy_(conv["conv_in.bias"])
        stock = pipe.unet(sample, t, **kwargs).sample
        again = pipe.unet(sample, t, **kwargs).sample
        expected = ours(sample, t, **kwargs).sample
    assert torch.equal(stock, again)  # inference is deterministic (no LoRA dropout left on)
    assert torch.allclose(stock, expected, atol=1e-5)
    assert (stock - base).abs().max() > 1e-2  # the LoRA does something

    # The kohya-key copy (for ComfyUI) carries the same weights and the real alpha.
    kohya = load_file(result.final_dir / KOHYA_WEIGHT_NAME)
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {16.0}
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(result.final_dir), weight_name=KOHYA_WEIGHT_NAME)
    with torch.no_grad():
        assert torch.allclose(pipe.unet(sample, t, **kwargs).sample, expected, atol=1e-5)


# ---- the script, run by path ----------------------------------------------------------------------------


def _script(*args: str, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def test_script_help_and_bad_flag():
    done = _script("--help")
    assert done.returncode == 0
    for field in dataclasses.fields(TrainConfig):
        assert f"--{field.name}" in done.stdout, field.name
    assert "--config" in done.stdout
    done = _script("--data_dir", "d", "--mask_probability", "1.5")
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --mask_probability must be between 0 and 1, got 1.5"]


def test_script_trains(data_2x2, tmp_path):
    out = tmp_path / "out"
    done = _script("--data_dir", str(data_2x2), "--output_dir", str(out), *TINY_ARGS, "--max_train_steps", "2",
                   "--save_every", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"saved {out / 'final_model'}" in done.stdout
    assert (out / "final_model" / LORA_WEIGHT_NAME).is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]


def test_optimizer_step_clips_the_trained_parameters_to_max_grad_norm():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from iclora.training.trainer import optimizer_step

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[0].requires_grad_(False)  # frozen: not the optimizer's, not clipped, not moved
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    before = [p.detach().clone() for p in model.parameters()]
    loss = (model(torch.full((2, 4), 100.0)) ** 2).sum()  # gradient norm in the thousands
    optimizer_step(accelerator, optimizer, schedule, loss, 0.5)
    after = list(model.parameters())
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    step = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after[2:], before[2:])))
    assert abs(float(step) - 0.5) < 1e-4  # SGD at lr 1 moves by exactly the clipped gradient
