"""Pickled torch checkpoints (``.ckpt``/``.pt``) read without running them. A pickle is a
program; ``torch.load`` runs it, and ``weights_only=True`` refuses the framework classes old
training runs stored next to the weights (``pytorch_lightning`` callbacks, ``__main__`` configs).
This reader interprets the pickle with a restricted ``find_class``: torch's tensor rebuilders and
a few plain containers are rebuilt by our own code, names that would run code (``os.system``,
``builtins.eval``, ``subprocess`` ...) refuse the file, and every other class becomes an inert
placeholder that records its arguments and is never imported. Tensors are numpy views of the
(uncompressed) storages inside the zip, mapped from the file, not read into memory."""

from __future__ import annotations

import io
import mmap
import os
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidFileError

# Storage classes (legacy typed storages) and their numpy dtypes / safetensors names.
_STORAGES = {
    "DoubleStorage": ("<f8", "F64"), "FloatStorage": ("<f4", "F32"), "HalfStorage": ("<f2", "F16"),
    "BFloat16Storage": ("<u2", "BF16"), "LongStorage": ("<i8", "I64"), "IntStorage": ("<i4", "I32"),
    "ShortStorage": ("<i2", "I16"), "CharStorage": ("i1", "I8"), "ByteStorage": ("u1", "U8"),
    "BoolStorage": ("?", "BOOL"),
}
# torch dtypes (UntypedStorage pickles name the dtype instead).
_DTYPES = {
    "float64": _STORAGES["DoubleStorage"], "float32": _STORAGES["FloatStorage"], "float16": _STORAGES["HalfStorage"],
    "bfloat16": _STORAGES["BFloat16Storage"], "int64": _STORAGES["LongStorage"], "int32": _STORAGES["IntStorage"],
    "int16": _STORAGES["ShortStorage"], "int8": _STORAGES["CharStorage"], "uint8": _STORAGES["ByteStorage"],
    "bool": _STORAGES["BoolStorage"],
}

# Names whose call runs code or touches the system: a checkpoint that names one is refused.
_DANGEROUS_MODULES = {
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty", "code",
    "ctypes", "marshal", "types", "functools", "operator", "pickle", "_pickle", "io", "builtins",
    "__builtin__", "webbrowser", "commands", "multiprocessing", "threading", "signal", "tempfile", "pathlib",
    "shlex", "platform", "inspect", "pdb", "timeit", "asyncio", "urllib", "http", "requests", "zipimport",
    "torch.hub", "torch.package", "numpy.testing", "numpy.f2py", "numpy.distutils",
}


class Placeholder:
    """A class or function of the pickle we do not rebuild (a training framework's): a fresh,
    empty class per name, so the pickle can build, call and fill "instances" of it. It records
    what it is given; its module is never imported and none of its code exists here."""

    args: tuple
    state: Any
    items: dict

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = object.__new__(cls)
        obj.args, obj.state, obj.items = args, None, {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.items[len(self.items)] = value

    def extend(self, values: Any) -> None:
        for v in values:
            self.append(v)


def placeholder(module: str, name: str) -> type:
    return type(name, (Placeholder,), {"__module__": f"astolfomix-placeholder:{module}", "__qualname__": name})


@dataclass
class StorageRef:
    key: str
    np_dtype: str
    st_dtype: str


@dataclass
class TensorRef:
    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, offset, size, stride, *_rest) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError("a tensor whose storage is not a storage")
    return TensorRef(storage, int(offset), tuple(int(x) for x in size), tuple(int(x) for x in stride))


def _rebuild_parameter(data, *_rest):
    return data


