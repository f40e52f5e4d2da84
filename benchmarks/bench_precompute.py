"""Benchmark precompute: Ray Data against a plain single-process torch loop, memory and MFU.

Usage: python benchmarks/bench_precompute.py [--images N] [--batch-size B] [--threads T]

Both runs encode the same curated images with the same teachers (the smoke profile's tiny SAM
and CLIP), the same batch size and the same torch thread count, and write the same feature
shards. The plain loop calls precompute's own ``decode_batch``, ``TeacherEncoder`` and
``write_shard`` in one process, so the difference is what Ray Data adds or overlaps. Ray Data
runs the decode tasks beside the encoder actor, on the CPU that the actor leaves free, while
the plain loop decodes and encodes in turn.

Each is run on N and on 4N images. Throughput is reported end to end (N images) and marginal,
3N / (t(4N) - t(N)), which cancels fixed costs such as Ray actor start-up and teacher loading.
Peak memory is the sum of the resident set sizes of this process and all its descendants
(the local Ray's processes), sampled every 0.1 s. MFU is the teachers' forward FLOPs (counted
with torch.utils.flop_counter) per second of the Ray run, over the fp32 matmul rate measured
here with the same thread count.

The plain loop then runs again with the teachers under bfloat16 autocast
(``precompute.compute_dtype``), and the benchmark prints its marginal speed and the largest
deviation of its stored features from the float32 ones, over the 4N images.

The last line is ``precompute_ratio=<ray/plain> rss_growth=<peak at 4N / peak at N> mfu=<fraction>``.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
from PIL import Image

import samclip.tasks  # noqa: F401  (sets Ray's loopback variables before ray is imported)
from samclip.config import PipelineConfig
from samclip.tasks import storage
from samclip.tasks.curate import curate
from samclip.tasks.features import read_features
from samclip.tasks.precompute import (
    KINDS,
    TeacherEncoder,
    decode_batch,
    feature_layout,
    precompute,
    write_shard,
)
from samclip.tasks.teachers import ensure_teachers

IMAGE_SIZE = (320, 240)  # (width, height) of the generated photos-sized noise images
PAGE = os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="N, the smaller run's image count")
    parser.add_argument("--batch-size", type=int, default=8, help="images per teacher forward")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (= CPUs per actor)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = tempfile.mkdtemp(prefix="samclip-bench-")
    counts = {"N": args.images, "4N": 4 * args.images}
    configs = {label: _prepare(work, label, count, args) for label, count in counts.items()}
    teachers = ensure_teachers(configs["N"][0])

    ray_seconds, plain_seconds, peaks = {}, {}, {}
    for label, (config, manifest_uri) in configs.items():
        with _PeakMemory() as memory:
            result = precompute(config, manifest_uri, teachers)
        assert result.computed == {kind: counts[label] for kind in KINDS}, result.computed
        ray_seconds[label] = result.seconds
        peaks[label] = memory.peak
        plain_seconds[label] = _plain_loop(config, manifest_uri, teachers, args.threads)
        print(
            f"{label}={counts[label]} images: ray {result.seconds:.2f} s, plain "
            f"{plain_seconds[label]:.2f} s, peak rss {memory.peak / 2**20:.0f} MiB"
        )

    extra = counts["4N"] - counts["N"]
    ray_rate = extra / (ray_seconds["4N"] - ray_seconds["N"])
    plain_rate = extra / (plain_seconds["4N"] - plain_seconds["N"])
    print(
        f"end to end, N images: ray {counts['N'] / ray_seconds['N']:.2f} images/s, plain "
        f"{counts['N'] / plain_seconds['N']:.2f} images/s"
    )
    print(f"marginal (N -> 4N): ray {ray_rate:.2f} images/s, plain {plain_rate:.2f} images/s")

    flops = _flops_per_image(teachers, args.threads)
    peak = _matmul_peak(args.threads)
    mfu = flops * ray_rate / peak
    print(
        f"teacher forward {flops / 1e9:.2f} GFLOP per image (clip + sam); matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s fp32 with {args.threads} thread(s); achieved "
        f"{flops * ray_rate / 1e9:.2f} GFLOP/s"
    )
    bf16_seconds = {
        label: _plain_loop(config, manifest_uri, teachers, args.threads, "bfloat16")
        for label, (config, manifest_uri) in configs.items()
    }
    bf16_rate = extra / (bf16_seconds["4N"] - bf16_seconds["N"])
    deviations = _feature_deviation(configs["4N"][0].storage.root, teachers)
    print(
        f"bf16 teachers, plain loop: marginal {bf16_rate:.2f} images/s "
        f"({bf16_rate / plain_rate:.2f}x fp32); largest |bf16 - fp32| of the stored features: "
        + ", ".join(
            f"{kind} {deviation:.4g} ({deviation / scale:.2%} of max |fp32| {scale:.3g})"
            for kind, (deviation, scale) in deviations.items()
        )
    )
    print(f"peak rss: N {peaks['N'] / 2**20:.0f} MiB, 4N {peaks['4N'] / 2**20:.0f} MiB")
    print(
        f"precompute_ratio={ray_rate / plain_rate:.3f} rss_growth={peaks['4N'] / peaks['N']:.3f} "
        f"mfu={mfu:.3f}"
    )


def _prepare(work: str, label: str, count: int, args) -> tuple[PipelineConfig, str]:
    """Write `count` images and curate them; each size gets its own root and features."""
    folder = os.path.join(work, label, "images")
    os.makedirs(folder)
    rng = np.random.default_rng(count)
    for index in range(count):
        pixels = rng.integers(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        with open(os.path.join(folder, f"{index:06d}.jpg"), "wb") as handle:
            handle.write(buffer.getvalue())
    config = PipelineConfig.model_validate(
        {
            "storage": {"root": os.path.join(work, label, "run")},
            "teachers": {"cache_dir": os.path.join(work, "cache")},
            "ray": {"num_cpus": max(2, args.threads + 1)},
            "data": {"source": folder, "val_fraction": 0.0},
            "precompute": {
                "batch_size": args.batch_size,
                "actors": 1,
                "cpus_per_actor": args.threads,
                "rows_per_shard": 256,
                # the teachers are shared across runs; only the features are separate
                "features_root": os.path.join(work, label, "features"),
            },
        }
    )
    # every run uses the N root's teacher files, so the fingerprints are the same
    teachers_root = os.path.join(work, "N", "run")
    sam = config.teachers.sam.model_copy(
        update={"checkpoint": f"{teachers_root}/teachers/sam_tiny.pth"}
    )
    clip = config.teachers.clip.model_copy(
        update={
            "weights": f"{teachers_root}/teachers/samclip-tiny-clip.bin",
            "model_config_path": f"{teachers_root}/teachers/samclip-tiny-clip.json",
        }
    )
    config = config.model_copy(
        update={"teachers": config.teachers.model_copy(update={"sam": sam, "clip": clip})}
    )
    return config, curate(config).manifest_uri


def _plain_loop(
    config: PipelineConfig,
    manifest_uri: str,
    teachers,
    threads: int,
    compute_dtype: str = "float32",
) -> float:
    """Encode and write every image of a manifest in this process; return the seconds."""
    started = time.perf_counter()
    manifest = storage.read_parquet(manifest_uri, columns=["hash", "uri"])
    limits = {
        "max_pixels": config.data.max_pixels,
        "min_side": config.data.min_side,
        "max_aspect": config.data.max_aspect,
    }
    batch_size = config.precompute.batch_size
    for kind in KINDS:
        layout = feature_layout(kind, teachers, config.precompute.dtype)
        folder = _plain_folder(config.storage.root, compute_dtype, kind)
        encoder = TeacherEncoder(kind, teachers, layout, threads, None, compute_dtype)
        pending: list[pa.Table] = []
        for start in range(0, manifest.num_rows, batch_size):
            pending.append(encoder(decode_batch(manifest.slice(start, batch_size), limits, None)))
            if sum(table.num_rows for table in pending) >= config.precompute.rows_per_shard:
                write_shard(pa.concat_tables(pending), folder, layout, None)
                pending = []
        if pending:
            write_shard(pa.concat_tables(pending), folder, layout, None)
    return time.perf_counter() - started


def _plain_folder(root: str, compute_dtype: str, kind: str) -> str:
    return os.path.join(root, f"plain-{compute_dtype}", kind)


def _feature_deviation(root: str, teachers) -> dict[str, tuple[float, float]]:
    """Return, per teacher, max |bf16 - fp32| over every stored feature value, and max |fp32|."""
    deviations = {}
    for kind in KINDS:
        exact = read_features(_plain_folder(root, "float32", kind))
        approximate = read_features(_plain_folder(root, "bfloat16", kind))
        assert exact.keys() == approximate.keys(), kind
        deviation = scale = 0.0
        for key, array in exact.items():
            reference = array.astype(np.float32)
            difference = np.abs(approximate[key].astype(np.float32) - reference)
            deviation = max(deviation, float(difference.max()))
            scale = max(scale, float(np.abs(reference).max()))
        deviations[kind] = (deviation, scale)
    return deviations


def _flops_per_image(teachers, threads: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from samclip.model.clip_teacher import clip_input
    from samclip.model.images import batch_sam_inputs
    from samclip.tasks.teachers import load_clip_teacher_from, load_sam_teacher

    torch.set_num_threads(threads)
    image = np.zeros((IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)
    clip = load_clip_teacher_from(teachers)
    sam = load_sam_teacher(teachers)
    total = 0
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            clip.encode_image(clip_input(image, clip)[None])
        total += counter.get_total_flops()
        inputs, _ = batch_sam_inputs([image], int(sam.image_encoder.img_size))
        counter = FlopCounterMode(display=False)
        with counter:
            sam.image_encoder(inputs)
        total += counter.get_total_flops()
    return float(total)


def _matmul_peak(threads: int, size: int = 1024, repeats: int = 10) -> float:
    """Measure this machine's fp32 matmul FLOP/s with the given thread count (best of runs)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


class _PeakMemory:
    """Sample the summed RSS of this process and its descendants every 0.1 s."""

    def __enter__(self) -> "_PeakMemory":
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss(os.getpid()))
            time.sleep(0.1)


def _tree_rss(root: int) -> int:
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        rss[int(entry)] = int(fields[21]) * PAGE
    total = 0
    for pid in rss:
        node = pid
        while node in parents and node != root and node > 1:
            node = parents[node]
        if node == root:
            total += rss[pid]
    return total


if __name__ == "__main__":
    main()
