"""Watching a run, through the training entry point: sample sheets during training, the loss
log and plot, trackers, progress lines, and the known noise kept out.

    pytest tests/test_monitor.py
"""

import json
import logging

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

from iclora.training.monitor import plot_loss, smooth

from conftest import TINY_ARGS, run_training

SAMPLE_FLAGS = ("--validation_every", "1", "--validation_inference_steps", "2")


def _lora(result):
    return load_file(result.final_dir / "pytorch_lora_weights.safetensors")


def _same_tensors(a, b):
    assert a.keys() == b.keys()
    return all(a[k].equal(b[k]) for k in a)


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_sampling_does_not_change_training(data_2x2, train, tmp_path, reference_run):
    """Samples at step 0, every step and at the end: the LoRA and the losses are bit-identical
    to a run without them, and the samples come from the first training composite."""
    out = tmp_path / "sampled"
    sampled = train(data_2x2, "--max_train_steps", "2", *SAMPLE_FLAGS, out=out)
    assert sampled.losses == reference_run.losses
    assert _same_tensors(_lora(sampled), _lora(reference_run))
    assert _same_tensors(load_file(sampled.final_dir / "conv_in.safetensors"),
                         load_file(reference_run.final_dir / "conv_in.safetensors"))

    steps = sorted(p.name for p in (out / "samples").glob("step_*"))
    assert steps == ["step_000000", "step_000001", "step_000002"]
    record = json.loads((out / "samples" / "step_000002" / "00000_inference.json").read_text())
    assert record["arguments"]["prompt"] == (data_2x2 / "00000.txt").read_text()
    assert record["arguments"]["panels_to_inpaint"] == [1, 2, 3]  # default: all but the first
    assert record["resolved"]["global_step"] == 2
    first = np.asarray(Image.open(out / "samples" / "step_000000" / "00000_0.png"), dtype=np.float32)
    last = np.asarray(Image.open(out / "samples" / "step_000002" / "00000_0.png"), dtype=np.float32)
    assert first.shape == (64, 64, 3)
    assert np.abs(first - last).max() > 0  # the sheets show the model as it trains
    # the visible panel is the input's own (pasted back by the shared inference code)
    source = np.asarray(Image.open(out / "samples" / "inputs" / "00000.png"), dtype=np.float32)
    assert np.array_equal(last[:32, :32], source[:32, :32])
    assert Image.open(out / "samples" / "progress.png").width > 4 * 64  # input, mask, 3 steps


def test_sampling_keeps_resume_exact_and_logs_continue(data_2x2_six, train, tmp_path, caplog):
    straight = train(data_2x2_six, "--max_train_steps", "4", "--lora_dropout", "0.1", out=tmp_path / "straight")
    out = tmp_path / "resumed"
    flags = ("--lora_dropout", "0.1", "--save_every", "2", *SAMPLE_FLAGS)
    train(data_2x2_six, "--max_train_steps", "3", *flags, out=out)  # checkpoint-2, then one step more
    with caplog.at_level(logging.INFO, logger="iclora"):
        resumed = train(data_2x2_six, "--max_train_steps", "4", *flags, "--resume_from_checkpoint", "latest", out=out)
    assert "resumed from checkpoint-2 at step 2" in caplog.text
    assert resumed.losses == straight.losses[2:]
    assert _same_tensors(_lora(resumed), _lora(straight))
    # the interrupted run's step 3 is replaced, not repeated
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["loss"] for r in log] == straight.losses
    assert all(a["seconds"] <= b["seconds"] for a, b in zip(log, log[1:]))  # continues across the resume
    steps = sorted(p.name for p in (out / "samples").glob("step_*"))
    assert steps == ["step_000000", "step_000001", "step_000002", "step_000003", "step_000004"]


