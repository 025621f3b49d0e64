"""What the two command lines share: one-line errors, argument parsing, and the option blocks that
several commands offer, each written once with its default read from the typed config.

An option block is a dataclass whose fields carry their `typer.Option` in the field's metadata; a
command that takes a parameter of that type gets the block's options on its command line and the
parsed values as one typed object (`@takes(Connection)`)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator, Optional

import typer

from collafuse.common.cut import check_ratio
from collafuse.common.config import DataConfig, DiffusionConfig, HeartbeatConfig, NodeConfig, PeerConfig, ProtocolLimits, WorkerConfig


def command_line(help: str, verbose_help: str) -> typer.Typer:
    """A command line in the project's manner: help without colours or tracebacks, and -v to log."""
    app = typer.Typer(help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)

    @app.callback()
    def main(verbose: bool = typer.Option(False, "--verbose", "-v", help=verbose_help)) -> None:
        import logging

        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    return app


def fail(message: str, code: int = 2) -> None:
    """A one-line error for the user, no traceback."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


@contextlib.contextmanager
def user_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Errors of these kinds are the user's to fix (a bad path, a refused key): one line, exit 2."""
    try:
        yield
    except kinds as exc:
        fail(str(exc))


def parse_ratios(text: str) -> tuple[float, ...]:
    """A comma list of cut ratios, each checked by the cut's own rule."""
    try:
        ratios = tuple(float(x) for x in text.split(","))
    except ValueError:
        fail(f"cut ratios must be numbers, got {text!r}")
    with user_errors(ValueError):
        return tuple(check_ratio(r) for r in ratios)


