"""The built-in torch engine's safetensors reader: a checkpoint's weights read straight from the
file into memory of the engine's own (or the device's), in large reads, and handed to a model built
without weights. Owns the file format (header, dtypes, shards) and its typed errors; not the
engine's phases or memory accounting (torch_engine.py), nor transformers' loader, which the engine
falls back to when this reader raises `NotLoadable`.

Why not transformers' `from_pretrained`: it leaves the file memory-mapped (page cache, not the
engine's memory), so the engine copied every tensor afterwards, reading the file through the
mapping a page fault at a time (bench/README.md, "Weight load", has both). Here each tensor's memory is
allocated once and the file is read into it with `os.preadv` (many tensors, or one large tensor's
slice, per call; the reads run in a few threads, the GIL released): no bytes objects, no mapping.

Imported by torch_engine in the engine's own process (it imports torch and transformers)."""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK_BYTES = 64 << 20  # one read: large enough that a call's cost vanishes, small enough to spread over threads
READERS = min(4, os.cpu_count() or 1)  # page-cache copies scale with cores; a disk wants a few requests queued
MAX_IOVECS = 512  # below Linux's IOV_MAX (1024)
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors' dtype names -> (torch's attribute, bytes per element).
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1), "I16": ("int16", 2), "U16": ("uint16", 2), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "I32": ("int32", 4), "U32": ("uint32", 4), "F32": ("float32", 4),
    "I64": ("int64", 8), "U64": ("uint64", 8), "F64": ("float64", 8),
}


class CorruptCheckpoint(ValueError):
    """A safetensors file (or its shard index) that cannot be what it says: the engine stops with
    this message rather than load garbage or fall back to a loader that would fail less clearly."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


class NotLoadable(Exception):
    """A sound checkpoint this reader does not load into this model as it stands (its tensors are
    named or shaped other than the model's, it is not safetensors, a buffer has no value outside
    the file): transformers' loader, which converts and renames, is the way."""


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # safetensors' name
    shape: tuple[int, ...]
    offset: int  # in the file, from its first byte
    nbytes: int


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    size: int
    entries: tuple[Entry, ...]  # by offset


