"""Helpers shared by the readers and writers of placer.io and by the other packages that read
files (profiling, simulator results, serve state): error wrapping and model checks."""

from __future__ import annotations

import binascii
import contextlib
import io
import json
import os
import pickle
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from placer.errors import InvalidInputError, MissingDependencyError
from placer.resources import check_memory, human_bytes
from placer.types import ModelSpec, RoutingTrace

SCHEMA_VERSION = 1
MAX_EXPERT_ID = int(np.iinfo(np.int16).max)
"""Largest expert id a routing trace holds (ids are stored as int16)."""
HEADER_KEY = "header"
"""Key of the JSON header (a uint8 array of UTF-8 JSON bytes) in native npz files."""


def fail(path: str | os.PathLike[str], message: str) -> InvalidInputError:
    """An :class:`InvalidInputError` naming ``path``."""
    return InvalidInputError(message, source=str(path))


def _data_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [
        ValueError, KeyError, IndexError, TypeError, AttributeError, EOFError, OverflowError,
        RuntimeError, zipfile.BadZipFile, json.JSONDecodeError, binascii.Error, struct.error,
        pickle.UnpicklingError, UnicodeDecodeError, zlib.error]
    pa = sys.modules.get("pyarrow")
    if pa is not None:
        errors.append(pa.ArrowException)
    return tuple(errors)


@contextlib.contextmanager
def guard(path: str | os.PathLike[str], what: str = "file") -> Iterator[None]:
    """Turn every data error raised inside the block into an InvalidInputError naming ``path``.

    Errors that already name ``path`` and :class:`MissingDependencyError` pass unchanged.
    """
    source = str(path)
    try:
        yield
    except MissingDependencyError:
        raise
    except InvalidInputError as exc:
        if exc.source == source:
            raise
        raise InvalidInputError(str(exc), source=source) from None
    except FileNotFoundError:
        raise fail(path, "file not found") from None
    except IsADirectoryError:
        raise fail(path, "is a directory, not a file") from None
    except PermissionError:
        raise fail(path, "permission denied") from None
    except OSError as exc:
        raise fail(path, f"cannot read {what}: {exc.strerror or exc}") from None
    except RecursionError:
        raise fail(path, f"corrupt or malformed {what}: nested too deeply") from None
    except Exception as exc:
        if isinstance(exc, _data_errors()):
            raise fail(path, f"corrupt, truncated or malformed {what}: {_detail(exc)}") from None
        raise


def _detail(exc: BaseException) -> str:
    """The first sentence of an exception's message, at most 160 characters."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    text = text.splitlines()[0].split(". ")[0].strip()
    return text if len(text) <= 160 else text[:157] + "..."


def require_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path; an error unless it is an existing, non-empty file."""
    p = Path(path)
    if not p.exists():
        raise fail(path, "file not found")
    if p.is_dir():
        raise fail(path, "is a directory, not a file")
    if p.stat().st_size == 0:
        raise fail(path, "file is empty")
    return p


def load_torch(path: str | os.PathLike[str], map_location: str = "cpu") -> Any:
    """``torch.load(path, weights_only=True, map_location=...)``: tensors and plain containers only
    (``"meta"``: the structure, tensors without their bytes)."""
    try:
        import torch  # deferred: optional extra (placer[profile])
    except ImportError:
        raise MissingDependencyError("torch", "profile", "reading SGLang .pt dumps") from None
    require_file(path)
    with guard(path, "torch file"):
        return torch.load(str(path), weights_only=True, map_location=map_location)


def to_numpy(path: str | os.PathLike[str], value: Any, what: str) -> np.ndarray:
    """A tensor, array or nested list as a numpy array (never an object array)."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == object:
        raise fail(path, f"{what} is ragged or not numeric")
    return arr


def int_array(path: str | os.PathLike[str], value: Any, what: str, ndim: int | tuple[int, ...]) -> np.ndarray:
    """``value`` as int64, checking dimensions and that it holds integers."""
    arr = to_numpy(path, value, what)
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if arr.ndim not in dims:
        raise fail(path, f"{what} has shape {list(arr.shape)}, expected {' or '.join(f'{d}-D' for d in dims)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not (np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr))
                and np.all(arr == np.round(arr))):
            raise fail(path, f"{what} must hold integers, got {arr.dtype}")
    return arr.astype(np.int64)


def _first_non_integer(value: Any) -> Any:
    """The first leaf of nested lists that is not an integer (bools, strings, fractions), else None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        elif type(item) is float:
            if not (np.isfinite(item) and item.is_integer()):
                return item
        elif type(item) is not int:
            return item
    return None


