"""Sweep results: the trial table, the trade-off plot with its Pareto front, and the winner.

Both objectives are maximised:
- CLIP objective: ``val/clip_similarity``, mean cosine similarity to the CLIP teacher (1 - L_CLIP);
- SAM objective: ``val/sam_iou``, mean mask IoU with the SAM teacher for the same prompts, i.e.
  how much of SAM's behaviour the student keeps (1.0 means identical masks).

A trial's checkpoint is recorded relative to the sweep folder (``checkpoint``) as well as by
URI (``checkpoint_uri``), so a sweep folder moved to another prefix still resolves its winners.
"""

from __future__ import annotations

import io
import math
from typing import Any

from samclip.config import SelectionConfig, SweepConfig
from samclip.tasks import storage

TABLE_FILE = "trials.parquet"
CSV_FILE = "trials.csv"
MARKDOWN_FILE = "trials.md"
PLOT_FILE = "pareto.png"
WINNER_FILE = "winner.json"


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Mark the points that no other point beats on both objectives (both maximised)."""
    marks = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (ox >= x and oy >= y) and (ox > x or oy > y) for j, (ox, oy) in enumerate(points) if j != i
        )
        marks.append(not dominated)
    return marks


def weighted_score(sweep: SweepConfig, clip: float | None, sam: float | None) -> float | None:
    if clip is None or sam is None:
        return None
    return sweep.clip_weight * clip + sweep.sam_weight * sam


def annotate(trials: list[dict[str, Any]], sweep: SweepConfig) -> None:
    """Add ``score`` and ``pareto`` to every row in place.

    The Pareto front is that of the trials that may win (see ``select_winner``).
    """
    for row in trials:
        row["score"] = weighted_score(sweep, row["clip_objective"], row["sam_objective"])
    done = [row for row in trials if _selectable(row, sweep.selection.include_stopped)]
    marks = pareto_front([(row["clip_objective"], row["sam_objective"]) for row in done])
    for row in trials:
        row["pareto"] = False
    for row, on_front in zip(done, marks):
        row["pareto"] = on_front


def _selectable(row: dict[str, Any], include_stopped: bool = True) -> bool:
    allowed = ("completed", "stopped") if include_stopped else ("completed",)
    return (
        row["clip_objective"] is not None
        and row["sam_objective"] is not None
        and bool(row["checkpoint_uri"])
        and row["status"] in allowed
    )


def select_winner(trials: list[dict[str, Any]], sweep: SweepConfig) -> dict[str, Any]:
    """Pick the winner by ``sweep.selection``; returns its params, objectives and checkpoint.

    Only completed trials compete, unless ``selection.include_stopped`` adds those ASHA stopped.

    Raises:
        RuntimeError: no trial finished with both objectives, or (constraint mode with
            fallback "error") none meets the bounds.
    """
    selection: SelectionConfig = sweep.selection
    candidates = [row for row in trials if _selectable(row, selection.include_stopped)]
    if not candidates:
        raise RuntimeError(
            f"no sweep trial finished with both objectives ({len(trials)} trials, statuses "
            f"{sorted({row['status'] for row in trials})}); see the trial errors in the table, or "
            "set sweep.selection.include_stopped=true to consider trials that ASHA stopped"
        )
    rule = f"max {sweep.clip_weight:g} * clip + {sweep.sam_weight:g} * sam"
    if selection.mode == "constraint":
        feasible = [row for row in candidates if _meets(row, selection)]
        bounds = _bounds_text(selection)
        if feasible:
            key = "clip_objective" if selection.objective == "clip" else "sam_objective"
            winner = max(feasible, key=lambda row: (row[key], row["score"]))
            rule = f"max {selection.objective} objective with {bounds}"
        elif selection.fallback == "score":
            winner = max(candidates, key=lambda row: row["score"])
            rule = f"no trial has {bounds}; fell back to {rule}"
        else:
            best = max(candidates, key=lambda row: row["sam_objective"])
            raise RuntimeError(
                f"no finished trial meets {bounds} ({len(candidates)} finished; the highest SAM "
                f"objective is {best['sam_objective']:.4f}, CLIP {best['clip_objective']:.4f}); "
                "loosen sweep.selection or set sweep.selection.fallback=score"
            )
    else:
        winner = max(candidates, key=lambda row: row["score"])
    return {
        "trial_id": winner["trial_id"],
        "params": winner["params"],
        "checkpoint": winner["checkpoint"],
        "checkpoint_uri": winner["checkpoint_uri"],
        "score": winner["score"],
        "clip_objective": winner["clip_objective"],
        "sam_objective": winner["sam_objective"],
        "rule": rule,
    }


def _meets(row: dict[str, Any], selection: SelectionConfig) -> bool:
    if selection.min_clip is not None and row["clip_objective"] < selection.min_clip:
        return False
    if selection.min_sam is not None and row["sam_objective"] < selection.min_sam:
        return False
    return True


def _bounds_text(selection: SelectionConfig) -> str:
    parts = []
    if selection.min_clip is not None:
        parts.append(f"clip >= {selection.min_clip:g}")
    if selection.min_sam is not None:
        parts.append(f"sam >= {selection.min_sam:g}")
    return " and ".join(parts)


def write_tables(trials: list[dict[str, Any]], experiment_uri: str) -> tuple[str, str, str]:
    """Write the trial table as Parquet, CSV and Markdown; returns their URIs."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rows = [{k: v for k, v in row.items() if k != "params"} for row in trials]
    table = pa.Table.from_pylist(rows)
    table_uri = storage.join(experiment_uri, TABLE_FILE)
    csv_uri = storage.join(experiment_uri, CSV_FILE)
    md_uri = storage.join(experiment_uri, MARKDOWN_FILE)
    storage.write_parquet(table, table_uri)
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer)
    storage.write_bytes(csv_uri, buffer.getvalue())
    storage.write_text(md_uri, markdown_table(trials))
    return table_uri, csv_uri, md_uri


