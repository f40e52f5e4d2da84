"""Kill precompute mid-run (a Ray worker, then the whole driver) and rerun it.

After the rerun every curated image has exactly one feature row per teacher, no file in a
feature folder is a truncated Parquet file, the rerun computes exactly the images that were
missing, and it keeps every shard and file that it did not write.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from samclip.config import PipelineConfig
from samclip.tasks.curate import curate
from samclip.tasks.features import list_shards
from samclip.tasks.precompute import precompute
from samclip.tasks.storage import TMP_PREFIX
from samclip.tasks.teachers import ensure_teachers

IMAGES = 16
DRIVER = os.path.join(os.path.dirname(__file__), "precompute_driver.py")


def _config(tmp_path, **precompute_settings) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "storage": {"root": str(tmp_path / "run")},
            "ray": {"num_cpus": 2},
            "data": {"source": str(tmp_path / "images"), "val_fraction": 0.0},
            "precompute": {"batch_size": 2, "rows_per_shard": 2, **precompute_settings},
        }
    )


def _write_images(folder) -> None:
    folder.mkdir()
    for index in range(IMAGES):
        # large enough that decoding and resizing take a while, so a kill lands mid-run
        pixels = np.random.default_rng(index).integers(0, 256, (384, 512, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        (folder / f"{index:02d}.png").write_bytes(buffer.getvalue())


def _shard_rows(folder: str) -> list[str]:
    """Every hash in every complete shard; also asserts that no visible file is truncated."""
    hashes: list[str] = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if name.startswith(TMP_PREFIX) or not name.endswith(".parquet"):
            continue
        table = pq.read_table(path)  # raises on a truncated or partial Parquet file
        hashes.extend(table.column("hash").to_pylist())
    return hashes


def _wait_for_shard(
    folder: str,
    timeout: float,
    stop: threading.Event | None = None,
    process: subprocess.Popen | None = None,
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (stop and stop.is_set()):
        if process is not None and process.poll() is not None:
            return False
        if os.path.isdir(folder) and any(
            name.startswith("part-") for name in os.listdir(folder)
        ):
            return True
        time.sleep(0.02)
    return False


def _children(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(entry))
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _encoder_worker_pids() -> list[int]:
    """Pids of this session's Ray workers that run the TeacherEncoder actor."""
    import ray

    node = ray._private.worker._global_node  # the node that this test session's driver started
    raylet = node.all_processes["raylet"][0].process.pid
    return [pid for pid in _children(raylet) if "TeacherEncoder" in _cmdline(pid)]


def _check_complete(config, manifest_uri, folders: dict[str, str]) -> None:
    hashes = set(pq.read_table(manifest_uri).column("hash").to_pylist())
    for kind, folder in folders.items():
        rows = _shard_rows(folder)
        assert len(rows) == len(set(rows)), f"{kind}: duplicate rows"
        assert set(rows) == hashes, f"{kind}: rows differ from the manifest"


