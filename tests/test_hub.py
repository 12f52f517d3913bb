"""A model id the hub cannot serve fails in one line, at once, and leaves nothing behind.

The network is blocked for these tests: HF_HUB_OFFLINE is unset (the suite sets it) and the
hub's endpoint is a local port nothing listens on, so every request is refused at once, as
on a machine without network; the cache is an empty folder of the test's own.

    pytest tests/test_hub.py
"""

import socket
import time

import pytest
from huggingface_hub import constants

from iclora.cli import run_cli
from iclora.hub import model_source

from conftest import TINY_ARGS


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return tmp_path / "hub-cache"


def one_error_line(capsys, main, argv) -> str:
    import iclora.backends.tiny  # noqa: F401  (diffusers: imported before the clock starts)

    start = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        run_cli(main, argv)
    assert time.monotonic() - start < 5, "no retries: the first request's failure is the answer"
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_training_on_an_unreachable_model_id_fails_at_once_and_writes_nothing(no_network, data_2x2, tmp_path, capsys):
    from iclora.training import train_sdxl_ic_lora, trainer  # noqa: F401  (imported before the clock starts)

    out = tmp_path / "out"
    line = one_error_line(capsys, train_sdxl_ic_lora.main,
                          ["--data_dir", str(data_2x2), "--output_dir", str(out), *TINY_ARGS, "--model_id", "tiny_sdxl"])
    assert "--model_id tiny_sdxl: the Hugging Face hub cannot be reached" in line
    assert "not in the cache" in line and "local folder" in line and "HF_HUB_OFFLINE=1" in line
    assert not out.exists()


def test_inference_on_an_unreachable_base_fails_at_once_and_writes_nothing(no_network, data_2x2, tmp_path, capsys):
    from iclora.inference import inpaint, sdxl_ic_lora_inference  # noqa: F401

    out = tmp_path / "out"
    line = one_error_line(capsys, sdxl_ic_lora_inference.main, [
        "--lora_path", "none", "--base_model", "someone/sdxl-typo", "--input_image", str(data_2x2 / "00000.png"),
        "--prompt", "x", "--panels_to_inpaint", "3", "--output_dir", str(out)])
    assert line.startswith("error: --base_model someone/sdxl-typo: the Hugging Face hub cannot be reached")
    assert "HF_HUB_OFFLINE=1" in line
    assert not out.exists()


def test_an_unreachable_pretrained_vae_fails_at_once_and_writes_nothing(no_network, data_2x2, tmp_path, capsys):
    from iclora.inference import inpaint, sdxl_ic_lora_inference  # noqa: F401  (imported before the clock starts)
    from iclora.training import train_sdxl_ic_lora, trainer  # noqa: F401

    out = tmp_path / "out"
    line = one_error_line(capsys, train_sdxl_ic_lora.main, [
        "--data_dir", str(data_2x2), "--output_dir", str(out), *TINY_ARGS, "--pretrained_vae", "someone/vae-typo"])
    assert line.startswith("error: --pretrained_vae someone/vae-typo: the Hugging Face hub cannot be reached")
    assert not out.exists()
    line = one_error_line(capsys, sdxl_ic_lora_inference.main, [
        "--lora_path", "none", "--base_model", "tiny-sdxl", "--pretrained_vae", "someone/vae-typo",
        "--input_image", str(data_2x2 / "00000.png"), "--prompt", "x", "--panels_to_inpaint", "3",
        "--output_dir", str(out)])
    assert line.startswith("error: --pretrained_vae someone/vae-typo: the Hugging Face hub cannot be reached")
    assert "HF_HUB_OFFLINE=1" in line and not out.exists()


def test_caption_on_an_unreachable_model_fails_at_once(no_network, data_dir, capsys):
    from iclora.prepare.__main__ import main

    for caption in data_dir.glob("*.txt"):
        caption.unlink()
    line = one_error_line(capsys, main, ["caption", "--data_dir", str(data_dir), "--model_id", "someone/vlm"])
    assert line.startswith("error: --model_id someone/vlm: the Hugging Face hub cannot be reached")
    assert "HF_HUB_OFFLINE=1" in line
    assert not list(data_dir.glob("*.txt"))


def test_offline_mode_names_the_missing_cache_entry_and_loads_a_cached_one_from_its_folder(no_network, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="--model_id someone/model: not a local folder and not in the Hugging Face cache"):
        model_source("someone/model")
    snapshot = no_network / "models--someone--model" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (no_network / "models--someone--model" / "refs").mkdir()
    (no_network / "models--someone--model" / "refs" / "main").write_text("0" * 40)
    assert model_source("someone/model") == str(snapshot)


def test_a_cached_model_loads_from_the_cache_when_the_hub_is_unreachable(no_network):
    snapshot = no_network / "models--someone--model" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (no_network / "models--someone--model" / "refs").mkdir()
    (no_network / "models--someone--model" / "refs" / "main").write_text("0" * 40)
    assert model_source("someone/model") == str(snapshot)


def test_local_folders_and_bad_paths(tmp_path):
    assert model_source(str(tmp_path)) == str(tmp_path)
    assert model_source("tiny-sdxl") == "tiny-sdxl"
    with pytest.raises(ValueError, match="no such folder, and not a Hugging Face hub id"):
        model_source(str(tmp_path / "missing" / "model"))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="a file, not a model folder"):
        model_source(str(tmp_path / "weights.safetensors"))


def test_convert_on_an_unreachable_base_fails_at_once_and_writes_nothing(no_network, data_2x2, train, tmp_path,
                                                                        capsys):
    from iclora.convert import main

    final = train(data_2x2, "--max_train_steps", "1").final_dir
    capsys.readouterr()
    out = tmp_path / "converted"
    line = one_error_line(capsys, main, ["--lora_path", str(final), "--base_model", "someone/sdxl-typo",
                                         "--output_dir", str(out)])
    assert line.startswith("error: --base_model someone/sdxl-typo: the Hugging Face hub cannot be reached")
    assert not out.exists()
