"""The per-worker loop of a training stage, run by Ray Train's TorchTrainer on every worker.

Rank 0 writes checkpoints and ``metrics.jsonl``, and every rank calls ``ray.train.report`` with
the same metrics. Gradients are averaged across workers by hand after both backward passes of
a step. DDP would not fit: the student is called through ``clip_embedding``,
``image_embeddings`` and ``predict_masks`` rather than ``forward``, and stage 2 runs two
backward passes per step.

Randomness is derived from (seed, rank, epoch, step): the rows each rank reads and their order
(``train_sharding``), and the prompts and torch RNG of each step. A run resumed with the same
number of workers therefore draws what the original run would have drawn, from its data
position alone. Checkpoints also store every rank's torch, numpy
and Python RNG states, and a resume with the same number of workers restores them, so code
that draws from the global generators between the derived seeds resumes exactly too. A resume
starts from the newest complete checkpoint in the run folder (``train_resume``).

On GPUs (``precision: bf16``) the forward passes run under bfloat16 autocast; Ray Train sets up
NCCL there and gloo on CPUs.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import numpy as np
import torch

from samclip.tasks import storage
from samclip.tasks.checkpoints import (
    load_student_state_dict,
    load_train_state,
    load_weights_strict,
    save_student_checkpoint,
    student_meta,
)
from samclip.tasks.train_collectives import average_gradients, broadcast_parameters, gather_objects
from samclip.tasks.train_metrics import (
    METRICS_FILE,
    MlflowMetrics,
    format_eta,
    read_metrics_jsonl,
    write_metrics_jsonl,
)
from samclip.tasks.train_resume import (
    choose_resume_checkpoint,
    upload_checkpoint,
    write_complete_marker,
)
from samclip.tasks.train_settings import LoopSettings
from samclip.tasks.train_state import (
    apply_test_hooks,
    capture_rng_states,
    derive_seed,
    fresh_state,
    restore_rng_states,
)
from samclip.tasks.train_steps import (
    accumulate_gradients,
    build_optimizer,
    build_scheduler,
    freeze_for_stage,
    optimizer_step,
)
from samclip.tasks.train_validation import update_early_stopping, validate, validation_score
from samclip.tasks.train_worker_data import WorkerData
from samclip.tasks.train_worker_setup import (
    configure_worker_logging,
    initial_student,
    load_frozen_teacher,
    node_id,
    peak_memory_mib,
)

logger = logging.getLogger(__name__)


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
        configure_worker_logging()
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.autocast_dtype = torch.bfloat16 if settings.precision == "bf16" else None

        # model, frozen teacher decoder, optimiser
        stage = settings.stage
        needs_teacher = stage == 2 or settings.val_has_sam or settings.init_checkpoint is None
        self.teacher = load_frozen_teacher(settings).to(self.device) if needs_teacher else None
        self.model = initial_student(settings, self.teacher).to(self.device)
        self.meta = student_meta(settings.arch, settings.embed_dim, **settings.student_options)
        trainable = freeze_for_stage(self.model, stage)
        self.optimizer = build_optimizer(self.model, stage, self.cfg)
        self.scheduler = build_scheduler(self.optimizer, self.cfg, settings.total_steps)
        self.state = fresh_state()
        self.resumed_from = None  # the ray.train.Checkpoint this attempt restored
        self._restore()
        broadcast_parameters(self.model, self.world)
        node_ids = gather_objects(node_id(), self.world)
        self.nodes = len(set(node_ids))
        if self.rank == 0:
            logger.info(
                "stage %d: %d workers on %d nodes (%s, %s), %d trainable parameters, "
                "%d steps per epoch, %d steps in all",
                stage, self.world, self.nodes, self.device, settings.precision, trainable,
                settings.steps_per_epoch, settings.total_steps,
            )

        # data and bookkeeping
        self.data = WorkerData(settings, self.rank, self.world, self.device)
        self.sam_stream = None
        if stage == 2:
            resolution = self.model.arch.sam_resolution
            self.sam_stream = self.data.sam_batches(self.state["sam_batches_drawn"], resolution)
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
                self.mlflow = MlflowMetrics(**settings.mlflow, resumed=self.resumed_from is not None)
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

        # Rank 0 chooses, so that every rank restores the same checkpoint.
        storage_context = ray.train.get_context().get_storage()  # a Ray Train DeveloperAPI
        filesystem = storage_context.storage_filesystem
        path = None
        if self.rank == 0:
            registered = ray.train.get_checkpoint()
            run_path = storage_context.experiment_fs_path
            chosen = choose_resume_checkpoint(registered, filesystem, run_path)
            path = None if chosen is None else chosen.path
        path = gather_objects(path, self.world)[0]
        if path is None:
            return
        checkpoint = self.resumed_from = ray.train.Checkpoint(path=path, filesystem=filesystem)
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
            restored = self.resumed_from if self.rank == 0 else None
            ray.train.report(
                self.state["last_metrics"],
                checkpoint=restored,
                checkpoint_upload_fn=upload_checkpoint,
            )

    def _train_epoch(self) -> None:
        settings, cfg, state = self.settings, self.cfg, self.state
        epoch = state["epoch"]
        self.model.train()
        self.last_step_end = time.perf_counter()
        for index, rows in enumerate(self.data.train_rows(epoch)):
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
        clip_batch = self.data.clip_batch(rows)
        samples = clip_batch.images.shape[0]
        sam_batch = prompts = None
        if settings.stage == 2:
            sam_batch = next(self.sam_stream)
            state["sam_batches_drawn"] += 1
            prompt_seed = derive_seed(settings.seed, "prompts", self.rank, state["step"])
            prompts = self.data.prompts(sam_batch, prompt_seed)
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
        peak_memory = peak_memory_mib(self.device)
        logger.info(
            "stage %d | epoch %d/%d | step %d/%d | eta %s | %s | %s | %.1f samples/s | peak memory %.0f MiB",
            settings.stage, epoch + 1, self.cfg.epochs, step, settings.total_steps, format_eta(eta_seconds),
            " ".join(f"{name} {value:.4f}" for name, value in terms.items()),
            " ".join(f"{name} {value:.2e}" for name, value in lrs.items()),
            samples_per_second, peak_memory,
        )
        metrics = {f"train/{name}": value for name, value in terms.items()}
        metrics.update(lrs)
        metrics.update({
            "samples_per_second": samples_per_second,
            "step_seconds": step_seconds,
            "samples": samples,
            "peak_memory_mib": peak_memory,
            "eta_seconds": eta_seconds,
        })
        self.metrics_lines.append({"kind": "train", "step": step, "epoch": epoch, "time": time.time(), **metrics})
        if self.mlflow is not None:
            self.mlflow.add(metrics, step)

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
        val = validate(self.model, self.data, settings, self.teacher, self.autocast_dtype)
        metrics.update(val)
        score = validation_score(val, settings.score_weights)
        if score is not None:
            metrics["val/score"] = score

        # early stopping on the stage objective, once per epoch
        if epoch_done and "val/loss" in val:
            update_early_stopping(state, val["val/loss"], cfg)
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
                write_complete_marker(folder, state["step"])
                write_metrics_jsonl(self.metrics_uri, self.metrics_lines)
                if self.mlflow is not None:
                    self.mlflow.add({k: v for k, v in metrics.items() if k.startswith("val/")}, state["step"])
                    self.mlflow.flush()
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_fn=upload_checkpoint)
        self.reported = True

