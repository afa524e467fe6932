"""Safetensors in and out: the only model format read, and atomic, streaming writes.

Reading goes through `safetensors.safe_open` (tensors are loaded one at a time, so an SDXL
checkpoint is never held whole). Writing streams tensor after tensor into a temporary file
beside the target and renames it, so a failed or cancelled run leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
import struct
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows: an open file cannot be deleted there, which protects a writer's partial file
    fcntl = None

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
    # torch.load reads a .safetensors name as safetensors, and the converted file must not replace its source
    source = path.with_suffix(".ckpt") if path.suffix == ".safetensors" else path
    first = f"Rename it to {source.name}, then convert it" if source != path else "Convert it"
    return (
        f"{path.name} is a pickle checkpoint, which can run arbitrary code when opened, so Concept Eraser "
        f"does not read it. {first} once with a tool you trust, e.g. load it in ComfyUI and save it with "
        "the 'Save Checkpoint' node, or run: python -c \"import torch; from safetensors.torch import save_file; "
        f"sd = torch.load('{source.name}', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
        f"save_file({{k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}}, "
        f"'{source.with_suffix('.safetensors').name}')\""
    )


def check_readable(path: str | os.PathLike, field: str = "model") -> Path:
    """Refuse missing files, special files, pickle checkpoints and anything that is not safetensors."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InvalidParameterError(field, f"{path} does not exist") from None
    except OSError as exc:
        raise InvalidParameterError(field, f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise InvalidParameterError(
            field, f"{path} is a folder; a single-file .safetensors checkpoint is needed (diffusers folders are not "
            "supported)")
    if not stat.S_ISREG(mode):  # opening a named pipe would wait for a writer forever
        raise InvalidParameterError(field, f"{path} is {file_kind(mode)}, not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise InvalidParameterError(field, f"cannot read {path}: {exc.strerror}") from None
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


def file_kind(mode: int) -> str:
    """A file type in words, for messages."""
    for test, name in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]


class SafetensorsReader:
    """Lazy view of one safetensors file: names, shapes, dtypes and metadata; tensors on demand."""

    def __init__(self, path: str | os.PathLike, field: str = "model"):
        self.path = check_readable(path, field)
        try:
            self._file = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt headers
            raise UnsafeFileError(f"{self.path.name} is not a valid safetensors file: {exc}") from None
        self.metadata: dict[str, str] = dict(self._file.metadata() or {})
        self.infos: dict[str, TensorInfo] = {}
        for key in self._file.keys():  # noqa: SIM118 - safe_open is not iterable
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


# Partial files: a short fixed-length name (a legal target name never becomes too long) that says what it is.
# The writer holds an exclusive lock on it, so a partial file nobody locks was left by a killed run.
PARTIAL_PREFIX, PARTIAL_SUFFIX = ".concept-eraser-", ".partial"


def check_writable(path: str | os.PathLike, overwrite: bool, field: str = "out",
                   suffix: str | None = ".safetensors", size: int = 0) -> Path:
    """Everything about an output path that can be known before the work: suffix, folder, name length,
    permissions, an existing file (refused unless `overwrite`, special files always), room for `size` bytes.
    Also removes the partial files of killed runs from the folder."""
    path = Path(path)
    if suffix and path.suffix.lower() != suffix:
        raise InvalidParameterError(field, f"{path.name} must end in {suffix}")
    folder = path.parent
    if not folder.exists():
        raise InvalidParameterError(field, f"the folder {folder} does not exist")
    if not folder.is_dir():
        raise InvalidParameterError(field, f"{folder} is {file_kind(folder.stat().st_mode)}, not a folder")
    name_max = _name_max(folder)
    if len(os.fsencode(path.name)) > name_max:
        raise InvalidParameterError(field, f"the file name is {len(os.fsencode(path.name))} bytes long; this file "
                                    f"system allows {name_max}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidParameterError(field, f"the folder {folder} is not writable")
    if path.is_symlink() or path.exists():
        if path.exists() and not path.is_file():  # a folder, a named pipe, a device (links followed)
            raise InvalidParameterError(field, f"{path} is {file_kind(path.stat().st_mode)}; give the name of a "
                                        "file to write")
        if not overwrite:
            raise InvalidParameterError(field, f"{path} already exists; choose another name or pass --overwrite")
    remove_stale_partials(folder)
    free = shutil.disk_usage(folder).free
    if size > free:
        raise InvalidParameterError(field, f"the folder {folder} has {free / 1e9:.2f} GB free; the output needs about "
                                    f"{size / 1e9:.2f} GB")
    return path


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not POSIX (Windows): its usual limit
        return 255


def _lock(fd: int, blocking: bool) -> bool:
    """An exclusive lock on an open file; False if another open file holds it (and `blocking` is False)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def remove_stale_partials(folder: str | os.PathLike) -> list[str]:
    """Delete the partial files that killed runs left in `folder`, with a warning naming each; returns their names."""
    removed = []
    for entry in Path(folder).glob(PARTIAL_PREFIX + "*" + PARTIAL_SUFFIX):
        try:
            size = _remove_if_stale(entry)
        except OSError:
            continue
        if size is not None:
            removed.append(entry.name)
            warnings.warn(f"removed {entry} ({size / 1e6:.1f} MB), a partial file left by a run that was killed "
                          "while writing", stacklevel=2)
    return removed


def _remove_if_stale(entry: Path) -> int | None:
    """The size of `entry` if no writer holds it (it is then deleted), else None."""
    if fcntl is None:  # Windows: deleting fails while a writer has the file open
        size = entry.stat().st_size
        os.unlink(entry)
        return size
    fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a named pipe would block opening
    try:
        info = os.fstat(fd)
        # A writer locks its file right after creating it: an empty file seconds old may be one in that instant.
        fresh = info.st_size == 0 and time.time() - info.st_mtime < 60
        if not stat.S_ISREG(info.st_mode) or fresh or not _lock(fd, blocking=False):
            return None
        os.unlink(entry)
        return info.st_size
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False, field: str = "out",
                  suffix: str | None = ".safetensors") -> Iterator[tuple[BinaryIO, Path]]:
    """Yield (file, its temporary path) in `path`'s folder; when the block ends without error, the file becomes
    `path`: through a hard link, which fails if `path` appeared meanwhile (kept as it is; the run fails unless
    `overwrite`). Created with the user's umask (with `overwrite`, an existing file's mode is kept). On any error
    or signal the partial file is removed; if the process is killed, the next write to the folder removes it."""
    path = check_writable(path, overwrite, field, suffix)
    for _ in range(100):
        partial = path.parent / f"{PARTIAL_PREFIX}{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise _write_error(field, path, exc) from None
    else:
        raise InvalidParameterError(field, f"cannot create a temporary file in {path.parent}")
    try:
        with os.fdopen(fd, "wb") as f:
            if fcntl is not None:
                _lock(f.fileno(), blocking=True)
            yield f, partial
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:  # published while still locked, so that no cleaner takes it for a stale file
                _publish(partial, path, overwrite, field)
        if fcntl is None:  # Windows renames and deletes only closed files
            _publish(partial, path, overwrite, field)
    except BaseException as exc:
        with suppress(OSError):
            os.unlink(partial)
        if isinstance(exc, OSError):  # a full disk, a vanished folder: said like every other bad input
            raise _write_error(field, path, exc) from None
        raise


def _publish(partial: Path, path: Path, overwrite: bool, field: str) -> None:
    if overwrite:
        with suppress(OSError):
            if path.is_file():
                os.chmod(partial, stat.S_IMODE(path.stat().st_mode))
        os.replace(partial, path)
        return
    gone = InvalidParameterError(field, f"{path} was created by something else while this run was writing; it "
                                 "was left as it is (choose another name or pass --overwrite)")
    try:
        os.link(partial, path)
    except FileExistsError:
        raise gone from None
    except OSError:  # no hard links here (FAT, some network shares): reserve the name, then rename over it
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            raise gone from None
        os.replace(partial, path)
        return
    os.unlink(partial)


def _write_error(field: str, path: Path, exc: OSError) -> InvalidParameterError:
    return InvalidParameterError(field, f"could not write {path}: {exc.strerror or exc}; nothing was written to it")


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor | LazyTensor] | Iterable[tuple[str, torch.Tensor | LazyTensor]],
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    field: str = "out",
    check: Callable[[str, torch.Tensor], None] | None = None,
) -> Path:
    """Stream tensors into `path` (see `atomic_output`). Lazy tensors are materialised one at a time;
    `check(name, tensor)` sees each written tensor first (in the dtype written) and may raise."""
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
    with atomic_output(path, overwrite, field) as (f, _):
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, value in items:
            tensor = value.load() if isinstance(value, LazyTensor) else value
            if tensor.dtype != value.dtype or tuple(tensor.shape) != tuple(value.shape):
                raise EraserError(f"internal error: {name} changed dtype or shape while saving")
            if check is not None:
                check(name, tensor)
            f.write(tensor_bytes(tensor))
    return Path(path)


def write_json(path: str | os.PathLike, data, overwrite: bool = False, field: str = "out") -> Path:
    """JSON (a report) written like every other output: atomically, never over a file unless `overwrite`."""
    text = json.dumps(data, indent=2, default=str).encode("utf-8")
    with atomic_output(path, overwrite, field, suffix=None) as (f, _):
        f.write(text)
    return Path(path)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's raw bytes as safetensors stores them (little-endian, C order, on the CPU)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def read_metadata_json(metadata: Mapping[str, str], key: str, default, field: str = "model"):
    """The JSON value stored under `key`, which must have `default`'s type (a hand-edited file may not)."""
    if key not in metadata:
        return default
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError:
        value = _NOT_JSON
    if not isinstance(value, type(default)):
        kind = {list: "list", dict: "object", str: "string"}.get(type(default), type(default).__name__)
        raise InvalidParameterError(field, f"its metadata {key} is not a JSON {kind}; was the file edited by hand?")
    return value


_NOT_JSON = object()
