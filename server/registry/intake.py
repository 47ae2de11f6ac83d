"""Uploaded files into a flat staging folder, safely and within a byte limit (archives: server.registry.archives)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from adapters_core.formats import FUSION_CONFIG, FUSION_WEIGHTS
from server.errors import UploadRejected

ADAPTER_FILES = frozenset(
    {"adapter_config.json", "adapter.safetensors", "head_config.json", "model_head.safetensors", "adapter_model.safetensors",
     FUSION_CONFIG, FUSION_WEIGHTS}
)
HEAD_WEIGHTS = "model_head.safetensors"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"})
PICKLE_HEAD = "pytorch_model_head.bin"  # AdapterHub's head file when saved without use_safetensors
IGNORED_FILES = frozenset({"README.md", ".gitattributes"})
_CHUNK = 1024 * 1024


@dataclass
class ByteBudget:
    """Counts bytes written for one upload (uncompressed, so archives cannot bomb the disk)."""

    limit: int
    used: int = 0
    detail: str = ""  # the 413's detail; empty: the upload limit's

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise UploadRejected(
                413, "upload-too-large",
                self.detail or f"upload exceeds the limit of {self.limit / (1024 * 1024):g} MiB (uncompressed)",
            )


@dataclass
class UploadBudget:
    """The byte budgets of one upload: every file counts against `main` (the upload limit), except an LM
    head's weights (model_head.safetensors on a causal LM backbone), which have a budget of their own, `head`,
    the size of a float32 copy of the backbone's LM head (server.registry.lm_head). A head that turns out not
    to be an LM head is charged to `main` after staging (`charge_head_to_main`)."""

    main: ByteBudget
    head: ByteBudget | None = None

    def for_file(self, base: str) -> ByteBudget:
        return self.head if self.head is not None and base == HEAD_WEIGHTS else self.main

    @property
    def limit(self) -> int:
        return self.main.limit + (self.head.limit if self.head is not None else 0)

    def charge_head_to_main(self) -> None:
        """The head file is not an LM head: its bytes count against the upload limit like any file (413)."""
        if self.head is not None and self.head.used:
            moved, self.head.used = self.head.used, 0
            self.main.take(moved)


def accepted_name(filename: str | None) -> str | None:
    """The file's name inside the adapter folder, None to skip it; UploadRejected for anything not allowed."""
    if not filename:
        raise UploadRejected(422, "bad-file", "every `files` part needs a filename (its name in the adapter folder)")
    base = PurePosixPath(filename.replace("\\", "/")).name
    suffix = PurePosixPath(base).suffix.lower()
    if base == PICKLE_HEAD:
        raise UploadRejected(
            415, "pickle-rejected",
            f"{base!r}: a pickled head is never accepted over the network (it is never unpickled); save the adapter "
            "with use_safetensors=True (AdapterHub then writes model_head.safetensors) or leave the head out",
        )
    if suffix in PICKLE_SUFFIXES:
        raise UploadRejected(
            415, "pickle-rejected",
            f"{base!r}: pickle-based weight files are never accepted over the network; upload safetensors "
            "(adapter.safetensors / adapter_model.safetensors, or model_adapter_fusion.safetensors for a fusion)",
        )
    if base in IGNORED_FILES:
        return None
    if base not in ADAPTER_FILES:
        raise UploadRejected(422, "bad-file", f"{base!r} is not an adapter file; allowed: {', '.join(sorted(ADAPTER_FILES))}")
    return base


def copy_limited(src: BinaryIO, dest: Path, budget: ByteBudget) -> None:
    """Copy a stream to a new file, counting bytes against the budget, and fsync it."""
    with dest.open("xb") as out:
        while chunk := src.read(_CHUNK):
            budget.take(len(chunk))
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def clear(dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
