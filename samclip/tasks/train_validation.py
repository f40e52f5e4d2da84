"""Validation in the training loop: metrics summed over all ranks, the score, early stopping."""

from __future__ import annotations

import logging
from typing import Any

import torch

from samclip.config import StageConfig
from samclip.tasks.train_collectives import all_reduce_sums
from samclip.tasks.train_data import slice_rows
from samclip.tasks.train_settings import LoopSettings
from samclip.tasks.train_state import derive_seed
from samclip.tasks.train_steps import validation_metrics, validation_sums
from samclip.tasks.train_worker_data import WorkerData

logger = logging.getLogger(__name__)


def validate(
    model: torch.nn.Module,
    data: WorkerData,
    settings: LoopSettings,
    teacher: torch.nn.Module | None,
    autocast_dtype: torch.dtype | None,
) -> dict[str, float]:
    """Return the ``val/...`` metrics of ``model`` on every rank's val rows (a collective call)."""
    cfg = settings.stage_cfg
    model.eval()
    totals: dict[str, float] = {}
    # the same prompts for the same val images at every validation, so that reports compare
    prompt_seed = derive_seed(settings.seed, "val-prompts", data.rank)
    for batch_index, rows in enumerate(data.val_rows()):
        clip_batch = data.clip_batch(rows)
        _add(totals, validation_sums(model, cfg, clip_batch, autocast_dtype=autocast_dtype))
        if not settings.val_has_sam or teacher is None:
            continue
        for start in range(0, len(rows["hash"]), cfg.sam_batch_size):
            part = slice_rows(rows, start, start + cfg.sam_batch_size)
            sam_batch = data.sam_batch(part, model.arch.sam_resolution)
            prompts = data.prompts(sam_batch, derive_seed(prompt_seed, batch_index, start))
            sums = validation_sums(model, cfg, None, sam_batch, prompts, teacher, autocast_dtype)
            _add(totals, sums)
    model.train()
    return validation_metrics(all_reduce_sums(totals, data.world), settings.stage, cfg)


def validation_score(val: dict[str, float], score_weights: tuple[float, float]) -> float | None:
    """Return ``val/score``, the weighted CLIP similarity plus SAM IoU (None without CLIP)."""
    if "val/clip_similarity" not in val:
        return None
    clip_weight, sam_weight = score_weights
    return clip_weight * val["val/clip_similarity"] + sam_weight * val.get("val/sam_iou", 0.0)


def update_early_stopping(state: dict[str, Any], val_loss: float, cfg: StageConfig) -> None:
    """Count epochs without a lower ``val_loss``, and mark ``state`` finished after the patience."""
    if cfg.early_stopping_patience is None:
        return
    if val_loss < state["best_val_loss"]:
        state["best_val_loss"], state["epochs_without_improvement"] = val_loss, 0
        return
    state["epochs_without_improvement"] += 1
    if state["epochs_without_improvement"] >= cfg.early_stopping_patience:
        logger.info(
            "early stopping: val/loss has not improved for %d epochs", cfg.early_stopping_patience
        )
        state["finished"] = state["early_stopped"] = True


def _add(totals: dict[str, float], sums: dict[str, float]) -> None:
    for name, value in sums.items():
        totals[name] = totals.get(name, 0.0) + value
