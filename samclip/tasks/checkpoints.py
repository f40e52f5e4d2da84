"""The student checkpoint format: a folder on any storage URI.

Files:
- ``model.safetensors``: the student's state dict.
- ``student.json``: what ``build_student_random`` needs to rebuild the architecture
  (``arch``, ``embed_dim`` and the keyword ``options``), plus ``format`` and ``version``.
- ``train_state.pt``: optimiser, scheduler, step, data position and RNG states, saved with
  ``torch.save`` and restricted to tensors and plain Python values so that
  ``torch.load(weights_only=True)`` reads it. Only training checkpoints carry it.
- ``config.yaml``: the resolved run config that produced the weights.

Every file is committed atomically through ``samclip.tasks.storage``, so a truncated file never
appears under its final name.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import torch

from samclip.tasks import storage

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
META_FILE = "student.json"
TRAIN_STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.yaml"

CHECKPOINT_FORMAT = "samclip-student"
CHECKPOINT_VERSION = 1


def student_meta(arch: str, embed_dim: int, **options: Any) -> dict[str, Any]:
    """Build the ``student.json`` payload: the builder's arguments and the format version."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": arch,
        "embed_dim": int(embed_dim),
        "options": dict(options),
    }


def save_student_checkpoint(
    dir_path: str,
    model: torch.nn.Module,
    student_meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
    config_yaml: str | None = None,
) -> str:
    """Write a student checkpoint into ``dir_path`` (a local folder or a storage URI).

    Returns ``dir_path``. ``train_state`` must hold only tensors and plain Python values.
    """
    from safetensors.torch import save as save_safetensors

    for key in ("arch", "embed_dim"):
        if key not in student_meta:
            raise ValueError(
                f"student_meta is missing {key!r}: build it with student_meta(arch, embed_dim)"
            )

    storage.makedirs(dir_path)
    storage.write_bytes(storage.join(dir_path, MODEL_FILE), save_safetensors(_unshared_state_dict(model)))
    storage.write_json(storage.join(dir_path, META_FILE), student_meta)
    if train_state is not None:
        buffer = io.BytesIO()
        torch.save(train_state, buffer)
        storage.write_bytes(storage.join(dir_path, TRAIN_STATE_FILE), buffer.getvalue())
    if config_yaml is not None:
        storage.write_text(storage.join(dir_path, CONFIG_FILE), config_yaml)
    return dir_path


def read_student_meta(uri_or_dir: str) -> dict[str, Any]:
    """Read and check ``student.json`` of a checkpoint folder."""
    meta_uri = storage.join(uri_or_dir, META_FILE)
    if not storage.exists(meta_uri):
        raise FileNotFoundError(
            f"{meta_uri} not found: {uri_or_dir} is not a student checkpoint "
            f"(expected {MODEL_FILE} and {META_FILE}, written by save_student_checkpoint)"
        )
    meta = storage.read_json(meta_uri)
    if meta.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{meta_uri} has format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
        )
    if int(meta.get("version", CHECKPOINT_VERSION)) > CHECKPOINT_VERSION:
        raise ValueError(
            f"{meta_uri} has format version {meta['version']}, newer than this code's "
            f"{CHECKPOINT_VERSION}: upgrade samclip to load it"
        )
    return meta


def load_student_state_dict(uri_or_dir: str) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` of a checkpoint folder into CPU tensors."""
    from safetensors.torch import load as load_safetensors

    return load_safetensors(storage.read_bytes(storage.join(uri_or_dir, MODEL_FILE)))


def load_student(uri_or_dir: str) -> torch.nn.Module:
    """Rebuild the student from ``student.json`` and load its weights strictly (on the CPU).

    Works on a local folder or any storage URI: the files are read through the storage layer,
    so nothing is staged on local disk.
    """
    from samclip.model.architectures import build_student_random

    meta = read_student_meta(uri_or_dir)
    model = build_student_random(meta["arch"], meta["embed_dim"], **meta.get("options", {}))
    load_weights_strict(model, load_student_state_dict(uri_or_dir), source=uri_or_dir)
    return model


def load_weights_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict with strict key matching and an error that names the mismatch."""
    expected = set(model.state_dict())
    found = set(state_dict)
    missing = sorted(expected - found)
    unexpected = sorted(found - expected)
    if missing or unexpected:
        hint = ""
        if unexpected and all(key.startswith("module.") for key in unexpected):
            hint = "; the keys start with 'module.', so it looks like a DDP state dict: strip that prefix"
        raise RuntimeError(
            f"student weights in {source} do not match the architecture: {len(missing)} missing keys "
            f"(first: {missing[:3]}), {len(unexpected)} unexpected keys (first: {unexpected[:3]}){hint}"
        )
    model.load_state_dict(state_dict, strict=True)


def load_train_state(uri_or_dir: str) -> dict[str, Any]:
    """Read ``train_state.pt`` with ``weights_only=True`` onto the CPU."""
    uri = storage.join(uri_or_dir, TRAIN_STATE_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"{uri} not found: the checkpoint contains weights only and cannot resume training"
        )
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)


def _unshared_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors rejects tensors that share storage. Cloning each later alias keeps every key
    # for strict loading, at the cost of storing tied weights twice.
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage_ptr = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage_ptr in seen:
            tensor = tensor.clone()
        seen.add(storage_ptr)
        tensors[name] = tensor
    return tensors
