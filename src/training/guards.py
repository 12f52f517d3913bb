"""What stops a run early, and how it stops: at once for a non-finite loss or gradient
(nothing more is written from those weights), at the next step boundary for SIGINT and
SIGTERM (a resumable checkpoint first). Every rank takes the same decision: the flags are
gathered from every process before anyone acts on them."""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path

import torch

from ..errors import RunStopped
from .checkpoints import find_checkpoints
from .distributed import count_non_finite

RESUME_HINT = "continue with the same command and --resume_from_checkpoint latest"


class NonFinite(RunStopped):
    exit_code = 1


class Interrupted(RunStopped):
    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopSignals:
    """While active, SIGINT / SIGTERM only set `received` (the loop finishes its step and
    saves); a second SIGINT raises KeyboardInterrupt at once, for a user who will not wait."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def agree(accelerator, loss: torch.Tensor, signals: StopSignals) -> tuple[bool, int | None]:
    """(is the loss finite on every rank, the signal any rank received). One `isfinite` per
    micro-batch; with several processes one tiny all-reduce, so all stop together."""
    bad = ~torch.isfinite(loss.detach())
    if accelerator.num_processes == 1:
        return not bool(bad), signals.received
    flags = torch.stack([bad.float(), torch.tensor(float(signals.received or 0), device=loss.device)])
    flags = accelerator.gather(flags[None]).amax(0)  # (2,): any rank's bad loss, largest signal number
    return flags[0].item() == 0, int(flags[1].item()) or None


def non_finite(step: int, what: str | float, output_dir: Path) -> NonFinite:
    """The error for a non-finite loss (this process's loss value) or gradient (a sentence)
    found in `step`, before its optimizer step."""
    if isinstance(what, float):
        what = f"the loss is {what}" if not math.isfinite(what) else "the loss is not finite on another process"
    newest = find_checkpoints(output_dir)
    kept = f"the newest checkpoint, {newest[-1]}, is kept" if newest else "no checkpoint was written"
    return NonFinite(f"step {step}: {what}; training stopped before the optimizer step, "
                     f"no final model written and {kept} (try a lower --learning_rate)")


def check_finite_weights(params, step: int, destination: Path) -> None:
    """Nothing is saved from weights holding a NaN or an infinity."""
    bad = count_non_finite(params)  # with a sharded denoiser, over every process's shards
    if bad:
        raise NonFinite(f"step {step}: {bad} trainable tensors are not finite; {destination} not written")