def json_ids(path: str | os.PathLike[str], value: Any, where: str, may_hold_bool: bool = True) -> np.ndarray:
    """Expert ids parsed from JSON (nested lists) as int64, never truncated.

    Fractional, string, boolean and null ids are errors (``np.asarray`` would truncate
    ``1.5``, turn ``true`` into 1, or keep strings); whole floats (``2.0``) are accepted.
    ``may_hold_bool=False`` (the JSON text holds no ``true``/``false``) skips the per-element
    scan for booleans mixed into integer lists.
    """
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        bad = _first_non_integer(value)
        if bad is not None:
            raise fail(path, f"{where}: expert id {json.dumps(bad)} is not an integer") from None
        raise fail(path, f"{where} is ragged (rows of different lengths)") from None
    kind = arr.dtype.kind
    if kind in "iu" and not may_hold_bool:
        return arr.astype(np.int64)
    if kind == "f" and arr.size and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        if np.abs(arr).max() < 2.0 ** 63:
            return arr.astype(np.int64)
    bad = _first_non_integer(value) if arr.size else None
    if bad is not None:
        text = json.dumps(bad) if isinstance(bad, (bool, str, float, type(None))) else repr(bad)
        raise fail(path, f"{where}: expert id {text} is not an integer")
    if kind not in "iu":
        if kind == "O":  # integers beyond int64, or ragged rows
            raise fail(path, f"{where} is ragged or holds integers beyond 64 bits")
        if arr.size:
            raise fail(path, f"{where}: expert ids must be integers, got {arr.dtype}")
    return arr.astype(np.int64)


def check_load(path: str | os.PathLike[str], load: np.ndarray, what: str = "load matrix") -> np.ndarray:
    """A load matrix [L, E]: numeric, finite, non-negative; int64 when integral else float64."""
    arr = to_numpy(path, load, what)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise fail(path, f"{what} has shape {list(arr.shape)}, expected [layers, experts]")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise fail(path, f"{what} is not numeric ({arr.dtype})")
    f = arr.astype(np.float64)
    if not np.all(np.isfinite(f)):
        layer = int(np.argwhere(~np.isfinite(f))[0, 0])
        raise fail(path, f"{what} has NaN or infinite values (layer row {layer})")
    if f.min() < 0:
        layer = int(np.argwhere(f < 0)[0, 0])
        raise fail(path, f"{what} has negative values (layer row {layer}, min {f.min():g})")
    if f.max() >= 2.0 ** 63:  # would wrap to negative as int64
        layer = int(np.argwhere(f >= 2.0 ** 63)[0, 0])
        raise fail(path, f"{what} value {f.max():g} out of range (layer row {layer}; counts must be "
                         f"below 2**63)")
    return arr.astype(np.int64) if np.all(f == np.round(f)) else f


def model_desc(model: ModelSpec) -> str:
    return (f"{model.name} ({model.num_moe_layers} MoE layers, E={model.num_experts}, "
            f"top_k={model.top_k})")


def resolve_model(path: str | os.PathLike[str], passed: ModelSpec | None,
                  header: dict[str, Any] | None) -> ModelSpec | None:
    """The model of an input: the caller's, else the file header's; they must not contradict.

    Two models agree when their routing shape (hidden layers, MoE layer ids, E, top-k) agrees;
    then the caller's is kept (it may carry sizes the header lacks).
    """
    found = None
    if header is not None:
        if not isinstance(header, dict):
            raise fail(path, "model in the file header is not an object")
        found = ModelSpec.from_dict(header)
    if passed is None or found is None:
        return passed if passed is not None else found

    def shape(m: ModelSpec) -> tuple[Any, ...]:
        return (m.num_moe_layers, m.num_experts, m.top_k, m.moe_layer_ids, m.num_hidden_layers)
    if shape(passed) != shape(found):
        raise fail(path, f"the file header describes model {model_desc(found)}, which contradicts "
                         f"the given model {model_desc(passed)}")
    return passed