def _ordered_dict(*args):
    return OrderedDict(*args)


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, path: str):
        super().__init__(f)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return _ordered_dict
        if module == "torch" and (name in _STORAGES or name == "UntypedStorage" or name in _DTYPES):
            return placeholder(module, name)  # resolved by persistent_load
        if module == "_codecs" and name == "encode":
            return lambda s, enc="latin1": s.encode(enc)  # how protocol-2 pickles spell bytes
        root = module.split(".")[0]
        if module in _DANGEROUS_MODULES or root in _DANGEROUS_MODULES:
            raise InvalidFileError(
                f"{self.path}: the pickle calls {module}.{name}, which would run code on this machine; refused "
                "(nothing was run)")
        return placeholder(module, name)

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        kind, key = pid[1], str(pid[2])
        name = kind.__name__ if isinstance(kind, type) else str(kind)
        if name in _STORAGES:
            np_dt, st_dt = _STORAGES[name]
        elif name in _DTYPES:
            np_dt, st_dt = _DTYPES[name]
        else:
            raise pickle.UnpicklingError(f"storage of unknown type {name!r:.40}")
        return StorageRef(key, np_dt, st_dt)


@dataclass
class PickledCheckpoint:
    tensors: dict[str, tuple[str, tuple[int, ...], np.ndarray]]  # name -> (st dtype, shape, raw bytes)
    skipped: list[str]  # entries that are not tensors (framework objects, step counters)


def read_ckpt(path: str | os.PathLike[str]) -> PickledCheckpoint:
    """The state dict of a torch zip checkpoint, without running its pickle."""
    path = os.fspath(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise InvalidFileError(
            f"{path}: not a torch zip checkpoint (the legacy pre-1.6 format, or not a checkpoint at all); "
            "load it with torch and save it again") from None
    except OSError as e:
        raise InvalidFileError(f"{path}: {e.strerror or e}") from None
    with zf, open(path, "rb") as f:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise InvalidFileError(f"{path}: a zip without data.pkl: not a torch checkpoint")
        prefix = pkl[: -len("data.pkl")]
        try:
            obj = _Unpickler(io.BytesIO(zf.read(pkl)), path).load()
        except InvalidFileError:
            raise
        except Exception as e:  # a damaged or hostile pickle: whatever it raised, it is not ours to run
            raise InvalidFileError(f"{path}: cannot read its pickle: {type(e).__name__}: {e}"[:400]) from None
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if not isinstance(state, dict):
            raise InvalidFileError(f"{path}: holds no state dict (a {type(state).__name__})")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else None
        tensors, skipped = {}, []
        for k, v in state.items():
            if not isinstance(v, TensorRef):
                skipped.append(str(k))
                continue
            tensors[str(k)] = _tensor(zf, mm, prefix, v, path, str(k))
        return PickledCheckpoint(tensors, skipped)


def _tensor(zf: zipfile.ZipFile, mm, prefix: str, t: TensorRef, path: str, name: str):
    member = f"{prefix}data/{t.storage.key}"
    try:
        info = zf.getinfo(member)
    except KeyError:
        raise InvalidFileError(f"{path}: tensor '{name}': storage {member} is missing") from None
    item = np.dtype(t.storage.np_dtype).itemsize
    if info.compress_type != zipfile.ZIP_STORED or mm is None:
        raise InvalidFileError(f"{path}: tensor '{name}': compressed storage (torch never writes one); refused")
    # The member's data follows its local header: map it instead of reading it.
    lh = mm[info.header_offset:info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(lh[26:28], "little") + int.from_bytes(lh[28:30], "little")
    if len(lh) < 30 or start + info.file_size > len(mm):
        raise InvalidFileError(f"{path}: tensor '{name}': storage {member} lies outside the file")
    buf = np.frombuffer(mm, dtype=np.uint8, count=info.file_size, offset=start)
    numel = int(np.prod(t.shape)) if t.shape else 1
    if numel == 0:
        return t.storage.st_dtype, t.shape, np.zeros(0, np.uint8)
    last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.stride))
    if t.offset < 0 or any(s < 0 for s in t.stride) or (last + 1) * item > buf.size:
        raise InvalidFileError(f"{path}: tensor '{name}': shape {list(t.shape)} and strides run past its storage")
    store = buf[: buf.size - buf.size % item].view(t.storage.np_dtype)
    arr = np.lib.stride_tricks.as_strided(store[t.offset:], shape=t.shape, strides=[s * item for s in t.stride])
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)  # a view in the pickle (rare): copied
    return t.storage.st_dtype, t.shape, arr.reshape(-1).view(np.uint8)
