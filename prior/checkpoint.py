"""Reading dalle2-pytorch 0.11.5 prior checkpoints safely, and checking every key and shape.

A checkpoint is a ``DiffusionPrior`` state dict: ``net.*`` (the network), ``noise_scheduler.*``
(13 schedule buffers) and possibly ``clip.clip.*`` (OpenAI CLIP). It may come raw or wrapped as
``{"ema_model": ...}`` / ``{"model": ...}``, in fp16 or fp32, as ``.pth`` or ``.safetensors``.

- ``.pth`` files are read with ``torch.load(weights_only=True)``: no pickled code ever runs. A
  zip-format ``.pth`` is first checked against its records' CRC-32s. The one object beside the
  tensors that 0.11.5's ``DiffusionPriorTrainer.save`` writes, its ``packaging`` version, is
  read as an inert placeholder (``_Unused``), never as the class it names.
- ``.safetensors`` files are read tensor by tensor with plain reads into fresh buffers, not
  through a memory map, so loading peaks at the model's size plus one tensor.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PREFIXES = {"net": "net.", "schedule": "noise_scheduler.", "clip": "clip.clip."}
WRAPPER_KEYS = ("ema_model", "model", "state_dict")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SAFETENSORS_MAX_HEADER = 100 * 2**20


# Globals a dalle2-pytorch 0.11.5 trainer checkpoint pickles beside its tensors: its "version",
# a packaging Version (in any packaging release's layout). They are not needed, so each is read
# as an _Unused placeholder instead of being imported.
_TRAINER_GLOBALS = (
    "packaging.version.Version",
    "packaging.version._Version",
    "packaging.version.LegacyVersion",
    "packaging._structures.InfinityType",
    "packaging._structures.NegativeInfinityType",
)


class _Unused:
    """Stands in for an unpickled object that is not needed: takes any arguments and state, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __setstate__(self, state):
        pass


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class _Entry:
    shape: tuple[int, ...]
    dtype: torch.dtype
    tensor: torch.Tensor | None = None  # .pth: a tensor (lazily paged in)
    offsets: tuple[int, int] | None = None  # .safetensors: byte range in the file