def moe_rows(path: str | os.PathLike[str], arr: np.ndarray, axis: int, model: ModelSpec | None,
             what: str = "layer count") -> np.ndarray:
    """Keep only the MoE layers along ``axis``.

    With a model: a length equal to its MoE layer count is kept as is; a length equal to its
    hidden layer count is cut to ``model.moe_layer_ids`` (dense rows dropped); anything else is
    an error. Without a model every layer is kept.
    """
    n = arr.shape[axis]
    if model is None or n == model.num_moe_layers:
        return arr
    if n == model.num_hidden_layers:
        return np.take(arr, np.asarray(model.moe_layer_ids), axis=axis)
    dense = model.num_hidden_layers - model.num_moe_layers
    extra = f" of {model.num_hidden_layers} hidden layers" if dense else ""
    raise fail(path, f"{what} {n} does not match {model.name} ({model.num_moe_layers} MoE layers{extra})")


def check_shape(path: str | os.PathLike[str], model: ModelSpec | None, num_layers: int,
                num_experts: int | None, top_k: int | None) -> None:
    """Layers, E and top-k of an input against the model (``None`` skips that check)."""
    if model is None:
        return
    if num_layers != model.num_moe_layers:
        raise fail(path, f"layer count {num_layers} does not match {model.name} "
                         f"({model.num_moe_layers} MoE layers)")
    if num_experts is not None and num_experts != model.num_experts:
        raise fail(path, f"expert count {num_experts} does not match {model.name} "
                         f"({model.num_experts} experts)")
    if top_k is not None and top_k != model.top_k:
        raise fail(path, f"top_k {top_k} does not match {model.name} (top_k={model.top_k})")


def check_ids(path: str | os.PathLike[str], ids: np.ndarray, num_experts: int,
              model: ModelSpec | None = None, what: str = "expert id") -> None:
    """Every id in ``[0, num_experts)``."""
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_experts:
        bad = lo if lo < 0 else hi
        of = f" for {model.name}" if model is not None else ""
        raise fail(path, f"{what} {bad} out of range [0, {num_experts}){of}")


def num_experts_of(path: str | os.PathLike[str], ids: np.ndarray, model: ModelSpec | None) -> int:
    """E: the model's when given (ids checked against it), else max id + 1."""
    if model is not None:
        check_ids(path, ids, model.num_experts, model)
        return model.num_experts
    if ids.size == 0:
        raise fail(path, "holds no routing data and no model is given to know the expert count")
    check_ids(path, ids, int(ids.max()) + 1)
    return int(ids.max()) + 1


def make_trace(path: str | os.PathLike[str], ids: np.ndarray, model: ModelSpec | None, *,
               num_experts: int | None = None, order: str = "sorted", **optional: Any) -> RoutingTrace:
    """A validated RoutingTrace [T, L, K] from MoE-only ids, checked against the model."""
    if ids.ndim != 3:
        raise fail(path, f"routing ids have shape {list(ids.shape)}, expected [tokens, layers, top_k]")
    e = num_experts if num_experts is not None else num_experts_of(path, ids, model)
    check_shape(path, model, ids.shape[1], e, ids.shape[2])
    check_ids(path, ids, e, model)
    if ids.size and int(ids.max()) > MAX_EXPERT_ID:  # before the int16 cast wraps it
        raise fail(path, f"expert id {int(ids.max())} out of range [0, {MAX_EXPERT_ID + 1}) "
                         "(placer stores expert ids as int16)")
    with guard(path, "routing data"):
        return RoutingTrace(ids.astype(np.int16), e, order, model=model, **optional)


def chunker(trace: RoutingTrace, chunk_tokens: int) -> Callable[[], Iterator[RoutingTrace]]:
    """A re-iterable stream of ``chunk_tokens``-token slices of an in-memory trace."""
    def chunks() -> Iterator[RoutingTrace]:
        if trace.num_tokens <= chunk_tokens:
            yield trace
            return
        for start in range(0, trace.num_tokens, chunk_tokens):
            yield trace.select_tokens(slice(start, start + chunk_tokens))  # type: ignore[arg-type]
    return chunks


