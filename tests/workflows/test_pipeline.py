"""The whole pipeline flow on a small subset of the built-in photographs, then a rerun.

Slow by nature (a few minutes): curate, precompute, three Ray Train stages, a two-trial sweep,
evaluation and registration, each for real on the tiny models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# two whole pipeline runs in one fixture: longer than the suite-wide 900 s on a busy machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, ray_cluster, prefect_harness):
    from samclip.workflows.pipeline import pipeline_flow

    from samclip.testbed.writer import write_testbed

    root = tmp_path_factory.mktemp("pipeline")
    # a few testbed scenes give the final model ground truth to be scored against
    scenes = root / "scenes"
    write_testbed(scenes, count=12, seed=0, size=64, val_fraction=0.5)
    overrides = [
        f"storage.root={root}",
        "data.limit=12",
        "data.augment_crops=1",
        "train.stage1.epochs=1",
        "train.stage1.max_steps=2",
        "train.stage2.max_steps=2",
        "train.stage3.max_steps=1",
        "sweep.num_samples=2",
        "evaluate.overlays=2",
        f"evaluate.classification={scenes}/labels_val.csv",
        f"evaluate.segmentation={scenes}/voc",
        "evaluate.segmentation_split=val",
        f"evaluate.segmentation_images={scenes}/images",
        f"evaluate.instances={scenes}/coco/instances_val.json",
        f"evaluate.instance_images={scenes}/images",
        "evaluate.dataset_seg_resolution=64",
        "evaluate.max_images=4",
    ]
    first = pipeline_flow(profile="smoke", overrides=overrides)
    second = pipeline_flow(profile="smoke", overrides=overrides)
    return root, overrides, first, second


def test_pipeline_writes_every_output(pipeline_run):
    from samclip.tasks import storage

    _, _, first, _ = pipeline_run
    data = first.sweep.data
    for uri in (
        data.manifest_uri,
        data.rejects_uri,
        data.summary_uri,
        first.sweep.stage1.checkpoint_uri,
        first.sweep.sweep.table_uri,
        first.sweep.sweep.plot_uri,
        first.final_checkpoint,
        first.evaluation.report_json_uri,
        first.evaluation.report_md_uri,
        *first.evaluation.overlay_uris,
    ):
        assert storage.exists(uri), uri
    assert len(first.evaluation.overlay_uris) == 2
    assert first.registered.version == "1"


def test_pipeline_scores_final_model_against_ground_truth(pipeline_run):
    from samclip.tasks import storage
    from samclip.tasks.register import download_registered

    root, _, first, _ = pipeline_run
    datasets = first.datasets
    assert storage.exists(datasets.report_md_uri)
    truth_keys = {"cls/top1", "seg/miou", "textseg/miou", "sam/box_miou_vs_truth"}
    assert truth_keys <= set(datasets.metrics)
    registered = first.registered
    meta = download_registered(registered.name, registered.alias, registered.tracking_uri, str(root / "download"))
    logged = json.loads((Path(meta["path"]) / "evaluation.json").read_text())
    assert {key: logged[key] for key in truth_keys} == {key: datasets.metrics[key] for key in truth_keys}
    assert "sam/miou_vs_teacher" in logged


def test_pipeline_rerun_computes_no_features(pipeline_run):
    _, _, first, second = pipeline_run
    assert first.sweep.data.computed["clip"] > 0
    assert second.sweep.data.computed == {"clip": 0, "sam": 0}
    assert second.registered.version == "2"


def test_registered_model_reproduces_evaluation(pipeline_run):
    _, _, first, _ = pipeline_run
    registered = first.registered
    env = {**os.environ, "PYTHONPATH": ""}
    completed = subprocess.run(
        [
            sys.executable, "-m", "samclip.cli", "verify-registered",
            f"{registered.name}@{registered.alias}", "--tracking-uri", registered.tracking_uri,
        ],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "max abs difference" in completed.stdout


def test_evaluation_report_has_both_objectives(pipeline_run):
    from samclip.tasks import storage

    _, _, first, _ = pipeline_run
    report = json.loads(storage.read_bytes(first.evaluation.report_json_uri))
    assert 0.0 <= report["metrics"]["objective/sam"] <= 1.0
    assert -1.0 <= report["metrics"]["objective/clip"] <= 1.0
    assert report["random_teachers"] is True