def markdown_table(trials: list[dict[str, Any]]) -> str:
    """Render the trials as a Markdown table: params, both objectives, status, checkpoint."""
    params = list(trials[0]["params"]) if trials else []
    header = ["trial", *params, "clip", "sam", "score", "epoch", "status", "pareto", "checkpoint"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in trials:
        cells = [
            str(row["trial_id"]),
            *[_short(row["params"].get(name)) for name in params],
            _short(row["clip_objective"]),
            _short(row["sam_objective"]),
            _short(row["score"]),
            _short(row["epoch"]),
            row["status"],
            "yes" if row.get("pareto") else "",
            row["checkpoint"] or "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_objectives(
    trials: list[dict[str, Any]], png_uri: str, title: str, winner_id: str | None = None
) -> str:
    """Scatter the CLIP objective against the SAM objective; the Pareto front is joined and ringed.

    Trials that ASHA stopped early are drawn with their last validation values as crosses.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in trials if row["clip_objective"] is not None and row["sam_objective"] is not None]
    figure, axis = plt.subplots(figsize=(7, 5.5))
    if done:
        for status, marker, colour in (("completed", "o", "tab:blue"), ("stopped", "x", "tab:gray")):
            group = [row for row in done if row["status"] == status]
            if group:
                axis.scatter(
                    [row["clip_objective"] for row in group], [row["sam_objective"] for row in group],
                    marker=marker, color=colour,
                    label="trial" if status == "completed" else "stopped early (last values)",
                )  # fmt: skip
        front = sorted(
            (row["clip_objective"], row["sam_objective"]) for row in done if row.get("pareto")
        )
        if front:
            fx, fy = zip(*front)
            axis.plot(fx, fy, "o--", color="tab:red", mfc="none", markersize=13, label="Pareto front")
        for row in done:
            label = ", ".join(f"{k}={_short(v)}" for k, v in row["params"].items())
            axis.annotate(
                label, (row["clip_objective"], row["sam_objective"]), fontsize=7,
                textcoords="offset points", xytext=(4, 4),
            )  # fmt: skip
            if winner_id is not None and row["trial_id"] == winner_id:
                axis.scatter(
                    [row["clip_objective"]], [row["sam_objective"]], marker="*", s=260,
                    color="gold", edgecolors="black", zorder=5, label="winner",
                )  # fmt: skip
        axis.legend(fontsize=8)
    else:
        axis.text(0.5, 0.5, "no trial finished", ha="center", va="center", transform=axis.transAxes)
    axis.set_xlabel("CLIP objective: val cosine similarity to the CLIP teacher")
    axis.set_ylabel("SAM objective: val mask IoU with the SAM teacher")
    axis.set_title(title)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    storage.write_bytes(png_uri, buffer.getvalue())
    return png_uri


def _short(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)
