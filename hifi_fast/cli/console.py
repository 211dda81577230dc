"""What the command line says: usage errors (exit status 2) and progress lines."""
from __future__ import annotations


class CLIError(Exception):
    """A usage problem reported as ``hifi-fast: error: ...`` with exit status 2."""


class Console:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def info(self, message: str = "") -> None:
        if not self.quiet:
            print(message, flush=True)


def quiet_transformers(quiet: bool) -> None:
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
