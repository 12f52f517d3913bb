"""What a training run would see, without loading the denoiser: `--dry_run`.

    python src/training/train_sdxl_ic_lora.py --config examples/sdxl_2x2.yaml --dry_run

Prints the composites found and their aspect buckets (their size against image_size², and
how much of each composite the resize crops away), every caption's length in tokens for each text encoder (and the
captions that will be cut), the panel markers of each caption against the grid, and the
steps and epochs the settings give, and the memory estimate (prepare/memory.py; the models
built from their configs on the meta device). Only tokenizers are loaded.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field

from ..backends.registry import backend_spec
from ..data import Record, scan_folder
from ..panels import Grid
from .markers import check_markers, find_markers



@dataclass
class EncoderCheck:
    name: str
    limit: int  # content tokens read
    lengths: dict[str, int]  # image name -> content tokens of its caption
    cut: dict[str, str] = field(default_factory=dict)  # image name -> the text that is lost


@dataclass
class CheckReport:
    num_images: int
    buckets: dict[tuple[int, int], dict]  # (H, W) -> {"count", "max_crop", "mean_crop"}
    encoders: list[EncoderCheck]
    marker_problems: dict[str, str]  # image name -> what is wrong
    with_markers: int
    steps_per_epoch: int
    max_train_steps: int
    epochs: float
    memory: object = None  # prepare.memory.Estimate, when the model's configs could be read


def crop_fraction(record: Record) -> float:
    """Share of the composite's area that the cover-resize + centre crop of data.py drops."""
    (h, w), (bh, bw) = record.original_size, record.size
    scale = max(bw / w, bh / h)
    resized_w, resized_h = max(bw, round(w * scale)), max(bh, round(h * scale))
    return 1.0 - (bw * bh) / (resized_w * resized_h)


def load_tokenizers(backend: str, model_id: str, max_token_length: int | None) -> list[tuple[str, object, int]]:
    """(name, tokenizer, content tokens read) for each text encoder of the model."""
    return backend_spec(backend).caption_tokenizers(model_id, max_token_length)


def check_encoder(name: str, tokenizer, limit: int, records: list[Record]) -> EncoderCheck:
    specials = len(tokenizer("").input_ids)  # CLIP: BOS + EOS; T5: EOS
    front = 1 if tokenizer("").input_ids[0] == getattr(tokenizer, "bos_token_id", None) else 0
    result = EncoderCheck(name, limit, {})
    for record in records:
        ids = tokenizer(record.caption, truncation=False).input_ids
        content = ids[front : len(ids) - (specials - front)]
        result.lengths[record.image.name] = len(content)
        if len(content) > limit:
            result.cut[record.image.name] = tokenizer.decode(content[limit:]).strip()
    return result


def schedule(records: list[Record], batch_size: int, accumulation: int, num_epochs: int,
             max_train_steps: int | None, processes: int) -> tuple[int, int, float]:
    """(steps per epoch, total steps, epochs) as the trainer computes them."""
    buckets: dict[tuple[int, int], int] = defaultdict(int)
    for record in records:
        buckets[record.size] += 1
    batches = sum(math.ceil(n / batch_size) for n in buckets.values())
    per_epoch = max(1, math.ceil(batches / processes / accumulation))
    total = max_train_steps or num_epochs * per_epoch
    return per_epoch, total, total / per_epoch


def check_training_data(cfg) -> CheckReport:
    """The dry-run report for a TrainConfig (nothing written, no model weights loaded)."""
    from ..backends import backend_class

    grid = Grid.parse(cfg.grid)
    records = scan_folder(cfg.data_dir, cfg.image_size, grid, backend_class(cfg.backend).pixel_quantum,
                          bucket_by=cfg.bucket_by)
    buckets: dict[tuple[int, int], list[float]] = defaultdict(list)
    for record in records:
        buckets[record.size].append(crop_fraction(record))
    bucket_stats = {size: {"count": len(c), "max_crop": max(c), "mean_crop": sum(c) / len(c)}
                    for size, c in sorted(buckets.items())}
    encoders = [check_encoder(name, tok, limit, records)
                for name, tok, limit in load_tokenizers(cfg.backend, cfg.model_id, cfg.max_token_length)]
    problems = {r.image.name: why for r in records if (why := check_markers(r.caption, grid))}
    with_markers = sum(1 for r in records if find_markers(r.caption))
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch, total, epochs = schedule(records, cfg.batch_size, cfg.gradient_accumulation_steps, cfg.num_epochs,
                                        cfg.max_train_steps, processes)
    return CheckReport(len(records), bucket_stats, encoders, problems, with_markers, per_epoch, total, epochs)


def print_report(report: CheckReport, cfg) -> None:
    print(f"dry run: {cfg.data_dir}, grid {cfg.grid}, image_size {cfg.image_size}, bucket_by {cfg.bucket_by} "
          "(no model loaded, nothing written)")
    print(f"images: {report.num_images}")
    print("buckets (height x width):")
    for (h, w), stats in report.buckets.items():
        print(f"  {h}x{w}: {stats['count']} composite(s), {h * w / cfg.image_size**2:.0%} of image_size² pixels, "
              f"crop mean {stats['mean_crop']:.1%} max {stats['max_crop']:.1%}")
    print("caption tokens per text encoder:")
    for enc in report.encoders:
        lengths = list(enc.lengths.values())
        print(f"  {enc.name}: reads {enc.limit}; min {min(lengths)} mean {sum(lengths) / len(lengths):.0f} "
              f"max {max(lengths)}; {len(enc.cut)} caption(s) cut")
        for name, lost in list(enc.cut.items())[:10]:
            print(f"    {name}: {enc.lengths[name]} tokens, loses: {lost[:80]!r}{'...' if len(lost) > 80 else ''}")
        if len(enc.cut) > 10:
            print(f"    ... and {len(enc.cut) - 10} more")
    lengths = backend_spec(cfg.backend).max_token_lengths  # the first: what is read without the flag
    longer = [str(n) for n in lengths if n > (cfg.max_token_length or lengths[0])]
    if longer and any(enc.cut for enc in report.encoders):
        print(f"  (--max_token_length {' or '.join(longer)} reads longer captions)")
    print(f"markers: {report.with_markers} of {report.num_images} caption(s) have panel markers; "
          f"{len(report.marker_problems)} with missing, empty or mismatched markers for the {cfg.grid} grid")
    for name, why in list(report.marker_problems.items())[:10]:
        print(f"  {name}: {why}")
    print(f"schedule: {report.steps_per_epoch} optimizer step(s) per epoch (batch {cfg.batch_size} x "
          f"{cfg.gradient_accumulation_steps} accumulated); {report.max_train_steps} steps = {report.epochs:.1f} epochs")


def dry_run(cfg) -> CheckReport:
    from .memory import report as memory_report

    report = check_training_data(cfg)
    print_report(report, cfg)
    report.memory = memory_report(cfg, report.buckets)  # last: its line ends the output
    return report
