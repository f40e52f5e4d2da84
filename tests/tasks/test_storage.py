"""Storage helpers on local files and on an S3-protocol server (moto) bound to loopback."""

from __future__ import annotations

import logging
import os
import socket
import time

import numpy as np
import pyarrow as pa
import pytest

from samclip.config import PipelineConfig
from samclip.tasks import features, storage, teachers

BUCKET = "samclip-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """An in-memory S3 server on 127.0.0.1 with one bucket; storage helpers pointed at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    patch = pytest.MonkeyPatch()
    patch.setenv("AWS_ACCESS_KEY_ID", "testing")
    patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    patch.setenv("SAMCLIP_S3_ENDPOINT_URL", endpoint)
    fs, _ = storage.filesystem(f"s3://{BUCKET}")
    fs.mkdir(BUCKET)
    try:
        yield endpoint
    finally:
        patch.undo()
        server.stop()


def test_put_and_get_file_local(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"weights")
    storage.put_file(str(source), str(tmp_path / "out" / "copy.bin"))
    storage.get_file(str(tmp_path / "out" / "copy.bin"), str(tmp_path / "back" / "copy.bin"))
    assert (tmp_path / "back" / "copy.bin").read_bytes() == b"weights"
    assert os.listdir(tmp_path / "out") == ["copy.bin"]
    assert os.listdir(tmp_path / "back") == ["copy.bin"]


def test_read_parquet_schema_keeps_metadata(tmp_path):
    table = pa.table({"a": [1, 2]}).replace_schema_metadata({"shape": "[2]"})
    storage.write_parquet(table, str(tmp_path / "t.parquet"))
    schema = storage.read_parquet_schema(str(tmp_path / "t.parquet"))
    assert schema.metadata[b"shape"] == b"[2]"


def test_list_files_skips_temporary(tmp_path):
    storage.write_bytes(str(tmp_path / "a" / "x.png"), b"1")
    (tmp_path / "a" / ".tmp-1-y.png").write_bytes(b"partial")
    assert storage.list_files(str(tmp_path), ".png") == [str(tmp_path / "a" / "x.png")]


def test_s3_bytes_and_listing(s3_endpoint):
    uri = f"s3://{BUCKET}/bytes/nested/a.bin"
    storage.write_bytes(uri, b"abc")
    assert storage.read_bytes(uri) == b"abc"
    assert storage.exists(uri)
    assert storage.list_files(f"s3://{BUCKET}/bytes") == [uri]
    assert storage.file_info(uri)["size"] == 3
    assert storage.local_path(uri) is None


def test_s3_put_and_get_file(s3_endpoint, tmp_path):
    source = tmp_path / "model.pth"
    source.write_bytes(os.urandom(3000))
    uri = f"s3://{BUCKET}/files/model.pth"
    storage.put_file(str(source), uri)
    storage.get_file(uri, str(tmp_path / "back" / "model.pth"))
    assert (tmp_path / "back" / "model.pth").read_bytes() == source.read_bytes()


def test_s3_feature_shards(s3_endpoint):
    folder = f"s3://{BUCKET}/features/clip-0123"
    arrays = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float16)
    hashes = ["a" * 64, "b" * 64, "c" * 64]
    uri = features.write_feature_shard(folder, hashes, arrays, "float16")
    assert uri.startswith(f"s3://{BUCKET}/features/clip-0123/part-")
    assert features.read_feature_hashes(folder) == set(hashes)
    restored = features.read_features(folder)
    assert np.array_equal(restored["b" * 64].view(np.uint16), arrays[1].view(np.uint16))


def test_s3_teachers_written_and_cached(s3_endpoint, tmp_path):
    config = PipelineConfig.model_validate(
        {
            "storage": {"root": f"s3://{BUCKET}/run", "endpoint_url": s3_endpoint},
            "teachers": {"cache_dir": str(tmp_path / "cache")},
        }
    )
    files = teachers.ensure_teachers(config)
    assert storage.exists(f"s3://{BUCKET}/run/teachers/sam_tiny.pth")
    assert files.sam_checkpoint_uri == f"s3://{BUCKET}/run/teachers/sam_tiny.pth"
    assert files.sam_checkpoint.startswith(str(tmp_path / "cache"))
    mtime = os.stat(files.clip_weights).st_mtime_ns

    again = teachers.ensure_teachers(config)
    assert again.clip_weights == files.clip_weights
    assert os.stat(again.clip_weights).st_mtime_ns == mtime
    assert again.sam_fingerprint == files.sam_fingerprint
    assert again.clip_fingerprint == files.clip_fingerprint


def _leave_temp_file(uri: str, data: bytes, monkeypatch) -> str:
    """Write like a writer killed before its rename, so its temporary file stays; return it."""

    def killed_before_rename(source, target):
        raise OSError("killed before the rename")

    folder = os.path.dirname(uri)
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    with monkeypatch.context() as patch:
        patch.setattr(storage.os, "replace", killed_before_rename)
        patch.setattr(storage.os, "remove", lambda path: None)
        with pytest.raises(OSError, match="killed"):
            storage.write_bytes(uri, data)
    (left,) = set(os.listdir(folder)) - before
    return os.path.join(folder, left)


def _age(path: str, seconds: float) -> None:
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


def test_remove_stale_temp_files_local(tmp_path, monkeypatch):
    stale = _leave_temp_file(str(tmp_path / "part-a.parquet"), b"partial", monkeypatch)
    nested = _leave_temp_file(str(tmp_path / "sub" / "part-b.parquet"), b"partial", monkeypatch)
    fresh = _leave_temp_file(str(tmp_path / "part-c.parquet"), b"partial", monkeypatch)
    assert os.path.basename(stale).startswith(storage.TMP_PREFIX)
    storage.write_bytes(str(tmp_path / "part-d.parquet"), b"committed")
    not_ours = tmp_path / ".tmp-written-by-another-tool"
    not_ours.write_bytes(b"other")
    for path in (stale, nested, str(tmp_path / "part-d.parquet"), str(not_ours)):
        _age(path, 7200)

    assert storage.remove_stale_temp_files(str(tmp_path), None) == []
    assert os.path.exists(stale)

    removed = storage.remove_stale_temp_files(str(tmp_path), 3600)
    assert removed == sorted([stale, nested])
    assert not os.path.exists(stale)
    assert not os.path.exists(nested)
    assert os.path.exists(fresh)  # a writer may still be writing it
    assert (tmp_path / "part-d.parquet").read_bytes() == b"committed"
    assert not_ours.exists()
    assert storage.remove_stale_temp_files(str(tmp_path / "missing"), 0) == []


def test_remove_stale_temp_files_s3(s3_endpoint):
    # An S3 writer sends one PUT and leaves no temporary object. This object is a local
    # writer's leftover that a sync copied. moto sets LastModified to now, so the age is 0.
    folder = f"s3://{BUCKET}/stale"
    temp = f"{folder}/nested/{storage.TMP_PREFIX}{'0' * 32}-part-a.parquet"
    storage.write_bytes(temp, b"partial")
    storage.write_bytes(f"{folder}/part-b.parquet", b"committed")
    storage.write_bytes(f"{folder}/{storage.TMP_PREFIX}short-name", b"other")

    assert storage.remove_stale_temp_files(folder, 3600) == []
    assert storage.remove_stale_temp_files(folder, 0) == [temp]
    assert not storage.exists(temp)
    assert storage.exists(f"{folder}/part-b.parquet")
    assert storage.exists(f"{folder}/{storage.TMP_PREFIX}short-name")
