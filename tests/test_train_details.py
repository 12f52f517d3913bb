"""Training details that only real sizes make visible, run through the training CLIs on the
tiny models: FLUX's resolution-shifted noise levels, what SDXL's caption dropout feeds, no
weight decay on the fully trained conv_in, area bucketing, and old checkpoints resuming as
they were trained.

    pytest tests/test_train_details.py
"""

import json
import math

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_ARGS, toy_dataset
from iclora.backends.flux import FluxBackend, inference_shift
from iclora.backends.lora_files import LORA_WEIGHT_NAME, METADATA_NAME
from iclora.backends.sdxl import CONV_IN_WEIGHT_NAME, SDXLBackend
from iclora.backends.tiny import TINY_MODELS
from iclora.cli import run_cli
from iclora.panels import Grid, composite_size
from iclora.training import run_setup
from iclora.training.checkpoints import STATE_NAME
from iclora.training.train_flux_ic_lora import main as train_flux
from iclora.training.train_sdxl_ic_lora import main as train_sdxl
from iclora.training.run_setup import UNRECORDED


def _flux(data, out, *flags):
    return train_flux(["--data_dir", str(data), "--output_dir", str(out), "--model_id", "tiny-flux",
                       "--image_size", "128", "--batch_size", "2", "--lora_rank", "4", "--learning_rate", "5e-3",
                       "--save_every", "2", "--seed", "0", "--cache_text_embeddings", *flags])


@pytest.fixture(scope="module")
def flux_data(tmp_path_factory):
    return toy_dataset(tmp_path_factory.mktemp("flux_data"), n=4, panel_size=64)  # 128 px: 8 x 8 packed tokens


@pytest.fixture
def flux_sigmas(monkeypatch):
    """The timesteps FLUX training feeds the transformer, per step."""
    seen = []
    noise_latents = FluxBackend.noise_latents

    def spy(self, latents, noise, generator):
        noisy, timesteps, target = noise_latents(self, latents, noise, generator)
        seen.append(timesteps / 1000)
        return noisy, timesteps, target

    monkeypatch.setattr(FluxBackend, "noise_latents", spy)
    return seen


def _lora(result):
    return load_file(result.final_dir / LORA_WEIGHT_NAME)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _forget(checkpoint, *keys):
    """Make `checkpoint` look as written before `keys` were recorded."""
    path = checkpoint / STATE_NAME
    state = json.loads(path.read_text())
    for key in keys:
        del state["run"][key]
    path.write_text(json.dumps(state))


# ---- FLUX: noise levels shifted as inference shifts its schedule -----------------------------------


def test_inference_shift_is_the_schedulers_own():
    """Training's shift of a sigma is what the scheduler does to the same sigma at inference,
    with mu as the FLUX pipelines compute it."""
    scheduler = FluxBackend.from_pretrained("tiny-flux").scheduler
    sigmas = np.linspace(1.0, 1 / 20, 20)
    for seq_len in (64, 1024, 4096, 6144):
        mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        shifted = inference_shift(scheduler, torch.tensor(sigmas, dtype=torch.float32), seq_len)
        torch.testing.assert_close(shifted, scheduler.sigmas[:-1])
    # 1024 x 1024 (4096 tokens): FLUX.1-dev's shift exp(1.15) ~ 3.2 moves sigma 0.5 to ~0.76.
    assert math.isclose(float(inference_shift(scheduler, torch.tensor([0.5]), 4096)), math.exp(1.15) / (math.exp(1.15) + 1),
                        rel_tol=1e-6)


def test_timestep_shift_resolution_moves_the_drawn_sigmas(flux_data, tmp_path, flux_sigmas):
    plain = _flux(flux_data, tmp_path / "none", "--max_train_steps", "2", "--timestep_shift", "none")
    drawn = torch.cat(flux_sigmas)
    flux_sigmas.clear()
    shifted_run = _flux(flux_data, tmp_path / "shift", "--max_train_steps", "2", "--timestep_shift", "resolution")
    shifted = torch.cat(flux_sigmas)
    # 128 x 128 composites: 16 x 16 latent pixels, 64 packed tokens.
    mu = calculate_shift(64, 256, 4096, 0.5, 1.15)
    expected = math.exp(mu) / (math.exp(mu) + (1 / drawn - 1))
    torch.testing.assert_close(shifted, expected)
    assert (shifted > drawn).all()  # exp(mu) > 1: towards noise
    for result, value in ((plain, "none"), (shifted_run, "resolution")):
        meta = json.loads((result.final_dir / METADATA_NAME).read_text())
        assert meta["training_args"]["timestep_shift"] == value
        state = json.loads((result.final_dir.parent / "checkpoints" / "checkpoint-2" / STATE_NAME).read_text())
        assert state["run"]["timestep_shift"] == value
    assert not _same(_lora(plain), _lora(shifted_run))


