"""The per-worker loop of a training stage, run by Ray Train's TorchTrainer on every worker.

Rank 0 writes checkpoints and ``metrics.jsonl``; every rank calls ``ray.train.report`` with the
same metrics. Gradients are averaged across workers by hand after both backward passes of a
step, rather than by DDP: the student is called through ``clip_embedding``, ``image_embeddings``
and ``predict_masks`` instead of ``forward``, and stage 2 runs two backward passes per step,
neither of which DDP's reducer supports.

Randomness is derived from (seed, rank, epoch, step): the shuffle of each epoch and the prompts
and torch RNG of each step. A resumed run therefore draws exactly what the original would have,
and the training state needs no RNG state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from samclip.config import StageConfig
from samclip.tasks import storage
from samclip.tasks.checkpoints import (
    load_student,
    load_train_state,
    load_weights_strict,
    load_student_state_dict,
    save_student_checkpoint,
    student_meta,
)
from samclip.tasks.train_data import FeatureSpec, make_clip_batch, make_sam_batch, slice_rows
from samclip.tasks.train_steps import (
    accumulate_gradients,
    build_optimizer,
    build_scheduler,
    freeze_for_stage,
    optimizer_step,
    validation_metrics,
    validation_sums,
)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SHUFFLE_BUFFER_ROWS = 1024  # rows held by Ray Data's local shuffle on each worker


@dataclass
class LoopSettings:
    """Everything a worker needs, built by the driver (plain values, so Ray can ship them)."""

    stage: int
    stage_config: dict[str, Any]
    seed: int
    arch: str
    student_options: dict[str, Any]
    embed_dim: int
    teacher_files: Any  # samclip.tasks.teachers.TeacherFiles
    init_checkpoint: str | None
    run_uri: str  # metrics.jsonl goes here
    steps_per_epoch: int
    sam_batches_per_pass: int
    clip_spec: FeatureSpec
    sam_spec: FeatureSpec | None
    val_has_sam: bool
    config_yaml: str
    max_pixels: int
    endpoint_url: str | None
    score_weights: tuple[float, float]  # (clip, sam) weights of val/score
    torch_threads: int

    @property
    def stage_cfg(self) -> StageConfig:
        return StageConfig.model_validate(self.stage_config)

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.stage_cfg.epochs
        max_steps = self.stage_cfg.max_steps
        return min(total, max_steps) if max_steps else total


def derive_seed(*parts: object) -> int:
    """Mix seed parts into one 63-bit seed, the same on every machine and Python version."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    settings: LoopSettings = loop_config["settings"]
    stage_cfg = settings.stage_cfg
    storage.configure_endpoint(settings.endpoint_url)
    torch.set_num_threads(settings.torch_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    _configure_logging()

    # model, teacher decoder, optimiser
    needs_teacher = settings.stage == 2 or settings.val_has_sam or settings.init_checkpoint is None
    teacher = _load_teacher(settings).to(device) if needs_teacher else None
    model = _initial_student(settings, teacher).to(device)
    meta = student_meta(settings.arch, settings.embed_dim, **settings.student_options)
    trainable = freeze_for_stage(model, settings.stage)
    optimizer = build_optimizer(model, settings.stage, stage_cfg)
    scheduler = build_scheduler(optimizer, stage_cfg, settings.total_steps)
    state = _fresh_state()

    # resume from this run's own last checkpoint (a restarted worker group or a rerun)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            load_weights_strict(model, load_student_state_dict(folder), source=folder)
            saved = load_train_state(folder)
        optimizer.load_state_dict(saved.pop("optimizer"))
        scheduler.load_state_dict(saved.pop("scheduler"))
        for schedule in scheduler.lr_lambdas:  # the loaded state carries the old run's lengths
            schedule.warmup_steps, schedule.total_steps = stage_cfg.warmup_steps, max(settings.total_steps, 1)
        state.update(saved)
        # a run resumed with a larger max_steps or more epochs continues; early stopping stays final
        state["finished"] = state["early_stopped"] or state["step"] >= settings.total_steps
        model.to(device)
        if rank == 0:
            logger.info("stage %d resumed at step %d (epoch %d)", settings.stage, state["step"], state["epoch"])
    _broadcast_parameters(model, world)
    if rank == 0:
        logger.info(
            "stage %d: %d workers, %d trainable parameters, %d steps per epoch, %d steps in all",
            settings.stage, world, trainable, settings.steps_per_epoch, settings.total_steps,
        )

    metrics_lines = _read_metrics_lines(settings.run_uri, state["step"]) if rank == 0 else []
    shards = {
        "train": ray.train.get_dataset_shard("train"),
        "val": ray.train.get_dataset_shard("val"),
        "train_sam": ray.train.get_dataset_shard("train_sam") if settings.stage == 2 else None,
    }
    loop = _Loop(settings, model, teacher, optimizer, scheduler, state, shards, rank, world, device, metrics_lines, meta)
    loop.run()


class _Loop:
    """Epochs, steps, validation and checkpoints of one worker; state lives in ``self.state``."""

    def __init__(self, settings, model, teacher, optimizer, scheduler, state, shards, rank, world, device, metrics_lines, meta):
        self.settings = settings
        self.cfg = settings.stage_cfg
        self.model, self.teacher = model, teacher
        self.optimizer, self.scheduler = optimizer, scheduler
        self.state = state
        self.shards = shards
        self.rank, self.world, self.device = rank, world, device
        self.metrics_lines = metrics_lines
        self.meta = meta
        self.sam_stream = self._sam_batches() if settings.stage == 2 else None
        self.window: dict[str, float] = {}
        self.window_steps = 0

    def run(self) -> None:
        import ray.train

        if self.state["finished"]:
            # The run completed before; report its final metrics again so the result has them.
            logger.info("stage %d already finished at step %d", self.settings.stage, self.state["step"])
            ray.train.report(self.state["last_metrics"], checkpoint=ray.train.get_checkpoint() if self.rank == 0 else None)
            return

        while self.state["epoch"] < self.cfg.epochs and not self.state["finished"]:
            self._train_epoch()

    def _train_epoch(self) -> None:
        settings, cfg, state = self.settings, self.cfg, self.state
        epoch = state["epoch"]
        self.model.train()
        batches = self.shards["train"].iter_batches(
            batch_size=cfg.clip_batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
            local_shuffle_seed=derive_seed(settings.seed, "shuffle", self.rank, epoch) % (2**31),
        )
        started = time.perf_counter()
        for index, rows in enumerate(batches):
            if index < state["batch_in_epoch"]:
                continue  # already trained on before the restart
            self._step(rows, epoch)
            state["batch_in_epoch"] = index + 1
            end_of_epoch = state["batch_in_epoch"] >= settings.steps_per_epoch
            at_max = cfg.max_steps is not None and state["step"] >= cfg.max_steps
            periodic = cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0
            if at_max:
                state["finished"] = True
            if end_of_epoch or at_max:
                break
            if periodic:
                self._validate_and_checkpoint(epoch_done=False)
        if not state["finished"] and state["batch_in_epoch"] < settings.steps_per_epoch:
            logger.warning(
                "epoch %d ended after %d of %d expected batches", epoch, state["batch_in_epoch"], settings.steps_per_epoch
            )
        state["epoch"] = epoch + 1
        state["batch_in_epoch"] = 0
        if state["epoch"] >= cfg.epochs:
            state["finished"] = True
        logger.debug("epoch %d took %.1f s", epoch, time.perf_counter() - started)
        self._validate_and_checkpoint(epoch_done=True)

    def _step(self, rows: dict[str, np.ndarray], epoch: int) -> None:
        settings, cfg, state = self.settings, self.cfg, self.state
        step_started = time.perf_counter()
        torch.manual_seed(derive_seed(settings.seed, "torch", self.rank, state["step"]))
        resolution = cfg.clip_resolution
        clip_batch = make_clip_batch(rows, settings.clip_spec, resolution, settings.max_pixels)
        clip_batch.images, clip_batch.targets = clip_batch.images.to(self.device), clip_batch.targets.to(self.device)
        samples = clip_batch.images.shape[0]

        sam_batch = prompts = None
        if settings.stage == 2:
            sam_batch = next(self.sam_stream)
            state["sam_batches_drawn"] += 1
            prompts = self._prompts(sam_batch, derive_seed(settings.seed, "prompts", self.rank, state["step"]))
            samples += sam_batch.images.shape[0]

        terms = accumulate_gradients(self.model, settings.stage, cfg, clip_batch, sam_batch, prompts, self.teacher)
        _average_gradients(self.optimizer, self.world)
        terms["grad_norm"] = optimizer_step(self.optimizer, self.scheduler, cfg)
        state["step"] += 1

        for name, value in terms.items():
            self.window[name] = self.window.get(name, 0.0) + value
        self.window_steps += 1
        seconds = time.perf_counter() - step_started
        samples_per_second = samples * self.world / max(seconds, 1e-9)
        log_now = state["step"] == 1 or state["step"] % cfg.log_every == 0 or state["step"] == settings.total_steps
        if self.rank == 0 and log_now:
            self._log_step(epoch, terms, samples_per_second)

    def _log_step(self, epoch: int, terms: dict[str, float], samples_per_second: float) -> None:
        lrs = {f"lr/{group['name']}": group["lr"] for group in self.optimizer.param_groups}
        peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        logger.info(
            "stage %d | epoch %d | step %d/%d | %s | %s | %.1f samples/s | peak rss %.0f MiB",
            self.settings.stage, epoch, self.state["step"], self.settings.total_steps,
            " ".join(f"{name} {value:.4f}" for name, value in terms.items()),
            " ".join(f"{name} {value:.2e}" for name, value in lrs.items()),
            samples_per_second, peak_rss_mib,
        )
        self.metrics_lines.append(
            {"kind": "train", "step": self.state["step"], "epoch": epoch, **{f"train/{k}": v for k, v in terms.items()}, **lrs,
             "samples_per_second": samples_per_second, "peak_rss_mib": peak_rss_mib}
        )

    def _prompts(self, sam_batch, seed: int):
        from samclip.model.prompts import sample_prompts

        generator = torch.Generator().manual_seed(seed)
        prompts = sample_prompts(sam_batch.images.shape[0], self.cfg.masks_per_image, sam_batch.valid_hw, generator)
        return type(prompts)(*(None if t is None else t.to(self.device) for t in prompts))

    def _sam_batches(self) -> Iterator:
        """Cycle over the SAM rows forever, reshuffled each pass, resuming at the saved position."""
        settings, cfg = self.settings, self.cfg
        per_pass = max(settings.sam_batches_per_pass, 1)
        drawn = self.state["sam_batches_drawn"]
        pass_index, skip = divmod(drawn, per_pass)
        resolution = self.model.arch.sam_resolution
        while True:
            batches = self.shards["train_sam"].iter_batches(
                batch_size=cfg.sam_batch_size,
                batch_format="numpy",
                local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
                local_shuffle_seed=derive_seed(settings.seed, "sam-shuffle", self.rank, pass_index) % (2**31),
            )
            for index, rows in enumerate(batches):
                if index < skip:
                    continue
                batch = make_sam_batch(rows, settings.sam_spec, resolution, settings.max_pixels)
                batch.images = batch.images.to(self.device)
                batch.teacher_embeddings = batch.teacher_embeddings.to(self.device)
                yield batch
            skip = 0
            pass_index += 1

    def _validate(self) -> dict[str, float]:
        settings, cfg = self.settings, self.cfg
        self.model.eval()
        totals: dict[str, float] = {}
        # the same prompts for the same val images at every validation, so epochs compare
        generator_seed = derive_seed(settings.seed, "val-prompts", self.rank)
        batch_index = 0
        for rows in self.shards["val"].iter_batches(batch_size=cfg.clip_batch_size, batch_format="numpy"):
            clip_batch = make_clip_batch(rows, settings.clip_spec, cfg.clip_resolution, settings.max_pixels)
            clip_batch.images, clip_batch.targets = clip_batch.images.to(self.device), clip_batch.targets.to(self.device)
            sums = validation_sums(self.model, cfg, clip_batch)
            _add(totals, sums)
            if settings.val_has_sam and self.teacher is not None:
                count = len(rows["hash"])
                for start in range(0, count, cfg.sam_batch_size):
                    part = slice_rows(rows, start, start + cfg.sam_batch_size)
                    sam_batch = make_sam_batch(part, settings.sam_spec, self.model.arch.sam_resolution, settings.max_pixels)
                    sam_batch.images = sam_batch.images.to(self.device)
                    sam_batch.teacher_embeddings = sam_batch.teacher_embeddings.to(self.device)
                    prompts = self._prompts(sam_batch, derive_seed(generator_seed, batch_index, start))
                    _add(totals, validation_sums(self.model, cfg, None, sam_batch, prompts, self.teacher))
            batch_index += 1
        self.model.train()
        totals = _all_reduce_sums(totals, self.world)
        return validation_metrics(totals, settings.stage, cfg)

    def _validate_and_checkpoint(self, epoch_done: bool) -> None:
        import ray.train

        settings, cfg, state = self.settings, self.cfg, self.state
        metrics: dict[str, float] = {
            "epoch": state["step"] / max(settings.steps_per_epoch, 1),
            "step": state["step"],
        }
        if self.window_steps:
            metrics.update({f"train/{k}": v / self.window_steps for k, v in self.window.items()})
        self.window, self.window_steps = {}, 0
        metrics.update({f"lr/{group['name']}": group["lr"] for group in self.optimizer.param_groups})
        val = self._validate()
        metrics.update(val)
        if "val/clip_similarity" in val:
            clip_weight, sam_weight = settings.score_weights
            metrics["val/score"] = clip_weight * val["val/clip_similarity"] + sam_weight * val.get("val/sam_iou", 0.0)

        # early stopping on the stage objective, once per epoch
        if epoch_done and "val/loss" in val and cfg.early_stopping_patience is not None:
            if val["val/loss"] < state["best_val_loss"]:
                state["best_val_loss"], state["epochs_without_improvement"] = val["val/loss"], 0
            else:
                state["epochs_without_improvement"] += 1
                if state["epochs_without_improvement"] >= cfg.early_stopping_patience:
                    logger.info("early stopping: val/loss has not improved for %d epochs", cfg.early_stopping_patience)
                    state["finished"] = state["early_stopped"] = True
        metrics["finished"] = float(state["finished"])
        state["last_metrics"] = metrics
        if self.rank == 0:
            logger.info("stage %d | step %d | %s", settings.stage, state["step"],
                        " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val/")))
            self.metrics_lines.append({"kind": "eval", **metrics})

        with tempfile.TemporaryDirectory(prefix="samclip-ckpt-") as folder:
            checkpoint = None
            if self.rank == 0:
                train_state = {**state, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
                save_student_checkpoint(folder, self.model, self.meta, train_state, settings.config_yaml)
                _write_metrics_lines(settings.run_uri, self.metrics_lines)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)


