"""Checkpoints as safetensors (no pickle): model weights, optimiser state and JSON metadata.

Written atomically (temporary file, fsync, rename), so a crash leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load, save, save_file

from collafuse.common.files import replace_durably


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The per-parameter state as named CPU tensors (`optim.<param index>.<key>`, e.g. Adam's
    moments), and the rest (non-tensor entries, param groups) for JSON metadata."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            name = f"optim.{pid}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _pack(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, metadata: dict[str, Any] | None,
          extra: Mapping[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The named tensors and the safetensors metadata of one checkpoint."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"extra.{k}": v.contiguous() for k, v in (extra or {}).items()})
    meta: dict[str, Any] = {"metadata": metadata or {}}
    if optimizer is not None:
        opt_tensors, opt_meta = flatten_optimizer(optimizer)
        tensors.update(opt_tensors)
        meta["optimizer"] = opt_meta
    return tensors, {"collafuse": json.dumps(meta)}


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    metadata: dict[str, Any] | None = None,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """`extra`: further tensors that must be consistent with the weights (a node's random state and
    unacknowledged jobs), written in the same file so that one rename commits them all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, meta = _pack(model, optimizer, metadata, extra)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    replace_durably(tmp, path)


def checkpoint_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, metadata: dict[str, Any] | None = None,
                     extra: Mapping[str, torch.Tensor] | None = None) -> bytes:
    """A checkpoint in memory, as the file would hold it (a trainer group hands it to a new rank)."""
    tensors, meta = _pack(model, optimizer, metadata, extra)
    return save(tensors, metadata=meta)


def _unpack(meta: dict[str, Any], tensors: Mapping[str, torch.Tensor], model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
            origin: str) -> dict[str, Any]:
    try:
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as exc:  # another preset or image size: say so in one line, not a page of shapes
        saved = meta.get("metadata", {}).get("model", "another")
        raise ValueError(f"checkpoint {origin} holds a {saved} model that does not fit this one ({str(exc).splitlines()[0]})") from None
    if optimizer is not None and "optimizer" in meta:
        opt_meta = meta["optimizer"]
        load_optimizer(optimizer, {**{k: v for k, v in tensors.items() if k.startswith("optim.")}, **opt_meta["scalars"]}, opt_meta["param_groups"])
    return meta.get("metadata", {})


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Load weights (and optimiser state) into the given objects; return the metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = json.loads((f.metadata() or {}).get("collafuse", "{}"))
        return _unpack(meta, {k: f.get_tensor(k) for k in f.keys() if not k.startswith("extra.")}, model, optimizer, str(path))


def load_checkpoint_bytes(blob: bytes, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                          device: torch.device | str = "cpu") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The inverse of checkpoint_bytes: loads into the objects; returns the metadata and the extra tensors."""
    header = json.loads(blob[8: 8 + int.from_bytes(blob[:8], "little")])
    tensors = {k: v.to(device) for k, v in load(blob).items()}
    meta = _unpack(json.loads(header.get("__metadata__", {}).get("collafuse", "{}")), tensors, model, optimizer, "in memory")
    return meta, {k[len("extra."):]: v.cpu() for k, v in tensors.items() if k.startswith("extra.")}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """A checkpoint's metadata, without loading its tensors."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return json.loads((f.metadata() or {}).get("collafuse", "{}")).get("metadata", {})


def load_extra(path: str | Path) -> dict[str, torch.Tensor]:
    """The `extra` tensors saved with a checkpoint (empty for one without)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k[len("extra."):]: f.get_tensor(k) for k in f.keys() if k.startswith("extra.")}


def load_optimizer(optimizer: torch.optim.Optimizer, entries: Mapping[str, Any], param_groups: list[dict] | None = None) -> None:
    """The inverse of flatten_optimizer; without param_groups the optimiser keeps its own (learning rate)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in entries.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    groups = param_groups if param_groups is not None else optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
