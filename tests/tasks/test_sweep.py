"""Stage-2 sweep: search space checks, Pareto front, and a real two-trial Ray Tune run."""

from __future__ import annotations

import time

import pytest
import torch

from samclip.config import SearchDim, StageConfig, load_config
from samclip.tasks import storage
from samclip.tasks.sweep import apply_params, build_search_space, max_concurrent_trials, pareto_front

# test_train's data builder; pytest puts this folder on sys.path (tests/tasks has no __init__.py)
from test_train import EMBED_DIM, tiny_config, write_stage_data  # noqa: E402


def test_space_rejects_unknown_key():
    with pytest.raises(ValueError, match="lambda_sam"):
        build_search_space({"lambda_sam": SearchDim(kind="uniform", low=1, high=2)})


def test_space_builds_every_kind():
    from ray.tune.search.sample import Categorical, Float

    space = build_search_space(
        {
            "sam_loss_weight": SearchDim(kind="loguniform", low=1, high=100),
            "lr_ratio": SearchDim(kind="uniform", low=0.05, high=0.2),
            "lr": SearchDim(kind="choice", values=[1e-5, 4e-5]),
            "masks_per_image": SearchDim(kind="grid", values=[2, 4]),
        }
    )
    assert isinstance(space["sam_loss_weight"], Float)
    assert isinstance(space["lr_ratio"], Float)
    assert isinstance(space["lr"], Categorical)
    assert space["masks_per_image"] == {"grid_search": [2, 4]}


def test_params_applied_and_validated():
    updated = apply_params(StageConfig(), {"sam_loss_weight": 3.0, "lr_ratio": 0.2})
    assert (updated.sam_loss_weight, updated.lr_ratio) == (3.0, 0.2)
    with pytest.raises(ValueError):
        apply_params(StageConfig(), {"lr_ratio": -1.0})


def test_pareto_front_marks_undominated():
    points = [(0.5, 0.9), (0.7, 0.7), (0.6, 0.6), (0.9, 0.2), (0.9, 0.2)]
    assert pareto_front(points) == [True, True, False, True, True]


def test_concurrency_from_cluster_cpus(tmp_path):
    config = load_config("smoke", [f"storage.root={tmp_path}", "train.cpus_per_worker=0.5"])
    assert max_concurrent_trials(config, 2.0) == 1  # 0.1 + 0.5 CPUs per trial, 1 CPU kept for Ray Data
    assert max_concurrent_trials(config, 4.0) == 5
    config = load_config("smoke", [f"storage.root={tmp_path}", "train.cpus_per_worker=0.5", "sweep.reserved_cpus=0"])
    assert max_concurrent_trials(config, 2.0) == 3
    config = load_config("smoke", [f"storage.root={tmp_path}", "sweep.max_concurrent_trials=1"])
    assert max_concurrent_trials(config, 16.0) == 1


def test_two_trial_sweep(ray_cluster, tmp_path):
    from samclip.model.architectures import build_student
    from samclip.tasks.checkpoints import load_student, save_student_checkpoint, student_meta
    from samclip.tasks.sweep import run_sweep
    from samclip.tasks.teachers import ensure_teachers, load_sam_teacher

    root = str(tmp_path)
    config = tiny_config(
        root,
        "train.cpus_per_worker=0.5",
        "train.stage2.max_steps=1",
        "sweep.num_samples=2",
        "sweep.scheduler=fifo",
    )
    data = write_stage_data(root, config)
    # a stage-1 checkpoint without running stage 1: the student as built from the teacher
    torch.manual_seed(0)
    student = build_student("tiny", load_sam_teacher(ensure_teachers(config)), EMBED_DIM, clip_head_depth=1)
    stage1 = storage.join(root, "stage1-ckpt")
    meta = student_meta("tiny", EMBED_DIM, clip_head_depth=1, pooling="max", mlp_hidden_layers=2)
    save_student_checkpoint(stage1, student, meta)

    started = time.perf_counter()
    result = run_sweep(config, data, stage1, name="sweep-test")
    print(f"sweep of 2 trials x 1 step: {time.perf_counter() - started:.1f} s")

    assert len(result.trials) == 2
    assert [row["status"] for row in result.trials] == ["completed", "completed"]
    for row in result.trials:
        assert 1.0 <= row["sam_loss_weight"] <= 100.0
        assert 0.0 <= row["sam_objective"] <= 1.0
        assert -1.0 <= row["clip_objective"] <= 1.0
    assert storage.read_parquet(result.table_uri).num_rows == 2
    assert storage.read_bytes(result.csv_uri).startswith(b'"trial_id"')
    assert storage.read_bytes(result.plot_uri)[:4] == b"\x89PNG"
    assert set(result.best["params"]) == {"sam_loss_weight", "lr_ratio"}
    assert result.best["score"] == max(row["score"] for row in result.trials)
    assert load_student(result.best["checkpoint_uri"]).embed_dim == EMBED_DIM


