"""Sweep resilience: an interrupted sweep resumes without rerunning finished trials, a moved sweep
folder still restores, and a sweep with other settings cannot take over an existing folder."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch
from ray import tune

from samclip.tasks import storage

from test_train import EMBED_DIM, tiny_config, write_stage_data  # noqa: E402


class InterruptAfterFirstTrial(tune.Callback):
    """Send this process SIGUSR1 once the first trial completes: Tune's own stop signal, as Ctrl+C."""

    armed = True  # a class attribute, so the copy that Tune restores from its saved state is disarmed

    def on_trial_complete(self, iteration, trials, trial, **info):
        if type(self).armed:
            type(self).armed = False
            os.kill(os.getpid(), signal.SIGUSR1)


def _stage1_checkpoint(root: str, config) -> str:
    from samclip.model.architectures import build_student
    from samclip.tasks.checkpoints import save_student_checkpoint, student_meta
    from samclip.tasks.teachers import ensure_teachers, load_sam_teacher

    torch.manual_seed(0)
    student = build_student("tiny", load_sam_teacher(ensure_teachers(config)), EMBED_DIM, clip_head_depth=1)
    uri = storage.join(root, "stage1-ckpt")
    meta = student_meta("tiny", EMBED_DIM, clip_head_depth=1, pooling="max", mlp_hidden_layers=2)
    save_student_checkpoint(uri, student, meta)
    return uri


def _snapshot(folder: str) -> dict[str, float]:
    """Map every trial run's result.json to its modification time."""
    found = {}
    for base, _, files in os.walk(folder):
        if "result.json" in files and "/runs/trial-" in base:
            found[base[len(folder):]] = os.stat(os.path.join(base, "result.json")).st_mtime_ns
    return found


@pytest.mark.slow
def test_interrupted_sweep_resumes_then_moves(ray_cluster, tmp_path):
    from samclip.tasks.sweep import run_sweep

    root = str(tmp_path / "first")
    overrides = [
        "train.cpus_per_worker=0.5", "train.stage2.max_steps=1", "sweep.num_samples=3",
        "sweep.max_concurrent_trials=1", "sweep.scheduler=fifo",
    ]  # fmt: skip
    config = tiny_config(root, *overrides)
    data = write_stage_data(root, config)
    stage1 = _stage1_checkpoint(root, config)
    folder = os.path.join(root, "sweep", "resume-test")

    # the first call stops after one trial, as a Ctrl+C would
    with pytest.raises(RuntimeError, match="interrupted: 1 of 3 trials finished"):
        run_sweep(config, data, stage1, name="resume-test", callbacks=[InterruptAfterFirstTrial()])
    finished = _snapshot(folder)
    assert len(finished) == 1, finished

    # the second call restores it: the finished trial's run is untouched, the others run
    result = run_sweep(config, data, stage1, name="resume-test")
    assert [row["status"] for row in result.trials] == ["completed"] * 3
    after = _snapshot(folder)
    assert len(after) == 3
    for run, mtime in finished.items():
        assert after[run] == mtime, f"{run} was trained again"

    # the folder moved under another root still restores, and nothing trains again
    moved_root = str(tmp_path / "second")
    os.makedirs(os.path.join(moved_root, "sweep"))
    shutil.move(folder, os.path.join(moved_root, "sweep", "resume-test"))
    moved = run_sweep(tiny_config(moved_root, *overrides), data, stage1, name="resume-test")
    moved_folder = os.path.join(moved_root, "sweep", "resume-test")
    assert _snapshot(moved_folder) == after
    assert moved.best["checkpoint_uri"].startswith(moved_folder)
    assert storage.exists(storage.join(moved.best["checkpoint_uri"], "model.safetensors"))
    assert moved.best["checkpoint"].startswith("runs/trial-")

    # another sweep under the same name is rejected instead of restoring this one
    other = tiny_config(moved_root, *overrides, "train.stage2.lr=1e-3")
    with pytest.raises(ValueError, match="contains sweep"):
        run_sweep(other, data, stage1, name="resume-test")