def checkpoint_files(folder: Path | str) -> list[Path]:
    """The safetensors files of a model folder: its index's shards, or its one file."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptCheckpoint(index, f"not a shard index (a JSON object with a weight_map): {exc}") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CorruptCheckpoint(index, f"names shards that are not in the folder: {', '.join(missing)}")
        return [folder / n for n in names]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    raise NotLoadable(f"{folder} has neither {SINGLE} nor {INDEX}")


def read_header(path: Path | str) -> Checkpoint:
    """The file's header, checked against the file: every tensor's bytes inside it, of the size its
    shape and dtype need, none overlapping."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise CorruptCheckpoint(path, f"truncated: {size} bytes, less than the 8-byte header length")
        (length,) = struct.unpack("<Q", f.read(8))
        if length > size - 8:
            raise CorruptCheckpoint(path, f"the header length {length} runs past the end of the file ({size} bytes)")
        if length > MAX_HEADER_BYTES:
            raise CorruptCheckpoint(path, f"the header length {length} is above safetensors' {MAX_HEADER_BYTES}")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except ValueError as exc:  # bad UTF-8 too
        raise CorruptCheckpoint(path, f"the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptCheckpoint(path, f"the header is JSON but not an object ({type(header).__name__})")
    start = 8 + length
    entries = sorted((_entry(path, name, info, start, size) for name, info in header.items() if name != "__metadata__"),
                     key=lambda e: e.offset)
    for before, after in zip(entries, entries[1:]):
        if after.offset < before.offset + before.nbytes:
            raise CorruptCheckpoint(path, f"tensors {before.name!r} and {after.name!r} overlap")
    return Checkpoint(path, size, tuple(entries))


def _entry(path: Path, name: str, info: Any, start: int, size: int) -> Entry:
    if not isinstance(info, dict):
        raise CorruptCheckpoint(path, f"tensor {name!r}: its entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPES:
        raise CorruptCheckpoint(path, f"tensor {name!r} has dtype {dtype!r}, which this reader does not know "
                                      f"(it knows {', '.join(DTYPES)})")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CorruptCheckpoint(path, f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CorruptCheckpoint(path, f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end]")
    begin, end = offsets
    if start + end > size:
        raise CorruptCheckpoint(path, f"tensor {name!r} ends at byte {end} of the data, past the end of the file "
                                      f"({size - start} bytes of data): the file is truncated or its offsets are wrong")
    needed = DTYPES[dtype][1]
    for d in shape:
        needed *= d
    if end - begin != needed:
        raise CorruptCheckpoint(path, f"tensor {name!r}: data_offsets {offsets} hold {end - begin} bytes; "
                                      f"{dtype} of shape {shape} needs {needed}")
    return Entry(name, dtype, tuple(shape), start + begin, needed)


def torch_dtype(path: Path, name: str):
    import torch

    value = getattr(torch, DTYPES[name][0], None)
    if value is None:
        raise CorruptCheckpoint(path, f"dtype {name} is not in this torch ({torch.__version__})")
    return value


# -- reading ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    name: str
    start: int  # in the tensor's bytes
    length: int


@dataclass(frozen=True)
class Read:
    """One preadv: `pieces` lie back to back in the file from `offset`."""
    offset: int
    pieces: tuple[Piece, ...]


def plan(entries: Iterable[Entry], chunk_bytes: int = CHUNK_BYTES) -> list[Read]:
    """The reads that fill `entries`: neighbours in the file share a read up to `chunk_bytes`; a
    larger tensor is read in slices of `chunk_bytes`, so threads can share it."""
    reads: list[Read] = []
    offset, total = 0, 0
    pieces: list[Piece] = []
    for entry in sorted(entries, key=lambda e: e.offset):
        for start in range(0, entry.nbytes, chunk_bytes):
            length = min(chunk_bytes, entry.nbytes - start)
            at = entry.offset + start
            if pieces and (at != offset + total or total + length > chunk_bytes or len(pieces) == MAX_IOVECS):
                reads.append(Read(offset, tuple(pieces)))
                pieces, total = [], 0
            if not pieces:
                offset = at
            pieces.append(Piece(entry.name, start, length))
            total += length
    if pieces:
        reads.append(Read(offset, tuple(pieces)))
    return reads


def read_exact(fd: int, views: list[memoryview], offset: int, path: Path) -> None:
    """Fill `views` from the file at `offset` (preadv may stop short: go on from where it did)."""
    views = [v for v in views if len(v)]
    while views:
        n = os.preadv(fd, views, offset)
        if n == 0:
            raise CorruptCheckpoint(path, f"truncated: the read at byte {offset} met the end of the file "
                                          "(did it shrink while it was read?)")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]


class _Staging(threading.local):
    """Each reader thread's pinned host buffer for a device: read into it, then copied over."""
    buffer: Any = None  # a torch tensor, made by the thread's first read


def read_tensors(files: Iterable[Path], device: str = "cpu", dtypes: Mapping[str, Any] | None = None,
                 readers: int = READERS) -> dict[str, Any]:
    """Every tensor of `files` (those `dtypes` names, when it is given), each in memory of its own
    on `device`, cast to the dtype `dtypes` gives it (a cast costs a copy; none when they agree)."""
    state: dict[str, Any] = {}
    staging = _Staging()
    with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="read-weights") as pool:
        for path in files:
            state.update(_read_file(pool, staging, read_header(path), device, dtypes))
    return state


def _read_file(pool: ThreadPoolExecutor, staging: _Staging, checkpoint: Checkpoint, device: str,
               dtypes: Mapping[str, Any] | None) -> dict[str, Any]:
    import torch

    path = checkpoint.path
    entries = {e.name: e for e in checkpoint.entries if dtypes is None or e.name in dtypes}
    # Raw bytes first, viewed as the tensor after: a uint8 buffer takes any dtype's bytes at offset 0.
    flat = {name: torch.empty(e.nbytes, dtype=torch.uint8, device=device) for name, e in entries.items()}
    work: Callable[[int, Read, Any, _Staging, Path], None]
    target: dict[str, Any]
    if torch.device(device).type == "cpu":
        views = {name: t.numpy().data for name, t in flat.items()}  # the arrays' bytes, as memoryviews
        work, target = _read_host, views
    else:
        work, target = _read_device, dict(flat)  # its own dict: a whole tensor leaves both
    left = {name: e.nbytes for name, e in entries.items()}
    state = {name: _as_tensor(path, e, flat.pop(name), dtypes) for name, e in entries.items() if e.nbytes == 0}
    fd = os.open(path, os.O_RDONLY)
    futures = {}
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a cold read: the kernel reads further ahead
        futures = {pool.submit(work, fd, r, target, staging, path): r for r in plan(entries.values())}
        for future in as_completed(futures):
            future.result()
            for piece in futures[future].pieces:
                left[piece.name] -= piece.length
                if left[piece.name] == 0:  # the tensor is whole: view it (and cast it) while the rest is read
                    target.pop(piece.name, None)  # a cast's raw bytes go as soon as it is done
                    state[piece.name] = _as_tensor(path, entries[piece.name], flat.pop(piece.name), dtypes)
        return state
    finally:
        # After a failed read the others stop before the descriptor closes: its number could be reused.
        for future in futures:
            future.cancel()
        wait(futures)
        os.close(fd)


def _read_host(fd: int, read: Read, views: Mapping[str, memoryview], staging: _Staging, path: Path) -> None:
    read_exact(fd, [views[p.name][p.start:p.start + p.length] for p in read.pieces], read.offset, path)


def _read_device(fd: int, read: Read, flat: Mapping[str, Any], staging: _Staging, path: Path) -> None:
    import torch

    if staging.buffer is None:
        staging.buffer = torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True)
    total = sum(p.length for p in read.pieces)
    read_exact(fd, [memoryview(staging.buffer.numpy())[:total]], read.offset, path)
    at = 0
    for p in read.pieces:  # synchronous copies: the buffer is reused by this thread's next read
        flat[p.name][p.start:p.start + p.length].copy_(staging.buffer[at:at + p.length])
        at += p.length


