"""Streaming safetensors I/O: read one tensor at a time, write a file
tensor by tensor.

safetensors has no append API and ``safe_open`` memory-maps the whole file,
so every page read stays in the process's RSS until the file is closed. The
merge engine instead reads each tensor with ``readinto`` (through the page
cache, into a buffer that is freed after its group), copies pass-through
tensors file-to-file with ``copy_file_range``, and writes the output header
up front from the known shapes and dtypes. The format is the documented one:
8-byte little-endian header length, a JSON header (``dtype``, ``shape``,
``data_offsets`` relative to the data start, optional ``__metadata__``),
padded with spaces to 8 bytes, then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100 << 20  # the reference implementation's limit; guards against garbage lengths


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def byte_view(tensor: torch.Tensor):
    """A writable byte buffer over a contiguous tensor's storage (any dtype, bf16 included)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


class TensorFileError(ValueError):
    """A file that is not a readable safetensors file; the message names it."""


def _parse_entry(key: str, raw: object, data_start: int) -> TensorEntry:
    if not isinstance(raw, dict):
        raise ValueError(f"tensor {key!r}: entry is not an object")
    offsets, dtype_name, shape = raw.get("data_offsets"), raw.get("dtype"), raw.get("shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(v) for v in offsets) and offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {key!r}: bad data_offsets {str(offsets)[:80]}")
    if not (isinstance(shape, list) and len(shape) <= 16 and all(_is_size(v) for v in shape)):
        raise ValueError(f"tensor {key!r}: bad shape {str(shape)[:80]}")
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise ValueError(f"tensor {key!r}: unsupported dtype {str(dtype_name)[:40]}")
    begin, end = offsets
    shape = tuple(shape)
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"tensor {key!r}: {end - begin} bytes for shape {shape} {dtype_name}")
    return TensorEntry(dtype, shape, data_start + begin, data_start + end)


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


def read_header(handle, size: int, path: Path) -> tuple[int, dict]:
    """Header length and parsed header of an open safetensors file, checked."""
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise TensorFileError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
    (length,) = struct.unpack("<Q", prefix)
    if length > min(MAX_HEADER, size - 8):
        raise TensorFileError(f"{path}: not a safetensors file (header length {length} for a file of {size} bytes)")
    try:
        header = json.loads(handle.read(length))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise TensorFileError(f"{path}: not a safetensors file (header is not JSON: {str(exc)[:120]})") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: not a safetensors file (header is not a JSON object)")
    return length, header


class TensorFile:
    """Read-only access to one safetensors file, a tensor at a time.

    With ``prefix``, only the tensors under it are seen, by their names
    without it (a training checkpoint keeps the model under ``model.``)."""

    def __init__(self, path: str | os.PathLike, prefix: str = ""):
        self.path = Path(path)
        self._handle = open(self.path, "rb", buffering=0)
        try:
            size = os.fstat(self._handle.fileno()).st_size
            length, header = read_header(self._handle, size, self.path)
            metadata = header.pop("__metadata__", None) or {}
            if not isinstance(metadata, dict):
                raise TensorFileError(f"{self.path}: __metadata__ is not a JSON object")
            self.metadata: dict[str, str] = metadata
            try:
                self.entries = {
                    key[len(prefix):]: _parse_entry(key, raw, 8 + length)
                    for key, raw in header.items() if key.startswith(prefix)
                }
            except ValueError as exc:
                raise TensorFileError(f"{self.path}: {exc}") from None
            self._check_bounds()
        except BaseException:
            self._handle.close()
            raise

    def _check_bounds(self) -> None:
        size = os.fstat(self._handle.fileno()).st_size
        if any(entry.end > size for entry in self.entries.values()):
            raise TensorFileError(f"{self.path}: truncated safetensors file")

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._handle.close()

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        buffer, done = memoryview(byte_view(tensor)), 0
        while done < entry.nbytes:
            got = os.preadv(self._handle.fileno(), [buffer[done:]], entry.start + done)
            if got <= 0:
                raise TensorFileError(f"{self.path}: short read of {key!r} (file changed or truncated?)")
            done += got
        return tensor

    def copy_bytes(self, key: str, out_fd: int) -> None:
        """Append the raw bytes of ``key`` to ``out_fd`` without passing them through Python."""
        entry = self.entries[key]
        offset, left = entry.start, entry.nbytes
        while left:
            sent = os.copy_file_range(self._handle.fileno(), out_fd, left, offset)
            if sent <= 0:
                raise ValueError(f"{self.path}: short copy of {key!r}")
            offset, left = offset + sent, left - sent


def build_header(layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """Header bytes (length prefix included) and the order tensors must be written in.

    Larger dtypes go first, as the reference writer does, so every tensor's
    offset is aligned to its element size."""
    order = sorted(layout, key=lambda key: -layout[key][0].itemsize)  # stable: keeps the caller's order
    header: dict[str, dict] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in order:
        dtype, shape = layout[key]
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, order


class TensorFileWriter:
    """Write a safetensors file whose tensors arrive one at a time, in ``order``."""

    def __init__(self, path: str | os.PathLike, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        self.layout = layout
        header, self.order = build_header(layout, metadata or {})
        self._handle = open(path, "wb", buffering=0)
        self._handle.write(header)
        self._next = 0

    def _expect(self, key: str) -> None:
        if self._next >= len(self.order) or self.order[self._next] != key:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise ValueError(f"tensor {key!r} written out of order; expected {expected!r}")
        self._next += 1

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self._expect(key)
        dtype, shape = self.layout[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {key!r}: got {tensor.dtype} {tuple(tensor.shape)}, header says {dtype} {shape}")
        self._handle.write(memoryview(byte_view(tensor.contiguous())))

    def copy_from(self, key: str, source: TensorFile, source_key: str) -> None:
        self._expect(key)
        if source.entries[source_key].nbytes != math.prod(self.layout[key][1]) * self.layout[key][0].itemsize:
            raise ValueError(f"tensor {key!r}: size differs from {source_key!r} in {source.path}")
        source.copy_bytes(source_key, self._handle.fileno())

    def close(self) -> None:
        missing = self.order[self._next:]
        self._handle.close()
        if missing:
            raise ValueError(f"{len(missing)} tensors never written (first: {missing[0]!r})")


def load_tensors(path: str | os.PathLike, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (under ``prefix``, without it), with the
    checks of :class:`TensorFile` (a file from a run directory or a user is untrusted input)."""
    with TensorFile(path, prefix) as tensors:
        return {key: tensors.read(key) for key in tensors.keys()}


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, with its I/O failures as ``OSError``
    (errno and file name kept) so a full disk is recognised as one."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as exc:  # noqa: BLE001 - SafetensorError carries the OS error only in its text
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None
