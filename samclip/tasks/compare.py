"""The paper's comparison at any scale: every model on the same data, one table, one trade-off plot.

Rows, all evaluated by ``evaluate.evaluate`` on the manifest's held-out images (and by
``eval_suite`` on the configured datasets, when there are any), each logged to MLflow when
``evaluate.mlflow`` is set:
- ``SAM teacher + probed head``: the stage-1 checkpoint, i.e. SAM's backbone and SAM head
  unchanged with the CLIP head trained on top (SAM's abilities intact; the reference for both);
- ``naive distillation``: the backbone and the CLIP head trained on L_CLIP only from the
  stage-1 checkpoint, SAM's head frozen (stage kind 4 of ``train_steps``);
- ``Wise-FT alpha=a``: (1 - a) * stage-1 weights + a * naive-distillation weights;
- ``SAM-CLIP``: stage 2, multi-task distillation with L_CLIP + lambda * L_SAM, from the same start.

The CLIP teacher has no SAM head and the SAM teacher no CLIP head, so they are the references
of the two axes (each scores 1.0 against itself) rather than evaluated rows.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from samclip.config import PipelineConfig
from samclip.tasks import storage
from samclip.tasks.train_data import StageData

logger = logging.getLogger(__name__)

CLIP_ABILITY = "clip/cosine_to_teacher"
SAM_ABILITY = "sam/miou_vs_teacher"
TABLE_COLUMNS = (
    CLIP_ABILITY, SAM_ABILITY, "cls/student_top1", "cls/top1", "cls/top5", "seg/miou", "textseg/miou",
    "sam/box_miou_vs_truth", "sam/box_miou_vs_teacher",
)  # fmt: skip


@dataclass
class ComparisonResult:
    output_uri: str
    table_md_uri: str
    table_json_uri: str
    plot_uri: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def comparison_uri(config: PipelineConfig) -> str:
    from samclip.tasks.naming import digest, stage_inputs

    inputs = {**stage_inputs(config, 2), "compare": config.compare.model_dump(mode="json")}
    return config.uri("compare", f"{config.compare.name}-{digest(inputs)}")


def train_baselines(
    config: PipelineConfig, data: StageData, stage1_checkpoint: str, output_uri: str
) -> dict[str, str]:
    """Train naive distillation and SAM-CLIP stage 2 from the stage-1 checkpoint; returns checkpoints.

    Runs are named by the comparison's folder, so a rerun reuses finished runs.
    """
    from samclip.tasks.train import run_stage
    from samclip.tasks.train_steps import NAIVE_DISTILLATION_STAGE

    runs_uri = storage.join(output_uri, "runs")
    naive_cfg = config.compare.naive_stage or config.train.stage2
    naive = run_stage(
        config, NAIVE_DISTILLATION_STAGE, data, stage1_checkpoint, "naive-distillation",
        stage_config=naive_cfg, storage_uri=runs_uri,
    )  # fmt: skip
    merged = run_stage(
        config, 2, data, stage1_checkpoint, "samclip-stage2", stage_config=config.train.stage2, storage_uri=runs_uri
    )
    return {"naive": naive.checkpoint_uri, "samclip": merged.checkpoint_uri}


def evaluate_models(
    config: PipelineConfig,
    stage1_checkpoint: str,
    checkpoints: dict[str, str],
    manifest_uri: str,
    features: dict[str, str],
    output_uri: str,
) -> list[dict[str, Any]]:
    """Evaluate the stage-1 model, naive distillation, Wise-FT at each alpha and SAM-CLIP."""
    from samclip.model.baselines import wise_ft
    from samclip.tasks.checkpoints import load_student
    from samclip.tasks.evaluate import evaluate

    original = load_student(stage1_checkpoint)
    naive = load_student(checkpoints["naive"])
    models: list[tuple[str, str, Any]] = [("SAM teacher + probed head", "reference", original)]
    models.append(("naive distillation", "naive", naive))
    for alpha in config.compare.wise_ft_alphas:
        models.append((f"Wise-FT alpha={alpha:g}", "wise-ft", wise_ft(original, naive, alpha)))
    models.append(("SAM-CLIP", "samclip", load_student(checkpoints["samclip"])))

    datasets = config.compare.datasets and bool(
        config.evaluate.classification or config.evaluate.segmentation or config.evaluate.instances
    )
    rows = []
    for label, kind, model in models:
        slug = label.lower().replace(" ", "-").replace("+", "and").replace("=", "")
        model_uri = storage.join(output_uri, "models", slug)
        result = evaluate(config, None, manifest_uri, features, name=label, model=model, output_uri=model_uri)
        metrics = dict(result.metrics)
        if config.evaluate.mlflow:
            from samclip.tasks.eval_suite import log_to_mlflow

            files = [result.report_json_uri, result.report_md_uri, *result.overlay_uris]
            log_to_mlflow(config, f"compare-{slug}", result.metrics, files)
        if datasets:
            from samclip.tasks.eval_suite import evaluate_datasets

            extra = evaluate_datasets(config, model=model, name=f"compare-{slug}", output_uri=storage.join(model_uri, "datasets"))
            metrics.update(extra.metrics)
        rows.append({"model": label, "kind": kind, "report": result.report_md_uri, "metrics": metrics})
        logger.info("compare %s: clip %.4f sam %.4f", label, metrics[CLIP_ABILITY], metrics[SAM_ABILITY])
    return rows


def write_comparison(rows: list[dict[str, Any]], output_uri: str, title: str) -> tuple[str, str, str]:
    """Write the table (Markdown, JSON) and the trade-off plot; returns their URIs."""
    columns = [c for c in TABLE_COLUMNS if any(c in row["metrics"] for row in rows)]
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row['metrics'][c]:.4f}" if c in row["metrics"] else "" for c in columns]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"CLIP ability: `{CLIP_ABILITY}` (1.0 = the CLIP teacher). SAM ability kept: `{SAM_ABILITY}` "
        "(1.0 = the SAM teacher's masks).",
    ]
    md_uri = storage.join(output_uri, "comparison.md")
    json_uri = storage.join(output_uri, "comparison.json")
    storage.write_text(md_uri, "\n".join(lines) + "\n")
    storage.write_json(json_uri, rows)
    plot_uri = storage.join(output_uri, "tradeoff.png")
    storage.write_bytes(plot_uri, plot_tradeoff(rows, title))
    return md_uri, json_uri, plot_uri


MODEL_MARKERS = {"reference": "s", "naive": "v", "wise-ft": "o", "samclip": "*"}


def draw_models(axis: Any, rows: list[dict[str, Any]], x_key: str, y_key: str) -> None:
    """Draw one marker per model row at (x_key, y_key), and the Wise-FT curve through the reference, Wise-FT and naive rows."""
    import matplotlib.pyplot as plt

    curve = sorted(
        (row["metrics"][x_key], row["metrics"][y_key])
        for row in rows
        if row["kind"] in ("reference", "wise-ft", "naive")
    )
    if curve:
        axis.plot(*zip(*curve), "--", color="tab:gray", lw=1, label="Wise-FT interpolation")
    colours = plt.get_cmap("tab10")
    for index, row in enumerate(rows):
        axis.scatter(
            [row["metrics"][x_key]], [row["metrics"][y_key]], marker=MODEL_MARKERS.get(row["kind"], "o"),
            color=colours(index % 10), s=180 if row["kind"] == "samclip" else 70, zorder=3, label=row["model"],
        )  # fmt: skip


def figure_png(figure: Any, axis: Any, title: str) -> bytes:
    """Title the plot, put the legend on the right, and return the figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    axis.set_title(title)
    axis.margins(0.15)
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def plot_tradeoff(rows: list[dict[str, Any]], title: str) -> bytes:
    """Plot CLIP ability gained (x) against SAM ability kept (y); Wise-FT points form a curve.

    Both teachers score 1.0 on their own axis and have no value on the other, so they are named
    in the axis labels rather than drawn (a point at 0 would squeeze every model into a corner).
    The legend identifies each point, because on small runs the points lie close together.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5.5))
    draw_models(axis, rows, CLIP_ABILITY, SAM_ABILITY)
    axis.set_xlabel(f"CLIP ability gained: {CLIP_ABILITY} (CLIP teacher = 1.0)")
    axis.set_ylabel(f"SAM ability kept: {SAM_ABILITY} (SAM teacher = 1.0)")
    return figure_png(figure, axis, title)


def run_comparison(
    config: PipelineConfig, data: StageData, stage1_checkpoint: str, features: dict[str, str]
) -> ComparisonResult:
    """Train the baselines and SAM-CLIP from one stage-1 checkpoint, evaluate all, write the table."""
    started = time.perf_counter()
    output_uri = comparison_uri(config)
    checkpoints = train_baselines(config, data, stage1_checkpoint, output_uri)
    rows = evaluate_models(config, stage1_checkpoint, checkpoints, data.manifest_uri, features, output_uri)
    md_uri, json_uri, plot_uri = write_comparison(rows, output_uri, f"SAM-CLIP and baselines ({config.profile})")
    seconds = time.perf_counter() - started
    logger.info("comparison written to %s in %.0f s", output_uri, seconds)
    return ComparisonResult(output_uri, md_uri, json_uri, plot_uri, rows, seconds)