def _as_tensor(path: Path, entry: Entry, raw, dtypes: Mapping[str, Any] | None):
    tensor = raw.view(torch_dtype(path, entry.dtype)).view(entry.shape)
    wanted = None if dtypes is None else dtypes[entry.name]
    return tensor if wanted is None or tensor.dtype == wanted else tensor.to(wanted)


# -- the model -------------------------------------------------------------------------------------

def load_model(folder: Path | str, model_class: Any, config: Any, dtype: Any, device: str) -> Any:
    """`model_class` built without weights (on the meta device: no memory, no random init), its
    buffers that no checkpoint holds (rotary frequencies) computed on `device`, then given the
    checkpoint's tensors as its own (`assign`: no copy), tied weights tied. Raises NotLoadable,
    before anything is read, when the checkpoint's names or shapes are not the model's."""
    import torch

    files = checkpoint_files(folder)
    with torch.device("meta"):
        model = model_class._from_config(config, dtype=dtype)
    _rebuild_buffers(model, device)
    expected = model.state_dict()
    entries = _entries(files)
    _check_names(model, expected, entries)
    state = read_tensors(files, device, {name: expected[name].dtype for name in entries})
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # tying did not cover a name the file lacks (an older transformers has no all_tied_weights_keys)
        raise NotLoadable(f"no value in the checkpoint for {_some(left)}")
    return model


def _entries(files: list[Path]) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    where: dict[str, Path] = {}
    for path in files:
        for entry in read_header(path).entries:
            if entry.name in where:
                raise CorruptCheckpoint(path, f"tensor {entry.name!r} is in {where[entry.name].name} too")
            entries[entry.name], where[entry.name] = entry, path
    return entries


def _check_names(model: Any, expected: Mapping[str, Any], entries: Mapping[str, Entry]) -> None:
    extra = sorted(entries.keys() - expected.keys())
    if extra:
        raise NotLoadable(f"the checkpoint has tensors the model has not ({_some(extra)}): transformers "
                          "renames or converts them for this model")
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(expected.keys() - entries.keys() - tied)
    if missing:
        raise NotLoadable(f"the checkpoint lacks tensors of the model ({_some(missing)})")
    wrong = [f"{name} {list(entries[name].shape)} (the model's {list(expected[name].shape)})"
             for name in sorted(entries) if tuple(expected[name].shape) != entries[name].shape]
    if wrong:
        raise NotLoadable(f"tensors shaped other than the model's: {_some(wrong)}")


def _rebuild_buffers(model: Any, device: str) -> None:
    """Modules whose non-persistent buffers (not in any checkpoint: rotary inverse frequencies) are
    on the meta device, built again from their config on `device`; one that cannot be is left out,
    and the model is NotLoadable (transformers initialises those through its own loader)."""
    import torch

    for name, module in list(model.named_modules()):
        meta = [b for b, t in module._buffers.items() if t is not None and t.is_meta
                and b in module._non_persistent_buffers_set]
        if not meta:
            continue
        if not name or next(module.parameters(), None) is not None:  # rebuilding it would lose more than buffers
            raise NotLoadable(f"buffers {', '.join(meta)} of {name or 'the model'} ({type(module).__name__}) have "
                              "no value outside the checkpoint")
        try:
            with torch.device(device):
                rebuilt = type(module)(module.config)
        except (AttributeError, TypeError) as exc:
            raise NotLoadable(f"buffers {', '.join(meta)} of {name or 'the model'} ({type(module).__name__}) have "
                              f"no value outside the checkpoint, and the module cannot be built again: {exc}") from None
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, rebuilt)


def _some(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
