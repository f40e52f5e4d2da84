"""Setup of a training worker before its loop: the frozen teacher, the student, logging."""

from __future__ import annotations

import logging
import resource

import torch

from samclip.logs import LOG_FORMAT
from samclip.tasks.train_settings import LoopSettings
from samclip.tasks.train_state import derive_seed


def load_frozen_teacher(settings: LoopSettings) -> torch.nn.Module:
    from samclip.tasks.teachers import load_sam_teacher

    teacher = load_sam_teacher(settings.teacher_files)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher.eval()


def initial_student(settings: LoopSettings, teacher: torch.nn.Module | None) -> torch.nn.Module:
    """Return the student a fresh run starts from: the previous stage's weights, or SAM's."""
    from samclip.model.architectures import build_student
    from samclip.tasks.checkpoints import load_student

    if settings.init_checkpoint is not None:
        return load_student(settings.init_checkpoint)
    assert teacher is not None
    # build_student draws the CLIP head's MLP from the global RNG; a fixed seed gives every
    # worker the same head
    torch.manual_seed(derive_seed(settings.seed, "student-init"))
    return build_student(settings.arch, teacher, settings.embed_dim, **settings.student_options)


def configure_worker_logging() -> None:
    # Ray's worker processes usually give the root logger a handler already. One is added only
    # where none exists, so that each line prints once.
    package = logging.getLogger("samclip")
    package.setLevel(logging.INFO)
    if not package.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        package.addHandler(handler)


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()
