"""Extract one uploaded .tar (plain, gz, bz2, xz) or .zip into a flat staging folder, budgeting as it streams.

A 16 KB bz2 stream can claim 12 GiB of zeros, so no decompressed byte is produced unbudgeted: a tar is read
once, front to back, through a reader that stops at the upload limit (plus room for tar headers); a zip
member is inflated here, chunk by chunk with bounded output (zipfile's own reader inflates a bzip2 or lzma
read in one unbounded call). Members are checked (names, links, one folder, no duplicates) as they come.
"""

from __future__ import annotations

import bz2
import gzip
import itertools
import lzma
import os
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from server.errors import UploadRejected
from server.registry.intake import ByteBudget, UploadBudget, accepted_name

MAX_ARCHIVE_MEMBERS = 64
TAR_HEADER_ROOM = 1024 * 1024  # tar headers and padding on top of the member bytes
_CHUNK = 1024 * 1024
_RAW_CHUNK = 64 * 1024
_COMPRESSED_TAR: tuple[tuple[bytes, Callable[[BinaryIO], Any]], ...] = (
    (b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
    (b"BZh", lambda f: bz2.BZ2File(f, mode="rb")),
    (b"\xfd7zXZ\x00", lambda f: lzma.LZMAFile(f, mode="rb")),
)
_DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)  # bz2 and gzip raise OSError on bad data


class _BudgetedReader:
    """A decompressed tar stream that refuses to yield more than `limit` bytes plus room for tar headers."""

    def __init__(self, inner: BinaryIO, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.budget = ByteBudget(limit + TAR_HEADER_ROOM)

    def read(self, n: int = -1) -> bytes:
        room = self.budget.limit - self.budget.used + 1
        try:
            data = self.inner.read(room if n < 0 else min(n, room))
        except _DECOMPRESS_ERRORS as exc:
            raise UploadRejected(422, "bad-archive", f"the archive is corrupt: {exc}") from None
        self.budget.used += len(data)
        if self.budget.used > self.budget.limit:
            raise UploadRejected(
                413, "upload-too-large",
                f"the archive unpacks to more than the upload's limit of {self.limit / (1024 * 1024):g} MiB (uncompressed)",
            )
        return data


def _write(chunks: Iterator[bytes], dest: Path, budget: ByteBudget) -> None:
    with dest.open("xb") as out:
        for chunk in chunks:
            budget.take(len(chunk))
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def _read_chunks(src: BinaryIO) -> Iterator[bytes]:
    while chunk := src.read(_CHUNK):
        yield chunk


def _safe_member_path(name: str) -> PurePosixPath:
    norm = name.replace("\\", "/")
    path = PurePosixPath(norm)
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":") or path.is_absolute():
        raise UploadRejected(422, "unsafe-archive", f"archive member {name!r} has an absolute path")
    if any(part == ".." for part in path.parts):
        raise UploadRejected(422, "unsafe-archive", f"archive member {name!r} points outside the archive ('..')")
    return PurePosixPath(*[p for p in path.parts if p not in ("", ".")])


class _Placement:
    """Members must sit in one folder (the archive root or a single top folder), each file name once."""

    def __init__(self) -> None:
        self.folder: PurePosixPath | None = None
        self.names: set[str] = set()
        self.count = 0

    def seen(self) -> None:
        """Count one member (files, folders, anything)."""
        self.count += 1
        if self.count > MAX_ARCHIVE_MEMBERS:
            raise UploadRejected(422, "bad-archive", f"archive has more than {MAX_ARCHIVE_MEMBERS} members")

    def place(self, name: str) -> str | None:
        """The member's file name in the staging folder, None to skip it; UploadRejected if not allowed."""
        path = _safe_member_path(name)
        if self.folder is None:
            self.folder = path.parent
        elif path.parent != self.folder:
            folders = sorted({str(self.folder) or ".", str(path.parent) or "."})
            raise UploadRejected(422, "bad-archive", "the archive must hold one adapter folder; files were found in: " + ", ".join(folders))
        base = accepted_name(path.name)
        if base is not None and base in self.names:
            raise UploadRejected(422, "bad-archive", f"the archive holds {base} twice")
        if base is not None:
            self.names.add(base)
        return base


