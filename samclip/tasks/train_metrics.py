"""A training run's ``metrics.jsonl`` and its loss-curve plot.

Each line is one JSON object with ``kind`` (``train`` for a logged step, ``eval`` for a
checkpoint report), ``step``, ``epoch`` and namespaced metrics (``train/...``, ``val/...``,
``lr/...``). Rank 0 rewrites the whole file at each checkpoint, because object stores cannot
append; a resumed run drops the lines past its restored step.
"""

from __future__ import annotations

import io
import json
from typing import Any

from samclip.tasks import storage

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


def read_metrics_jsonl(uri: str, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """Read the lines of a metrics file, optionally only those at or before ``up_to_step``."""
    if not storage.exists(uri):
        return []
    text = storage.read_bytes(uri).decode()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    if up_to_step is None:
        return lines
    return [line for line in lines if line.get("step", 0) <= up_to_step]


def write_metrics_jsonl(uri: str, lines: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines)
    storage.write_text(uri, text)


def plot_loss_curve(metrics_uri: str, png_uri: str, title: str) -> str:
    """Draw train and val losses against the optimiser step into a PNG; returns ``png_uri``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = read_metrics_jsonl(metrics_uri)
    figure, axis = plt.subplots(figsize=(7, 4))
    curves = (
        ("train", "train/loss", "-"),
        ("train", "train/clip_cosine", ":"),
        ("eval", "val/loss", "o-"),
        ("eval", "val/clip_cosine", "s--"),
    )
    for kind, key, style in curves:
        points = [(line["step"], line[key]) for line in lines if line.get("kind") == kind and key in line]
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, style, label=key)
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    if axis.has_data():
        axis.legend()
    else:
        axis.text(0.5, 0.5, "no metrics recorded", ha="center", va="center", transform=axis.transAxes)

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    storage.write_bytes(png_uri, buffer.getvalue())
    return png_uri
