"""Disk caches of text embeddings and latents: same training, nothing stale reused.

    pytest tests/test_cache.py
"""

import pytest
import torch
from PIL import Image

CACHES = ["--cache_text_embeddings", "--cache_latents"]


def captions(folder) -> set[str]:
    return {p.read_text().strip() for p in folder.glob("*.txt")}


@pytest.mark.parametrize("conditioning", ["blend", "concat"])
def test_a_run_from_cache_trains_what_a_run_without_it_trains(conditioning, data_2x2, tmp_path, train):
    flags = ["--max_train_steps", "3", "--conditioning", conditioning, "--caption_dropout", "0.3"]
    plain = train(data_2x2, *flags)
    cache = ["--cache_dir", str(tmp_path / "cache"), *CACHES]
    cold = train(data_2x2, *flags, *cache)  # encodes and writes the cache
    warm = train(data_2x2, *flags, *cache)  # reads it
    assert len(list((tmp_path / "cache" / "latents").iterdir())) == 4
    assert len(list((tmp_path / "cache" / "text").iterdir())) == len(captions(data_2x2)) + 1  # and a dropped caption's unconditional embeddings
    # The cache encodes one composite at a time, the plain run a batch: float32 rounding of the
    # latents, which Adam's normalised steps carry into the next losses (5e-5 relative after
    # three steps with the LoRA on SDXL's ResNet convs, the default).
    torch.testing.assert_close(torch.tensor(cold.losses), torch.tensor(plain.losses), rtol=1e-4, atol=1e-6)
    assert warm.losses == cold.losses


def test_encoders_leave_the_device_and_the_cache_is_read(data_2x2, tmp_path, make_trainer):
    flags = ["--cache_dir", str(tmp_path / "cache"), *CACHES]
    first = make_trainer(data_2x2, *flags)
    n = len(captions(data_2x2))
    assert (first.latent_cache.misses, first.prompt_cache.misses) == (4, n)
    assert first.backend.vae.device.type == first.backend.text_encoder.device.type == "cpu"
    second = make_trainer(data_2x2, *flags)
    assert (second.latent_cache.hits, second.latent_cache.misses) == (4, 0)
    assert (second.prompt_cache.hits, second.prompt_cache.misses) == (n, 0)
    # concat: the masked-image latents of every subset training can draw (2x2, up to 2 masked: 4 + 6 + 'all').
    assert len([k for k in second.latent_cache.names(0) if k.startswith("masked_")]) == 11


def test_a_changed_image_or_setting_is_encoded_again(data_dir, tmp_path, make_trainer):
    flags = ["--cache_dir", str(tmp_path / "cache"), *CACHES]
    make_trainer(data_dir, *flags)
    image = Image.open(data_dir / "00002.png").convert("RGB")
    image.putpixel((0, 0), (1, 2, 3))
    image.save(data_dir / "00002.png")  # same name and size, other content
    (data_dir / "00003.txt").write_text("a caption that changed")
    again = make_trainer(data_dir, *flags)
    assert (again.latent_cache.hits, again.latent_cache.misses) == (3, 1)
    assert again.prompt_cache.misses == 1 and len(again.prompt_cache.embeds) == len(captions(data_dir))
    # Settings that change the encoding: another prompt length, another bucket size.
    longer = make_trainer(data_dir, *flags, "--max_token_length", "225")
    assert longer.prompt_cache.misses == len(captions(data_dir)) and longer.latent_cache.misses == 0
    assert make_trainer(data_dir, *flags, "--image_size", "32").latent_cache.misses == 4


def test_cache_defaults_to_output_dir(data_2x2, tmp_path, train):
    train(data_2x2, "--max_train_steps", "1", "--cache_text_embeddings", out=tmp_path / "run")
    assert len(list((tmp_path / "run" / "cache" / "text").glob("*.safetensors"))) == len(captions(data_2x2))
    assert not list((tmp_path / "run" / "cache").rglob("*.tmp*"))


@pytest.mark.parametrize("model, conditioning", [("tiny-flux", "blend"), ("tiny-flux-fill", "concat")])
def test_flux_from_cache_trains_the_same(model, conditioning, data_2x2, tmp_path):
    from iclora.training.train_flux_ic_lora import main

    def run(out, *flags):
        return main(["--data_dir", str(data_2x2), "--output_dir", str(tmp_path / out), "--model_id", model,
                     "--conditioning", conditioning, "--image_size", "64", "--batch_size", "2", "--lora_rank", "4",
                     "--max_train_steps", "2", *flags]).losses

    plain = run("plain")
    cached = run("cached", *CACHES)
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=1e-5, atol=1e-6)
    assert run("cached", *CACHES, "--max_train_steps", "2", "--output_dir", str(tmp_path / "again"),
               "--cache_dir", str(tmp_path / "cached" / "cache")) == cached


def test_training_from_cached_latents_decodes_no_composite(data_2x2, tmp_path, train, monkeypatch):
    """The pixels of a batch are unused with cached latents: decoding them cost ~30 ms of host
    time per 1024 px composite, every step."""
    import iclora.data

    flags = ["--max_train_steps", "2", "--cache_dir", str(tmp_path / "cache"), *CACHES]
    decoded = []
    load = iclora.data.load_composite
    monkeypatch.setattr(iclora.data, "load_composite", lambda *args: decoded.append(args[0].name) or load(*args))
    train(data_2x2, *flags)
    assert sorted(decoded) == sorted(p.name for p in data_2x2.glob("*.png"))  # once each, into the cache
    decoded.clear()
    train(data_2x2, *flags)
    assert decoded == []
