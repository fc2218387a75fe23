"""Model objects shared between worker processes through one RAM file each: publish, attach, clean up.

publish() writes every CPU tensor storage reachable from a loaded object (a checkpoint tuple, a LoRA
state dict, a VAE...) once into a file under /dev/shm, 64-byte aligned, and pickles the rest (the
skeleton) with cloudpickle, each storage a persistent reference (offset, length) into the file.
attach() maps the file copy-on-write (mmap ACCESS_COPY = MAP_PRIVATE) and unpickles the skeleton, each
tensor rebuilt over the mapping without a copy: the weights sit once in RAM for any number of
processes, and a write into an attached tensor makes a private page, never another process's change.
- Views of one storage come back over one storage (offset and strides kept).
- Only plain CPU tensors are published; CUDA or meta tensors and tensor subclasses (ComfyUI's quantized
  types) raise SegmentError naming them: the caller loads privately.
- Classes that answer every attribute through __getattr__ (ComfyUI's model configs return None, so
  pickle would call a None __setstate__) are rebuilt from their __dict__.
- A mapping lives as long as a tensor over it and is never closed explicitly. Files are named
  comfy-multigpu-<owner pid>-<name>: remove_owned on a clean stop, remove_stale after a crash.

Host objects touched: none.
"""
from __future__ import annotations

import io
import mmap
import os
import pickle
import re
import tempfile
from dataclasses import dataclass

import cloudpickle
import psutil

SEGMENT_PREFIX = "comfy-multigpu-"
_ALIGN = 64                # byte alignment of each storage in the file
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class SegmentError(Exception):
    """The object cannot be published; the message names the tensor or type and why."""


@dataclass(frozen=True)
class Published:
    blob: bytes        # the pickled skeleton: what attach() needs besides the file
    nbytes: int        # bytes of tensor data in the file
    tensors: int       # tensor objects in the skeleton


# ---- names and clean-up ------------------------------------------------------------------------
def segment_dir() -> str:
    """/dev/shm when it is a writable directory (RAM), else the temporary directory."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else tempfile.gettempdir()


def segment_path(owner_pid: int, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"segment name {name!r} has characters outside [A-Za-z0-9_.-]; "
                         "pass a name made of letters, digits, '_', '.' and '-' only")
    return os.path.join(segment_dir(), f"{SEGMENT_PREFIX}{int(owner_pid)}-{name}")


def remove(path: str) -> bool:
    """Unlinks the segment; False when it was not there. Processes that attached keep their mapping."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _remove_segments(doomed) -> list[str]:
    """Unlinks the segment files in segment_dir() whose owner pid `doomed` accepts; returns their paths."""
    removed = []
    for entry in os.scandir(segment_dir()):
        owner = entry.name[len(SEGMENT_PREFIX):].split("-", 1)[0]
        if entry.name.startswith(SEGMENT_PREFIX) and owner.isdigit() and doomed(int(owner)):
            try:
                if remove(entry.path):
                    removed.append(entry.path)
            except PermissionError:          # another user's segment in a shared /dev/shm
                pass
    return removed


def remove_owned(owner_pid: int) -> list[str]:
    """Unlinks every segment of that owner (its clean stop); returns their paths."""
    return _remove_segments(lambda owner: owner == owner_pid)


def remove_stale(alive=psutil.pid_exists) -> list[str]:
    """Unlinks the segments whose owner process is gone (start-up after a crash); returns their paths."""
    return _remove_segments(lambda owner: not alive(owner))


