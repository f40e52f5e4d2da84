"""The resumable training state of a worker: counters, seeds, RNG states and the test hooks.

Everything here is saved in ``train_state.pt`` (see ``samclip.tasks.checkpoints``), so it is
restricted to tensors and plain Python values that ``torch.load(weights_only=True)`` accepts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Test hooks. Failure injection: the worker of rank SAMCLIP_TEST_FAIL_RANK (default 0) ends its
# process right after optimiser step SAMCLIP_TEST_FAIL_AT_STEP, before that step's checkpoint.
# It fails once: the marker file SAMCLIP_TEST_FAIL_MARKER records that it happened.
# SAMCLIP_TEST_STEP_SLEEP_S slows every step down, so that a test can kill a driver mid-stage.
FAIL_AT_STEP_ENV = "SAMCLIP_TEST_FAIL_AT_STEP"
FAIL_RANK_ENV = "SAMCLIP_TEST_FAIL_RANK"
FAIL_MARKER_ENV = "SAMCLIP_TEST_FAIL_MARKER"
STEP_SLEEP_ENV = "SAMCLIP_TEST_STEP_SLEEP_S"
TEST_ENV_VARS = (FAIL_AT_STEP_ENV, FAIL_RANK_ENV, FAIL_MARKER_ENV, STEP_SLEEP_ENV)


def fresh_state() -> dict[str, Any]:
    return {
        "step": 0,  # optimiser steps taken
        "epoch": 0,  # the epoch in progress
        "batch_in_epoch": 0,  # CLIP batches of that epoch already trained on
        "sam_batches_drawn": 0,
        "finished": False,
        "early_stopped": False,
        "best_val_loss": math.inf,
        "epochs_without_improvement": 0,
        "last_metrics": {},
    }


def derive_seed(*parts: object) -> int:
    """Mix seed parts into one 63-bit seed, the same on every machine and Python version."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def capture_rng_states() -> dict[str, Any]:
    """Return this process's torch, CUDA, numpy and Python RNG states as tensors and plain values."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the RNG states that ``capture_rng_states`` returned."""
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    np.random.set_state((
        numpy_state["kind"],
        numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["position"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def apply_test_hooks(step: int, rank: int) -> None:
    """Sleep after ``step``, or end this worker's process once, as the test variables request."""
    sleep_seconds = os.environ.get(STEP_SLEEP_ENV)
    if sleep_seconds:
        time.sleep(float(sleep_seconds))
    fail_at = os.environ.get(FAIL_AT_STEP_ENV)
    marker = os.environ.get(FAIL_MARKER_ENV)
    if not fail_at or not marker or step != int(fail_at):
        return
    if rank != int(os.environ.get(FAIL_RANK_ENV, "0")) or os.path.exists(marker):
        return
    with open(marker, "w", encoding="utf-8") as handle:
        handle.write(f"rank {rank} exited after step {step}\n")
    logger.warning("%s=%s: rank %d exits now to test recovery", FAIL_AT_STEP_ENV, fail_at, rank)
    logging.shutdown()
    os._exit(1)
