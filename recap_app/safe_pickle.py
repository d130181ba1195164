"""Unpickling that can run no code: only allow-listed (module, name) globals are looked up.

`pickle.load` calls whatever a file names (`posix.system`, `builtins.exec`, ...), so a file recap did not
write itself (a checkpoint URL is user input) must never reach it. DCP still pickles its `.metadata`;
recap reads it through `restricted_load` with exactly the types that file holds (DCP_METADATA_GLOBALS,
found by recording what real recap checkpoints pickle).
"""

from __future__ import annotations

import enum
import io
import pickle
from collections.abc import Set
from typing import IO, Any

import torch

from recap_app.errors import InputError


class UntrustedInputError(InputError, ValueError):
    """A file would need to run code (unpickle an arbitrary object) to be read; nothing was run."""


class RefusedGlobalError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list; `module` and `name` say which."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


_DTYPES = {("torch", n) for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)}

# What a DCP `.metadata` of torch 2.13 pickles (recorded from recap's own 1- and 2-rank checkpoints, sync
# and async saves, and a plain-path DCP save): the metadata dataclasses, their enum, torch.Size, dtypes, the
# layout lookup TensorProperties reduces to (`_get_layout("torch.strided")`, a dict lookup) and the
# PosixPath DCP's FileSystemWriter stores as checkpoint_id. Constructing any of them runs no user code.
DCP_METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        *(
            ("torch.distributed.checkpoint.metadata", n)
            for n in (
                "Metadata",
                "MetadataIndex",
                "StorageMeta",
                "TensorProperties",
                "TensorStorageMetadata",
                "ChunkStorageMetadata",
                "BytesStorageMetadata",  # admitted to be read; loading such an item is refused
                "_MEM_FORMAT_ENCODING",
            )
        ),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        *_DTYPES,
    }
)


def _enum_member(cls: Any, name: str) -> Any:
    """What `builtins.getattr` may do in a checkpoint: look up a member of an allowed Enum class. Some
    Python 3.11 builds pickle enum members as `getattr(EnumClass, "NAME")` (seen in DCP's
    `_MEM_FORMAT_ENCODING` written inside the recap image); anything else is refused."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and name in cls.__members__:
        return cls[name]
    raise RefusedGlobalError("builtins", f"getattr({getattr(cls, '__name__', type(cls).__name__)}, {name!r})")


class _Restricted(pickle.Unpickler):
    def __init__(self, file: IO[bytes], allowed: Set[tuple[str, str]]) -> None:
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):
            return _enum_member  # only allowed Enum classes reach it: every class was looked up here
        if (module, name) not in self._allowed:
            raise RefusedGlobalError(module, name)
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def restricted_load(file: IO[bytes] | bytes, allowed: Set[tuple[str, str]]) -> Any:
    """Unpickle `file` looking up only `allowed` globals; RefusedGlobalError names the first other one
    (raised before it is imported or called)."""
    stream = io.BytesIO(file) if isinstance(file, bytes) else file
    return _Restricted(stream, allowed).load()
