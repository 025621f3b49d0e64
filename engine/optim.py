"""One optimiser step, the same for a client's and the server's model."""

from __future__ import annotations

import torch


def apply_loss(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> float | None:
    """Backpropagate, clip the gradient norm, step; the loss value, or None (and no step) when the
    gradient is not finite, so that one bad batch never makes the weights NaN."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    return loss.item()