def _fresh_state() -> dict[str, Any]:
    return {
        "step": 0,
        "epoch": 0,
        "batch_in_epoch": 0,
        "sam_batches_drawn": 0,
        "finished": False,
        "early_stopped": False,
        "best_val_loss": math.inf,
        "epochs_without_improvement": 0,
        "last_metrics": {},
    }


def _add(totals: dict[str, float], sums: dict[str, float]) -> None:
    for name, value in sums.items():
        totals[name] = totals.get(name, 0.0) + value


def _load_teacher(settings: LoopSettings) -> torch.nn.Module:
    from samclip.tasks.teachers import load_sam_teacher

    teacher = load_sam_teacher(settings.teacher_files)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher.eval()


def _initial_student(settings: LoopSettings, teacher: torch.nn.Module | None) -> torch.nn.Module:
    """Return the student a fresh run starts from: the previous stage's weights, or SAM's."""
    from samclip.model.architectures import build_student

    if settings.init_checkpoint is not None:
        return load_student(settings.init_checkpoint)
    assert teacher is not None
    # the CLIP head's random MLP comes from the global RNG: the same on every worker
    torch.manual_seed(derive_seed(settings.seed, "student-init"))
    return build_student(settings.arch, teacher, settings.embed_dim, **settings.student_options)


