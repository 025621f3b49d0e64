"""One optimiser step, the same for a client's and the server's model."""

from __future__ import annotations

import torch


def apply_loss(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> float:
    """Backpropagate, clip the gradient norm, step; return the loss value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()
