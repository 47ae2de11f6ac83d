"""Turn uploaded parts (files or one archive) into a flat staging folder, safely and within a byte limit."""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile
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
MAX_ARCHIVE_MEMBERS = 64
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


def _safe_member_path(name: str) -> PurePosixPath:
    norm = name.replace("\\", "/")
    path = PurePosixPath(norm)
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":") or path.is_absolute():
        raise UploadRejected(422, "unsafe-archive", f"archive member {name!r} has an absolute path")
    if any(part == ".." for part in path.parts):
        raise UploadRejected(422, "unsafe-archive", f"archive member {name!r} points outside the archive ('..')")
    return PurePosixPath(*[p for p in path.parts if p not in ("", ".")])


def _place(members: list[tuple[PurePosixPath, object]]) -> list[tuple[str, object]]:
    """Members must sit in one folder (the archive root or a single top folder); map them to file names."""
    parents = {m.parent for m, _ in members}
    if len(parents) > 1:
        raise UploadRejected(
            422, "bad-archive", "the archive must hold one adapter folder; files were found in: "
            + ", ".join(sorted(str(p) or "." for p in parents))
        )
    out: list[tuple[str, object]] = []
    for path, handle in members:
        base = accepted_name(path.name)
        if base is not None:
            out.append((base, handle))
    return out


def _extract_tar(path: Path, dest: Path, budget: ByteBudget) -> None:
    try:
        tf = tarfile.open(path, mode="r:*")
    except tarfile.TarError as exc:
        raise UploadRejected(422, "bad-archive", f"cannot read the archive as tar: {exc}") from exc
    with tf:
        files: list[tuple[PurePosixPath, object]] = []
        for count, info in enumerate(tf, 1):
            if count > MAX_ARCHIVE_MEMBERS:
                raise UploadRejected(422, "bad-archive", f"archive has more than {MAX_ARCHIVE_MEMBERS} members")
            member = _safe_member_path(info.name)
            if info.issym() or info.islnk():
                raise UploadRejected(422, "unsafe-archive", f"archive member {info.name!r} is a link; links are refused")
            if info.isdir():
                continue
            if not info.isfile():
                raise UploadRejected(422, "unsafe-archive", f"archive member {info.name!r} is not a regular file")
            files.append((member, info))
        for base, info in _place(files):
            src = tf.extractfile(info)  # type: ignore[arg-type]
            assert src is not None
            copy_limited(src, dest / base, budget)


def _extract_zip(path: Path, dest: Path, budget: ByteBudget) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise UploadRejected(422, "bad-archive", f"cannot read the archive as zip: {exc}") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ARCHIVE_MEMBERS:
            raise UploadRejected(422, "bad-archive", f"archive has more than {MAX_ARCHIVE_MEMBERS} members")
        files: list[tuple[PurePosixPath, object]] = []
        for info in infos:
            member = _safe_member_path(info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UploadRejected(422, "unsafe-archive", f"archive member {info.filename!r} is a link; links are refused")
            if info.is_dir():
                continue
            files.append((member, info))
        for base, info in _place(files):
            with zf.open(info) as src:  # type: ignore[call-overload]
                copy_limited(src, dest / base, budget)


def extract_archive(path: Path, filename: str, dest: Path, budget: ByteBudget) -> None:
    """Extract a .tar, .tar.gz or .zip into dest (flat), refusing links, absolute paths and '..'."""
    if zipfile.is_zipfile(path):
        _extract_zip(path, dest, budget)
    elif filename.lower().endswith((".tar", ".tar.gz", ".tgz")) or tarfile.is_tarfile(path):
        _extract_tar(path, dest, budget)
    else:
        raise UploadRejected(422, "bad-archive", f"{filename!r} is not a .tar, .tar.gz or .zip archive")
    if not any(dest.iterdir()):
        raise UploadRejected(422, "bad-archive", "the archive holds no adapter files")


def clear(dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
