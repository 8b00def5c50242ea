"""Read pickle-based PyTorch files (official Lightning ``.ckpt``, ``.pt``/``.pth``) without ever running code.

A pickle is a small program: a GLOBAL names any importable object and REDUCE calls it, so loading a file
the ordinary way can run anything (``os.system`` included). ``torch.load(weights_only=True)`` is safe but
refuses a whole Lightning file as soon as one entry besides the weights holds a numpy scalar, an OmegaConf
``DictConfig``, an ``argparse.Namespace`` or an object of a class that is not installed.

This reader resolves a global only from a short table (``_ALLOWED``): torch's tensor-rebuild functions
(replaced by checked equivalents that only accept storages read from the file), the storage types,
``torch.Size``, torch dtypes, ``collections.OrderedDict``, ``set`` and ``frozenset``. Every other global
becomes an inert placeholder: a subclass of ``Opaque`` that remembers the name. Nothing is imported; calling
a placeholder, building one (NEWOBJ, BUILD), appending to it or setting items on it only records the
arguments. So every entry of a Lightning file loads (its extras as placeholders) and its tensors come out
exactly as ``torch.load`` gives them; ``load_state_dict`` then insists that the weights are tensors and
names the globals of anything else, in one line.

Formats: torch's zip format (torch >= 1.6: ``<prefix>/data.pkl``, one record ``<prefix>/data/<key>`` per
storage, its dtype in the persistent id, the byte order in ``<prefix>/byteorder``) and the older stream
format (magic number, protocol, system info, the pickle, the storage keys, then each storage's element count
and bytes, little-endian), which torchvision's and pytorch-fid's released weights use. The tar format of
2017 and plain pickles are refused.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from shared.checkpoint import CheckpointError, PathLike, error_line
from shared.progress import progress

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # first pickle of torch's stream format
STREAM_PROTOCOL = 1001
_CHUNK = 16 << 20

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexDoubleStorage": torch.complex128, "ComplexFloatStorage": torch.complex64,
    "UntypedStorage": torch.uint8,
}
_DTYPES = {name: v for name, v in vars(torch).items() if isinstance(v, torch.dtype)}
_PLAIN_TENSOR_TYPES = {"torch._tensor.Tensor", "torch.Tensor", "torch.nn.parameter.Parameter"}


class Opaque:
    """An object the file builds from a global outside the allowlist: never built, only recorded.

    ``global_name`` (on the class) is the global the pickle named; an instance keeps what the pickle gave it:
    ``args``/``kwargs`` (the call or NEWOBJ), ``state`` (BUILD), ``items`` (APPEND) and ``entries`` (SETITEM).
    """

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items=[], entries=[])
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["state"] = state

    def append(self, item):
        self.items.append(item)

    def extend(self, items):
        self.items.extend(items)

    def __setitem__(self, key, value):
        self.entries.append((key, value))

    def __call__(self, *args, **kwargs):
        return _placeholder(f"{self.global_name}(...)")(*args, **kwargs)

    def __repr__(self):
        return f"<not loaded: {self.global_name}>"


def _placeholder(global_name: str) -> type:
    return type("Opaque", (Opaque,), {"global_name": global_name, "__module__": __name__})


def global_of(obj: Any) -> Optional[str]:
    """The global an ``Opaque`` object (or placeholder class) stands for; None for anything else."""
    if isinstance(obj, Opaque):
        return obj.global_name
    if isinstance(obj, type) and issubclass(obj, Opaque):
        return obj.global_name
    return None


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage:
    """Bytes of one storage of the file (``data``: a uint8 tensor, possibly filled later) and its dtype."""

    def __init__(self, data: torch.Tensor, dtype: torch.dtype):
        self.data, self.dtype = data, dtype


def _ints(value: Any, what: str) -> Tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        raise pickle.UnpicklingError(f"a tensor's {what} is not a tuple of integers")
    return tuple(value)


def _size(*args) -> Tuple[int, ...]:
    return _ints(args[0] if args else (), "size")


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A tensor over bytes read from the file, every argument checked (bounds included)."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not one of the file's")
    dtype = dtype if dtype is not None else storage.dtype
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError("a tensor without a dtype")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride) or min(size + stride, default=0) < 0:
        raise pickle.UnpicklingError("a tensor with a negative or malformed offset, size or stride")
    item = dtype.itemsize
    count = storage.data.numel() // item
    if 0 not in size and offset + sum((s - 1) * st for s, st in zip(size, stride)) >= count:
        raise pickle.UnpicklingError(f"a tensor of size {size} reaches past its storage ({count} elements)")
    flat = storage.data[: count * item].view(dtype)
    return torch.as_strided(flat, size, stride, flat.storage_offset() + offset)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _tensor(storage, storage_offset, size, stride)  # hooks and conj/neg bits never apply to weights


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    return _tensor(storage, storage_offset, size, stride, dtype if isinstance(dtype, torch.dtype) else None)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter without tensor data")
    return data


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
    """A tensor of a subclass: plain tensors and parameters come back as tensors, other classes stay opaque."""
    if func not in _REBUILDERS or not isinstance(args, tuple):
        raise pickle.UnpicklingError("a tensor rebuilt by something else than torch's tensor functions")
    tensor = func(*args)
    name = global_of(new_type)
    if name is None:
        raise pickle.UnpicklingError("a tensor subclass that is not a class")
    return tensor if name in _PLAIN_TENSOR_TYPES else new_type(tensor, state)


_ALLOWED: Dict[Tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): _size,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    ("torch.storage", "UntypedStorage"): _StorageType(torch.uint8),  # storages of the dtypes of _rebuild_tensor_v3
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    """Globals from ``_ALLOWED`` or placeholders; storages through ``storage`` (None: the file has none here)."""

    def __init__(self, file, storage: Optional[Callable[[tuple], Any]] = None):
        super().__init__(file)
        self._storage = storage
        self._placeholders: Dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        value = _ALLOWED.get((module, name))
        if value is not None:
            return value
        qualified = f"{module}.{name}"
        if qualified not in self._placeholders:
            self._placeholders[qualified] = _placeholder(qualified)
        return self._placeholders[qualified]

    def persistent_load(self, pid: Any) -> Any:
        if self._storage is None or not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError("an unexpected persistent id")
        return self._storage(pid)


def _dtype_of(storage_type: Any) -> torch.dtype:
    if not isinstance(storage_type, _StorageType):
        raise pickle.UnpicklingError(f"unsupported storage type {global_of(storage_type) or storage_type!r}")
    return storage_type.dtype


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise pickle.UnpicklingError("a storage with a malformed size")
    return value


def _byteswap(data: torch.Tensor, dtype: torch.dtype) -> None:
    """In place, from the other byte order (complex numbers: each part)."""
    width = dtype.itemsize // (2 if dtype.is_complex else 1)
    if width > 1 and data.numel():
        data.copy_(data.view(-1, width).flip(1).reshape(-1))


def _read_exact(src, out: torch.Tensor, what: str, bar: Any) -> None:
    view = memoryview(out.numpy())
    pos = 0
    while pos < len(view):
        chunk = src.read(min(_CHUNK, len(view) - pos))
        if not chunk:
            raise EOFError(f"{what} ends early ({pos} of {len(view)} bytes)")
        view[pos:pos + len(chunk)] = chunk
        pos += len(chunk)
        bar.update(len(chunk))


def _load_zip(path: Path, bar: Any) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        pickles = sorted(n for n in names if n.endswith("/data.pkl") and n.count("/") == 1)
        if len(pickles) != 1:
            raise pickle.UnpicklingError("a zip archive without one <name>/data.pkl (not a torch.save file)")
        prefix = pickles[0][: -len("data.pkl")]
        order = zf.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        if order not in ("little", "big"):
            raise pickle.UnpicklingError(f"unknown byte order {order!r}")
        loaded: Dict[str, _Storage] = {}
        bar.total = sum(zf.getinfo(n).file_size for n in names if n.startswith(prefix + "data/"))

        def storage(pid: tuple) -> _Storage:
            if len(pid) != 5 or pid[0] not in ("storage", b"storage"):
                raise pickle.UnpicklingError(f"an unexpected persistent id of {len(pid)} fields")
            _, storage_type, key, _location, numel = pid
            dtype, numel, key = _dtype_of(storage_type), _count(numel), str(key)
            if key not in loaded:
                record = f"{prefix}data/{key}"
                if record not in names:
                    raise pickle.UnpicklingError(f"storage record {record} is missing")
                if zf.getinfo(record).file_size != numel * dtype.itemsize:
                    raise pickle.UnpicklingError(f"storage record {record} has the wrong size")
                data = torch.empty(numel * dtype.itemsize, dtype=torch.uint8)
                with zf.open(record) as src:
                    _read_exact(src, data, record, bar)
                if order != sys.byteorder:
                    _byteswap(data, dtype)
                loaded[key] = _Storage(data, dtype)
            return _Storage(loaded[key].data, dtype)

        return _Unpickler(io.BytesIO(zf.read(prefix + "data.pkl")), storage).load()


def _load_stream(f, bar: Any) -> Any:
    """torch's format before the zip one: four pickles, then the storages' bytes in key order."""
    try:
        magic = _Unpickler(f).load()
    except Exception:  # whatever the first pickle is, it is not torch's magic number
        magic = None
    if magic != MAGIC_NUMBER:
        raise pickle.UnpicklingError("not a torch.save file (a plain pickle, without torch's magic number)")
    protocol = _Unpickler(f).load()
    if protocol != STREAM_PROTOCOL:
        raise pickle.UnpicklingError(f"unsupported torch file protocol {protocol!r}")
    _Unpickler(f).load()  # system info: the data below is little-endian whatever machine wrote it
    roots: Dict[str, _Storage] = {}

    def storage(pid: tuple) -> Any:
        kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) == 4:  # a pickled nn.Module's class: stays a placeholder
            return pid[1]
        if kind != "storage" or len(pid) != 6:
            raise pickle.UnpicklingError(f"an unexpected persistent id {kind!r}")
        _, storage_type, key, _location, numel, view = pid
        dtype, numel, key = _dtype_of(storage_type), _count(numel), str(key)
        if key not in roots:
            roots[key] = _Storage(torch.empty(numel * dtype.itemsize, dtype=torch.uint8), dtype)
        root = roots[key]
        if view is None:
            return _Storage(root.data, dtype)
        if not isinstance(view, tuple) or len(view) != 3:
            raise pickle.UnpicklingError("a malformed storage view")
        start, length = _count(view[1]) * dtype.itemsize, _count(view[2]) * dtype.itemsize
        if start + length > root.data.numel():
            raise pickle.UnpicklingError("a storage view reaches past its storage")
        return _Storage(root.data[start:start + length], dtype)

    result = _Unpickler(f, storage).load()
    keys = _Unpickler(f).load()
    if not isinstance(keys, list) or set(map(str, keys)) != set(roots):
        raise pickle.UnpicklingError("the storage list does not match the pickle")
    bar.total = sum(root.data.numel() for root in roots.values())
    for key in keys:
        root = roots[str(key)]
        header = f.read(8)
        if len(header) != 8 or struct.unpack("<q", header)[0] * root.dtype.itemsize != root.data.numel():
            raise pickle.UnpicklingError(f"storage {key} has the wrong size")
        _read_exact(f, root.data, f"storage {key}", bar)
    return result


def load(path: PathLike, show_progress: bool = False) -> Any:
    """Everything in the file, tensors as tensors and unknown objects as ``Opaque`` records; never runs code.

    ``show_progress``: a progress bar with ETA over the bytes read (a released AR-XL file is several GB).
    Raises ``CheckpointError`` (one line, "refusing to load PATH: ...") for a file that is not a torch.save
    file or is damaged."""
    path = Path(path)
    # the bytes of the tensors, counted once the archive or pickle has said how many there are
    bar = progress(desc=f"reading {path.name}", unit="B", unit_scale=True, disable=not show_progress)
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path, bar)
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if len(head) == 2 and head[0] == 0x80:  # a pickle: torch's stream format, or a plain pickle
                return _load_stream(f, bar)
        if head == b"PK":
            raise pickle.UnpicklingError("a damaged zip archive (truncated?): no central directory")
        if tarfile.is_tarfile(path):
            raise pickle.UnpicklingError("a torch file in the tar format of 2017, which is not supported")
        raise pickle.UnpicklingError("not a torch.save file" if head else "the file is empty")
    except IsADirectoryError:
        raise CheckpointError(f"refusing to load {path}: a directory, not a checkpoint file") from None
    except FileNotFoundError:
        raise CheckpointError(f"refusing to load {path}: no such file") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: {e}") from None
    except Exception as e:  # truncated zip/pickle, bad CRC, out of memory, ...: the file is damaged
        raise CheckpointError(f"refusing to load {path}: damaged or not a torch.save file ({error_line(e)})") from None
    finally:
        bar.close()


def _what(value: Any) -> str:
    name = global_of(value)
    if name is not None:
        return name
    return type(value).__name__


def state_dict_from(obj: Any, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The weights inside a loaded file: Lightning's ``state_dict`` entry, or the file itself when it is the
    state dict. Every value must be a tensor; otherwise one line naming the offending entries and globals."""
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict):
        raise CheckpointError(f"{source} holds no state dict: a {_what(sd)}, not a dict of tensors "
                              f"(under 'state_dict' or at the top)")
    bad: List[str] = [f"{k!r} ({_what(v)})" for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"refusing {source}: its state dict is not all tensors: {len(bad)} entries hold "
                              f"other objects, e.g. {', '.join(bad[:3])}; objects are never built from a checkpoint")
    return dict(sd)


def load_state_dict(path: PathLike, show_progress: bool = False) -> Dict[str, torch.Tensor]:
    """``state_dict_from(load(path))``: the tensors of any Lightning / torch.save file, or a one-line refusal."""
    return state_dict_from(load(path, show_progress), str(path))
