"""Composite datasets (iclora.data): folder validation, loading without stretching, buckets."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from iclora.data import (
    BucketBatchSampler,
    CompositeDataset,
    DatasetError,
    Record,
    collate,
    load_composite,
    scan_folder,
)
from iclora.panels import Grid, composite_size

G2x2 = Grid(2, 2)


def _image(path: Path, width: int, height: int, caption: str | None = "a set", colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


# ---- scanning ---------------------------------------------------------------------------------


def test_scan_reads_every_composite_sorted_with_captions(data_2x2):
    records = scan_folder(data_2x2, 64, G2x2, 8)
    assert [r.image.name for r in records] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    for record in records:
        assert record.caption == record.image.with_suffix(".txt").read_text().strip()
        assert record.caption.startswith("A set of four panels")
        assert record.original_size == (64, 64) and record.size == (64, 64)


def test_scan_strips_captions_and_takes_other_suffixes(tmp_path):
    _image(tmp_path / "b.JPG", 64, 64, caption="  two cats \n")
    _image(tmp_path / "a.webp", 96, 64, caption="one dog")
    (tmp_path / "notes.md").write_text("not an image")
    records = scan_folder(tmp_path, 64, G2x2, 8)
    assert [(r.image.name, r.caption) for r in records] == [("a.webp", "one dog"), ("b.JPG", "two cats")]
    assert records[0].original_size == (64, 96)  # (height, width)
    assert records[0].size == (48, 64)  # 64 x 42.7 -> 64 x 48: panels on latent pixels


def test_nonexistent_folder(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        scan_folder(tmp_path / "missing", 64, G2x2, 8)


def test_empty_folder_and_folder_of_captions_only(tmp_path):
    with pytest.raises(DatasetError, match="no images"):
        scan_folder(tmp_path, 64, G2x2, 8)
    (tmp_path / "a.txt").write_text("caption without image")
    with pytest.raises(DatasetError, match=r"no images \(.jpeg, .jpg, .png, .webp\)"):
        scan_folder(tmp_path, 64, G2x2, 8)


def test_missing_caption(data_dir):
    (data_dir / "00002.txt").unlink()
    with pytest.raises(DatasetError, match="00002.png: no caption file 00002.txt"):
        scan_folder(data_dir, 64, G2x2, 8)


def test_unreadable_images(data_dir):
    (data_dir / "x.png").write_bytes(b"this is not a png at all")
    (data_dir / "x.txt").write_text("garbage")
    good = (data_dir / "00001.png").read_bytes()
    (data_dir / "00001.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(DatasetError) as info:
        scan_folder(data_dir, 64, G2x2, 8)
    message = str(info.value)
    assert "x.png: unreadable image" in message
    assert "00001.png: unreadable image" in message


def test_too_small_images(tmp_path):
    _image(tmp_path / "ok.png", 32, 16)  # longer side 32: upscaled exactly 2x to 64
    _image(tmp_path / "small.png", 31, 31)
    with pytest.raises(DatasetError) as info:
        scan_folder(tmp_path, 64, G2x2, 8)
    message = str(info.value)
    assert "small.png: 31x31 is too small for --image_size 64 (longer side must be at least 32)" in message
    assert "ok.png" not in message


def test_every_problem_in_one_single_line_error(data_dir):
    (data_dir / "00000.txt").unlink()
    (data_dir / "broken.png").write_bytes(b"\x89PNG garbage")
    (data_dir / "broken.txt").write_text("x")
    _image(data_dir / "tiny.png", 8, 8)
    with pytest.raises(DatasetError) as info:
        scan_folder(data_dir, 64, G2x2, 8)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"--data_dir {data_dir}: 3 bad file(s): ")
    for name in ("00000.png: no caption", "broken.png: unreadable", "tiny.png: 8x8 is too small"):
        assert name in message


def test_long_problem_lists_are_shortened(tmp_path):
    for i in range(25):
        _image(tmp_path / f"{i:02d}.png", 64, 64, caption=None)
    with pytest.raises(DatasetError, match=r"25 bad file\(s\): .*; and 5 more: 20.png, 21.png, 22.png, 23.png, 24.png$"):
        scan_folder(tmp_path, 64, G2x2, 8)


# ---- loading --------------------------------------------------------------------------------


def _disc_image(path: Path, width: int, height: int, radius: int) -> Path:
    image = Image.new("RGB", (width, height), (0, 0, 0))
    cx, cy = width // 2, height // 2
    ImageDraw.Draw(image).ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=(255, 255, 255))
    image.save(path)
    return path


def _extent(pixels: torch.Tensor) -> tuple[int, int]:
    """Width and height of the bright blob in a (3, H, W) tensor in [-1, 1]."""
    bright = pixels.mean(0) > 0  # (H, W)
    rows, cols = bright.any(1).nonzero(), bright.any(0).nonzero()
    return int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)


def test_load_composite_crops_instead_of_stretching(tmp_path):
    # A 2:1 image into a square: scaled to cover (unchanged here) and centre-cropped, so
    # a circle stays a circle; stretching would halve its width.
    path = _disc_image(tmp_path / "wide.png", 256, 128, radius=40)
    pixels, (top, left) = load_composite(path, (128, 128))
    assert pixels.shape == (3, 128, 128) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert (top, left) == (0, 64)
    width, height = _extent(pixels)
    assert abs(width - height) <= 1 and abs(width - 81) <= 2


def test_load_composite_to_its_bucket_keeps_the_aspect(tmp_path):
    _disc_image(tmp_path / "tall.png", 128, 192, radius=50)
    (tmp_path / "tall.txt").write_text("tall")
    [record] = scan_folder(tmp_path, 128, G2x2, 8)
    assert record.size == (128, 80)  # 85.3 x 128 rounded to panels of whole latent pixels
    pixels, (top, left) = load_composite(record.image, record.size)
    assert pixels.shape == (3, 128, 80)
    assert top == 0 and 0 < left <= 8  # cropped by a few pixels, not squeezed
    width, height = _extent(pixels)
    assert abs(width - height) <= 1 and abs(height - 67) <= 2  # scaled by 2/3 both ways


def test_dataset_items_and_collate(data_2x2):
    records = scan_folder(data_2x2, 64, G2x2, 8)
    dataset = CompositeDataset(records)
    assert len(dataset) == 4
    item = dataset[1]
    assert item["index"] == 1
    assert item["pixels"].shape == (3, 64, 64)
    assert item["caption"] == records[1].caption
    assert item["original_size"].tolist() == [64, 64] and item["crop_top_left"].tolist() == [0, 0]
    # The pixels are the image's, scaled to [-1, 1].
    expected = np.asarray(Image.open(records[1].image).convert("RGB"), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(item["pixels"].permute(1, 2, 0), torch.from_numpy(expected), atol=1e-6)
    batch = collate([dataset[0], dataset[3]])
    assert batch["index"].tolist() == [0, 3]
    assert batch["pixels"].shape == (2, 3, 64, 64)
    assert batch["caption"] == [records[0].caption, records[3].caption]
    assert batch["original_size"].shape == (2, 2) and batch["crop_top_left"].shape == (2, 2)


def test_dataset_without_pixels_gives_the_same_samples_undecoded(tmp_path, monkeypatch):
    """With cached latents training reads no pixels: the rest of each sample (the SDXL crop
    conditioning included) must be what decoding gives."""
    _disc_image(tmp_path / "tall.png", 128, 192, radius=50)
    _disc_image(tmp_path / "wide.png", 256, 120, radius=40)
    for name in ("tall", "wide"):
        (tmp_path / f"{name}.txt").write_text(name)
    records = scan_folder(tmp_path, 128, G2x2, 8, allow_crop=True)
    decoded = [CompositeDataset(records)[i] for i in range(len(records))]
    monkeypatch.setattr("iclora.data.load_composite", lambda *a: pytest.fail("decoded an image"))
    undecoded = [CompositeDataset(records, pixels=False)[i] for i in range(len(records))]
    assert all(d["crop_top_left"].sum() > 0 for d in decoded)  # both are cropped
    for full, light in zip(decoded, undecoded):
        assert light.keys() == full.keys() - {"pixels"}
        assert all(torch.equal(torch.as_tensor(light[k]), torch.as_tensor(full[k])) for k in light if k != "caption")
        assert light["caption"] == full["caption"]
    assert "pixels" not in collate(undecoded)


# ---- buckets --------------------------------------------------------------------------------


def _records(sizes: list[tuple[int, int]]) -> list[Record]:
    return [Record(Path(f"{i}.png"), "c", size, size) for i, size in enumerate(sizes)]


def test_bucket_sampler_never_mixes_sizes_and_covers_every_sample():
    sizes = [(64, 64)] * 7 + [(64, 48)] * 5 + [(48, 64)] * 3
    records = _records(sizes)
    sampler = BucketBatchSampler(records, batch_size=2, seed=3)
    assert len(sampler) == 4 + 3 + 2
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        for batch in batches:
            assert 1 <= len(batch) <= 2
            assert len({records[i].size for i in batch}) == 1, batch
        flat = [i for batch in batches for i in batch]
        assert sorted(flat) == list(range(len(records)))
        orders.append(flat)
    assert len({tuple(o) for o in orders}) > 1  # reshuffled between epochs


def test_bucket_sampler_order_is_a_function_of_seed_and_epoch():
    records = _records([(64, 64)] * 6 + [(64, 48)] * 6)

    def order(seed, epoch):
        sampler = BucketBatchSampler(records, batch_size=4, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1, 2) == order(1, 2)
    assert order(1, 2) != order(2, 2)


def test_mixed_aspect_folder_gets_two_buckets(tmp_path):
    for i in range(3):
        _image(tmp_path / f"square{i}.png", 128, 128)
        _image(tmp_path / f"tall{i}.png", 128, 192)
    records = scan_folder(tmp_path, 128, G2x2, 8)
    assert Counter(r.size for r in records) == {(128, 128): 3, (128, 80): 3}
    for r in records:
        (h, w), (bh, bw) = r.original_size, r.size
        assert (bw, bh) == composite_size(w, h, 128, G2x2, 8)
        assert abs(bw - bh * w / h) <= 8  # aspect kept up to half a 16 px rounding step
    sampler = BucketBatchSampler(records, batch_size=2, seed=0)
    for batch in sampler:
        assert len({records[i].size for i in batch}) == 1