def test_timestep_shift_resolution_is_refused_for_sdxl(capsys):
    with pytest.raises(SystemExit):
        run_cli(train_sdxl, ["--data_dir", "d", "--timestep_shift", "resolution"])
    assert "error: --timestep_shift resolution is for --backend flux" in capsys.readouterr().err


def test_checkpoints_keep_their_timestep_shift_on_resume(flux_data, tmp_path):
    """A resumed run draws as its checkpoint did: one without the field (written before it
    existed) unshifted, whatever today's default; a given flag that differs is refused."""
    for shift in ("none", "resolution"):
        straight = _flux(flux_data, tmp_path / f"straight_{shift}", "--max_train_steps", "4", "--timestep_shift", shift)
        out = tmp_path / f"first_{shift}"
        _flux(flux_data, out, "--max_train_steps", "2", "--timestep_shift", shift)
        if shift == "none":
            _forget(out / "checkpoints" / "checkpoint-2", *UNRECORDED)
        resumed = _flux(flux_data, out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
        assert resumed.losses == straight.losses[2:], shift
        assert _same(_lora(resumed), _lora(straight)), shift
        assert json.loads((resumed.final_dir / METADATA_NAME).read_text())["training_args"]["timestep_shift"] == shift
    with pytest.raises(ValueError, match=r"run settings differ \(timestep_shift resolution -> none\)"):
        _flux(flux_data, tmp_path / "first_resolution", "--max_train_steps", "6", "--timestep_shift", "none",
              "--resume_from_checkpoint", "latest")


# ---- SDXL: --lora_convs, the LoRA on the ResNet convs too --------------------------------------------


def _sdxl(data, out, *flags):
    return train_sdxl(["--data_dir", str(data), "--output_dir", str(out), *TINY_ARGS, "--save_every", "2",
                       "--lora_dropout", "0", "--learning_rate", "1e-2", *flags])


def test_lora_convs_train_the_resnet_convs_and_resume_with_them(tmp_path):
    """By default (--lora_convs) every ResNet conv1 / conv2 carries a LoRA that training moves;
    a resume keeps the checkpoint's choice unless the flag says otherwise (then it is refused),
    and a checkpoint from before the flag existed (attention only) resumes without them."""
    data = toy_dataset(tmp_path / "data")
    unet = TINY_MODELS["tiny-sdxl"]()["unet"]
    convs = {n for n, m in unet.named_modules() if n.endswith((".conv1", ".conv2"))}
    straight = _sdxl(data, tmp_path / "straight", "--max_train_steps", "4")
    lora = _lora(straight)
    trained = {k.removeprefix("unet.").removesuffix(".lora_B.weight") for k in lora if k.endswith(".lora_B.weight")}
    assert convs and convs <= trained  # PEFT starts lora_B at zero: each has moved
    assert all(lora[f"unet.{m}.lora_B.weight"].abs().max() > 0 for m in convs)
    assert json.loads((straight.final_dir / METADATA_NAME).read_text())["training_args"]["lora_convs"] is True

    out = tmp_path / "resumed"
    _sdxl(data, out, "--max_train_steps", "2", "--lora_convs")
    resumed = _sdxl(data, out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert _same(_lora(resumed), lora)  # the flag not given: the checkpoint's convs, resumed exactly
    with pytest.raises(ValueError, match=r"run settings differ \(lora_convs True -> False\)"):
        _sdxl(data, out, "--max_train_steps", "6", "--no_lora_convs", "--resume_from_checkpoint", "latest")

    older = tmp_path / "older"
    _sdxl(data, older, "--max_train_steps", "2", "--no_lora_convs")
    assert not any(".conv1." in k or ".conv2." in k for k in load_file(older / "final_model" / LORA_WEIGHT_NAME))
    _forget(older / "checkpoints" / "checkpoint-2", "lora_convs")
    again = _sdxl(data, older, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert not any(".conv1." in k or ".conv2." in k for k in _lora(again))
    assert json.loads((again.final_dir / METADATA_NAME).read_text())["training_args"]["lora_convs"] is False


def test_lora_convs_is_refused_where_there_are_no_convs(capsys):
    with pytest.raises(SystemExit):
        run_cli(train_flux, ["--data_dir", "d", "--lora_convs"])
    assert "error: --lora_convs is for --backend sdxl: FLUX.1's denoiser has no conv layers" in capsys.readouterr().err


# ---- SDXL: caption dropout trains what classifier-free guidance feeds ------------------------------


@pytest.fixture
def fed_embeds(monkeypatch):
    """The text embeddings the SDXL UNet is given, per micro-batch."""
    seen = []
    predict = SDXLBackend.predict

    def spy(self, noisy, timesteps, prompt_embeds, mask, masked_latents, batch):
        seen.append({k: v.detach().clone() for k, v in prompt_embeds.items()})
        return predict(self, noisy, timesteps, prompt_embeds, mask, masked_latents, batch)

    monkeypatch.setattr(SDXLBackend, "predict", spy)
    return seen


@pytest.mark.parametrize("cache", [False, True])
def test_caption_dropout_feeds_the_unconditional_embeddings(data_2x2, train, fed_embeds, cache):
    flags = ["--cache_text_embeddings"] if cache else []
    train(data_2x2, "--max_train_steps", "4", "--caption_dropout", "0.5", "--seed", "3", *flags)
    backend = SDXLBackend.from_pretrained("tiny-sdxl")
    assert backend.inpaint_pipeline().config.force_zeros_for_empty_prompt
    # What inference feeds classifier-free guidance's unconditional branch: zeros.
    negative = backend.pipeline_prompt("a caption", None, 7.5)
    captions = [p.read_text().strip() for p in sorted(data_2x2.glob("*.txt"))]
    conditional = backend.encode_prompt(captions)["prompt_embeds"]
    dropped = kept = 0
    for embeds in fed_embeds:
        for row in range(len(embeds["prompt_embeds"])):
            if embeds["prompt_embeds"][row].abs().max() == 0:
                dropped += 1
                torch.testing.assert_close(embeds["prompt_embeds"][row], negative["negative_prompt_embeds"][0])
                torch.testing.assert_close(embeds["pooled_prompt_embeds"][row],
                                           negative["negative_pooled_prompt_embeds"][0])
            else:
                kept += 1
                assert min((embeds["prompt_embeds"][row] - c).abs().max() for c in conditional) < 1e-5
    assert dropped and kept  # seed 3 drops some of the 8 captions, not all


def test_caption_dropout_without_force_zeros_feeds_the_empty_caption(monkeypatch, data_2x2, train, fed_embeds):
    """A pipeline that encodes empty prompts (force_zeros_for_empty_prompt false) gets that."""
    init = SDXLBackend.__init__

    def no_zeros(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._prompt_pipe.register_to_config(force_zeros_for_empty_prompt=False)

    monkeypatch.setattr(SDXLBackend, "__init__", no_zeros)
    train(data_2x2, "--max_train_steps", "1", "--caption_dropout", "1")
    empty = SDXLBackend.from_pretrained("tiny-sdxl").encode_prompt([""])
    assert fed_embeds[0]["prompt_embeds"].abs().max() > 0
    torch.testing.assert_close(fed_embeds[0]["prompt_embeds"], empty["prompt_embeds"].expand(2, -1, -1))


# ---- weight decay: the LoRA only ----------------------------------------------------------------


def test_conv_in_trains_without_weight_decay(data_2x2, train, make_trainer):
    """One AdamW step from the same start: weight decay changes the LoRA but not conv_in."""
    runs = [train(data_2x2, "--max_train_steps", "1", "--learning_rate", "1e-2", "--weight_decay", wd)
            for wd in ("0", "0.5")]
    conv_in = [load_file(r.final_dir / CONV_IN_WEIGHT_NAME) for r in runs]
    assert _same(*conv_in)
    assert not _same(*[_lora(r) for r in runs])
    trainer = make_trainer(data_2x2, "--weight_decay", "0.3", "--conv_in_learning_rate", "1e-3")
    lora, full = trainer.optimizer.param_groups
    assert (lora["weight_decay"], full["weight_decay"], full["lr"]) == (0.3, 0.0, 1e-3)
    assert {id(p) for p in full["params"]} == {id(p) for p in trainer.backend.unet.conv_in.parameters()}


def test_old_sdxl_checkpoints_resume_as_they_were_trained(data_2x2_six, train, make_trainer, tmp_path):
    """A concat checkpoint written before conv_in had its own optimizer group (one group,
    decayed throughout; "" fed for dropped captions) resumes into exactly the run it was."""
    flags = ("--save_every", "2", "--caption_dropout", "0.5", "--learning_rate", "1e-2", "--weight_decay", "0.5")
    with pytest.MonkeyPatch.context() as patch:  # the trainer as it was: what UNRECORDED says
        check = run_setup.check_outputs
        patch.setattr(run_setup, "check_outputs", lambda trainer: (trainer.run_signature.update(UNRECORDED), check(trainer))[1])
        straight = train(data_2x2_six, "--max_train_steps", "4", *flags)
        out = tmp_path / "old"
        train(data_2x2_six, "--max_train_steps", "2", *flags, out=out)
    _forget(out / "checkpoints" / "checkpoint-2", *UNRECORDED)
    trainer = make_trainer(data_2x2_six, "--output_dir", str(out), "--max_train_steps", "4",
                           "--resume_from_checkpoint", "latest", *flags)
    assert len(trainer.optimizer.param_groups) == 1 and trainer.optimizer.param_groups[0]["weight_decay"] == 0.5
    assert trainer.run_signature["dropped_caption"] == "empty"
    resumed = trainer.train()
    assert resumed.global_step == 4 and resumed.losses == straight.losses[2:]
    assert _same(_lora(resumed), _lora(straight))
    assert _same(*[load_file(r.final_dir / CONV_IN_WEIGHT_NAME) for r in (resumed, straight)])
    # Today's run differs: conv_in is not decayed, dropped captions are fed zeros.
    assert not _same(_lora(train(data_2x2_six, "--max_train_steps", "4", *flags)), _lora(straight))


# ---- --bucket_by area ------------------------------------------------------------------------------


def test_composite_size_by_area():
    grid, quantum = Grid(1, 3), 8
    assert composite_size(3072, 1024, 1024, grid, quantum) == (1032, 344)  # longest side: a third of the pixels
    w, h = composite_size(3072, 1024, 1024, grid, quantum, "area")
    assert (w, h) == (1776, 592) and abs(w * h / 1024**2 - 1) < 0.01 and w / h == 3
    assert composite_size(2048, 2048, 1024, Grid(2, 2), 16, "area") == (1024, 1024)
    for size in [(1776, 592), (1000, 1500), (640, 1920)]:
        w, h = composite_size(*size, 1024, grid, 16, "area")
        assert w % (3 * 16) == 0 and h % 16 == 0  # every panel boundary on a packed FLUX token
        assert abs(w * h / 1024**2 - 1) < 0.05


def test_bucket_by_area_dry_run_and_training(tmp_path, train, spy, capsys):
    data = toy_dataset(tmp_path / "data", n=4, grid=(1, 3))  # 96 x 32 strips
    Image.open(data / "00000.png").resize((90, 36)).save(data / "00000.png")  # another aspect, another bucket
    argv = ["--data_dir", str(data), "--output_dir", str(tmp_path / "dry"), *TINY_ARGS, "--grid", "1x3",
            "--image_size", "64"]
    longest = train_sdxl([*argv, "--dry_run"])
    area = train_sdxl([*argv, "--bucket_by", "area", "--dry_run"])
    printed = capsys.readouterr().out
    assert sorted(longest.buckets) == [(24, 72)]  # the longer side 64, rounded to whole panels: 42 % of 64²
    # ~64² pixels each (the nearest sizes with every panel boundary on a latent pixel), the aspect kept.
    assert sorted(area.buckets) == [(40, 96), (40, 120)]
    assert "bucket_by area" in printed and "40x120: 3 composite(s), 117% of image_size² pixels" in printed
    result = train(data, "--grid", "1x3", "--image_size", "64", "--bucket_by", "area", "--max_train_steps", "4",
                   "--batch_size", "1", "--save_every", "2")
    assert sorted({shape[-2:] for shape in spy["noisy_shape"]}) == [(5, 12), (5, 15)]  # one epoch: both buckets
    meta = json.loads((result.final_dir / METADATA_NAME).read_text())
    assert meta["bucket_by"] == "area" and meta["training_args"]["bucket_by"] == "area"
    with pytest.raises(ValueError, match=r"run settings differ \(bucket_by area -> longest\)"):
        train(data, "--grid", "1x3", "--image_size", "64", "--max_train_steps", "6", "--batch_size", "1",
              "--save_every", "2", "--resume_from_checkpoint", str(result.final_dir.parent / "checkpoints" / "checkpoint-2"))