def _check_size(name: str, size: int, budget: ByteBudget) -> None:
    if budget.used + size > budget.limit:
        limit = budget.detail or f"the upload's limit is {budget.limit / (1024 * 1024):g} MiB (uncompressed)"
        raise UploadRejected(413, "upload-too-large", f"archive member {name!r} unpacks to {size} bytes; {limit}")


def _open_tar_stream(f: BinaryIO) -> BinaryIO:
    head = f.read(8)
    f.seek(0)
    for magic, opener in _COMPRESSED_TAR:
        if head.startswith(magic):
            return opener(f)
    return f


def _extract_tar(path: Path, dest: Path, budget: UploadBudget) -> None:
    with path.open("rb") as raw, _open_tar_stream(raw) as stream:
        try:
            tf = tarfile.open(fileobj=_BudgetedReader(stream, budget.limit), mode="r|")
        except tarfile.TarError as exc:
            raise UploadRejected(422, "bad-archive", f"cannot read the archive as tar: {exc}") from None
        try:
            _extract_tar_members(tf, dest, budget)
        except tarfile.TarError as exc:
            raise UploadRejected(422, "bad-archive", f"the archive is corrupt: {exc}") from None
        finally:
            tf.close()


def _extract_tar_members(tf: tarfile.TarFile, dest: Path, budget: UploadBudget) -> None:
    """One pass over a stream-mode tar: each member is checked, then written, before the next is read."""
    placement = _Placement()
    for info in tf:
        placement.seen()
        if info.isdir():
            _safe_member_path(info.name)
            continue
        if info.issym() or info.islnk():
            raise UploadRejected(422, "unsafe-archive", f"archive member {info.name!r} is a link; links are refused")
        if not info.isfile():
            raise UploadRejected(422, "unsafe-archive", f"archive member {info.name!r} is not a regular file")
        base = placement.place(info.name)
        if base is None:
            continue
        _check_size(info.name, info.size, budget.for_file(base))
        src = tf.extractfile(info)
        assert src is not None
        _write(_read_chunks(src), dest / base, budget.for_file(base))


