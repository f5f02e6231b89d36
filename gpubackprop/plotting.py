"""Training curves as a PNG (for ``gpubackprop train --plot``).

matplotlib is optional (``pip install gpubackprop[plot]``) and imported only here, only when a
plot is drawn.  The figure is drawn on matplotlib's Agg canvas directly, without pyplot, so
drawing neither opens a window nor changes the caller's matplotlib backend.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MATPLOTLIB_HINT", "plot_history", "require_matplotlib"]

MATPLOTLIB_HINT = "plotting needs matplotlib; install it with: pip install 'gpubackprop[plot]'"


def require_matplotlib() -> None:
    """Raise ImportError with the install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{MATPLOTLIB_HINT} ({error})") from None


def plot_history(
    history: dict[str, list[float]],
    path: str | os.PathLike,
    title: str | None = None,
    loss_label: str = "loss",
) -> Path:
    """Draw the per-epoch curves of ``history`` (``History.history``: "loss", "val_loss",
    "accuracy", "val_accuracy", ...) into a PNG at ``path``: loss on the left, accuracy on the
    right when the history has any.  Returns the path written."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not history.get("loss"):
        raise ValueError("history has no 'loss' values to plot")
    epochs = list(range(1, len(history["loss"]) + 1))
    has_accuracy = bool(history.get("accuracy") or history.get("val_accuracy"))
    figure = Figure(figsize=(10 if has_accuracy else 5.5, 4), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 2 if has_accuracy else 1, squeeze=False)[0]
    for axis, metric, label in (
        (panels[0], "loss", loss_label),
        *(((panels[1], "accuracy", "accuracy"),) if has_accuracy else ()),
    ):
        for key, name, style in ((metric, "train", "-"), (f"val_{metric}", "validation", "--")):
            values = history.get(key)
            if values:
                axis.plot(
                    epochs[: len(values)], values, style, marker="o", markersize=3, label=name
                )
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    path = Path(path)
    figure.savefig(path, format="png", dpi=100)
    return path
