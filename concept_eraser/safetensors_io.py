"""Safetensors in and out: the only model format read, and atomic, streaming writes.

Reading goes through `safetensors.safe_open` (tensors are loaded one at a time, so an SDXL
checkpoint is never held whole). Writing streams tensor after tensor into a temporary file
beside the target and renames it, so a failed or cancelled run leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import safe_open

from .errors import EraserError, InvalidParameterError, UnsafeFileError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        DTYPE_NAMES[getattr(torch, _name)] = "F8_E4M3" if "e4m3" in _name else "F8_E5M2"


def conversion_hint(path: Path) -> str:
    target = path.with_suffix(".safetensors").name
    return (
        f"{path.name} is a pickle checkpoint, which can run arbitrary code when opened, so Concept Eraser "
        "does not read it. Convert it once with a tool you trust, e.g. load it in ComfyUI and save it with "
        "the 'Save Checkpoint' node, or run: python -c \"import torch; from safetensors.torch import save_file; "
        f"sd = torch.load('{path.name}', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
        f"save_file({{k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}}, '{target}')\""
    )


def check_readable(path: str | os.PathLike) -> Path:
    """Refuse missing files, pickle checkpoints and anything that is not safetensors."""
    path = Path(path)
    if not path.exists():
        raise InvalidParameterError("model", f"{path} does not exist")
    if path.is_dir():
        raise InvalidParameterError(
            "model", f"{path} is a folder; a single-file .safetensors checkpoint is needed (diffusers folders are not supported)"
        )
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    # safetensors: u64 header length, then the JSON header. Its first bytes can be anything, so the
    # pickle signatures (0x80 protocol byte, or "PK" for torch's zip files) are only checked when
    # the file is not plausibly safetensors.
    header_len = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
    looks_safetensors = len(head) == 9 and head[8:9] == b"{" and 0 < header_len <= min(size - 8, 100_000_000)
    if path.suffix.lower() in PICKLE_SUFFIXES or (
        not looks_safetensors and (head[:1] == b"\x80" or head[:2] == b"PK")
    ):
        raise UnsafeFileError(conversion_hint(path))
    if not looks_safetensors:
        raise UnsafeFileError(f"{path.name} is not a safetensors file (its header is not readable)")
    return path


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]


class SafetensorsReader:
    """Lazy view of one safetensors file: names, shapes, dtypes and metadata; tensors on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = check_readable(path)
        try:
            self._file = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise UnsafeFileError(f"{self.path.name} is not a valid safetensors file: {exc}") from None
        self.metadata: dict[str, str] = dict(self._file.metadata() or {})
        self.infos: dict[str, TensorInfo] = {}
        for key in self._file.keys():
            sl = self._file.get_slice(key)
            self.infos[key] = TensorInfo(_dtype_from_name(sl.get_dtype()), tuple(sl.get_shape()))
        self._sha256: str | None = None

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def get(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)

    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256


_NAME_TO_DTYPE = {v: k for k, v in DTYPE_NAMES.items()}


def _dtype_from_name(name: str) -> torch.dtype:
    name = name.upper()
    if name not in _NAME_TO_DTYPE:
        raise UnsafeFileError(f"tensor dtype {name} is not supported")
    return _NAME_TO_DTYPE[name]


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class LazyTensor:
    """A tensor to write that is produced only when its turn comes (keeps peak memory low)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def check_writable(path: str | os.PathLike, overwrite: bool, field: str = "out") -> Path:
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InvalidParameterError(field, f"{path.name} must end in .safetensors")
    if not path.parent.exists():
        raise InvalidParameterError(field, f"the folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise InvalidParameterError(field, f"{path} already exists; choose another name or pass --overwrite")
    return path


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor | LazyTensor] | Iterable[tuple[str, torch.Tensor | LazyTensor]],
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Stream tensors into `path` (temp file + rename). Lazy tensors are materialised one at a time."""
    path = check_writable(path, overwrite)
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    header: dict[str, object] = {}
    offset = 0
    for name, value in items:
        dtype, shape = (value.dtype, tuple(value.shape))
        nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, value in items:
                tensor = value.load() if isinstance(value, LazyTensor) else value
                if tensor.dtype != value.dtype or tuple(tensor.shape) != tuple(value.shape):
                    raise EraserError(f"internal error: {name} changed dtype or shape while saving")
                f.write(tensor_bytes(tensor))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's raw bytes as safetensors stores them (little-endian, C order, on the CPU)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def read_metadata_json(metadata: Mapping[str, str], key: str, default):
    if key not in metadata:
        return default
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        return default
