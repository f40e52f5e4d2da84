"""The claims flow on a reduced shapes testbed: scenes, both teachers on Ray Train, the comparison, the verdicts.

The reduced setting (documented in docs/testbed.md) trains each teacher for a few hundred steps
and distils on a small testbed, so it runs in minutes on 2 cores. It checks the direction of
claims 2 and 5 on ground truth; the full run (``samclip claims --profile shapes``) checks all five.
"""

from __future__ import annotations

import json

import pytest

# Teacher training dominates: about 15 minutes on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.testbed, pytest.mark.timeout(3000)]

REDUCED = [
    "testbed.count=160",
    "testbed.clip={train_scenes: 1000, eval_scenes: 100, batch_size: 64, max_steps: 300, eval_every: 100, single_object_fraction: 0.3}",
    "testbed.sam={train_scenes: 300, eval_scenes: 20, batch_size: 8, max_steps: 200, eval_every: 100, lr: 5.0e-4}",
    "train.stage1.epochs=3",
    "train.stage2.epochs=3",
    "compare.wise_ft_alphas=[0.5]",
    "evaluate.max_images=40",
    "evaluate.overlays=1",
]


@pytest.fixture(scope="module")
def claims_run(tmp_path_factory, ray_cluster, prefect_harness):
    from samclip.workflows.claims_flow import claims_flow

    root = tmp_path_factory.mktemp("claims")
    results = root / "results"
    outputs = claims_flow("shapes", [f"storage.root={root}", *REDUCED], results_dir=str(results))
    return root, results, outputs


def test_claims_flow_writes_the_results_file(claims_run):
    root, results, outputs = claims_run
    for name in ("shapes-claims.md", "shapes-claims.png"):
        assert (results / name).is_file(), name
    text = (results / "shapes-claims.md").read_text()
    assert "](shapes-claims.png)" in text
    assert [item["claim"] for item in outputs.claims] == [1, 2, 3, 4, 5]
    models = [row["model"] for row in outputs.rows]
    assert models[:2] == ["CLIP teacher", "SAM teacher"]
    assert "SAM-CLIP" in models
    record = json.loads((root / "testbed" / "teachers" / "sam_shapes.pth.teacher.json").read_text())
    assert record["result"]["steps"] >= 1


def _metrics(outputs, kind):
    return next(row["metrics"] for row in outputs.rows if row["kind"] == kind)


def test_claim_2_direction_naive_distillation_forgets_masks(claims_run):
    _, _, outputs = claims_run
    naive, sam_teacher = _metrics(outputs, "naive"), _metrics(outputs, "sam-teacher")
    assert naive["sam/box_miou_vs_truth"] < sam_teacher["sam/box_miou_vs_truth"]


# In the reduced run, claim 5's direction is met by a small margin: 0.060 through both heads
# against 0.056 from the CLIP head alone. In the full run it is not (0.047 and 0.180).
def test_claim_5_direction_both_heads_segment_better(claims_run):
    _, _, outputs = claims_run
    merged = _metrics(outputs, "samclip")
    assert merged["textseg/miou"] > merged["seg/miou"]
