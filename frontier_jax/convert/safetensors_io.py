"""Lazy reading and sharded writing of safetensors checkpoints, in numpy.

File layout (safetensors): an 8-byte little-endian header length N, N bytes of JSON
    {name: {"dtype": "F32"|"BF16"|"F8_E4M3"|..., "shape": [...], "data_offsets": [begin, end]},
     "__metadata__": {...}}
then the raw little-endian tensor bytes, offsets relative to the end of the header.
A checkpoint directory holds either one `model.safetensors` or shards named in
`model.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map": {name: file}}).

Reading memory-maps each file and copies one tensor at a time, so a checkpoint larger than
host memory can be walked tensor by tensor.  The reader is our own (a few lines over numpy and
ml_dtypes) because `safetensors`' numpy/flax loaders cannot represent fp8 tensors.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


def read_json(path: str, what: str):
    """The JSON value in file `path`; ValueError naming the file when it is not JSON."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{path}: {what} is not valid JSON ({err})") from err


def _read_header(path: str) -> tuple[dict, int]:
    """-> (header without __metadata__, byte offset of the data section).  Checks that every
    tensor's bytes lie inside the file and match its dtype and shape (a truncated download)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if n is None or 8 + n > size:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, shorter than its header)")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise ValueError(f"{path}: the safetensors header is not valid JSON ({err})") from err
    header.pop("__metadata__", None)
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if 8 + n + end > size:
            raise ValueError(
                f"{path}: truncated safetensors file: tensor {name} ends at byte {8 + n + end}, "
                f"the file has {size}; download it again"
            )
        dtype = _DTYPES.get(info["dtype"])
        if dtype is not None and end - begin != dtype.itemsize * int(np.prod(info["shape"])):
            raise ValueError(
                f"{path}: tensor {name} holds {end - begin} bytes, its dtype {info['dtype']} "
                f"and shape {info['shape']} need {dtype.itemsize * int(np.prod(info['shape']))}"
            )
    return header, 8 + n


class CheckpointReader:
    """Names, shapes and lazily read values of every tensor of a safetensors checkpoint dir."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"HF checkpoint directory {path} does not exist")
        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            files = sorted(set(read_json(index, "the shard index")["weight_map"].values()))
        elif os.path.exists(os.path.join(path, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise FileNotFoundError(f"{path} has neither {INDEX_FILE} nor {SINGLE_FILE}")
        self._entries: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            file_path = os.path.join(path, name)
            header, data_start = _read_header(file_path)
            for key, info in header.items():
                self._entries[key] = (file_path, info, data_start)
        self._maps: dict[str, np.memmap] = {}

    def names(self) -> set[str]:
        return set(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a numpy array in its stored dtype (a copy, not a view)."""
        file_path, info, data_start = self._entries[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported safetensors dtype {info['dtype']}")
        if file_path not in self._maps:
            self._maps[file_path] = np.memmap(file_path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._maps[file_path][data_start + begin : data_start + end]
        return np.array(raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"]))


def _write_file(path: str, tensors: list[tuple[str, np.ndarray]]) -> None:
    header, offset = {}, 0
    for name, array in tensors:
        header[name] = {
            "dtype": _CODES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, array in tensors:
            f.write(np.ascontiguousarray(array).tobytes())


def write_checkpoint(path: str, tensors: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int) -> None:
    """Writes (name, array) pairs, in order, into shards of at most `max_shard_bytes` (a tensor
    larger than that gets a shard of its own): `model.safetensors` when one shard suffices,
    else `model-0000i-of-0000n.safetensors` plus the index.  Each shard is written as soon as
    it is full, so only one shard is held in memory.  `path` must not hold a checkpoint yet."""
    os.makedirs(path, exist_ok=True)
    if any(f.endswith(".safetensors") or f == INDEX_FILE for f in os.listdir(path)):
        raise FileExistsError(f"{path} already holds a safetensors checkpoint; export into a new directory")
    written: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
    shard: list[tuple[str, np.ndarray]] = []
    size = total = 0

    def flush():
        tmp = os.path.join(path, f".shard-{len(written)}.tmp")
        _write_file(tmp, shard)
        written.append((tmp, [name for name, _ in shard]))

    for name, array in tensors:
        if shard and size + array.nbytes > max_shard_bytes:
            flush()
            shard, size = [], 0
        shard.append((name, array))
        size += array.nbytes
        total += array.nbytes
    flush()
    if len(written) == 1:
        os.replace(written[0][0], os.path.join(path, SINGLE_FILE))
        return
    weight_map = {}
    for i, (tmp, names) in enumerate(written):
        file_name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(tmp, os.path.join(path, file_name))
        weight_map.update({name: file_name for name in names})
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
