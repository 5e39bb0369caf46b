"""Reading and writing the safetensors format with numpy alone (memory-mapped, bf16 included).

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian tensor bytes. https://github.com/huggingface/safetensors#format
numpy has no bfloat16, so BF16 tensors are handed out as uint16 bit patterns tagged "BF16";
`to_float32` widens them (a bf16 value is the top half of a float32).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import UserError

# safetensors dtype name -> numpy storage dtype
STORAGE_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclass
class RawTensor:
    """A tensor as stored: `data` holds the storage dtype (uint16 bit patterns for BF16)."""

    dtype: str
    data: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def to_float32(self) -> np.ndarray:
        return to_float32(self)


def to_float32(t: RawTensor) -> np.ndarray:
    if t.dtype == "BF16":
        return (t.data.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(t.data, dtype=np.float32)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (as torch's .to(bfloat16))."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


class SafetensorsFile:
    """One .safetensors file, its tensors memory-mapped on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise ValueError("file shorter than its 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > 100 * 1024 * 1024:
                    raise ValueError(f"header length {n} is implausible")
                header = json.loads(f.read(n))
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not a valid safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        self.data_start = 8 + n
        self.file_size = os.path.getsize(path)
        self._mm: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> RawTensor:
        e = self.entries[name]
        dtype = e["dtype"]
        if dtype not in STORAGE_DTYPES:
            raise UserError(f"{self.path}: tensor {name} has unsupported dtype {dtype}")
        begin, end = e["data_offsets"]
        if self.data_start + end > self.file_size:
            raise UserError(f"{self.path} is truncated (tensor {name} runs past the end of the file)")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[self.data_start + begin : self.data_start + end]
        arr = raw.view(STORAGE_DTYPES[dtype]).reshape(e["shape"])
        return RawTensor(dtype, arr)


def save_file(tensors: dict[str, RawTensor | np.ndarray], path: str, metadata: dict | None = None) -> None:
    """Write tensors (numpy arrays, or RawTensor for BF16) as one safetensors file."""
    reverse = {np.dtype(v).str: k for k, v in STORAGE_DTYPES.items() if k != "BF16"}
    header: dict = {}
    blobs = []
    offset = 0
    for name, t in tensors.items():
        if isinstance(t, RawTensor):
            dtype, arr = t.dtype, np.ascontiguousarray(t.data)
        else:
            arr = np.ascontiguousarray(t)
            dtype = reverse[arr.dtype.str]
        nbytes = arr.nbytes
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        blobs.append(arr)
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for arr in blobs:
            f.write(arr.tobytes())