class Checkpoint:
    """The tensors of a checkpoint file by name, shapes known before any data is read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        self._size = self.path.stat().st_size
        self._storage: torch.UntypedStorage | None = None
        if self.path.suffix == ".safetensors":
            self._entries, self._data_start = self._index_safetensors()
        else:
            self._entries, self._data_start = self._index_pickle(), 0

    # -- indexing -------------------------------------------------------------------------

    def _index_pickle(self) -> dict[str, _Entry]:
        obj = self._torch_load()
        state = unwrap_state_dict(obj, self.path)
        return {k: _Entry(tuple(v.shape), v.dtype, tensor=v) for k, v in state.items()}

    def _torch_load(self) -> object:
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
            raise CheckpointError(f"{self.path}: corrupted: neither a PyTorch (zip or pickle) nor a safetensors file")
        if magic.startswith(b"PK"):
            self._check_zip()
        try:
            with torch.serialization.safe_globals([(_Unused, name) for name in _TRAINER_GLOBALS]):
                try:
                    return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as error:
                    if "mmap" not in str(error):
                        raise
                    return torch.load(self.path, map_location="cpu", weights_only=True)  # legacy format
        except pickle.UnpicklingError as error:
            # torch's message: advice to disable the check, then what was blocked; keep the latter
            lines = [line for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line]
            reason = lines[0].strip() if lines else "not plain tensors"
            raise CheckpointError(
                f"{self.path}: refused to load: unpickling it needs more than plain tensors ({reason}). "
                "Only weights are loaded, never pickled code."
            ) from None
        except Exception as error:  # torch raises many types on damaged archives
            raise CheckpointError(f"{self.path}: truncated or corrupted PyTorch file ({error})") from None

    def _check_zip(self) -> None:
        """Verify every record of a zip-format ``.pth`` against its CRC-32 before unpickling.

        ``torch.load`` does not, so flipped bytes in tensor data would load silently as wrong
        weights, and flipped bytes in the pickle would read as a refusal. It reads the file once
        (about a second per GB); LAION's ``.pth`` is read only when it is converted.
        """
        try:
            with zipfile.ZipFile(self.path) as archive:
                bad = archive.testzip()
        except Exception as error:  # BadZipFile, EOFError, zlib.error, OSError ... on damaged archives
            raise CheckpointError(f"{self.path}: truncated or corrupted PyTorch file ({error})") from None
        if bad is not None:
            raise CheckpointError(f"{self.path}: corrupted: the data of {bad!r} does not match its CRC-32")

    def _index_safetensors(self) -> tuple[dict[str, _Entry], int]:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_SAFETENSORS_MAX_HEADER, size - 8):
                raise CheckpointError(f"{self.path}: corrupted or truncated safetensors header")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise CheckpointError(f"{self.path}: corrupted safetensors header ({error})") from None
        data_start = 8 + header_len
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(n) for n in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupted safetensors entry for {name!r}") from None
            nbytes = dtype.itemsize * _numel(shape)
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(f"{self.path}: corrupted safetensors entry for {name!r}")
            if data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated: {name!r} ends at byte {data_start + end} but the file has {size}"
                )
            entries[name] = _Entry(shape, dtype, offsets=(begin, end))
        return entries, data_start

    # -- access ---------------------------------------------------------------------------

    def shapes(self, prefix: str = "") -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors under ``prefix`` (prefix removed)."""
        return {k[len(prefix) :]: e.shape for k, e in self._entries.items() if k.startswith(prefix)}

    def keys(self) -> list[str]:
        return list(self._entries)

    @property
    def is_safetensors(self) -> bool:
        return self.path.suffix == ".safetensors"

    def dtypes(self, prefix: str = "") -> dict[str, torch.dtype]:
        """Stored dtypes of the tensors under ``prefix`` (prefix removed)."""
        return {k[len(prefix) :]: e.dtype for k, e in self._entries.items() if k.startswith(prefix)}

    def read(self, name: str, mapped: bool = False) -> torch.Tensor:
        """One tensor: a fresh buffer, or with ``mapped`` a copy-on-write view of the file.

        Mapped tensors cost no copy; their pages are read from the page cache when first
        touched. Read tensors never map the file, so loading with a conversion peaks at the
        converted model plus one tensor instead of also holding the file's pages.
        """
        entry = self._entries[name]
        if entry.tensor is not None:
            return entry.tensor
        begin, end = entry.offsets
        start = self._data_start + begin
        if mapped and start % entry.dtype.itemsize == 0:
            if self._storage is None:
                self._storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=self._size)
            view = torch.empty(0, dtype=entry.dtype)
            return view.set_(self._storage, start // entry.dtype.itemsize, entry.shape)
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(start)
            if f.readinto(buffer.numpy()) != end - begin:
                raise CheckpointError(f"{self.path}: truncated while reading {name!r}")
        return buffer.view(entry.dtype).view(entry.shape)

    def tensors(self, prefix: str = "", mapped: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name without prefix, tensor)`` pairs, one at a time (see ``read``)."""
        for name in self._entries:
            if name.startswith(prefix):
                yield name[len(prefix) :], self.read(name, mapped)

    def check_prefixes(self) -> None:
        """Every key belongs to the network, the schedule or CLIP."""
        unexpected = [k for k in self._entries if not k.startswith(tuple(PREFIXES.values()))]
        if unexpected:
            raise CheckpointError(
                f"{self.path}: not a dalle2-pytorch diffusion prior checkpoint: unexpected keys "
                f"{_listing(unexpected)} (expected only {', '.join(p + '*' for p in PREFIXES.values())})"
            )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown} and {len(names) - limit} more" if len(names) > limit else shown


def unwrap_state_dict(obj: object, path: Path | str = "checkpoint") -> dict[str, torch.Tensor]:
    """A raw state dict, ``{"ema_model": sd}`` or ``{"model": sd}`` -> the state dict.

    Keys of an EMA wrapper's own state dict (``ema_model.net...``) lose that prefix.
    """
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise CheckpointError(
                f"{path}: no state dict found: top-level keys are {_listing([str(k) for k in obj])}, "
                f"expected tensors or one of {WRAPPER_KEYS}"
            )
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("ema_model.") for k in state):
        state = {k.removeprefix("ema_model."): v for k, v in state.items() if k.startswith("ema_model.")}
    return state


def check_shapes(
    module: nn.Module, shapes: Mapping[str, tuple[int, ...]], source: str, ignore: tuple[str, ...] = ()
) -> None:
    """Every key of ``module``'s state dict is present with its shape, and nothing else is."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items() if k not in ignore}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected and k not in ignore]
    wrong = [f"{k} {shapes[k]} (expected {expected[k]})" for k in expected if k in shapes and shapes[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listing(unexpected)}")
    if wrong:
        problems.append(f"mis-shaped {_listing(wrong)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


@torch.no_grad()
def materialize(
    module: nn.Module,
    tensors: Iterator[tuple[str, torch.Tensor]],
    device: torch.device | str = "cpu",
    ignore: tuple[str, ...] = (),
) -> nn.Module:
    """Give a module built on the meta device the checkpoint's tensors, one at a time.

    Each tensor is taken as it is when it already has the module's dtype (cast the module on
    the meta device first) and device, and converted otherwise, so the peak is the module plus
    one tensor. Shapes must have passed ``check_shapes``.
    """
    device = torch.device(device)
    expected = module.state_dict(keep_vars=True)
    state = {}
    for name, tensor in tensors:
        if name in ignore:
            continue
        target = expected[name]
        as_is = tensor.dtype == target.dtype and tensor.device == device
        state[name] = tensor if as_is else tensor.to(device, target.dtype)
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"not filled from the checkpoint: {_listing(missing)}")
    module.load_state_dict(state, strict=True, assign=True)
    return module


def save_safetensors(state: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write tensors as safetensors (contiguous copies where needed), flushed to disk.

    Tensors that share memory are written as copies: safetensors refuses shared storage, and
    0.11.5's state dicts share one rotary ``freqs`` tensor between all layers.
    """
    from safetensors.torch import save_file

    tensors, storages = {}, set()
    for name, tensor in state.items():
        tensor = tensor.contiguous()
        if tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
