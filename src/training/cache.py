"""Disk caches of text embeddings and VAE latents, shareable between runs.

    output_dir/cache/            (or --cache_dir)
        text/<key>.safetensors     one caption's embeddings (encode_prompt)
        latents/<key>.safetensors  one composite's VAE posterior, and for concat the
                                   masked-image latents of every panel subset training can draw

A key is the SHA-256 of everything that changes the result: the caption text or the image
file's bytes, the backend, model, variant and VAE, the bucket size, the prompt length, the
grid and the panel subsets. A changed image or setting therefore gets a new key and is
encoded afresh; nothing stale can be read. Files are written under a temporary name and
renamed, so an interrupted run leaves no half-written entry.

The latent cache stores the posterior (mean, log-variance), not one sample: each step draws
its latents from it with the step's seeded RNG, exactly as encoding the image would, so a run
from cache trains what a run without it trains. Masked-image latents are the posterior mode
(as the inpaint pipelines use them), so they are cached as they are. The encoders reach the
training device only while entries are missing, the denoiser off it meanwhile (`OnDemand`),
and leave it when their cache is complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from ..backends.lora_files import match_umask
from ..data import CompositeDataset, Record
from ..panels import Grid, panel_mask

logger = logging.getLogger(__name__)
FORMAT = 1  # bump when what is stored changes
POSTERIOR = "posterior"


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_settings(cfg, backend, text: bool) -> dict:
    """What decides the encoders' weights (and for text, the prompt encoding)."""
    settings = {"format": FORMAT, "backend": backend.name, "model": cfg.model_id, "variant": cfg.variant}
    return {**settings, "max_token_length": backend.max_token_length} if text else {**settings, "vae": cfg.pretrained_vae}


def panel_subsets(grid: Grid, mask_probability: float, max_masked_panels: int) -> list[tuple[int, ...]]:
    """Every set of masked panels `sample_masked_panels` can give, plus 'all' (what an
    unmasked draw is trained as)."""
    n = grid.num_panels
    subsets = [tuple(range(n))]
    if mask_probability > 0:
        for k in range(1, min(max_masked_panels, n - 1) + 1):
            subsets += list(itertools.combinations(range(n), k))
    return subsets


def subset_name(subset) -> str:
    return "masked_" + "_".join(map(str, subset))


class _Store:
    def __init__(self, folder: Path):
        self.folder = folder
        self.hits = self.misses = 0

    def get(self, key: str, make) -> dict[str, torch.Tensor]:
        """The entry's tensors, read from disk or made (and written) now."""
        path = self.path(key, make)
        return load_file(path)

    def path(self, key: str, make) -> Path:
        """The entry's file, made (and written) now if it is not on disk yet."""
        path = self.folder / f"{key}.safetensors"
        if path.is_file():
            self.hits += 1
            return path
        self.misses += 1
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in make().items()}
        self.folder.mkdir(parents=True, exist_ok=True)
        # A temporary name of this process's own: the processes of a distributed run (or two
        # runs sharing --cache_dir) may write the same entry at once; any complete one is right.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            save_file(tensors, str(tmp))
            match_umask(tmp)  # safetensors writes 0600: runs of other users may share --cache_dir
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


class TextCache:
    """Caption -> encode_prompt's tensors (each without the batch axis), on the CPU; with
    `unconditional`, None -> the backend's `unconditional_prompt` (a dropped caption); and per
    sample-sheet prompt, the pipeline's prompt arguments (`pipeline_arguments`).
    `before_encoding()` is called before anything is encoded (not when all is on disk)."""

    def __init__(self, folder: Path, cfg, backend, captions: set[str], unconditional: bool = False,
                 sample_prompts=(), before_encoding=None):
        store, settings = _Store(folder / "text"), model_settings(cfg, backend, text=True)
        ready = before_encoding or (lambda: None)

        def encoded(make):
            ready()
            return {k: v[0] for k, v in make().items()}

        def arguments(prompt, guidance):
            ready()
            return backend.encoded_pipeline_prompt(prompt, None, guidance)

        self.embeds = {c: store.get(digest("text", settings, c), lambda c=c: encoded(lambda: backend.encode_prompt([c])))
                       for c in sorted(captions)}
        if unconditional:
            self.embeds[None] = store.get(digest("unconditional", settings),
                                          lambda: encoded(backend.unconditional_prompt))
        self.pipeline_arguments = {
            (p, g): store.get(digest("pipeline", settings, p, g), lambda p=p, g=g: arguments(p, g))
            for p, g in sample_prompts
        }
        self.hits, self.misses = store.hits, store.misses

    def batch(self, captions: list[str | None], device) -> dict[str, torch.Tensor]:
        keys = self.embeds[captions[0]].keys()
        return {k: torch.stack([self.embeds[c][k] for c in captions]).to(device) for k in keys}


