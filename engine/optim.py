"""One optimiser step, the same for a client's and the server's model."""

from __future__ import annotations

from typing import Callable

import torch

Reduce = Callable[[list[torch.Tensor]], None]  # sums tensors over a trainer group's ranks, in place


def apply_loss(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor | None, grad_clip: float,
               reduce: Reduce | None = None) -> float | None:
    """Backpropagate, clip the gradient norm, step; the loss value, or None (and no step) when the
    gradient is not finite, so that one bad batch never makes the weights NaN.

    With `reduce` (data-parallel ranks), the gradients and the loss are summed over the ranks before
    the clip, so every rank clips, checks and steps on the same numbers and stays identical; a rank
    with no rows (`loss` None) still takes part with zeros."""
    optimizer.zero_grad(set_to_none=True)
    if loss is not None:
        loss.backward()
    if reduce is not None:
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        total = loss.detach().float().reshape(1) if loss is not None else torch.zeros(1, device=params[0].device)
        reduce([*grads, total])
        for p, g in zip(params, grads):
            p.grad = g
        loss = total
    assert loss is not None
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    return loss.item()
