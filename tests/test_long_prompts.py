"""SDXL prompts longer than 77 CLIP tokens (kohya's chunked encoding), in training and
inference alike.

    pytest tests/test_long_prompts.py
"""

import functools
import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLInpaintPipeline

from iclora.backends.sdxl import SDXLBackend
from iclora.backends.sdxl_prompt import chunk_ids

ROOT = Path(__file__).resolve().parents[1]
INPUT = ROOT / "data" / "sample" / "00001.png"
# One byte per token in the tiny tokenizer: 100 tokens of "a", then what differs.
HEAD = "a" * 100


@pytest.fixture(scope="module")
def backend():
    return SDXLBackend.from_pretrained("tiny-sdxl", conditioning="blend", max_token_length=75)


def test_75_is_exactly_the_diffusers_encoding(backend):
    prompts = ["a red square " * 20, "short"]
    ours = backend.encode_prompt(prompts)
    embeds, _, pooled, _ = backend.inpaint_pipeline().encode_prompt(
        prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert torch.equal(ours["prompt_embeds"], embeds) and torch.equal(ours["pooled_prompt_embeds"], pooled)


@pytest.mark.parametrize("length", [150, 225])
def test_longer_prompts_read_past_77_tokens(backend, length, monkeypatch):
    monkeypatch.setattr(backend, "max_token_length", length)
    a, b = HEAD + " first ending", HEAD + " other ending"
    long = backend.encode_prompt([a, b])
    assert long["prompt_embeds"].shape[1] == length + 2  # BOS + 75 per chunk + EOS
    # Tokens 101.. are read: the two prompts now differ; the pooled embedding (first chunk) does not.
    assert not torch.allclose(long["prompt_embeds"][0], long["prompt_embeds"][1])
    assert torch.allclose(long["pooled_prompt_embeds"][0], long["pooled_prompt_embeds"][1], atol=1e-6)
    monkeypatch.setattr(backend, "max_token_length", 75)
    short = backend.encode_prompt([a, b])
    assert torch.equal(short["prompt_embeds"][0], short["prompt_embeds"][1])  # cut at 75: the same


def test_chunks_start_with_bos_and_end_with_eos(backend):
    tok = backend.tokenizer
    ids = chunk_ids(tok, [HEAD, "short"], 225)  # (2, 3, 77)
    assert ids.shape == (2, 3, 77)
    assert (ids[..., 0] == tok.bos_token_id).all() and (ids[..., -1] == tok.eos_token_id).all()
    assert (ids[1, 1:, 1] == tok.eos_token_id).all()  # windows after the prompt: <BOS> <EOS> <PAD>...
    assert ids[0, 1, 1:26].tolist() == tok(HEAD).input_ids[76:101]  # window 2 continues the prompt


def test_training_records_the_length_and_inference_uses_it(tmp_path, train, monkeypatch):
    result = train(ROOT / "data" / "sample", "--max_train_steps", "1", "--batch_size", "1",
                   "--max_token_length", "225", "--conditioning", "blend")
    meta = json.loads((result.final_dir / "iclora_config.json").read_text())
    assert meta["max_token_length"] == 225
    calls = []
    real_call = StableDiffusionXLInpaintPipeline.__call__

    @functools.wraps(real_call)
    def call(self, *a, **k):
        calls.append(k)
        return real_call(self, *a, **k)

    monkeypatch.setattr(StableDiffusionXLInpaintPipeline, "__call__", call)
    from iclora.inference.sdxl_ic_lora_inference import main as infer

    out = tmp_path / "infer"
    infer(["--lora_path", str(result.final_dir), "--input_image", str(INPUT), "--prompt", HEAD + " and more",
           "--num_inference_steps", "1", "--guidance_scale", "3", "--output_dir", str(out), "--seed", "0"])
    kwargs = calls[0]
    assert "prompt" not in kwargs or kwargs["prompt"] is None
    assert kwargs["prompt_embeds"].shape[1] == kwargs["negative_prompt_embeds"].shape[1] == 227
    backend = SDXLBackend.from_pretrained("tiny-sdxl", conditioning="blend", max_token_length=225)
    expected = backend.encode_prompt([HEAD + " and more"])["prompt_embeds"]
    assert torch.allclose(kwargs["prompt_embeds"], expected, atol=1e-5)  # as training encodes it
    assert json.loads((out / "00001_inference.json").read_text())["resolved"]["max_token_length"] == 225


def test_sdxl_default_is_150_and_flux_refuses_other_lengths(tmp_path, capsys):
    from iclora.training.train_flux_ic_lora import main as flux_main

    assert SDXLBackend.from_pretrained("tiny-sdxl", conditioning="blend").max_token_length == 150
    with pytest.raises(SystemExit):
        flux_main(["--data_dir", str(tmp_path), "--max_token_length", "150"])
    assert "--max_token_length is for --backend sdxl" in capsys.readouterr().err


def test_flux_says_the_clip_warning_once(caplog):
    import logging

    from iclora.backends.flux import FluxBackend

    backend = FluxBackend.from_pretrained("tiny-flux")
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            backend.encode_prompt([HEAD + f" caption {step}", HEAD + " another"])
    said = [r.getMessage() for r in caplog.records if "CLIP" in r.getMessage()]
    assert len(said) == 1 and "said once" in said[0]


def test_resume_takes_the_default_as_its_value_and_refuses_another(data_2x2, train, tmp_path):
    out = tmp_path / "run"
    train(data_2x2, "--max_train_steps", "1", "--save_every", "1", out=out)
    resumed = train(data_2x2, "--max_train_steps", "2", "--max_token_length", "150", "--resume_from_checkpoint",
                    "latest", out=out)
    assert resumed.global_step == 2
    with pytest.raises(ValueError, match=r"max_token_length 150 -> 225"):
        train(data_2x2, "--max_train_steps", "3", "--max_token_length", "225", "--resume_from_checkpoint", "latest",
              out=out)
