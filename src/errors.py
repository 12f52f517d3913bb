"""Errors shared by the library and its command lines, below both: the training loop raises
them, `cli.run_cli` turns them into one `error:` line and an exit status."""

from __future__ import annotations


class RunStopped(RuntimeError):
    """A run that stopped for a reason the user must see (a non-finite loss, a signal, a full
    disk): its message is the one line printed, `exit_code` the status."""

    exit_code = 1
