"""Composite-image datasets: a folder of images with same-stem .txt captions.

Every problem in the folder is found before any model is loaded and reported in one error.
Composites of different aspect ratios train together: each is resized (never stretched:
scaled to cover, then centre-cropped by a few pixels) to its bucket size from
`panels.composite_size`, and a batch only holds samples of one bucket.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .panels import Grid, composite_size

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
MAX_UPSCALE = 2.0  # a composite whose longer side would be enlarged more than this is "too small"


class DatasetError(ValueError):
    """The data folder has problems; the message lists every offending file."""


@dataclass(frozen=True)
class Record:
    image: Path
    caption: str
    original_size: tuple[int, int]  # (height, width) as stored on disk
    size: tuple[int, int]  # (height, width) after bucketing


def scan_folder(data_dir: str | Path, image_size: int, grid: Grid, quantum: int) -> list[Record]:
    """Read captions and image headers of every image in `data_dir` (sorted by name)."""
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
            problems.append(f"{path.name}: no caption file {caption_file.name}")
            continue
        try:
            with Image.open(path) as image:
                image.verify()  # catches truncated and corrupt files without decoding pixels
            with Image.open(path) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            problems.append(f"{path.name}: unreadable image ({error.__class__.__name__})")
            continue
        if max(width, height) * MAX_UPSCALE < image_size:
            problems.append(
                f"{path.name}: {width}x{height} is too small for --image_size {image_size} "
                f"(longer side must be at least {math.ceil(image_size / MAX_UPSCALE)})"
            )
            continue
        caption = caption_file.read_text(encoding="utf-8").strip()
        bucket_w, bucket_h = composite_size(width, height, image_size, grid, quantum)
        records.append(Record(path, caption, (height, width), (bucket_h, bucket_w)))
    if problems:
        shown = "; ".join(problems[:20]) + (f"; and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise DatasetError(f"--data_dir {folder}: {len(problems)} bad file(s): {shown}")
    return records


def load_composite(path: Path, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pixels (3, H, W) in [-1, 1] at `size` = (H, W), and the crop's (top, left)."""
    height, width = size
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = max(width / image.width, height / image.height)
        resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(resized, Image.Resampling.LANCZOS)
        top, left = (resized[1] - height) // 2, (resized[0] - width) // 2
        image = image.crop((left, top, left + width, top + height))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (top, left)


class CompositeDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[Record]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        pixels, crop = load_composite(record.image, record.size)
        return {
            "index": index,
            "pixels": pixels,
            "caption": record.caption,
            "original_size": torch.tensor(record.original_size),
            "crop_top_left": torch.tensor(crop),
        }


def collate(samples: list[dict]) -> dict:
    return {
        "index": torch.tensor([s["index"] for s in samples]),
        "pixels": torch.stack([s["pixels"] for s in samples]),  # (B, 3, H, W)
        "caption": [s["caption"] for s in samples],
        "original_size": torch.stack([s["original_size"] for s in samples]),  # (B, 2)
        "crop_top_left": torch.stack([s["crop_top_left"] for s in samples]),  # (B, 2)
    }


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
