"""Choosing the checkpoint a stage resumes from: newest complete one, never a half-written one."""

from __future__ import annotations

import json
import os

import pyarrow.fs as pafs
import pytest
import torch

from samclip.tasks import train_resume
from samclip.tasks.checkpoints import (
    MODEL_FILE,
    load_train_state,
    save_student_checkpoint,
    student_meta,
)
from samclip.tasks.train_resume import (
    COMPLETE_MARKER,
    choose_resume_checkpoint,
    complete_step,
    copy_checkpoint,
    newest_complete_checkpoint,
    write_complete_marker,
)

LOCAL = pafs.LocalFileSystem()


def _local_checkpoint(folder: str, step: int) -> str:
    """Write a checkpoint the way the worker loop does, in a local folder."""
    torch.manual_seed(step)
    model = torch.nn.Linear(4, 3)
    state = {"step": step, "optimizer": {"state": {}, "param_groups": []}}
    save_student_checkpoint(folder, model, student_meta("tiny", 3), state, "seed: 0\n")
    write_complete_marker(folder, step)
    return folder


def _uploaded(tmp_path, run: str, name: str, step: int) -> str:
    """Upload a checkpoint into the run folder as upload_checkpoint does, and return its path."""
    local = _local_checkpoint(str(tmp_path / "local" / name), step)
    destination = str(tmp_path / run / name)
    copy_checkpoint(LOCAL, local, LOCAL, destination)
    return destination


@pytest.fixture()
def run_folder(tmp_path):
    """A run folder with complete checkpoints at steps 1 and 2, and half-written ones at 3-5."""
    run = tmp_path / "run"
    paths = {
        step: _uploaded(tmp_path, "run", f"checkpoint_2026-01-01_00-00-0{step}", step)
        for step in (1, 2, 3, 4, 5)
    }
    os.remove(os.path.join(paths[3], COMPLETE_MARKER))  # the upload stopped before the marker
    with open(os.path.join(paths[4], MODEL_FILE), "r+b") as handle:  # a file cut short
        handle.truncate(10)
    with open(os.path.join(paths[5], COMPLETE_MARKER), "w") as handle:  # a marker cut short
        handle.write('{"step": 5, "fil')
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    return str(run), paths


def test_marker_lists_every_file(tmp_path):
    folder = _local_checkpoint(str(tmp_path / "ckpt"), 7)
    with open(os.path.join(folder, COMPLETE_MARKER)) as handle:
        marker = json.load(handle)
    assert marker["step"] == 7
    others = sorted(name for name in os.listdir(folder) if name != COMPLETE_MARKER)
    assert sorted(marker["files"]) == others
    assert marker["files"][MODEL_FILE] == os.path.getsize(os.path.join(folder, MODEL_FILE))


def test_copy_writes_marker_last(tmp_path, monkeypatch):
    folder = _local_checkpoint(str(tmp_path / "ckpt"), 3)
    copied = []
    real_copy = pafs.copy_files

    def recording_copy(source, destination, **options):
        copied.append(os.path.basename(destination))
        real_copy(source, destination, **options)

    monkeypatch.setattr(train_resume.pafs, "copy_files", recording_copy)
    destination = str(tmp_path / "run" / "checkpoint_a")
    copy_checkpoint(LOCAL, folder, LOCAL, destination)
    assert copied[-1] == COMPLETE_MARKER
    assert sorted(copied) == sorted(os.listdir(folder))
    assert complete_step(LOCAL, destination) == 3
    assert load_train_state(destination)["step"] == 3


def test_half_written_checkpoints_are_incomplete(run_folder):
    _, paths = run_folder
    steps = [complete_step(LOCAL, paths[step]) for step in (1, 2, 3, 4, 5)]
    assert steps == [1, 2, None, None, None]


def test_newest_complete_checkpoint_chosen(run_folder):
    run, paths = run_folder
    assert newest_complete_checkpoint(LOCAL, run) == (paths[2], 2)


def test_no_checkpoint_in_missing_folder(tmp_path):
    assert newest_complete_checkpoint(LOCAL, str(tmp_path / "never-written")) is None
    assert choose_resume_checkpoint(None, LOCAL, str(tmp_path / "never-written")) is None


def test_unregistered_newer_checkpoint_wins(run_folder):
    from ray.train import Checkpoint

    run, paths = run_folder
    registered = Checkpoint(path=paths[1], filesystem=LOCAL)
    assert choose_resume_checkpoint(registered, LOCAL, run).path == paths[2]
    # the driver died before its first registration
    assert choose_resume_checkpoint(None, LOCAL, run).path == paths[2]


def test_registered_checkpoint_kept_when_newest(run_folder):
    from ray.train import Checkpoint

    run, paths = run_folder
    registered = Checkpoint(path=paths[2], filesystem=LOCAL)
    assert choose_resume_checkpoint(registered, LOCAL, run) is registered


def test_registered_checkpoint_without_marker_kept(run_folder, tmp_path):
    from ray.train import Checkpoint

    run, _ = run_folder
    # a checkpoint written before completion markers existed
    old = _local_checkpoint(str(tmp_path / "old"), 1)
    os.remove(os.path.join(old, COMPLETE_MARKER))
    registered = Checkpoint(path=old, filesystem=LOCAL)
    assert choose_resume_checkpoint(registered, LOCAL, run) is registered
