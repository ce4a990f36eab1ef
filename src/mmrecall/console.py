"""What a person watching a command sees: progress bars only on a terminal (logs and CI get log lines)."""

from __future__ import annotations

import sys


def show_bars(progress: bool = True) -> bool:
    """Draw tqdm / Lightning progress bars: asked for (no --no-progress) and stderr is a terminal."""
    return progress and sys.stderr.isatty()