def rechunk(pieces: Iterable[tuple[np.ndarray, ...]], chunk_tokens: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Regroup pieces of token-aligned arrays (axis 0 is tokens; a request, a forward pass) into
    groups of exactly ``chunk_tokens`` tokens, the last one shorter. Empty pieces are skipped."""
    held: list[tuple[np.ndarray, ...]] = []
    count = 0
    for piece in pieces:
        n, start = len(piece[0]), 0
        while start < n:
            take = min(chunk_tokens - count, n - start)
            held.append(tuple(a[start:start + take] for a in piece))
            count, start = count + take, start + take
            if count == chunk_tokens:
                yield tuple(np.concatenate(arrays) for arrays in zip(*held, strict=True))
                held, count = [], 0
    if held:
        yield tuple(np.concatenate(arrays) for arrays in zip(*held, strict=True))


def json_header(path: str | os.PathLike[str], raw: bytes | np.ndarray) -> dict[str, Any]:
    """Decode a native JSON header (bytes or a uint8 array)."""
    data = raw.tobytes() if isinstance(raw, np.ndarray) else raw
    try:
        header = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(path, f"corrupt placer header: {exc}") from None
    if not isinstance(header, dict):
        raise fail(path, "corrupt placer header: not a JSON object")
    version = header.get("schema_version")
    if version != SCHEMA_VERSION:
        raise fail(path, f"unsupported placer schema_version {version!r} (this version reads {SCHEMA_VERSION})")
    return header


def header_bytes(header: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(json.dumps(header, sort_keys=True).encode("utf-8"), dtype=np.uint8)


def _npy_header(fp: Any) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """(shape, dtype, header length) of the ``.npy`` stream ``fp`` at its start; None for unknown versions."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    else:  # pragma: no cover - np.load reports it
        return None
    return tuple(int(d) for d in shape), dtype, fp.tell()


def check_arrays(path: str | os.PathLike[str]) -> None:
    """Check the array headers of an ``.npy`` or ``.npz`` file before ``np.load`` allocates them.

    Each array's declared size (shape x itemsize) must match the bytes the file (or the zip
    member) holds, and all of them together must fit in the memory available.
    """
    total = 0
    with guard(path, "array file"):
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if not info.filename.endswith(".npy"):
                        continue
                    with zf.open(info) as member:
                        head = _npy_header(member)
                    if head is None or head[1].hasobject:
                        continue
                    shape, dtype, start = head
                    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                    check_memory(path, nbytes, f"member {info.filename} declares an array of")
                    if info.file_size != start + nbytes:
                        raise fail(path, f"member {info.filename} is truncated or corrupt: its header declares "
                                         f"{list(shape)} {dtype} ({human_bytes(nbytes)}), it holds "
                                         f"{human_bytes(max(info.file_size - start, 0))}")
                    total += nbytes
        else:
            with open(path, "rb") as f:
                if f.read(6) != b"\x93NUMPY":
                    return
                f.seek(0)
                head = _npy_header(f)
            if head is None or head[1].hasobject:
                return
            shape, dtype, start = head
            total = int(np.prod(shape, dtype=object)) * dtype.itemsize
            check_memory(path, total)
            size = os.path.getsize(path)
            if size < start + total:
                raise fail(path, f"truncated or corrupt .npy: its header declares {list(shape)} {dtype} "
                                 f"({human_bytes(total)}), the file holds {human_bytes(max(size - start, 0))}")
    check_memory(path, total, "declares arrays of")


def load_arrays(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``np.load(path, allow_pickle=False, **kwargs)`` after :func:`check_arrays`."""
    check_arrays(path)
    return np.load(path, allow_pickle=False, **kwargs)


def check_npy_bytes(path: str | os.PathLike[str], raw: bytes, where: str) -> None:
    """Check an in-memory ``.npy`` payload's declared array against its length and the memory available."""
    try:
        head = _npy_header(io.BytesIO(raw))
    except (ValueError, EOFError, SyntaxError) as exc:
        raise fail(path, f"{where}: .npy payload unreadable ({_detail(exc)})") from None
    if head is None or head[1].hasobject:
        return
    shape, dtype, start = head
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    check_memory(path, nbytes, f"{where}: .npy payload declares an array of")
    if len(raw) < start + nbytes:
        raise fail(path, f"{where}: .npy payload is truncated: its header declares {list(shape)} {dtype} "
                         f"({human_bytes(nbytes)}), it holds {human_bytes(max(len(raw) - start, 0))}")
