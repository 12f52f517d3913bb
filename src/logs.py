"""What a command line run prints: iclora's own INFO lines, and none of the stack's known noise.

The entry points call setup_logging() before the slow imports, so the filters are in place
when the noisy modules log at import time:

- bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" at import
  on CPUs with AVX512-BF16 when the optional `kernels` package is missing; it then uses its
  own CPU kernel, so nothing is wrong.
- transformers says at import that its image processors fall back to PIL without
  torchvision; no pipeline of ours uses them.
- diffusers' ModelMixin.to(dtype) warns "should be kept in float32: []" even when that list
  is empty.
- The tokenizers and pipelines warn about prompts over CLIP's 77 tokens on every call (each
  training step, each image): each such message is said once.
"""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

_DROP = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "diffusers.models.modeling_utils": ("should be kept in float32: []",),
    # CLIP/Siglip image processors of pipelines we never use for images fall back to PIL.
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
}
_PIPELINES = [f"diffusers.pipelines.{p}" for p in (
    "stable_diffusion_xl.pipeline_stable_diffusion_xl", "stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint",
    "flux.pipeline_flux", "flux.pipeline_flux_inpaint", "flux.pipeline_flux_fill")]
_ONCE = {
    "transformers.tokenization_utils_base": ("Token indices sequence length is longer than",),
    **{name: ("can only handle sequences up to",) for name in _PIPELINES},
}


class _KnownNoise(logging.Filter):
    """Drops messages containing a fragment (once=False), or lets each one through once."""

    def __init__(self, fragments: tuple[str, ...], once: bool):
        super().__init__()
        self.fragments, self.once, self.seen = fragments, once, set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not any(fragment in message for fragment in self.fragments):
            return True
        if not self.once or message in self.seen:
            return False
        self.seen.add(message)
        return True


class _TqdmHandler(logging.StreamHandler):
    """Writes through tqdm, so a log line does not break a progress bar in two."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as logging.StreamHandler: never let logging end the run
            self.handleError(record)


def setup_logging() -> None:
    """iclora's INFO lines (resume, samples, fallbacks) on stderr; the known noise filtered.
    Idempotent: tests call the entry points many times in one process."""
    for table, once in ((_DROP, False), (_ONCE, True)):
        for name, fragments in table.items():
            target = logging.getLogger(name)
            if not any(isinstance(f, _KnownNoise) for f in target.filters):
                target.addFilter(_KnownNoise(fragments, once))
    package = logging.getLogger("iclora")
    if not any(isinstance(h, _TqdmHandler) for h in package.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = True  # pytest's caplog reads the root logger