class LatentCache:
    """Per composite: the VAE posterior, and (concat) the masked-image latents per panel subset.
    Read from disk per batch (only the tensors the batch needs): at 1024 px a concat entry is
    ~3 MB, too much to hold for a large dataset."""

    def __init__(self, folder: Path, cfg, backend, records: list[Record], dataset: CompositeDataset, grid: Grid,
                 device, before_encoding=None):
        store, settings = _Store(folder / "latents"), model_settings(cfg, backend, text=False)
        # Only concat and reference take a masked-image input: other entries (and keys) hold the posterior only.
        self.concat = backend.conditioning in ("concat", "reference")
        subsets = panel_subsets(grid, cfg.mask_probability, cfg.max_masked_panels) if self.concat else []
        self.entries: list[Path] = []
        for index, record in enumerate(records):
            key = digest("latents", settings, file_digest(record.image), record.size, str(grid), subsets)

            def make(index=index):
                if before_encoding is not None:
                    before_encoding()
                pixels = dataset[index]["pixels"][None].to(device)  # (1, 3, H, W)
                tensors = {POSTERIOR: backend.codec.posterior(pixels)[0]}
                for subset in subsets:
                    mask = panel_mask(list(subset), grid, *pixels.shape[-2:])[None].to(device)  # (1, 1, H, W)
                    tensors[subset_name(subset)] = backend.masked_image_latents(pixels, mask)[0]
                return tensors

            self.entries.append(store.path(key, make))
        self.hits, self.misses = store.hits, store.misses

    def latents(self, backend, indices: list[int], device) -> torch.Tensor:
        """Latents drawn from the cached posteriors, on `device` (so the RNG draws match
        those of encoding there)."""
        return backend.codec.sample(torch.stack([self._read(i, POSTERIOR) for i in indices]).to(device))

    def masked_latents(self, indices: list[int], subsets: list[tuple[int, ...]], device) -> torch.Tensor | None:
        if not self.concat:
            return None
        return torch.stack([self._read(i, subset_name(s)) for i, s in zip(indices, subsets)]).to(device)

    def _read(self, index: int, name: str) -> torch.Tensor:
        with safe_open(str(self.entries[index]), framework="pt") as f:
            return f.get_tensor(name)

    def names(self, index: int) -> list[str]:
        with safe_open(str(self.entries[index]), framework="pt") as f:
            return list(f.keys())


def cache_folder(cfg) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "cache"


class OnDemand:
    """Puts the backend's `part` (text_encoders, vae) on the training device the first time
    an entry must be encoded, the denoiser off it first: the encoders and the denoiser never
    share the device, and nothing moves when every entry is on disk already."""

    def __init__(self, backend, part: str):
        self.backend, self.part = backend, part
        self.used = False

    def __call__(self) -> None:
        if not self.used:
            self.used = True
            if self.backend.is_placed("denoiser"):  # a quantized one: loaded onto the GPU
                self.backend.place("denoiser", False)
            self.backend.place(self.part, True)


def build_caches(cfg, backend, records: list[Record], dataset: CompositeDataset, grid: Grid, device,
                 dropped_caption: str = "unconditional", sample_prompts: list[tuple[str, float]] = (), record=None):
    """(TextCache or None, LatentCache or None) as the flags ask. The encoders they cache
    for are on the training device only while entries are missing, and off it afterwards;
    `record(phase)` is called at the end of each encoding, before they leave. With the text
    cache, `sample_prompts` ((prompt, guidance) of the sample sheets) are encoded too, as the
    pipeline takes them (TextCache.pipeline_arguments). `dropped_caption`: what caption
    dropout feeds, 'unconditional' (None's entry) or 'empty' (the caption "")."""
    folder = cache_folder(cfg)
    text = latents = None
    if cfg.cache_text_embeddings:
        dropout = cfg.caption_dropout > 0
        captions = {r.caption for r in records} | ({""} if dropout and dropped_caption == "empty" else set())
        encoding = OnDemand(backend, "text_encoders")
        text = TextCache(folder, cfg, backend, captions, unconditional=dropout and dropped_caption == "unconditional",
                         sample_prompts=sample_prompts, before_encoding=encoding)
        if record is not None:
            record("caching text embeddings")
        backend.place("text_encoders", False)
        logger.info("text cache %s: %d read, %d encoded", folder, text.hits, text.misses)
    if cfg.cache_latents:
        encoding = OnDemand(backend, "vae")
        latents = LatentCache(folder, cfg, backend, records, dataset, grid, device, encoding)
        if record is not None:
            record("caching latents")
        backend.place("vae", False)
        logger.info("latent cache %s: %d read, %d encoded", folder, latents.hits, latents.misses)
    return text, latents