def _one_ratio(value: float) -> float:
    """--cut-ratio of a node, refused as a bad parameter by the cut's own rule."""
    try:
        return check_ratio(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def key_folder(keys: Path | None, insecure: bool) -> str:
    """The key folder a command runs with ('' = plain TCP, only when asked for, and said loudly)."""
    if keys is not None and insecure:
        fail("give either --keys or --insecure, not both")
    if keys is None and not insecure:
        fail("give --keys DIR (see `collafuse keys --help`), or --insecure for a plain-TCP loopback experiment")
    if insecure:
        typer.secho("WARNING: --insecure: plain TCP, no encryption or authentication; anyone who reaches the port is trusted",
                    err=True, fg=typer.colors.YELLOW)
        return ""
    if not keys.is_dir():
        fail(f"key folder {keys} does not exist")
    return str(keys)


def option(info: typing.Any) -> typing.Any:
    """A dataclass field that is also a command-line option (`info`: a `typer.Option`)."""
    return field(default=info.default, metadata={"option": info})


def takes(*blocks: type) -> typing.Callable:
    """Give a command the options of each block (a dataclass made of `option` fields), before its
    own, and pass it the parsed block as the parameter annotated with the block's type."""

    def decorate(command: typing.Callable) -> typing.Callable:
        hints = typing.get_type_hints(command)
        own = inspect.signature(command).parameters.values()
        target = {block: next(name for name, hint in hints.items() if hint is block) for block in blocks}
        params = []
        for block in blocks:
            block_hints = typing.get_type_hints(block)
            params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.metadata["option"], annotation=block_hints[f.name])
                       for f in fields(block)]
        params += [p.replace(annotation=hints[p.name], kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.name not in target.values()]

        @functools.wraps(command)
        def run(**values: typing.Any) -> typing.Any:
            for block in blocks:
                values[target[block]] = block(**{f.name: values.pop(f.name) for f in fields(block)})
            return command(**values)

        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        del run.__wrapped__  # typer must read the signature above, not the command's own
        return run

    return decorate


MAX_FRAME = typer.Option(ProtocolLimits.max_frame_bytes, "--max-frame-bytes", min=1024, help="Largest tensor frame accepted.")


INSECURE = typer.Option(False, "--insecure", help="Plain TCP: no encryption, no authentication, anyone who reaches the port is trusted. Only for loopback experiments.")


@dataclass(frozen=True)
class Keys:
    """How a process authenticates to the broker (or, for the broker, whom it accepts)."""

    keys: Optional[Path] = option(typer.Option(None, "--keys", help="Key folder: the broker's from `collafuse keys init`, a peer's from `collafuse keys add`. Every connection is then encrypted and authenticated (CURVE)."))
    insecure: bool = option(INSECURE)

    def folder(self) -> str:
        return key_folder(self.keys, self.insecure)


@dataclass(frozen=True)
class Connection(Keys):
    """What every process on the wire must agree on with the broker: keys, liveness and T."""

    heartbeat_interval: float = option(typer.Option(HeartbeatConfig.interval, "--heartbeat-interval", min=0.01, help="Seconds between heartbeats."))
    heartbeat_liveness: int = option(typer.Option(HeartbeatConfig.liveness, "--heartbeat-liveness", min=1, help="Missed heartbeats before the peer counts as dead (a node or worker then reconnects and re-sends)."))
    levels: int = option(typer.Option(DiffusionConfig.levels, "--levels", help="T, the number of noise levels (must match between nodes and workers)."))

    def heartbeat(self) -> HeartbeatConfig:
        return HeartbeatConfig(self.heartbeat_interval, self.heartbeat_liveness)

    def limits(self, max_frame_bytes: int = ProtocolLimits.max_frame_bytes) -> ProtocolLimits:
        return ProtocolLimits(levels=self.levels, max_frame_bytes=max_frame_bytes)

    def peer(self) -> dict[str, typing.Any]:
        """The PeerConfig fields this block sets."""
        return {"keys": self.folder(), "heartbeat": self.heartbeat(), "limits": self.limits()}


DEVICE = typer.Option(PeerConfig.device, "--device", help="'auto' (CUDA when present), 'cpu' or 'cuda:N'.")


@dataclass(frozen=True)
class ServerModel:
    """The server model a worker serves (`worker`, and the workers `up` and `loadtest` start)."""

    device: str = option(DEVICE)
    model: str = option(typer.Option(WorkerConfig.model, "--model", help="Server U-Net preset: tiny, paper or large."))
    image_size: int = option(typer.Option(WorkerConfig.image_size, "--image-size", help="Image side the server model takes."))
    max_batch: int = option(typer.Option(WorkerConfig.max_batch, "--max-batch", min=1, help="Rows in one denoising model call."))

    def worker_args(self) -> list[str]:
        """The same choices as `collafuse worker` options, for the workers a command starts."""
        return ["--model", self.model, "--image-size", str(self.image_size), "--device", self.device, "--max-batch", str(self.max_batch)]


@dataclass(frozen=True)
class Node:
    """Who a node is and what it holds: the options `join` and `generate` share."""

    broker: str = option(typer.Option(NodeConfig.broker, "--broker", help="The broker's frontend address."))
    name: str = option(typer.Option(..., "--name", help="This node's client name (unique per broker)."))
    cut_ratio: float = option(typer.Option(NodeConfig.cut_ratio, "--cut-ratio", callback=_one_ratio, help="c in [0,1]: this node owns levels 1..round(c*T); 1 = purely local; a c with round(c*T) = 0 sends clean images and needs --share-clean-images."))
    shard: int = option(typer.Option(NodeConfig.shard, "--shard", min=0, help="Which client shard of the data this node holds (0-based)."))
    shards: int = option(typer.Option(NodeConfig.shards, "--shards", min=1, help="Into how many client shards the data is split."))
    image_size: int = option(typer.Option(DataConfig.image_size, "--image-size", help="32, 64 or 128; must match the server model."))
    model: str = option(typer.Option(NodeConfig.model, "--model", help="Local U-Net preset: tiny, paper or large."))
    state: str = option(typer.Option(NodeConfig.state, "--state", help="Folder for this node's secret (STATE/secret.key, bound to the cut, T and data settings it was first used "
        "with), local checkpoint and progress.json. Default ~/.collafuse/node-NAME, whatever folder the node starts in: another "
        "folder means another secret, and the server then gets a second view of every image both send."))
    device: str = option(typer.Option(NodeConfig.device, "--device", help="'auto', 'cpu' or 'cuda:N'."))
