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
- bitsandbytes' optional kernel loader says at import that it skips a "publisher trust
  check" when the hub is offline; the kernel is not used.
- transformers' tokenizers say "Token indices sequence length is longer than ..." when a
  caption is counted in full: we count to cut it into chunks (SDXL, --max_token_length) or
  to say how it is cut; no sequence ever reaches an encoder longer than it reads.
- diffusers says "No LoRA keys associated to CLIPTextModel ..." for each text encoder when a
  LoRA trains none: ours never do.
- The FLUX pipelines say on every call that CLIP or T5 cut a long prompt; the FLUX backend
  says it once, with what it means (CLIP gives only the pooled vector; T5 reads 512).
- The SDXL pipelines' truncation notice (only for prompts they encode themselves) is said once.

Progress bars are tqdm's on a terminal; when stderr is a file or a pipe they print a plain
line when they start, every PLAIN_INTERVAL seconds and at the end, instead of redrawing one
line with carriage returns (a log file would hold every redraw).
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

_FLUX_PIPELINES = [f"diffusers.pipelines.flux.{p}" for p in ("pipeline_flux", "pipeline_flux_inpaint", "pipeline_flux_fill")]
_SDXL_PIPELINES = [f"diffusers.pipelines.stable_diffusion_xl.{p}" for p in (
    "pipeline_stable_diffusion_xl", "pipeline_stable_diffusion_xl_inpaint")]
_DROP = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check",),
    "diffusers.models.modeling_utils": ("should be kept in float32: []",),
    "diffusers.loaders.lora_base": ("No LoRA keys associated to",),
    "diffusers.loaders.peft": ("No LoRA keys associated to",),
    # CLIP/Siglip image processors of pipelines we never use for images fall back to PIL.
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    "transformers.tokenization_utils_base": ("Token indices sequence length is longer than",),
    **{name: ("can only handle sequences up to", "`max_sequence_length` is set to") for name in _FLUX_PIPELINES},
}
_ONCE = {name: ("can only handle sequences up to",) for name in _SDXL_PIPELINES}
PLAIN_INTERVAL = 30.0  # seconds between a progress bar's plain lines off a terminal


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
            tqdm.write(self.format(record), file=sys.stderr)  # today's stderr, not the one at set-up
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


class _PlainLines(tqdm):
    """A progress bar for a log file or a pipe: one plain line when it starts (unless it is a
    bar that does not stay, leave=False), then at most one every PLAIN_INTERVAL seconds, and
    one when it ends; no carriage returns, no bar."""

    def __init__(self, *args, **kwargs):
        # Set before tqdm's __init__, which draws the first line.
        self._next_line = 0.0 if kwargs.get("leave", True) is not False else time.monotonic() + PLAIN_INTERVAL
        kwargs.setdefault("bar_format", "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        # Every update reaches display(), which alone decides when a line is due: tqdm's own
        # rate limits (0.1 s, adaptive miniters) would skip the end of a fast bar.
        kwargs.setdefault("mininterval", 0)
        kwargs.setdefault("miniters", 1)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        # msg="" asks to clear the line (before a log line, at close): a log has none to clear.
        if msg is None and time.monotonic() >= self._next_line:
            self._line()
        return True

    def clear(self, nolock=False):
        pass  # before a log line (tqdm.write): a log has no line to clear

    def _line(self) -> None:
        self.fp.write(f"{self}\n")
        self.fp.flush()
        self._next_line, self._shown = time.monotonic() + PLAIN_INTERVAL, self.n

    def close(self):
        if not getattr(self, "disable", True) and getattr(self, "sp", None) is not None:
            if self.leave is not False and self.n != getattr(self, "_shown", None):
                self._line()  # the end: what was done, in how long
            self.sp = None  # tqdm's close would redraw and end the line again
        super().close()


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm's bar on a terminal; plain periodic lines (_PlainLines) when stderr is not one."""
    stream = kwargs.get("file") or sys.stderr
    terminal = getattr(stream, "isatty", lambda: False)()
    return (tqdm if terminal else _PlainLines)(iterable, **kwargs)


def pipeline_progress(pipe, **kwargs) -> None:
    """A diffusers pipeline's denoising bar through progress_bar (its own is plain tqdm)."""
    pipe.progress_bar = lambda iterable=None, total=None: progress_bar(iterable, total=total, **kwargs)
