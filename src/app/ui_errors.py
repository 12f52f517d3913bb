"""How the page shows a handler's errors: as the command line's one `error:` line, in the
status box of the tab that raised it. Every tab module (ui.py, ui_data.py, ui_train.py)
wraps its handlers in `shows_errors`."""

from __future__ import annotations

import functools
import logging

import gradio as gr

logger = logging.getLogger(__name__)


def shows_errors(outputs: int):
    """A handler whose bad input shows as one line in its status box (its first output),
    the other outputs left as they were."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (ValueError, OSError, NotImplementedError, RuntimeError) as error:
                if not isinstance(error, (ValueError, OSError, NotImplementedError)):
                    logger.exception("unexpected error")
                message = f"error: {error}"
                return message if outputs == 1 else (message, *[gr.skip()] * (outputs - 1))

        return run

    return wrap
