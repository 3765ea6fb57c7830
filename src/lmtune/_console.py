"""The one place that talks to the terminal: log lines and progress bars.

Library code logs through ``log`` (logger "lmtune"); the CLI decides where it goes. Progress bars are
tqdm, written to stderr, shown only on the main process and only when asked for.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("lmtune")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (test runners and notebooks replace it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_cli_logging(verbose: bool = False) -> None:
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    if any(getattr(h, "_lmtune", False) for h in log.handlers):
        return
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._lmtune = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def progress(total: int, desc: str, enabled: bool, initial: int = 0, leave: bool = False) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, initial=initial, leave=leave,
                dynamic_ncols=True, file=sys.stderr, mininterval=0.5)


def quiet_libraries() -> None:
    """No progress bars from transformers or huggingface_hub (loading, converting, writing weights): lmtune shows
    its own, here, when asked for."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:  # save_pretrained's "Writing model shards" bar comes from huggingface_hub
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass
