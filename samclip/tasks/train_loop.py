"""The per-worker loop of a training stage, run by Ray Train's TorchTrainer on every worker.

Rank 0 writes checkpoints and ``metrics.jsonl``, and every rank calls ``ray.train.report`` with
the same metrics. Gradients are averaged across workers by hand after both backward passes of
a step. DDP would not fit: the student is called through ``clip_embedding``,
``image_embeddings`` and ``predict_masks`` rather than ``forward``, and stage 2 runs two
backward passes per step.

Randomness is derived from (seed, rank, epoch, step): the shuffle of each epoch, and the
prompts and torch RNG of each step. A resumed run therefore draws what the original run would
have drawn from its data position alone. Checkpoints also store every rank's torch, numpy and
Python RNG states, and a resume with the same number of workers restores them, so code that
draws from the global generators between the derived seeds resumes exactly too.

NOTE: bit-exact resume is tested with one worker. With several workers, Ray Data's split may
hand a different set of index rows to each rank after a restart, so a resumed run is a valid
continuation but not guaranteed to match an uninterrupted one bit for bit.

On GPUs (``precision: bf16``) the forward passes run under bfloat16 autocast; Ray Train sets up
NCCL there and gloo on CPUs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from samclip.config import StageConfig
from samclip.logs import LOG_FORMAT
from samclip.tasks import storage
from samclip.tasks.checkpoints import (
    load_student,
    load_student_state_dict,
    load_train_state,
    load_weights_strict,
    save_student_checkpoint,
    student_meta,
)
from samclip.tasks.train_collectives import (
    all_reduce_sums,
    average_gradients,
    broadcast_parameters,
    gather_objects,
)
from samclip.tasks.train_data import (
    FeatureLookup,
    FeatureSpec,
    make_clip_batch,
    make_sam_batch,
    slice_rows,
)
from samclip.tasks.train_metrics import (
    METRICS_FILE,
    MlflowMetrics,
    format_eta,
    read_metrics_jsonl,
    write_metrics_jsonl,
)
from samclip.tasks.train_state import (
    capture_rng_states,
    fresh_state,
    apply_test_hooks,
    restore_rng_states,
)
from samclip.tasks.train_steps import (
    SamBatch,
    accumulate_gradients,
    build_optimizer,
    build_scheduler,
    freeze_for_stage,
    optimizer_step,
    validation_metrics,
    validation_sums,
)

logger = logging.getLogger(__name__)

SHUFFLE_BUFFER_ROWS = 1024  # rows in Ray Data's local shuffle buffer on each worker


@dataclass
class LoopSettings:
    """Everything a worker needs, built by the driver as plain values that Ray can ship."""

    stage: int
    stage_config: dict[str, Any]
    seed: int
    arch: str
    student_options: dict[str, Any]  # keyword arguments of build_student besides arch and embed_dim
    embed_dim: int
    teacher_files: Any  # samclip.tasks.teachers.TeacherFiles
    init_checkpoint: str | None
    run_uri: str  # folder of the run, where metrics.jsonl goes
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
    precision: str = "fp32"  # "bf16" runs the forward passes under bfloat16 autocast
    # MLflow destination of rank 0's metrics: tracking_uri, experiment, artifact_location and
    # run_name; None logs to metrics.jsonl only
    mlflow: dict[str, Any] | None = None

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
    """Train one stage on this worker; ``loop_config["settings"]`` is a LoopSettings."""
    WorkerLoop(loop_config["settings"]).run()


class WorkerLoop:
    """Model, optimiser, data shards and training state of one worker, and the loop over them."""

    def __init__(self, settings: LoopSettings) -> None:
        import ray.train
        import ray.train.torch

        self.settings = settings
        self.cfg = settings.stage_cfg
        storage.configure_endpoint(settings.endpoint_url)
        torch.set_num_threads(settings.torch_threads)
        _configure_logging()
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.autocast_dtype = torch.bfloat16 if settings.precision == "bf16" else None

        # model, frozen teacher decoder, optimiser
        stage = settings.stage
        needs_teacher = stage == 2 or settings.val_has_sam or settings.init_checkpoint is None
        self.teacher = _load_teacher(settings).to(self.device) if needs_teacher else None
        self.model = _initial_student(settings, self.teacher).to(self.device)
        self.meta = student_meta(settings.arch, settings.embed_dim, **settings.student_options)
        trainable = freeze_for_stage(self.model, stage)
        self.optimizer = build_optimizer(self.model, stage, self.cfg)
        self.scheduler = build_scheduler(self.optimizer, self.cfg, settings.total_steps)
        self.state = fresh_state()
        self._restore()
        broadcast_parameters(self.model, self.world)
        node_ids = gather_objects(_node_id(), self.world)
        self.nodes = len(set(node_ids))
        if self.rank == 0:
            logger.info(
                "stage %d: %d workers on %d nodes (%s, %s), %d trainable parameters, "
                "%d steps per epoch, %d steps in all",
                stage, self.world, self.nodes, self.device, settings.precision, trainable,
                settings.steps_per_epoch, settings.total_steps,
            )

        # data and bookkeeping
        self.shards = {name: ray.train.get_dataset_shard(name) for name in ("train", "val")}
        self.clip_features = FeatureLookup(settings.clip_spec)
        self.sam_features = FeatureLookup(settings.sam_spec) if settings.sam_spec is not None else None
        self.sam_stream = None
        if stage == 2:
            self.shards["train_sam"] = ray.train.get_dataset_shard("train_sam")
            self.sam_stream = self._sam_batches()
        self.metrics_uri = storage.join(settings.run_uri, METRICS_FILE)
        self.metrics_lines = []
        if self.rank == 0:
            self.metrics_lines = read_metrics_jsonl(self.metrics_uri, self.state["step"])
        self.window: dict[str, float] = {}  # summed loss terms since the last report
        self.window_steps = 0
        self.reported = False
        self.mlflow = None
        if self.rank == 0 and settings.mlflow is not None:
            try:
                self.mlflow = MlflowMetrics(**settings.mlflow)
            except Exception as error:  # noqa: BLE001  (metrics must not stop training)
                logger.warning(
                    "MLflow at %s is unavailable, so metrics go to metrics.jsonl only: %s",
                    settings.mlflow["tracking_uri"], error,
                )
        # step timing of this attempt, for samples/s and the ETA
        self.attempt_started = time.perf_counter()
        self.attempt_steps = 0
        self.last_step_end = self.attempt_started

    def _restore(self) -> None:
        """Resume from this run's own last checkpoint (a restarted worker group or a rerun)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            load_weights_strict(self.model, load_student_state_dict(folder), source=folder)
            saved = load_train_state(folder)
        self.optimizer.load_state_dict(saved.pop("optimizer"))
        self.scheduler.load_state_dict(saved.pop("scheduler"))
        # The loaded schedule carries the old run's lengths; the current settings win.
        for schedule in self.scheduler.lr_lambdas:
            schedule.warmup_steps = self.cfg.warmup_steps
            schedule.total_steps = max(self.settings.total_steps, 1)
        rng_states = saved.pop("rng_states", None)
        if rng_states is not None and len(rng_states) == self.world:
            restore_rng_states(rng_states[self.rank])
        state = self.state
        state.update(saved)
        # A run resumed with a larger max_steps or more epochs continues; early stopping is final.
        state["finished"] = (
            state["early_stopped"]
            or state["step"] >= self.settings.total_steps
            or state["epoch"] >= self.cfg.epochs
        )
        if self.rank == 0:
            logger.info(
                "stage %d resumed at step %d (epoch %d)", self.settings.stage, state["step"], state["epoch"]
            )

    def run(self) -> None:
        import ray.train

        while self.state["epoch"] < self.cfg.epochs and not self.state["finished"]:
            self._train_epoch()
        if self.mlflow is not None:
            self.mlflow.finish()

        if not self.reported:
            # The restored checkpoint was already final: report it again so the result has it.
            logger.info("stage %d already finished at step %d", self.settings.stage, self.state["step"])
            restored = ray.train.get_checkpoint() if self.rank == 0 else None
            ray.train.report(self.state["last_metrics"], checkpoint=restored)

    def _train_epoch(self) -> None:
        settings, cfg, state = self.settings, self.cfg, self.state
        epoch = state["epoch"]
        self.model.train()
        self.last_step_end = time.perf_counter()
        batches = self.shards["train"].iter_batches(
            batch_size=cfg.clip_batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
            local_shuffle_seed=derive_seed(settings.seed, "shuffle", self.rank, epoch) % 2**31,
        )
        for index, rows in enumerate(batches):
            if index < state["batch_in_epoch"]:
                continue  # trained on before the restart
            self._step(rows, epoch)
            state["batch_in_epoch"] = index + 1
            if cfg.max_steps is not None and state["step"] >= cfg.max_steps:
                state["finished"] = True
            if state["batch_in_epoch"] >= settings.steps_per_epoch or state["finished"]:
                break
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                self._validate_and_checkpoint(epoch_done=False)
                self.last_step_end = time.perf_counter()  # step timing leaves validation out

        epoch_done = state["batch_in_epoch"] >= settings.steps_per_epoch or not state["finished"]
        if not state["finished"] and state["batch_in_epoch"] < settings.steps_per_epoch:
            logger.warning(
                "epoch %d ended after %d of %d expected batches",
                epoch, state["batch_in_epoch"], settings.steps_per_epoch,
            )
        if epoch_done:
            # A stop at max_steps inside an epoch keeps the position, so a longer run continues it.
            state["epoch"] = epoch + 1
            state["batch_in_epoch"] = 0
        if state["epoch"] >= cfg.epochs:
            state["finished"] = True
        self._validate_and_checkpoint(epoch_done=epoch_done)

    def _step(self, rows: dict[str, np.ndarray], epoch: int) -> None:
        settings, cfg, state = self.settings, self.cfg, self.state
        # A step's time runs from the end of the previous step, so it includes the wait for data.
        started = self.last_step_end
        torch.manual_seed(derive_seed(settings.seed, "torch", self.rank, state["step"]))

        # batches: CLIP images, and in stage 2 SAM images with their sampled prompts
        clip_batch = make_clip_batch(rows, self.clip_features, cfg.clip_resolution, settings.max_pixels)
        clip_batch = clip_batch.to(self.device)
        samples = clip_batch.images.shape[0]
        sam_batch = prompts = None
        if settings.stage == 2:
            sam_batch = next(self.sam_stream)
            state["sam_batches_drawn"] += 1
            prompt_seed = derive_seed(settings.seed, "prompts", self.rank, state["step"])
            prompts = self._prompts(sam_batch, prompt_seed)
            samples += sam_batch.images.shape[0]

        # backward passes, gradient averaging, one optimiser step
        lrs = {f"lr/{group['name']}": group["lr"] for group in self.optimizer.param_groups}
        terms = accumulate_gradients(
            self.model, settings.stage, cfg, clip_batch, sam_batch, prompts, self.teacher,
            self.autocast_dtype,
        )
        average_gradients(self.optimizer, self.world)
        terms["grad_norm"] = optimizer_step(self.optimizer, self.scheduler, cfg)
        state["step"] += 1
        apply_test_hooks(state["step"], self.rank)

        # bookkeeping and the log line
        for name, value in terms.items():
            self.window[name] = self.window.get(name, 0.0) + value
        self.window_steps += 1
        self.attempt_steps += 1
        self.last_step_end = time.perf_counter()
        step_seconds = max(self.last_step_end - started, 1e-9)
        step = state["step"]
        if self.rank == 0 and (step == 1 or step % cfg.log_every == 0 or step == settings.total_steps):
            self._log_step(epoch, terms, lrs, samples * self.world, step_seconds)

    def _log_step(
        self, epoch: int, terms: dict[str, float], lrs: dict[str, float], samples: int, step_seconds: float
    ) -> None:
        settings, step = self.settings, self.state["step"]
        samples_per_second = samples / step_seconds
        # the mean step time of this attempt, including validation and checkpoints
        seconds_per_step = (self.last_step_end - self.attempt_started) / max(self.attempt_steps, 1)
        eta_seconds = seconds_per_step * (settings.total_steps - step)
        peak_memory_mib = _peak_memory_mib(self.device)
        logger.info(
            "stage %d | epoch %d/%d | step %d/%d | eta %s | %s | %s | %.1f samples/s | peak memory %.0f MiB",
            settings.stage, epoch + 1, self.cfg.epochs, step, settings.total_steps, format_eta(eta_seconds),
            " ".join(f"{name} {value:.4f}" for name, value in terms.items()),
            " ".join(f"{name} {value:.2e}" for name, value in lrs.items()),
            samples_per_second, peak_memory_mib,
        )
        metrics = {f"train/{name}": value for name, value in terms.items()}
        metrics.update(lrs)
        metrics.update({
            "samples_per_second": samples_per_second,
            "step_seconds": step_seconds,
            "samples": samples,
            "peak_memory_mib": peak_memory_mib,
            "eta_seconds": eta_seconds,
        })
        self.metrics_lines.append({"kind": "train", "step": step, "epoch": epoch, "time": time.time(), **metrics})
        if self.mlflow is not None:
            self.mlflow.add(metrics, step)

    def _prompts(self, sam_batch: SamBatch, seed: int):
        from samclip.model.prompts import sample_prompts

        generator = torch.Generator().manual_seed(seed)
        count = sam_batch.images.shape[0]
        prompts = sample_prompts(count, self.cfg.masks_per_image, sam_batch.valid_hw, generator)
        return type(prompts)(*(None if t is None else t.to(self.device) for t in prompts))

    def _sam_batches(self) -> Iterator[SamBatch]:
        """Cycle over the SAM rows forever, reshuffled each pass, from the saved position on."""
        settings, cfg = self.settings, self.cfg
        pass_index, skip = divmod(self.state["sam_batches_drawn"], max(settings.sam_batches_per_pass, 1))
        resolution = self.model.arch.sam_resolution
        while True:
            batches = self.shards["train_sam"].iter_batches(
                batch_size=cfg.sam_batch_size,
                batch_format="numpy",
                local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
                local_shuffle_seed=derive_seed(settings.seed, "sam-shuffle", self.rank, pass_index) % 2**31,
            )
            for index, rows in enumerate(batches):
                if index >= skip:
                    batch = make_sam_batch(rows, self.sam_features, resolution, settings.max_pixels)
                    yield batch.to(self.device)
            skip = 0
            pass_index += 1

    def _validate(self) -> dict[str, float]:
        settings, cfg = self.settings, self.cfg
        self.model.eval()
        totals: dict[str, float] = {}
        # the same prompts for the same val images at every validation, so that reports compare
        prompt_seed = derive_seed(settings.seed, "val-prompts", self.rank)
        batches = self.shards["val"].iter_batches(batch_size=cfg.clip_batch_size, batch_format="numpy")
        for batch_index, rows in enumerate(batches):
            clip_batch = make_clip_batch(rows, self.clip_features, cfg.clip_resolution, settings.max_pixels)
            clip_batch = clip_batch.to(self.device)
            _add(totals, validation_sums(self.model, cfg, clip_batch, autocast_dtype=self.autocast_dtype))
            if not settings.val_has_sam or self.teacher is None:
                continue
            for start in range(0, len(rows["hash"]), cfg.sam_batch_size):
                part = slice_rows(rows, start, start + cfg.sam_batch_size)
                resolution = self.model.arch.sam_resolution
                sam_batch = make_sam_batch(part, self.sam_features, resolution, settings.max_pixels)
                sam_batch = sam_batch.to(self.device)
                prompts = self._prompts(sam_batch, derive_seed(prompt_seed, batch_index, start))
                sums = validation_sums(
                    self.model, cfg, None, sam_batch, prompts, self.teacher, self.autocast_dtype
                )
                _add(totals, sums)
        self.model.train()
        return validation_metrics(all_reduce_sums(totals, self.world), settings.stage, cfg)

    def _validate_and_checkpoint(self, epoch_done: bool) -> None:
        import ray.train

        settings, cfg, state = self.settings, self.cfg, self.state

        # metrics: train means since the last report, learning rates, validation
        metrics: dict[str, float] = {
            "epoch": state["step"] / max(settings.steps_per_epoch, 1),
            "step": state["step"],
            "nodes": self.nodes,
        }
        if self.window_steps:
            metrics.update({f"train/{k}": v / self.window_steps for k, v in self.window.items()})
        self.window, self.window_steps = {}, 0
        metrics.update({f"lr/{group['name']}": group["lr"] for group in self.optimizer.param_groups})
        val = self._validate()
        metrics.update(val)
        if "val/clip_similarity" in val:
            clip_weight, sam_weight = settings.score_weights
            sam_part = sam_weight * val.get("val/sam_iou", 0.0)
            metrics["val/score"] = clip_weight * val["val/clip_similarity"] + sam_part

        # early stopping on the stage objective, once per epoch
        if epoch_done and "val/loss" in val and cfg.early_stopping_patience is not None:
            if val["val/loss"] < state["best_val_loss"]:
                state["best_val_loss"], state["epochs_without_improvement"] = val["val/loss"], 0
            else:
                state["epochs_without_improvement"] += 1
                if state["epochs_without_improvement"] >= cfg.early_stopping_patience:
                    logger.info(
                        "early stopping: val/loss has not improved for %d epochs", cfg.early_stopping_patience
                    )
                    state["finished"] = state["early_stopped"] = True
        metrics["finished"] = float(state["finished"])
        state["last_metrics"] = metrics

        # checkpoint: every rank's RNG states go to rank 0, which writes it; every rank reports
        rng_states = gather_objects(capture_rng_states(), self.world)
        with tempfile.TemporaryDirectory(prefix="samclip-ckpt-") as folder:
            checkpoint = None
            if self.rank == 0:
                logger.info(
                    "stage %d | step %d | %s", settings.stage, state["step"],
                    " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val/")),
                )
                self.metrics_lines.append({"kind": "eval", **metrics})
                train_state = {
                    **state,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng_states": rng_states,  # one entry per rank
                }
                save_student_checkpoint(folder, self.model, self.meta, train_state, settings.config_yaml)
                write_metrics_jsonl(self.metrics_uri, self.metrics_lines)
                if self.mlflow is not None:
                    self.mlflow.add({k: v for k, v in metrics.items() if k.startswith("val/")}, state["step"])
                    self.mlflow.flush()
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)
        self.reported = True


def _peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


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
    # build_student draws the CLIP head's MLP from the global RNG; a fixed seed gives every
    # worker the same head
    torch.manual_seed(derive_seed(settings.seed, "student-init"))
    return build_student(settings.arch, teacher, settings.embed_dim, **settings.student_options)


def _configure_logging() -> None:
    # Ray's worker processes usually give the root logger a handler already. One is added only
    # where none exists, so that each line prints once.
    package = logging.getLogger("samclip")
    package.setLevel(logging.INFO)
    if not package.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        package.addHandler(handler)
