"""Prefect artifacts of a pipeline run: evaluation table, links to pictures, registered version.

Artifacts show in the Prefect UI on the flow run's page. Keyed artifacts (``samclip-…``) also
keep their history across runs. Nothing here reads the environment, so no credential reaches
an artifact, and a tracking URI's user-info part is replaced before publishing.
"""

from __future__ import annotations

import os
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from samclip.tasks.register import redact_uri


def _link(uri: str) -> str:
    # A local path becomes a file:// link so that the UI renders it as one.
    return uri if "://" in uri else "file://" + os.path.abspath(uri)


def evaluation_markdown(name: str, metrics: dict[str, float]) -> str:
    """Render evaluation metrics as a Markdown table, one row per metric."""
    rows = [f"| `{key}` | {value:.4f} |" for key, value in sorted(metrics.items())]
    return "\n".join([f"## Evaluation of {name}", "", "| metric | value |", "|---|---|", *rows])


def registered_markdown(registered: Any) -> str:
    """Describe a registered version: name, version, alias and the gates' decision."""
    status = "promoted" if registered.promoted else "held as candidate"
    return "\n".join([
        f"## {registered.name} version {registered.version}",
        "",
        f"- alias: `@{registered.alias}` ({status})",
        f"- gates: {registered.reason}",
        f"- MLflow run: `{registered.run_id}`",
        f"- registry: `{redact_uri(registered.tracking_uri)}`",
    ])


def publish_run_artifacts(evaluation: Any, sweep: Any, registered: Any, datasets: Any = None) -> list[str]:
    """Create the run's artifacts and return their ids; ``datasets`` is the ground-truth evaluation."""
    ids = [
        create_markdown_artifact(
            evaluation_markdown("the final model", evaluation.metrics),
            key="samclip-evaluation",
            description="Evaluation of the registered model",
        ),
        create_markdown_artifact(
            registered_markdown(registered),
            key="samclip-registered-model",
            description="Registered model version and promotion decision",
        ),
        create_link_artifact(_link(evaluation.report_md_uri), link_text="evaluation report"),
        create_link_artifact(_link(sweep.plot_uri), link_text="sweep trade-off plot"),
    ]
    for index, uri in enumerate(evaluation.overlay_uris, start=1):
        ids.append(create_link_artifact(_link(uri), link_text=f"overlay {index}"))
    if datasets is not None:
        ids.append(create_markdown_artifact(
            evaluation_markdown("the final model against ground truth", datasets.metrics),
            key="samclip-evaluation-datasets",
            description="The final model on the configured evaluation datasets",
        ))  # fmt: skip
        ids.append(create_link_artifact(_link(datasets.report_md_uri), link_text="dataset evaluation report"))
        for index, uri in enumerate(datasets.overlay_uris, start=1):
            ids.append(create_link_artifact(_link(uri), link_text=f"dataset overlay {index}"))
    if sweep.trials:
        rows = [
            {key: value for key, value in trial.items() if isinstance(value, (int, float, str))}
            for trial in sweep.trials
        ]
        ids.append(create_table_artifact(rows, key="samclip-sweep-trials", description="Stage 2 sweep trials"))
    return [str(artifact_id) for artifact_id in ids]