def test_validation_flags_and_yaml_lists(data_2x2, train, tmp_path):
    big = tmp_path / "val" / "big.png"
    big.parent.mkdir()
    Image.open(data_2x2 / "00001.png").resize((128, 128)).save(big)  # sampled at the training size
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"validation_image": [str(big), str(data_2x2 / "00002.png")],
                                      "validation_panels": [1, 3]}))
    out = tmp_path / "out"
    train(data_2x2, "--config", str(config), "--validation_prompt", "a prompt", "--max_train_steps", "1",
          "--validation_inference_steps", "2", out=out)
    # a validation image without --validation_every: samples at step 0 and at the end
    assert sorted(p.name for p in (out / "samples").glob("step_*")) == ["step_000000", "step_000001"]
    for stem in ("big", "00002"):
        record = json.loads((out / "samples" / "step_000001" / f"{stem}_inference.json").read_text())
        assert record["arguments"]["prompt"] == "a prompt"
        assert record["resolved"]["panels"] == [1, 3]
        assert Image.open(out / "samples" / "step_000001" / f"{stem}_0.png").size == (64, 64)
        assert (out / "samples" / "step_000001" / f"{stem}_comparison.png").is_file()


@pytest.mark.parametrize("flags, message", [
    (("--validation_image", "nowhere.png"), "error: --validation_image nowhere.png: no such file"),
    (("--validation_panels", "0", "1", "2", "3"), "error: --validation_panels must leave at least one panel visible"),
    (("--validation_panels", "4"), "error: --validation_panels: panel 4 is outside the 2x2 grid"),
    (("--validation_every", "0"), "error: --validation_every must be at least 1, got 0"),
    (("--report_to", "wandb"), "error: --report_to wandb: wandb is not installed (pip install wandb)"),
])
def test_bad_monitoring_flags_give_one_error_line(flags, message, data_2x2, tmp_path, capsys):
    import importlib.util

    if "wandb" in flags and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    from iclora.cli import run_cli
    from iclora.training.train_sdxl_ic_lora import main

    argv = ["--data_dir", str(data_2x2), "--output_dir", str(tmp_path / "out"), *TINY_ARGS, *flags]
    with pytest.raises(SystemExit) as info:
        run_cli(main, argv)
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), errors
    assert not (tmp_path / "out").exists()


def test_a_validation_image_needs_a_caption_or_a_prompt(data_2x2, tmp_path, capsys):
    from iclora.cli import run_cli
    from iclora.training.train_sdxl_ic_lora import main

    image = tmp_path / "lone.png"
    Image.open(data_2x2 / "00000.png").save(image)
    argv = ["--data_dir", str(data_2x2), "--output_dir", str(tmp_path / "out"), *TINY_ARGS,
            "--validation_image", str(image)]
    with pytest.raises(SystemExit):
        run_cli(main, argv)
    assert f"error: --validation_image {image}: no same-stem .txt caption; give --validation_prompt" in capsys.readouterr().err


def test_train_log_and_loss_plot(data_2x2, train, tmp_path):
    out = tmp_path / "out"
    result = train(data_2x2, "--max_train_steps", "3", "--save_every", "2", out=out)
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert [r["loss"] for r in log] == result.losses
    assert [r["epoch"] for r in log] == [0, 0, 1]  # 2 batches an epoch
    assert all(r["lr"] == 1e-4 and r["seconds"] > 0 and r["images_per_s"] > 0 for r in log)
    assert "peak_gpu_memory_gib" not in log[0]  # CUDA only
    assert all(r["masked_loss"] > 0 for r in log)
    plot = Image.open(out / "loss.png")
    assert plot.size == (640, 360) and len(set(plot.getdata())) > 3  # axes, raw and smoothed lines


def test_the_log_splits_the_loss_into_masked_and_visible_panels(data_2x2, train, tmp_path):
    # Whole composites: every latent pixel is masked, so the loss is the masked MSE and there
    # is no visible part to log.
    out = tmp_path / "whole"
    train(data_2x2, "--max_train_steps", "1", "--mask_probability", "0", out=out)
    (record,) = _log(out)
    assert "visible_loss" not in record and record["loss"] == pytest.approx(record["masked_loss"], rel=1e-4)
    # One masked panel of four, visible panels at full weight: the loss is the pixel-weighted
    # mean of the two parts (3 visible latent pixels to each masked one).
    out = tmp_path / "one"
    train(data_2x2, "--max_train_steps", "1", "--mask_probability", "1", "--max_masked_panels", "1",
          "--batch_size", "1", "--visible_loss_weight", "1", out=out)
    (record,) = _log(out)
    assert record["loss"] == pytest.approx((record["masked_loss"] + 3 * record["visible_loss"]) / 4, rel=1e-3)


