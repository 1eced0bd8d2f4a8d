"""The one place figures are made and written: matplotlib on its headless backend, PNGs written
atomically (a crash never leaves half a picture). Used by the evaluation report, the study report
and Grad-CAM panels."""

from __future__ import annotations

from cxrlt.core.fileio import atomic_path

GROUP_COLOURS = {"head": "tab:blue", "medium": "tab:orange", "tail": "tab:red"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 110) -> None:
    """Write `fig` as a PNG at `path` (atomic) and close it."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
