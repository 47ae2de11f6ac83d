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
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"})
IGNORED_FILES = frozenset({"README.md", ".gitattributes"})
_CHUNK = 1024 * 1024


@dataclass
class ByteBudget:
    """Counts bytes written for one upload (uncompressed, so archives cannot bomb the disk)."""

    limit: int
    used: int = 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise UploadRejected(
                413, "upload-too-large", f"upload exceeds the limit of {self.limit // (1024 * 1024)} MiB (uncompressed)"
            )


def accepted_name(filename: str | None) -> str | None:
    """The file's name inside the adapter folder, None to skip it; UploadRejected for anything not allowed."""
    if not filename:
        raise UploadRejected(422, "bad-file", "every `files` part needs a filename (its name in the adapter folder)")
    base = PurePosixPath(filename.replace("\\", "/")).name
    suffix = PurePosixPath(base).suffix.lower()
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