def _broadcast_parameters(model: torch.nn.Module, world: int) -> None:
    if world > 1:
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)


def _average_gradients(optimizer: torch.optim.Optimizer, world: int) -> None:
    """All-reduce the mean of every trainable gradient in one flat buffer."""
    if world == 1:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for param, grad in zip(params, grads):
        param.grad = flat[offset : offset + grad.numel()].view_as(param).clone()
        offset += grad.numel()


def _all_reduce_sums(totals: dict[str, float], world: int) -> dict[str, float]:
    if world == 1:
        return totals
    names = ["clip_cosine", "clip_count", "sam_focal", "sam_dice", "sam", "sam_count", "sam_iou", "mask_count"]
    values = torch.tensor([totals.get(name, 0.0) for name in names], dtype=torch.float64)
    torch.distributed.all_reduce(values)
    return dict(zip(names, values.tolist()))


def _read_metrics_lines(run_uri: str, up_to_step: int) -> list[dict[str, Any]]:
    uri = storage.join(run_uri, METRICS_FILE)
    if not storage.exists(uri):
        return []
    lines = [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]
    # lines past the restored checkpoint belong to work that is being redone
    return [line for line in lines if line.get("step", 0) <= up_to_step]


def _write_metrics_lines(run_uri: str, lines: list[dict[str, Any]]) -> None:
    # object stores cannot append, so the whole file is rewritten at each checkpoint
    text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines)
    storage.write_text(storage.join(run_uri, METRICS_FILE), text)


def _configure_logging() -> None:
    package = logging.getLogger("samclip")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