def mapped_bytes(path: str, pid: int | None = None) -> tuple[int, int]:
    """(Rss, Pss) in bytes of the mappings of `path` in /proc/<pid or self>/smaps."""
    names = {path, os.path.realpath(path)}
    names |= {n + " (deleted)" for n in names}
    rss = pss = 0
    inside = False                                              # in a mapping of that file
    with open(f"/proc/{pid if pid is not None else 'self'}/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            parts = line.split(None, 5) or [":"]
            if not parts[0].endswith(":"):                      # a mapping's header line
                inside = len(parts) == 6 and parts[5].rstrip("\n") in names
            elif inside and parts[0] in ("Rss:", "Pss:"):
                kib = int(parts[1]) * 1024
                rss, pss = (rss + kib, pss) if parts[0] == "Rss:" else (rss, pss + kib)
    return rss, pss


# ---- publishing --------------------------------------------------------------------------------
def _new_object(cls):
    return cls.__new__(cls)


def _update_dict(obj, state):
    obj.__dict__.update(state)
    return obj


def _answers_everything(cls) -> bool:
    """A class whose __getattr__ would hand pickle a bogus __setstate__, and that says nothing else
    about how to pickle it (checked on the class, never through the instance's __getattr__)."""
    own = [vars(k) for k in cls.__mro__ if k is not object]
    return (any("__getattr__" in d for d in own) and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__
            and not any(n in d for d in own for n in ("__setstate__", "__getstate__", "__getnewargs__",
                                                       "__getnewargs_ex__", "__slots__")))


def _refusal(t, why: str) -> str:
    kind = f"{type(t).__module__}.{type(t).__qualname__}"
    return (f"{kind}(shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device}) {why}; "
            "only plain CPU tensors can be")


class _Pickler(cloudpickle.Pickler):
    """Skeleton pickler: plain CPU tensors become (storage reference, offset, size, stride, dtype)."""

    def __init__(self, file):
        super().__init__(file, protocol=5)
        import torch
        self._torch = torch
        self.offsets: dict[tuple[int, int], int] = {}     # (data_ptr, nbytes) -> offset in the file
        self.storages: list = []                          # (offset, storage), in file order
        self.end = self.tensors = 0                       # next free offset; tensors reduced
        self._holder = None                               # the Parameter whose .data comes next
        self._plain: dict[type, bool] = {}                # class -> _answers_everything(class)

    def persistent_id(self, obj):
        if type(obj) is not self._torch.UntypedStorage:
            return None
        key = (obj.data_ptr(), obj.nbytes())
        if key not in self.offsets:
            self.offsets[key] = self.end
            self.storages.append((self.end, obj))
            self.end = -(-(self.end + obj.nbytes()) // _ALIGN) * _ALIGN
        return ("storage", self.offsets[key], obj.nbytes())

    def reducer_override(self, obj):
        torch, cls = self._torch, type(obj)
        if cls is torch.Tensor:
            return self._reduce_tensor(obj)
        if cls is torch.nn.Parameter:
            self._holder = obj
        elif isinstance(obj, torch.Tensor):
            raise SegmentError(obj, _refusal(obj, "is a tensor subclass"))
        elif not issubclass(cls, type):
            if cls not in self._plain:
                self._plain[cls] = _answers_everything(cls)
            if self._plain[cls] and isinstance(getattr(obj, "__dict__", None), dict):
                return _new_object, (cls,), dict(obj.__dict__), None, None, _update_dict
        return super().reducer_override(obj)

    def _reduce_tensor(self, t):
        torch, holder, self._holder = self._torch, self._holder, None
        why = ("is not on the CPU" if t.device.type != "cpu" else
               "is not strided" if t.layout != torch.strided else "is quantized" if t.is_quantized else
               "has a conj/neg bit" if t.is_conj() or t.is_neg() else None)
        if why:
            raise SegmentError(t if holder is None else holder, _refusal(t, why))
        self.tensors += 1
        storage = t.untyped_storage()
        state = torch._utils._get_obj_state(t)
        return _rebuild_tensor, (storage if storage.nbytes() else None, t.storage_offset(), tuple(t.shape),
                                 t.stride(), t.dtype, t.requires_grad, state or None)


def _rebuild_tensor(storage, offset, size, stride, dtype, requires_grad, state):
    import torch
    t = torch.empty(0, dtype=dtype).set_(torch.UntypedStorage(0) if storage is None else storage,
                                         offset, size, stride).requires_grad_(requires_grad)
    if state:
        torch._utils._set_obj_state(t, state)
    return t


def _name_of(root, target) -> str:
    """Where `target` sits in `root` (attributes, items, module parameters), for error messages."""
    import torch
    todo, seen = [(root, "<object>")], set()
    while todo:
        obj, where = todo.pop()
        if obj is target:
            return where
        if id(obj) in seen or isinstance(obj, (torch.Tensor, str, bytes, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            todo += [(t, f"{where}.{n}") for n, t in obj.named_parameters(remove_duplicate=False)]
            todo += [(t, f"{where}.{n}") for n, t in obj.named_buffers(remove_duplicate=False)]
        elif isinstance(obj, dict):
            todo += [(v, f"{where}[{k!r}]") for k, v in obj.items()]
        elif isinstance(obj, (list, tuple)):
            todo += [(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        elif hasattr(obj, "__dict__"):
            todo += [(v, f"{where}.{k}") for k, v in vars(obj).items()]
    return "<not reachable by attribute or item>"


def publish(obj, path: str) -> Published:
    """Writes every tensor storage of `obj` into a new file at `path` (O_EXCL, mode 0600) and returns
    the pickled skeleton. On any failure the file is removed and the error raised (SegmentError when
    the object holds something that cannot be published)."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    try:
        buffer = io.BytesIO()
        pickler = _Pickler(buffer)
        try:
            pickler.dump(obj)
        except SegmentError as e:
            culprit, why = e.args
            raise SegmentError(f"cannot publish {_name_of(obj, culprit)}: {why} published; "
                               "load this one privately") from None
        import torch
        for offset, storage in pickler.storages:
            view = memoryview(torch.tensor([], dtype=torch.uint8).set_(storage).numpy())
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        os.ftruncate(fd, max((offset + s.nbytes() for offset, s in pickler.storages), default=0))
        return Published(blob=buffer.getvalue(), nbytes=sum(s.nbytes() for _, s in pickler.storages),
                         tensors=pickler.tensors)
    except BaseException:
        remove(path)
        raise
    finally:
        os.close(fd)


# ---- attaching ---------------------------------------------------------------------------------
class _Unpickler(pickle.Unpickler):
    """Resolves each storage reference to a uint8 slice of the mapping, one storage per offset."""

    def __init__(self, file, mapping):
        super().__init__(file)
        self._mapping = mapping
        self._storages: dict[int, object] = {}

    def persistent_load(self, pid):
        kind, offset, nbytes = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r} in a segment skeleton")
        if offset not in self._storages:
            import torch
            self._storages[offset] = torch.frombuffer(self._mapping, dtype=torch.uint8, count=nbytes,
                                                      offset=offset).untyped_storage()
        return self._storages[offset]


def attach(blob: bytes, path: str):
    """The published object, its tensors over a private (copy-on-write) mapping of `path`.
    FileNotFoundError when the segment is gone."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else None
    return _Unpickler(io.BytesIO(blob), mapping).load()
