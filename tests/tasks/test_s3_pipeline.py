"""Curate and precompute end to end on an S3-protocol server (moto) bound to 127.0.0.1.

The test starts the server, creates the bucket and sets fake AWS_* credentials. The storage
root is an s3:// URI and the endpoint comes from ``storage.endpoint_url``; the same bucket is
then read through s3fs, pyarrow's own S3 filesystem and Ray Data.
"""

from __future__ import annotations

import io
import logging
import socket

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from samclip.config import PipelineConfig
from samclip.tasks import storage
from samclip.tasks.curate import curate
from samclip.tasks.features import list_shards, read_features
from samclip.tasks.precompute import precompute
from samclip.tasks.teachers import ensure_teachers

BUCKET = "samclip-e2e"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    patch = pytest.MonkeyPatch()
    patch.setenv("AWS_ACCESS_KEY_ID", "testing")
    patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # Were anything to ask for instance metadata, it would reach a closed loopback port.
    patch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    patch.setenv("SAMCLIP_S3_ENDPOINT_URL", endpoint)
    fs, _ = storage.filesystem(f"s3://{BUCKET}")
    fs.mkdir(BUCKET)
    try:
        yield endpoint
    finally:
        patch.undo()
        server.stop()


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_curate_and_precompute_on_s3(ray_cluster, s3_server, tmp_path):
    source = f"s3://{BUCKET}/images"
    for index in range(5):
        storage.write_bytes(f"{source}/nested/{index}.png", _png(48 + index, 40, seed=index))
    storage.write_bytes(f"{source}/copy.png", _png(48, 40, seed=0))  # duplicate of nested/0.png
    storage.write_bytes(f"{source}/broken.jpg", b"not an image")
    config = PipelineConfig.model_validate(
        {
            "storage": {"root": f"s3://{BUCKET}/run", "endpoint_url": s3_server},
            "ray": {"num_cpus": 2},
            "data": {"source": source},
            "teachers": {"cache_dir": str(tmp_path / "cache")},
            "precompute": {"batch_size": 2, "rows_per_shard": 2},
        }
    )

    # curate: Ray Data workers read the bucket
    result = curate(config)
    assert result.manifest_uri == f"s3://{BUCKET}/run/curate/manifest.parquet"
    assert result.counts["accepted"] == 5
    assert result.counts["rejected/duplicate"] == 1
    assert result.counts["rejected/not_an_image"] == 1

    # precompute: features land in the bucket, keyed by fingerprint, and a rerun reuses them
    teachers = ensure_teachers(config)
    first = precompute(config, result.manifest_uri, teachers)
    assert first.computed == {"clip": 5, "sam": 5}
    assert first.features["sam"] == f"s3://{BUCKET}/run/features/sam-{teachers.sam_fingerprint}"
    assert all(uri.startswith(f"s3://{BUCKET}/") for uri in list_shards(first.features["clip"]))
    again = precompute(config, result.manifest_uri, teachers)
    assert again.computed == {"clip": 0, "sam": 0}

    hashes = storage.read_parquet(result.manifest_uri).column("hash").to_pylist()
    sam = read_features(first.features["sam"], hashes)
    assert all(sam[key].shape == teachers.sam_embedding_shape for key in hashes)

    # the same objects through pyarrow's own S3 client and through Ray Data
    s3 = storage.pyarrow_s3_filesystem(s3_server)
    manifest = pq.read_table(f"{BUCKET}/run/curate/manifest.parquet", filesystem=s3)
    assert sorted(manifest.column("hash").to_pylist()) == sorted(hashes)
    dataset = ray_cluster.data.read_parquet(
        f"{BUCKET}/run/curate/manifest.parquet", filesystem=s3
    )
    assert dataset.count() == 5
