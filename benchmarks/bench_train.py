"""Stage-2 training speed: Ray Train with one worker against a plain torch loop in one process.

Both run the same number of stage-2 steps of the same student on the same synthetic data
(images decoded from storage, teacher features looked up in their shards), with the same
batch sizes and the same number of torch threads. A step's time runs from the end of the previous
step, so it includes the wait for data. Each rate is taken at the median step time, leaving out
the first step as warm-up. The plain loop runs once before and once after Ray Train, and the
faster of the two is the reference of the ratio.

Usage: python benchmarks/bench_train.py [--steps 8] [--threads 1]   (or: make bench-train)
The last line is ``train_ratio=<ray/plain> first_step_s=<seconds>``, where first_step_s is the
time from calling run_stage (which starts Ray) to the end of the first optimiser step.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time

import samclip.tasks  # noqa: F401  (sets Ray's loopback variables before ray is imported)

def plain_loop(config, data, steps: int, threads: int) -> list[tuple[int, float]]:
    """Train ``steps`` stage-2 steps in this process; returns (samples, seconds) per step."""
    import numpy as np
    import torch

    from samclip.model.architectures import build_student
    from samclip.model.prompts import sample_prompts
    from samclip.tasks.teachers import ensure_teachers, load_sam_teacher
    from samclip.tasks.train_data import FeatureLookup, build_stage_tables, make_clip_batch, make_sam_batch
    from samclip.tasks.train_steps import (
        accumulate_gradients,
        build_optimizer,
        build_scheduler,
        freeze_for_stage,
        optimizer_step,
    )

    torch.set_num_threads(threads)
    cfg = config.train.stage2
    tables = build_stage_tables(data, 2)
    teacher = load_sam_teacher(ensure_teachers(config)).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    torch.manual_seed(0)
    student = config.student
    model = build_student(
        student.arch, teacher, tables.clip_spec.shape[0], clip_head_depth=student.clip_head_depth,
        pooling=student.pooling, mlp_hidden_layers=student.mlp_hidden_layers,
    ).train()
    freeze_for_stage(model, 2)
    optimizer = build_optimizer(model, 2, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    clip_features, sam_features = FeatureLookup(tables.clip_spec), FeatureLookup(tables.sam_spec)
    clip_rows = tables.train.to_pydict()
    sam_rows = tables.train_sam.to_pydict()

    def rows_at(rows: dict, start: int, size: int) -> dict:
        count = len(rows["hash"])
        picks = [(start + offset) % count for offset in range(size)]
        return {name: np.asarray([values[i] for i in picks]) for name, values in rows.items()}

    timings = []
    last_end = time.perf_counter()
    for step in range(steps):
        clip_batch = make_clip_batch(
            rows_at(clip_rows, step * cfg.clip_batch_size, cfg.clip_batch_size),
            clip_features, cfg.clip_resolution, config.data.max_pixels,
        )
        sam_batch = make_sam_batch(
            rows_at(sam_rows, step * cfg.sam_batch_size, cfg.sam_batch_size),
            sam_features, model.arch.sam_resolution, config.data.max_pixels,
        )
        generator = torch.Generator().manual_seed(step)
        prompts = sample_prompts(sam_batch.images.shape[0], cfg.masks_per_image, sam_batch.valid_hw, generator)
        accumulate_gradients(model, 2, cfg, clip_batch, sam_batch, prompts, teacher)
        optimizer_step(optimizer, scheduler, cfg)
        now = time.perf_counter()
        timings.append((clip_batch.images.shape[0] + sam_batch.images.shape[0], now - last_end))
        last_end = now
    return timings


def ray_loop(config, data, steps: int) -> tuple[list[tuple[int, float]], float]:
    """Run the same steps through run_stage; returns (samples, seconds) per step and first_step_s."""
    from samclip.tasks.train import run_stage
    from samclip.tasks.train_metrics import read_metrics_jsonl

    submitted = time.time()
    result = run_stage(config, 2, data, None, "bench-train")
    lines = [line for line in read_metrics_jsonl(result.metrics_jsonl_uri) if line["kind"] == "train"]
    if len(lines) != steps:
        raise RuntimeError(f"expected {steps} logged steps in {result.metrics_jsonl_uri}, found {len(lines)}")
    timings = [(int(line["samples"]), float(line["step_seconds"])) for line in lines]
    return timings, lines[0]["time"] - submitted


def samples_per_second(timings: list[tuple[int, float]]) -> float:
    """Return samples per second at the median step time, leaving out the first (warm-up) step.

    The median rather than the mean keeps a few steps slowed by other work on a shared machine
    from deciding the result.
    """
    measured = timings[1:]
    return statistics.median(samples / seconds for samples, seconds in measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="stage-2 optimiser steps of each loop")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the Ray worker's CPUs)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary storage root")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is left out as warm-up")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")

    from samclip.config import load_config
    from samclip.tasks.train_synthetic import write_synthetic_stage_data

    root = tempfile.mkdtemp(prefix="samclip-bench-train-")
    try:
        config = load_config("smoke", [
            f"storage.root={root}",
            "ray.num_cpus=2",
            "train.workers=1",
            f"train.cpus_per_worker={args.threads}",
            "train.log_to_mlflow=false",
            "train.stage2.epochs=1",
            f"train.stage2.max_steps={args.steps}",
            "train.stage2.log_every=1",
            "train.stage2.checkpoint_every=0",
        ])
        cfg = config.train.stage2
        images = args.steps * cfg.clip_batch_size
        data = write_synthetic_stage_data(root, config, n_train=images, n_val=2, clip_dim=256)

        # The plain loop runs before and after Ray Train, because the load of a shared machine
        # can change during the benchmark.
        plain_before = plain_loop(config, data, args.steps, args.threads)
        ray_timings, first_step_s = ray_loop(config, data, args.steps)
        plain_after = plain_loop(config, data, args.steps, args.threads)
        # the faster plain run is the reference, so load never flatters Ray Train
        plain_rate = max(samples_per_second(plain_before), samples_per_second(plain_after))
        ray_rate = samples_per_second(ray_timings)
        print(f"stage 2, {args.steps} steps of {cfg.clip_batch_size} CLIP + {cfg.sam_batch_size} SAM images "
              f"x {cfg.masks_per_image} masks, {args.threads} torch threads, median step, first step left out")
        print(
            f"plain torch loop: {plain_rate:.2f} samples/s (before Ray {samples_per_second(plain_before):.2f}, "
            f"after {samples_per_second(plain_after):.2f})"
        )
        print(f"ray train, 1 worker: {ray_rate:.2f} samples/s")
        print(f"job submission to end of first step: {first_step_s:.1f} s (includes starting Ray)")
        print(f"train_ratio={ray_rate / plain_rate:.3f} first_step_s={first_step_s:.1f}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
