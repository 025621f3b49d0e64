"""Safetensors blobs without torch or the safetensors package, validated before any allocation.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the raw little-endian data. Parsing reads only the header; arrays are zero-copy views.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Mapping

import numpy as np

from collafuse.protocol.wire import ErrorCode, ProtocolError

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "I64": np.int64, "I32": np.int32, "U8": np.uint8}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items() if v is not None}
_ITEMSIZE = {k: np.dtype(v).itemsize for k, v in DTYPES.items() if v is not None}
MAX_HEADER_BYTES = 1 << 20

TensorSpec = Mapping[str, tuple[str, tuple[int, ...]]]  # name → (dtype, exact shape)


def encode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    header: dict = {}
    offset = 0
    parts = []
    for name, arr in tensors.items():
        arr = np.require(arr, requirements="C")  # (np.ascontiguousarray would make a scalar 1-d)
        dtype = _NAMES.get(arr.dtype)
        if dtype is None:
            raise ValueError(f"unsupported dtype {arr.dtype} for tensor {name}")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        parts.append(data)
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw + b"".join(parts)


def split(arrays: Mapping[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """Arrays grouped in order so that each group's encoded frame stays within max_bytes (a model's
    weights can be far larger than one frame may be). Raises ValueError for an array that alone
    does not fit."""
    groups: list[dict[str, np.ndarray]] = [{}]
    size = 8
    for name, arr in arrays.items():
        need = arr.nbytes + len(name) + 128  # data plus its header entry, generously
        if need + 8 > max_bytes:
            raise ValueError(f"tensor {name!r} ({arr.nbytes} bytes) does not fit in a frame of {max_bytes} bytes")
        if groups[-1] and size + need > max_bytes:
            groups.append({})
            size = 8
        groups[-1][name] = arr
        size += need
    return groups


def read_header(blob: memoryview | bytes, max_bytes: int) -> tuple[dict, int]:
    """(header, data start) after checking the framing; nothing proportional to claims is allocated."""
    size = len(blob)
    if size > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"tensor frame of {size} bytes exceeds the limit of {max_bytes}")
    if size < 8:
        raise ProtocolError(ErrorCode.BAD_TENSOR, "tensor frame shorter than its 8-byte header length")
    (n,) = struct.unpack_from("<Q", blob, 0)
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"tensor header length {n} is impossible for a {size}-byte frame")
    try:
        header = json.loads(bytes(blob[8 : 8 + n]))
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: thousands of nested `[`
        raise ProtocolError(ErrorCode.BAD_TENSOR, "tensor header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.BAD_TENSOR, "tensor header is not a JSON object")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ProtocolError(ErrorCode.BAD_TENSOR, "tensor header's __metadata__ is not a map of strings to strings")
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"tensor {name!r}: malformed header entry") from None
        if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"tensor {name[:64]!r}: unsupported dtype {repr(dtype)[:64]}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"tensor {name!r}: bad shape {repr(shape)[:64]}")
        if not (type(begin) is int and type(end) is int and 0 <= begin <= end <= data_len):
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"tensor {name!r}: data offsets outside the frame")
        if end - begin != math.prod(shape) * _ITEMSIZE[dtype]:  # exact integers: a huge claimed shape cannot wrap
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"tensor {name!r}: {end - begin} bytes do not hold shape {shape} of {dtype}")
        spans.append((begin, end))
    spans.sort()
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        raise ProtocolError(ErrorCode.BAD_TENSOR, "tensor data regions overlap")
    return header, 8 + n


def check(blob: memoryview | bytes, spec: TensorSpec, max_bytes: int) -> tuple[dict, int]:
    """Validate a frame against the exact tensors a message type needs; (header, data start)."""
    header, start = read_header(blob, max_bytes)
    names = {k for k in header if k != "__metadata__"}
    if names != set(spec):
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"expected tensors {sorted(spec)}, got {sorted(names)}")
    for name, (dtype, shape) in spec.items():
        got = header[name]
        if got["dtype"] != dtype or tuple(got["shape"]) != tuple(shape):
            raise ProtocolError(
                ErrorCode.BAD_TENSOR, f"tensor {name!r}: expected {dtype}{list(shape)}, got {got['dtype']}{got['shape']}"
            )
    return header, start


def decode(blob: memoryview | bytes, spec: TensorSpec | None, max_bytes: int) -> dict[str, np.ndarray]:
    """Checked, zero-copy numpy views of a frame's tensors (`spec=None` accepts any tensors)."""
    header, start = check(blob, spec, max_bytes) if spec is not None else read_header(blob, max_bytes)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = np.dtype(DTYPES[info["dtype"]]).newbyteorder("<")
        out[name] = np.frombuffer(blob, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin).reshape(info["shape"])
    return out