# ---------------------------------------------------------------- search, concurrency, winner


def test_grid_searcher_spaces_ranges():
    from samclip.tasks.sweep import grid_values

    space = build_search_space(
        {"sam_loss_weight": SearchDim(kind="loguniform", low=1, high=100), "lr": SearchDim(kind="choice", values=[1e-5])},
        searcher="grid",
        grid_points=3,
    )
    assert space["sam_loss_weight"] == {"grid_search": [1.0, 10.0, 100.0]}
    assert space["lr"] == {"grid_search": [1e-5]}
    assert grid_values(SearchDim(kind="uniform", low=0.0, high=1.0), 3) == [0.0, 0.5, 1.0]


def test_concurrency_limited_by_gpus(tmp_path):
    config = load_config("smoke", [f"storage.root={tmp_path}", "train.use_gpu=true", "train.workers=2"])
    assert max_concurrent_trials(config, {"CPU": 64.0, "GPU": 4.0}) == 2  # 2 GPUs per trial


def _rows():
    def row(trial, clip, sam, status="completed"):
        return {
            "trial_id": trial, "params": {"sam_loss_weight": 1.0}, "clip_objective": clip, "sam_objective": sam,
            "status": status, "checkpoint": f"runs/trial-{trial}/c", "checkpoint_uri": f"/s/runs/trial-{trial}/c",
        }  # fmt: skip

    return [
        row("a", 0.90, 0.80), row("b", 0.70, 0.97), row("c", 0.60, 0.99), row("d", 0.95, 0.99, "error"),
        row("e", 0.99, 0.98, "stopped"),
    ]  # fmt: skip


def test_winner_by_weighted_score(tmp_path):
    from samclip.tasks.sweep_report import annotate, select_winner

    config = load_config("smoke", [f"storage.root={tmp_path}", "sweep.sam_weight=2.0"])
    trials = _rows()
    annotate(trials, config.sweep)
    # the errored trial and the stopped one are left out unless include_stopped is set
    assert [row["pareto"] for row in trials] == [True, True, True, False, False]
    winner = select_winner(trials, config.sweep)
    assert winner["trial_id"] == "b"  # scores: a 0.9 + 1.6 = 2.5, b 0.7 + 1.94 = 2.64, c 0.6 + 1.98 = 2.58
    assert winner["score"] == pytest.approx(max(row["score"] for row in trials[:3]))
    with_stopped = load_config("smoke", [f"storage.root={tmp_path}", "sweep.selection.include_stopped=true"])
    assert select_winner(trials, with_stopped.sweep)["trial_id"] == "e"


def test_winner_by_constraint(tmp_path):
    from samclip.tasks.sweep_report import annotate, select_winner

    config = load_config(
        "smoke", [f"storage.root={tmp_path}", "sweep.selection.mode=constraint", "sweep.selection.min_sam=0.95"]
    )
    trials = _rows()
    annotate(trials, config.sweep)
    winner = select_winner(trials, config.sweep)
    assert winner["trial_id"] == "b"  # best CLIP objective among SAM >= 0.95
    assert "sam >= 0.95" in winner["rule"]

    strict = load_config("smoke", [f"storage.root={tmp_path}", "sweep.selection.mode=constraint", "sweep.selection.min_sam=0.999"])
    with pytest.raises(RuntimeError, match="no finished trial meets sam >= 0.999"):
        select_winner(trials, strict.sweep)


def test_constraint_needs_a_bound():
    with pytest.raises(ValueError, match="needs min_clip or min_sam"):
        load_config("smoke", ["sweep.selection.mode=constraint"])


def test_expected_trials_count_grid(tmp_path):
    from samclip.tasks.sweep import expected_trial_count

    config = load_config("smoke", [f"storage.root={tmp_path}", "sweep.num_samples=2"])
    assert expected_trial_count(config.sweep) == 2
    config = load_config("smoke", [f"storage.root={tmp_path}", "sweep.searcher=grid", "sweep.grid_points=3"])
    assert expected_trial_count(config.sweep) == 4 * 3 * 3  # the smoke profile's num_samples is 4


def test_asha_rungs_from_config(tmp_path):
    from samclip.tasks.sweep import asha_rungs

    config = load_config("smoke", [f"storage.root={tmp_path}", "sweep.scheduler=asha", "train.stage2.epochs=4"])
    assert asha_rungs(config) == [1.0, 2.0, 4.0, 5.0]  # grace 1, factor 2, max_t = epochs + 1
    assert asha_rungs(load_config("smoke", [f"storage.root={tmp_path}"])) == []
