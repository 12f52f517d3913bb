"""`--dry_run`: what training would see, printed without loading the denoiser.

    pytest tests/test_check.py
"""

import shutil

import pytest
from PIL import Image

from iclora.training.train_sdxl_ic_lora import main as train_sdxl
from iclora.training.train_flux_ic_lora import main as train_flux


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if anything tries to load a model."""
    import iclora.backends
    import iclora.training.run_setup  # first: importing it while patched would bind the refusal for good

    def refuse(*args, **kwargs):
        raise AssertionError("--dry_run loaded a model")

    monkeypatch.setattr(iclora.backends, "load_backend", refuse)
    monkeypatch.setattr("iclora.training.run_setup.load_backend", refuse)


def test_dry_run_reports_buckets_tokens_markers_and_steps(data_dir, tmp_path, no_models, capsys):
    # A wide composite (a second bucket, cropped) and a caption with wrong markers.
    shutil.copy(data_dir / "00000.png", data_dir / "wide.png")
    Image.open(data_dir / "00000.png").resize((130, 60)).save(data_dir / "wide.png")
    (data_dir / "wide.txt").write_text("short; [IMAGE 1] one; [IMAGE 2] two")
    (data_dir / "00001.txt").write_text("a set; [IMAGE 1] one; [IMAGE 2]; [IMAGE 3] three; [IMAGE 4] four")
    out = tmp_path / "out"
    report = train_sdxl(["--data_dir", str(data_dir), "--output_dir", str(out), "--model_id", "tiny-sdxl",
                         "--image_size", "64", "--batch_size", "2", "--gradient_accumulation_steps", "2",
                         "--num_epochs", "3", "--max_token_length", "150", "--dry_run"])
    printed = capsys.readouterr().out
    assert not out.exists()  # nothing written
    assert report.num_images == 5
    assert {size: b["count"] for size, b in report.buckets.items()} == {(32, 64): 1, (64, 64): 4}
    assert report.buckets[(64, 64)]["max_crop"] == 0.0
    assert 0.0 < report.buckets[(32, 64)]["max_crop"] < 0.2  # 130x60 cover-resized to 69x32, cropped to 64x32
    clip = report.encoders[0]
    assert clip.limit == 150 and clip.lengths["wide.png"] == len("short;[IMAGE1]one;[IMAGE2]two")  # 1 byte = 1 token, spaces split
    assert set(clip.cut) == {f"0000{i}.png" for i in (0, 2, 3)}  # the toy captions are > 150 bytes
    assert report.marker_problems == {"wide.png": "missing marker(s) [IMAGE 3] [IMAGE 4] of the 2x2 grid",
                                      "00001.png": "empty panel(s): [IMAGE 2] with no description"}
    # 2 batches of the 64x64 bucket + 1 of the 32x64 one = 3 micro-batches, 2 accumulated: 2 steps/epoch.
    assert (report.steps_per_epoch, report.max_train_steps, report.epochs) == (2, 6, 3.0)
    for text in ["images: 5", "64x64: 4 composite(s)", "reads 150", "3 caption(s) cut", "wide.png: missing marker(s) [IMAGE 3] [IMAGE 4]",
                 "00001.png: empty panel(s): [IMAGE 2]", "2 with missing, empty or mismatched markers",
                 "6 steps = 3.0 epochs"]:
        assert text in printed


def test_dry_run_flux_counts_t5_tokens(data_dir, tmp_path, no_models):
    report = train_flux(["--data_dir", str(data_dir), "--output_dir", str(tmp_path / "o"), "--model_id", "tiny-flux",
                         "--image_size", "64", "--max_train_steps", "7", "--dry_run"])
    names = [e.name for e in report.encoders]
    assert "T5" in names[1] and report.encoders[1].limit == 511 and not report.encoders[1].cut
    assert report.encoders[0].cut  # CLIP's 75 tokens: the pooled vector sees the start only
    assert report.max_train_steps == 7


def test_dry_run_still_rejects_bad_data(data_dir, no_models, capsys):
    (data_dir / "00001.txt").unlink()
    with pytest.raises(ValueError, match="no caption file"):
        train_sdxl(["--data_dir", str(data_dir), "--model_id", "tiny-sdxl", "--image_size", "64", "--dry_run"])
