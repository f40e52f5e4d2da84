"""Complete checkpoints, and the checkpoint that a restarted stage resumes from.

Ray Train restores a run from the checkpoints that its controller has registered, and it
registers one only after rank 0 has uploaded it. A driver killed between the upload and the
registration therefore leaves a newer checkpoint in storage than ``ray.train.get_checkpoint()``
returns. So every checkpoint of a stage carries ``checkpoint_complete.json`` (its step and the
size of each other file), which ``upload_checkpoint`` writes after every other file. A
restarted worker group resumes from the complete checkpoint with the highest step in the run
folder, registered or not. A folder whose marker is missing or unreadable, or whose files do
not have the sizes the marker lists, is half-written and never chosen.

NOTE: Ray Train does not know a checkpoint that it never registered, so
``CheckpointConfig(num_to_keep)`` never deletes it; half-written folders stay as well.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's default checkpoint folder names


def write_complete_marker(folder: str, step: int) -> None:
    """Write the marker into a local checkpoint folder: ``step`` and the size of every file."""
    sizes = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name == COMPLETE_MARKER:
            continue
        if not os.path.isfile(path):
            raise ValueError(
                f"checkpoint folder {folder} contains the subfolder {name}, but the completion "
                "marker covers files only: save the checkpoint as files in one folder"
            )
        sizes[name] = os.path.getsize(path)
    with open(os.path.join(folder, COMPLETE_MARKER), "w", encoding="utf-8") as handle:
        json.dump({"step": int(step), "files": sizes}, handle, sort_keys=True)


def copy_checkpoint(
    source_fs: pafs.FileSystem, source: str, destination_fs: pafs.FileSystem, destination: str
) -> None:
    """Copy a checkpoint folder file by file, the completion marker last (if it has one)."""
    infos = source_fs.get_file_info(pafs.FileSelector(source))
    names = sorted(info.base_name for info in infos if info.type == pafs.FileType.File)
    if COMPLETE_MARKER in names:
        names.remove(COMPLETE_MARKER)
        names.append(COMPLETE_MARKER)
    destination_fs.create_dir(destination)
    for name in names:
        # One file at a time and without threads. Ray Train 2.60's own upload turns threads off
        # for S3 too, citing a pyarrow bug in threaded uploads (apache/arrow#32372).
        pafs.copy_files(
            f"{source}/{name}",
            f"{destination}/{name}",
            source_filesystem=source_fs,
            destination_filesystem=destination_fs,
            use_threads=False,
        )


def upload_checkpoint(checkpoint: Any, checkpoint_dir_name: str) -> Any:
    """Upload a checkpoint into the run folder, marker last; ``ray.train.report``'s upload hook."""
    import ray.train

    # get_storage() is a Ray Train DeveloperAPI, so it may change between Ray versions (used
    # here with 2.60).
    storage_context = ray.train.get_context().get_storage()
    filesystem = storage_context.storage_filesystem
    destination = storage_context.build_checkpoint_path_from_name(checkpoint_dir_name)
    copy_checkpoint(checkpoint.filesystem, checkpoint.path, filesystem, destination)
    return ray.train.Checkpoint(path=destination, filesystem=filesystem)


def complete_step(filesystem: pafs.FileSystem, folder: str) -> int | None:
    """Return the step of a complete checkpoint folder, or None when it is half-written."""
    try:
        with filesystem.open_input_stream(f"{folder}/{COMPLETE_MARKER}") as handle:
            marker = json.loads(handle.read())
        step, sizes = int(marker["step"]), dict(marker["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    infos = filesystem.get_file_info([f"{folder}/{name}" for name in sizes])
    for info, size in zip(infos, sizes.values()):
        if info.type != pafs.FileType.File or info.size != size:
            return None
    return step


def newest_complete_checkpoint(
    filesystem: pafs.FileSystem, run_path: str
) -> tuple[str, int] | None:
    """Return the path and step of the complete checkpoint with the highest step in a run folder.

    Among folders with the same step, the one whose name sorts last wins: Ray Train names them
    by their creation time.
    """
    infos = filesystem.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    found = []
    for info in infos:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith(CHECKPOINT_PREFIX):
            continue
        step = complete_step(filesystem, info.path)
        if step is None:
            logger.info("checkpoint folder %s is incomplete, so no resume uses it", info.path)
            continue
        found.append((step, info.base_name, info.path))
    if not found:
        return None
    step, _, path = max(found)
    return path, step


def choose_resume_checkpoint(registered: Any, filesystem: pafs.FileSystem, run_path: str) -> Any:
    """Return the checkpoint to resume from: the registered one, or a newer complete one.

    ``registered`` is ``ray.train.get_checkpoint()`` (a ``ray.train.Checkpoint`` or None). A
    registered checkpoint without a marker, written before markers existed, is kept.
    """
    import ray.train

    newest = newest_complete_checkpoint(filesystem, run_path)
    if newest is None:
        return registered
    path, step = newest
    if registered is not None:
        registered_step = complete_step(registered.filesystem, registered.path)
        if registered_step is None or registered_step >= step:
            return registered
    logger.warning(
        "resuming from %s at step %d, newer than the last checkpoint Ray Train registered (%s): "
        "the previous driver probably stopped between its upload and its registration",
        path, step, "none" if registered is None else registered.path,
    )
    return ray.train.Checkpoint(path=path, filesystem=filesystem)