def _lzma_inflater(raw: Iterator[bytes]) -> tuple[lzma.LZMADecompressor, bytes]:
    """A zip LZMA member starts with 2 version bytes, a 2-byte properties size and LZMA1 properties."""
    head = b""
    while len(head) < 4 or len(head) < 4 + struct.unpack("<H", head[2:4])[0]:
        chunk = next(raw, b"")
        if not chunk:
            raise UploadRejected(422, "bad-archive", "a zip LZMA member is cut short")
        head += chunk
    size = struct.unpack("<H", head[2:4])[0]
    if size != 5:
        raise UploadRejected(422, "bad-archive", "a zip LZMA member has malformed properties")
    props, dict_size = head[4], int.from_bytes(head[5:9], "little")
    lzma1 = {"id": lzma.FILTER_LZMA1, "lc": props % 9, "lp": (props // 9) % 5, "pb": props // 45, "dict_size": dict_size}
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[lzma1]), head[9:]


def _zip_raw(f: BinaryIO, info: zipfile.ZipInfo) -> Iterator[bytes]:
    """The member's compressed bytes, from just after its local header."""
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise UploadRejected(422, "bad-archive", f"zip member {info.filename!r} has no local header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    left = info.compress_size
    while left:
        chunk = f.read(min(_RAW_CHUNK, left))
        if not chunk:
            raise UploadRejected(422, "bad-archive", f"zip member {info.filename!r} is cut short")
        left -= len(chunk)
        yield chunk


def _inflate_zlib(raw: Iterator[bytes]) -> Iterator[bytes]:
    """Raw deflate; output per call is capped, the rest of the input waits in unconsumed_tail."""
    inflater = zlib.decompressobj(-15)
    for data in raw:
        while data and not inflater.eof:
            yield inflater.decompress(data, _CHUNK)
            data = inflater.unconsumed_tail
        if inflater.eof:
            return
    yield inflater.flush()


def _inflate_buffered(inflater: bz2.BZ2Decompressor | lzma.LZMADecompressor, raw: Iterator[bytes]) -> Iterator[bytes]:
    """bz2 / lzma: output per call is capped, the decompressor buffers the rest and goes on with b""."""
    for data in raw:
        while not inflater.eof:
            yield inflater.decompress(data, _CHUNK)
            data = b""
            if inflater.needs_input:
                break
        if inflater.eof:
            return


def _inflated(info: zipfile.ZipInfo, raw: Iterator[bytes]) -> Iterator[bytes]:
    method = info.compress_type
    if method == zipfile.ZIP_STORED:
        return raw
    if method == zipfile.ZIP_DEFLATED:
        return _inflate_zlib(raw)
    if method == zipfile.ZIP_BZIP2:
        return _inflate_buffered(bz2.BZ2Decompressor(), raw)
    if method == zipfile.ZIP_LZMA:
        inflater, rest = _lzma_inflater(raw)
        return _inflate_buffered(inflater, itertools.chain([rest], raw))
    raise UploadRejected(422, "bad-archive", f"zip member {info.filename!r} uses compression method {method}; "
                         "stored, deflate, bzip2 and lzma are accepted")


def _zip_member(f: BinaryIO, info: zipfile.ZipInfo) -> Iterator[bytes]:
    """The member's bytes, inflated at most _CHUNK at a time, CRC-checked at the end."""
    if info.flag_bits & 0x1:
        raise UploadRejected(422, "bad-archive", f"zip member {info.filename!r} is encrypted")
    crc = 0
    try:
        for chunk in _inflated(info, _zip_raw(f, info)):
            crc = zlib.crc32(chunk, crc)
            yield chunk
    except _DECOMPRESS_ERRORS as exc:
        raise UploadRejected(422, "bad-archive", f"zip member {info.filename!r} is corrupt: {exc}") from None
    if crc != info.CRC:
        raise UploadRejected(422, "bad-archive", f"zip member {info.filename!r} fails its CRC check (corrupt archive)")


def _extract_zip(path: Path, dest: Path, budget: UploadBudget) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, ValueError, struct.error, EOFError, NotImplementedError) as exc:
        raise UploadRejected(422, "bad-archive", f"cannot read the archive as zip: {exc}") from None
    placement = _Placement()
    with zf, path.open("rb") as f:
        infos = zf.infolist()
        if len(infos) > MAX_ARCHIVE_MEMBERS:
            raise UploadRejected(422, "bad-archive", f"archive has more than {MAX_ARCHIVE_MEMBERS} members")
        for info in infos:
            placement.seen()
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UploadRejected(422, "unsafe-archive", f"archive member {info.filename!r} is a link; links are refused")
            if info.is_dir():
                _safe_member_path(info.filename)
                continue
            base = placement.place(info.filename)
            if base is None:
                continue
            _check_size(info.filename, info.file_size, budget.for_file(base))
            _write(_zip_member(f, info), dest / base, budget.for_file(base))


def extract_archive(path: Path, filename: str, dest: Path, budget: ByteBudget | UploadBudget) -> None:
    """Extract a .tar (.gz, .bz2, .xz) or .zip into dest (flat), refusing links, absolute paths, '..',
    members in several folders and a file name given twice; decompressed bytes count against `budget` (an
    UploadBudget: each member against its file's budget, the tar stream against their sum).
    Members are written as they stream, so a rejected archive's files are removed again."""
    if isinstance(budget, ByteBudget):
        budget = UploadBudget(budget)
    try:
        if zipfile.is_zipfile(path):
            _extract_zip(path, dest, budget)
        elif _looks_like_tar(path, filename):
            _extract_tar(path, dest, budget)
        else:
            raise UploadRejected(422, "bad-archive", f"{filename!r} is not a .tar (.gz, .bz2, .xz) or .zip archive")
    except UploadRejected:
        for written in dest.iterdir():
            written.unlink()
        raise
    if not any(dest.iterdir()):
        raise UploadRejected(422, "bad-archive", "the archive holds no adapter files")


def _looks_like_tar(path: Path, filename: str) -> bool:
    with path.open("rb") as f:
        head = f.read(512)
    if any(head.startswith(magic) for magic, _ in _COMPRESSED_TAR) or head[257:262] == b"ustar":
        return True
    return filename.lower().endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz"))