def test_a_fresh_run_replaces_an_old_log(data_2x2, train, tmp_path):
    out = tmp_path / "out"
    train(data_2x2, "--max_train_steps", "3", "--save_every", "100", *SAMPLE_FLAGS, out=out)
    train(data_2x2, "--max_train_steps", "1", "--save_every", "100", "--overwrite_output_dir", out=out)  # fresh
    assert [r["step"] for r in _log(out)] == [1]
    assert not list((out / "samples").glob("step_*"))


def test_smooth_and_plot(tmp_path):
    values = np.r_[np.ones(50), np.zeros(50)]
    smoothed = smooth(values)
    assert smoothed[0] == 1.0 and smoothed[49] == pytest.approx(1.0)
    assert 0 < smoothed[60] < 1 and smoothed[-1] < 0.01  # follows, with lag
    plot_loss(list(range(1, 101)), [*values[:-1], float("nan")], tmp_path / "loss.png")  # a NaN does not break it
    assert (tmp_path / "loss.png").is_file()


def test_tensorboard(data_2x2, train, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(data_2x2, "--max_train_steps", "2", "--report_to", "tensorboard", *SAMPLE_FLAGS, out=out)
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events
    scalars, images = {}, {}
    for event in events:
        accumulator = EventAccumulator(str(event), size_guidance={"images": 0, "scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [e.step for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["images"]:
            images[tag] = [e.step for e in accumulator.Images(tag)]
    assert scalars["loss"] == [1, 2] and scalars["lr"] == [1, 2]
    assert images["samples/0"] == [0, 1, 2]


def test_known_noise_is_filtered_or_said_once(data_2x2, train):
    train(data_2x2, "--max_train_steps", "1")  # the entry point installs the filters

    def passes(name: str, message: str) -> bool:
        """Whether the logger `name` lets `message` through to its handlers."""
        logger = logging.getLogger(name)
        return bool(logger.filter(logger.makeRecord(name, logging.WARNING, __file__, 0, message, None, None)))

    assert not passes("bitsandbytes.backends.cpu.ops",
                      "Failed to load CPU gemm_4bit_forward from kernels-community: no kernels.")
    assert not passes("diffusers.models.modeling_utils",
                      "There are modules in UNet2DConditionModel that should be kept in float32: []. Casting ...")
    assert passes("diffusers.models.modeling_utils", "There are modules that should be kept in float32: ['norm']")
    truncated = "The following part of your input was truncated because CLIP can only handle sequences up to 77 " \
                "tokens: ['a prompt of this test only']"
    said = [passes("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl", truncated)
            for _ in range(3)]  # one per step
    assert said == [True, False, False]
    # FLUX's are dropped: the backend says once how CLIP and T5 read a long prompt.
    assert not passes("diffusers.pipelines.flux.pipeline_flux", truncated)
    assert not passes("diffusers.loaders.lora_base", "No LoRA keys associated to CLIPTextModel found with the prefix")


def test_training_progress_bar_shows_epoch_loss_lr(data_2x2, tmp_path, capsys):
    run_training(data_2x2, tmp_path / "out", "--max_train_steps", "2")
    err = capsys.readouterr().err
    assert "epoch=" in err and "loss=" in err and "lr=" in err and "<" in err  # "<" precedes tqdm's ETA


def test_inference_shows_progress_over_images_and_steps(data_2x2, tmp_path, capsys, monkeypatch):
    from iclora import logs
    from iclora.inference.sdxl_ic_lora_inference import main

    monkeypatch.setattr(logs, "PLAIN_INTERVAL", 0.0)  # stderr is no terminal here: a plain line per update

    main(["--lora_path", "none", "--base_model", "tiny-sdxl", "--native_size",
          "--input_image", str(data_2x2 / "00000.png"),
          "--prompt", "p", "--num_images", "2", "--num_inference_steps", "2", "--seed", "0",
          "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "images: 2/2" in err
    assert "denoising: 2/2" in err