@pytest.mark.slow
def test_kill_worker_then_rerun(ray_cluster, tmp_path):
    _write_images(tmp_path / "images")
    config = _config(tmp_path)
    teachers = ensure_teachers(config)
    manifest_uri = curate(config).manifest_uri
    clip_folder = config.uri("features", f"clip-{teachers.clip_fingerprint}")

    killed: list[int] = []
    stop = threading.Event()

    def kill_one_encoder() -> None:
        if _wait_for_shard(clip_folder, timeout=120, stop=stop):
            for pid in _encoder_worker_pids()[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    killer = threading.Thread(target=kill_one_encoder)
    killer.start()
    try:
        first = precompute(config, manifest_uri, teachers)
        first_error = None
    except Exception as error:  # the run may fail or recover; either way the rerun must finish it
        first, first_error = None, error
    finally:
        stop.set()
        killer.join()
    assert killed, "no TeacherEncoder worker was found to kill"

    present = {kind: set(_shard_rows(folder)) for kind, folder in _folders(config, teachers).items()}
    print(f"worker kill: pid {killed[0]}; rows present after the first run: "
          f"{ {kind: len(rows) for kind, rows in present.items()} }")
    shards_before = {kind: set(list_shards(folder)) for kind, folder in _folders(config, teachers).items()}
    rerun = precompute(config, manifest_uri, teachers)

    for kind in ("clip", "sam"):
        assert rerun.computed[kind] == IMAGES - len(present[kind])
        assert shards_before[kind] <= set(list_shards(rerun.features[kind]))
    _check_complete(config, manifest_uri, rerun.features)
    # Ray Data restarts a killed actor and retries its batch, so the first run normally finished
    if first is not None:
        assert first.computed == {"clip": IMAGES, "sam": IMAGES}
    else:
        print(f"first run failed after the worker kill: {first_error!r}")


def _folders(config, teachers) -> dict[str, str]:
    return {
        "clip": config.uri("features", f"clip-{teachers.clip_fingerprint}"),
        "sam": config.uri("features", f"sam-{teachers.sam_fingerprint}"),
    }


def _kill_ray_started_by(temp_dir: str) -> None:
    """End Ray processes that the killed driver started (they name its temporary folder)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and temp_dir in _cmdline(int(entry)):
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_kill_driver_then_rerun(ray_cluster, tmp_path):
    _write_images(tmp_path / "images")
    config = _config(tmp_path)
    teachers = ensure_teachers(config)
    manifest_uri = curate(config).manifest_uri
    folders = _folders(config, teachers)

    # a file in the feature folder that precompute did not write, and must keep
    os.makedirs(folders["clip"], exist_ok=True)
    foreign = os.path.join(folders["clip"], "NOTES.txt")
    with open(foreign, "w", encoding="utf-8") as handle:
        handle.write("kept by every rerun")

    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config.model_dump(mode="json")))
    # Ray's socket paths must stay short (Unix sockets allow about 107 bytes)
    ray_dir = tempfile.mkdtemp(prefix="samclip-kill-")
    env = {**os.environ, "SAMCLIP_RAY_TMPDIR": ray_dir}
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / "driver.log"
    with open(log_path, "wb") as log:
        driver = subprocess.Popen(
            [sys.executable, DRIVER, str(config_path), manifest_uri],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        started = _wait_for_shard(folders["clip"], timeout=240, process=driver)
        assert started, f"the driver wrote no shard; its log:\n{log_path.read_text()[-3000:]}"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
        _kill_ray_started_by(ray_dir)
    assert driver.returncode == -signal.SIGKILL

    present = {kind: _shard_rows(folder) for kind, folder in folders.items()}
    assert 0 < len(present["clip"]) < IMAGES or not present["sam"], "the kill came after the run"
    shards_before = {kind: set(list_shards(folder)) for kind, folder in folders.items()}

    rerun = precompute(config, manifest_uri, teachers)
    print(f"driver kill: rows present {({kind: len(rows) for kind, rows in present.items()})}, "
          f"rerun computed {rerun.computed}, reused {rerun.reused}")

    for kind in ("clip", "sam"):
        assert rerun.computed[kind] == IMAGES - len(set(present[kind]))
        assert rerun.reused[kind] == len(set(present[kind]))
        assert shards_before[kind] <= set(list_shards(folders[kind]))
    _check_complete(config, manifest_uri, folders)
    assert os.path.isfile(foreign)


def test_exception_mid_write_leaves_no_shard(tmp_path, monkeypatch):
    """An exception while the bytes are written leaves only a temporary name, then nothing."""
    from samclip.tasks import features, storage

    def failing_replace(source, target):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(storage.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        features.write_feature_shard(
            str(tmp_path), ["a" * 64], np.zeros((1, 4), np.float16), "float16"
        )
    assert os.listdir(tmp_path) == []
