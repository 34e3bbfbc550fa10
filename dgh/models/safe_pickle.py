"""A restricted unpickler for torch checkpoints that pickle whole objects (e.g. classic YOLOv5 ``.pt`` files).

``torch.load(weights_only=True)`` refuses such files, and ``weights_only=False`` would import and run the pickled
classes' code (the original YOLOv5 repository). :func:`safe_load_checkpoint` does neither:

- :class:`RestrictedUnpickler` (a :class:`pickle.Unpickler`) resolves only a small whitelist of globals (plain data
  containers, torch dtypes/storage types and our *own* tensor-rebuild functions). Every other global, whether a
  class (``models.yolo.Model``) or a function (``os.system``), becomes a fresh subclass of :class:`PickledObject`:
  a plain container that records the constructor arguments and the pickled ``__dict__`` state and runs nothing.
- Storages of torch's zip format are read by :meth:`RestrictedUnpickler.persistent_load` directly from the archive
  (``<prefix>/data/<key>``) as raw bytes, and tensors are rebuilt with :func:`torch.as_strided`.

Reference for the zip layout and the persistent id tuple ``("storage", storage_type, key, location, numel)``:
``torch/serialization.py`` (``_load``), read for understanding only.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(ValueError):
    """The file is not a torch zip checkpoint that the restricted unpickler can read."""


class PickledObject:
    """Plain container standing in for any non-whitelisted pickled class or callable.

    Attributes (set by unpickling, never by running the original code):
        _pickled_global: ``"module.name"`` of the global it replaces (class attribute).
        _call_args: positional arguments of a REDUCE/NEWOBJ call, if any.
        __dict__ entries: the pickled object state (for ``nn.Module``: ``_parameters``, ``_buffers``, ``_modules``, ...).
    """

    _pickled_global = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_call_args"] = args
        if kwargs:
            self.__dict__["_call_kwargs"] = kwargs

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:  # noqa: D102 - NEWOBJ calls cls.__new__(cls, *args)
        obj = super().__new__(cls)
        obj.__dict__["_call_args"] = args
        return obj

    def __setstate__(self, state: Any) -> None:
        """BUILD opcode: store the state as attributes (a ``(dict, slots)`` tuple is merged)."""
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:
                if part:
                    self.__dict__.update(part)
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<PickledObject {self._pickled_global}>"


def _rebuild_tensor_v2(storage: torch.Tensor, storage_offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    """Tensor view of a flat storage tensor (replaces ``torch._utils._rebuild_tensor_v2``)."""
    if not isinstance(storage, torch.Tensor):
        raise UnsafeCheckpointError("tensor record without a storage")
    if len(size) == 0:
        return storage[storage_offset : storage_offset + 1].reshape(()).clone()
    return torch.as_strided(storage, tuple(size), tuple(stride), storage_offset).clone()


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    """A parameter is kept as its plain tensor (replaces ``torch._utils._rebuild_parameter``)."""
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: tuple, state: Any) -> Any:
    """``torch._tensor._rebuild_from_type_v2``: call the (whitelisted) rebuild function, drop the subclass."""
    return func(*args) if callable(func) and not isinstance(func, type) else PickledObject(func, args)


_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _StorageType:
    """Marker for a pickled storage class (``torch.HalfStorage`` ...): only carries its dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): torch.Size,
}
_BUILTIN_MODULES = {"builtins", "__builtin__"}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that never imports or runs pickled code; see the module docstring.

    Args:
        file: the ``data.pkl`` stream.
        archive: the open zip archive holding the storages.
        prefix: the archive's top folder (``"archive"`` for recent torch versions).

    Attributes:
        replaced_globals: sorted set of ``"module.name"`` globals that were turned into :class:`PickledObject`.
    """

    def __init__(self, file: io.BufferedIOBase, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._storages: dict[str, torch.Tensor] = {}
        self._stand_ins: dict[str, type] = {}
        self.replaced_globals: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - pickle hook
        if module in _BUILTIN_MODULES:
            module = "builtins"
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        qualified = f"{module}.{name}"
        self.replaced_globals.add(qualified)
        if qualified not in self._stand_ins:
            self._stand_ins[qualified] = type(name, (PickledObject,), {"_pickled_global": qualified})
        return self._stand_ins[qualified]

    def persistent_load(self, pid: Any) -> torch.Tensor:  # noqa: D102 - pickle hook
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unsupported persistent id {str(pid)[:60]}")
        storage_type, key = pid[1], str(pid[2])
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise UnsafeCheckpointError(f"unsupported storage type {storage_type!r}")
        cache_key = f"{key}:{dtype}"
        if cache_key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}/data/{key}")
            except KeyError:
                raise UnsafeCheckpointError(f"storage {key} missing from the archive") from None
            self._storages[cache_key] = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return self._storages[cache_key]


def safe_load_checkpoint(path: str | Path) -> tuple[Any, set[str]]:
    """Unpickle a torch zip checkpoint without executing any of its code.

    Args:
        path: a file written by ``torch.save`` (zip format, torch >= 1.6).

    Returns:
        ``(obj, replaced_globals)``: the unpickled object, where tensors are real CPU tensors (dtype as stored) and
        every non-whitelisted class/callable is a :class:`PickledObject`; and the set of replaced ``module.name``.

    Raises:
        UnsafeCheckpointError: not a zip checkpoint, or a malformed one.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(f"{path} is not a torch zip checkpoint")
    try:
        with zipfile.ZipFile(path) as archive:
            pkl_names = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pkl_names:
                raise UnsafeCheckpointError(f"{path} has no data.pkl (not a torch checkpoint)")
            prefix = pkl_names[0].split("/")[0]
            unpickler = RestrictedUnpickler(io.BytesIO(archive.read(pkl_names[0])), archive, prefix)
            obj = unpickler.load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed pickle is reported as one line
        raise UnsafeCheckpointError(f"{path} could not be unpickled safely ({type(exc).__name__}: {exc})"[:300]) from None
    return obj, unpickler.replaced_globals


def module_state(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Harvest a ``state_dict``-like mapping from an unpickled ``nn.Module`` stand-in.

    Walks ``_parameters``, ``_buffers`` (minus ``_non_persistent_buffers_set``) and ``_modules`` recursively, in the
    same naming scheme as :meth:`torch.nn.Module.state_dict`. ``None`` entries are skipped.
    """
    out: dict[str, torch.Tensor] = {}
    state = getattr(obj, "__dict__", {})
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        for name, tensor in (state.get(kind) or {}).items():
            if isinstance(tensor, torch.Tensor) and not (kind == "_buffers" and name in non_persistent):
                out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_state(child, f"{prefix}{name}."))
    return out


def iter_modules(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``named_modules()`` of an unpickled module stand-in: ``[(dotted_name, obj), ...]``, root first."""
    found = [(prefix.rstrip("."), obj)]
    for name, child in (getattr(obj, "__dict__", {}).get("_modules") or {}).items():
        if child is not None:
            found.extend(iter_modules(child, f"{prefix}{name}."))
    return found
