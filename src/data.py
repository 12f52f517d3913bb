"""Composite-image datasets: a folder of images with same-stem .txt captions.

Every problem in the folder is found before any model is loaded and reported in one error:
each image is decoded in full (a truncated file fails here, not at step 0), each caption
must be UTF-8 (a BOM is dropped). Composites of different aspect ratios train together:
each is resized (never stretched: scaled to cover, then centre-cropped by a few pixels) to
its bucket size from `panels.composite_size` (longer side or area), and a batch only holds samples of one
bucket. A composite whose bucket would crop more than MAX_CROP of a side (and more than the
one grid step that rounding may cost) is refused unless allowed (`--allow_crop`). Pixels are read as 8-bit RGB by `images.open_rgb8` (16-bit,
palette and transparent images included), as inference reads them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .images import open_rgb8
from .panels import Grid, bucket_scale, composite_size

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
MAX_UPSCALE = 2.0  # a composite whose longer side would be enlarged more than this is "too small"
MAX_CROP = 0.05  # the most of either side the centre crop to a bucket may cut without --allow_crop
SHOWN_PROBLEMS = 20  # problems described in full in the error; the rest are named


class DatasetError(ValueError):
    """The data folder has problems; the message lists every offending file."""


@dataclass(frozen=True)
class Record:
    image: Path
    caption: str
    original_size: tuple[int, int]  # (height, width) as stored on disk
    size: tuple[int, int]  # (height, width) after bucketing


def scan_folder(data_dir: str | Path, image_size: int, grid: Grid, quantum: int,
                allow_crop: bool = False, bucket_by: str = "longest") -> list[Record]:
    """Read captions and decode every image in `data_dir` (sorted by name); each bucket from
    `composite_size` with `bucket_by`."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DatasetError(f"--data_dir {folder}: no such folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DatasetError(f"--data_dir {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    records, problems = [], []
    for path in images:
        caption_file = path.with_suffix(".txt")
        if not caption_file.is_file():
            problems.append((path.name, f"{path.name}: no caption file {caption_file.name}"))
            continue
        try:
            caption = read_caption(caption_file)
        except ValueError as error:
            problems.append((caption_file.name, f"{caption_file.name}: {error}"))
            continue
        try:
            with Image.open(path) as image:
                image.load()  # decodes every pixel: verify() alone passes truncated JPEGs
                width, height = image.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            problems.append((path.name, f"{path.name}: unreadable image ({error.__class__.__name__}: {error})"))
            continue
        scale = bucket_scale(width, height, image_size, bucket_by)
        if scale > MAX_UPSCALE:
            longer = max(width, height)
            problems.append((path.name,
                f"{path.name}: {width}x{height} is too small for --image_size {image_size} "
                f"(longer side must be at least {math.ceil(round(longer * scale / MAX_UPSCALE, 6))})"
            ))
            continue
        bucket_w, bucket_h = composite_size(width, height, image_size, grid, quantum, bucket_by)
        problem = crop_problem(width, height, bucket_w, bucket_h, grid, quantum)
        if problem and not allow_crop:
            problems.append((path.name, f"{path.name}: {width}x{height} {problem} (--allow_crop trains it anyway)"))
            continue
        records.append(Record(path, caption, (height, width), (bucket_h, bucket_w)))
    if problems:
        shown = "; ".join(text for _, text in problems[:SHOWN_PROBLEMS])
        if len(problems) > SHOWN_PROBLEMS:
            shown += f"; and {len(problems) - SHOWN_PROBLEMS} more: " + ", ".join(n for n, _ in problems[SHOWN_PROBLEMS:])
        raise DatasetError(f"--data_dir {folder}: {len(problems)} bad file(s): {shown}")
    return records


def read_caption(path: Path) -> str:
    """A caption file's text: UTF-8, a BOM dropped, stripped; ValueError naming the bad byte."""
    try:
        return Path(path).read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start})") from None


def crop_problem(width: int, height: int, bucket_w: int, bucket_h: int, grid: Grid, quantum: int) -> str | None:
    """What the centre crop to a bucket would cut from a width x height composite, when that
    is more than MAX_CROP of a side; else None. Rounding to whole panels crops up to one grid
    step: more than that and MAX_CROP means the shape does not fit the training size at all."""
    kept_w, kept_h = crop_kept(width, height, bucket_w, bucket_h)
    cut_w, cut_h = bucket_w / kept_w - bucket_w, bucket_h / kept_h - bucket_h  # bucket pixels lost
    too_wide = cut_w > max(MAX_CROP * bucket_w / kept_w, grid.cols * quantum)
    too_tall = cut_h > max(MAX_CROP * bucket_h / kept_h, grid.rows * quantum)
    if not (too_wide or too_tall):
        return None
    side, kept = ("width", kept_w) if too_wide else ("height", kept_h)
    return f"would be cropped to {kept:.1%} of its {side} to fit {bucket_w}x{bucket_h} for the {grid} grid"


def crop_kept(width: int, height: int, bucket_w: int, bucket_h: int) -> tuple[float, float]:
    """Fractions of the width and height that survive `load_composite`'s scale-to-cover and
    centre crop to a bucket."""
    scale = max(bucket_w / width, bucket_h / height)
    return min(1.0, bucket_w / (width * scale)), min(1.0, bucket_h / (height * scale))


def cover_crop(width: int, height: int, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """`load_composite`'s geometry for a width x height image and a bucket `size` = (H, W):
    the (width, height) it is resized to (scaled to cover) and the centre crop's (top, left)."""
    bucket_h, bucket_w = size
    scale = max(bucket_w / width, bucket_h / height)
    resized = (max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale)))
    return resized, ((resized[1] - bucket_h) // 2, (resized[0] - bucket_w) // 2)


def load_composite(path: Path, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pixels (3, H, W) in [-1, 1] at `size` = (H, W), and the crop's (top, left)."""
    height, width = size
    image = open_rgb8(path)
    resized, (top, left) = cover_crop(image.width, image.height, size)
    image = image.resize(resized, Image.Resampling.LANCZOS)
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (top, left)


class CompositeDataset(torch.utils.data.Dataset):
    """Samples of `records`; with pixels=False without decoding the images (when training
    reads cached latents: decoding a 1024 px composite costs ~30 ms of host time)."""

    def __init__(self, records: list[Record], pixels: bool = True):
        self.records = records
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        sample = {"index": index, "caption": record.caption, "original_size": torch.tensor(record.original_size)}
        if self.pixels:
            sample["pixels"], crop = load_composite(record.image, record.size)
        else:
            _, crop = cover_crop(record.original_size[1], record.original_size[0], record.size)
        sample["crop_top_left"] = torch.tensor(crop)
        return sample


def collate(samples: list[dict]) -> dict:
    batch = {
        "index": torch.tensor([s["index"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "original_size": torch.stack([s["original_size"] for s in samples]),  # (B, 2)
        "crop_top_left": torch.stack([s["crop_top_left"] for s in samples]),  # (B, 2)
    }
    if "pixels" in samples[0]:
        batch["pixels"] = torch.stack([s["pixels"] for s in samples])  # (B, 3, H, W)
    return batch


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of indices that share one bucket size. The order is a pure function of
    (seed, epoch), so a resumed run replays exactly the batches of an uninterrupted one."""

    def __init__(self, records: list[Record], batch_size: int, seed: int):
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, record in enumerate(records):
            buckets[record.size].append(index)
        self.buckets = [buckets[key] for key in sorted(buckets)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        batches = []
        for indices in self.buckets:
            order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]

    def __len__(self) -> int:
        return sum(math.ceil(len(b) / self.batch_size) for b in self.buckets)
