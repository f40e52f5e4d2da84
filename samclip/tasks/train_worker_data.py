"""The batches of one training worker: its rows of each index dataset, as model inputs.

Ray Train gives every worker each index dataset whole. ``train_sharding`` decides which rows
this rank reads and in which order, from seeds that every rank derives alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from samclip.tasks.train_data import FeatureLookup, make_clip_batch, make_sam_batch
from samclip.tasks.train_settings import LoopSettings
from samclip.tasks.train_sharding import READ_ROWS, RowAssignment, rank_batches
from samclip.tasks.train_state import derive_seed
from samclip.tasks.train_steps import ClipBatch, SamBatch


class WorkerData:
    """Index shards and feature lookups of one worker, and the batches it reads from them."""

    def __init__(self, settings: LoopSettings, rank: int, world: int, device: torch.device) -> None:
        import ray.train

        self.settings, self.cfg = settings, settings.stage_cfg
        self.rank, self.world, self.device = rank, world, device
        names = ("train", "val", "train_sam") if settings.stage == 2 else ("train", "val")
        self.shards = {name: ray.train.get_dataset_shard(name) for name in names}
        self.clip_features = FeatureLookup(settings.clip_spec)
        self.sam_features = FeatureLookup(settings.sam_spec) if settings.sam_spec is not None else None

    def rank_batches(
        self, name: str, batch_size: int, shuffle_seed: int | None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield this rank's batches of index rows of dataset ``name``.

        ``shuffle_seed`` must be the same on every rank, because it decides which rank reads
        which row. None keeps the index order and gives each rank a contiguous part.
        """
        rows = self.settings.index_rows[name]
        shuffle = shuffle_seed is not None
        assignment = RowAssignment(rows, self.world, seed=shuffle_seed or 0, shuffle=shuffle)
        chunks = self.shards[name].iter_batches(batch_size=READ_ROWS, batch_format="numpy")
        return rank_batches(chunks, assignment, self.rank, batch_size, shuffle_seed)

    def train_rows(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """Yield the index rows of each CLIP batch of ``epoch`` (cheap to skip: no images yet)."""
        seed = derive_seed(self.settings.seed, "shuffle", epoch)
        return self.rank_batches("train", self.cfg.clip_batch_size, seed)

    def val_rows(self) -> Iterator[dict[str, np.ndarray]]:
        return self.rank_batches("val", self.cfg.clip_batch_size, shuffle_seed=None)

    def clip_batch(self, rows: dict[str, np.ndarray]) -> ClipBatch:
        resolution, max_pixels = self.cfg.clip_resolution, self.settings.max_pixels
        batch = make_clip_batch(rows, self.clip_features, resolution, max_pixels)
        return batch.to(self.device)

    def sam_batch(self, rows: dict[str, np.ndarray], resolution: int) -> SamBatch:
        batch = make_sam_batch(rows, self.sam_features, resolution, self.settings.max_pixels)
        return batch.to(self.device)

    def sam_batches(self, drawn: int, resolution: int) -> Iterator[SamBatch]:
        """Cycle over the SAM rows forever, reshuffled each pass, after ``drawn`` batches."""
        settings = self.settings
        pass_index, skip = divmod(drawn, max(settings.sam_batches_per_pass, 1))
        while True:
            pass_seed = derive_seed(settings.seed, "sam-shuffle", pass_index)
            batches = self.rank_batches("train_sam", self.cfg.sam_batch_size, pass_seed)
            for index, rows in enumerate(batches):
                if index >= skip:
                    yield self.sam_batch(rows, resolution)
            skip = 0
            pass_index += 1

    def prompts(self, sam_batch: SamBatch, seed: int) -> Any:
        """Sample ``masks_per_image`` prompts per image of ``sam_batch`` from ``seed``."""
        from samclip.model.prompts import sample_prompts

        generator = torch.Generator().manual_seed(seed)
        count = sam_batch.images.shape[0]
        prompts = sample_prompts(count, self.cfg.masks_per_image, sam_batch.valid_hw, generator)
        return type(prompts)(*(None if t is None else t.to(self.device) for t in prompts))
