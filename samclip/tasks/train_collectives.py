"""Cross-worker collectives of the training loop (torch.distributed, as Ray Train sets it up).

Every function is a no-op for a single worker, so the loop calls them unconditionally.
"""

from __future__ import annotations

import torch
import torch.distributed

VAL_SUM_KEYS = (
    "clip_cosine", "clip_count", "sam_focal", "sam_dice", "sam", "sam_count", "sam_iou", "mask_count"
)


def broadcast_parameters(model: torch.nn.Module, world: int) -> None:
    """Copy rank 0's parameters and buffers to every worker, in place."""
    if world > 1:
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)


def average_gradients(optimizer: torch.optim.Optimizer, world: int) -> None:
    """All-reduce the mean of every trainable gradient through one flat buffer.

    A parameter without a gradient gets a zero gradient, so AdamW's weight decay still applies
    to it. In stages 1-3 every trainable parameter receives a gradient at each step.
    """
    if world == 1:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for param, grad in zip(params, grads):
        param.grad = flat[offset : offset + grad.numel()].view_as(param).clone()
        offset += grad.numel()


def all_reduce_sums(totals: dict[str, float], world: int) -> dict[str, float]:
    """Sum validation statistics (the VAL_SUM_KEYS) over every worker."""
    if world == 1:
        return totals
    values = torch.tensor([totals.get(name, 0.0) for name in VAL_SUM_KEYS], dtype=torch.float64)
    torch.distributed.all_reduce(values)
    return dict(zip(VAL_SUM_KEYS, values.tolist()))


def gather_objects(value: object, world: int) -> list[object]:
    """Return every worker's ``value`` (picklable), in rank order, on every worker."""
    if world == 1:
        return [value]
    gathered: list[object] = [None] * world
    torch.distributed.all_gather_object(gathered, value)
    return gathered
