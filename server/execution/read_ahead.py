"""Adapter folders read on a side thread while forward passes run, so a cold load only attaches them.

Before each forward pass (or generation step) the scheduler names the adapters that requests already queued
need and the model does not hold; a reader thread reads and parses their folders meanwhile (safetensors,
configs, PEFT translation: what `read_adapter_files` does, about a third of a MiniLM adapter's cold load), and
the load that follows takes the parsed files instead of reading them on the inference thread. An entry records
every file's size and modification time when its read began and is used only while they still match, so a
folder rewritten since is read again; a read that failed is not used either (the load reads and reports its own
error). Entries are bounded by count and bytes, oldest dropped first; a load takes its entry out.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from adapters_core.formats import AdapterFiles

log = logging.getLogger("adapterserve.read_ahead")

Stamps = tuple[tuple[str, int, int], ...]


def folder_stamps(folder: Path) -> Stamps | None:
    """(name, size, mtime_ns) of every file in `folder`, sorted; None when it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            found = [(e.name, (st := e.stat()).st_size, st.st_mtime_ns) for e in it if e.is_file()]
    except OSError:
        return None
    return tuple(sorted(found))


def files_nbytes(files: AdapterFiles) -> int:
    tensors = [*files.state.values(), *(files.head_state or {}).values()]
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(eq=False)
class _Entry:
    future: Future[AdapterFiles]
    stamps: Stamps
    nbytes: int = 0  # known once the read has finished


class ReadAhead:
    """Reads folders on one thread with `read`; `take` hands out what was read for a folder still unchanged."""

    def __init__(self, read: Callable[[Path], AdapterFiles], limit_entries: int = 32, limit_bytes: int = 64 << 20) -> None:
        self._read = read
        self.limit_entries = limit_entries
        self.limit_bytes = limit_bytes
        self._entries: OrderedDict[Path, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def want(self, folders: Iterable[Path]) -> None:
        """Start reading the folders not read or being read already (at most `limit_entries` of them)."""
        if self.limit_entries <= 0:
            return
        for folder in folders:
            folder = Path(folder)
            with self._lock:
                if folder in self._entries:
                    continue
            stamps = folder_stamps(folder)
            if stamps is None:
                continue
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
            entry = _Entry(self._executor.submit(self._read, folder), stamps)
            entry.future.add_done_callback(lambda f, e=entry: self._finished(e, f))
            with self._lock:
                self._entries[folder] = entry
                self._trim()

    def take(self, folder: Path) -> AdapterFiles | None:
        """The files read ahead for `folder` (waiting for a read under way), or None: never wanted, dropped, not
        begun yet (it is cancelled: the caller reads at once instead of waiting behind other reads), changed on disk
        since, or the read failed. Either way the entry is gone afterwards."""
        with self._lock:
            entry = self._entries.pop(Path(folder), None)
        if entry is None or entry.future.cancel():  # still queued behind other reads: reading it now is sooner
            self.misses += 1
            return None
        try:
            files = entry.future.result()
        except Exception as exc:  # the load reads the folder again and reports its own error
            log.debug("reading %s ahead failed: %s", folder, exc)
            files = None
        if files is None or folder_stamps(Path(folder)) != entry.stamps:
            self.misses += 1
            return None
        self.hits += 1
        return files

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def close(self) -> None:
        self.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _finished(self, entry: _Entry, future: Future[AdapterFiles]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        with self._lock:
            entry.nbytes = files_nbytes(future.result())
            self._trim()

    def _trim(self) -> None:
        """Under the lock: drop the oldest entries beyond the bounds (a read under way finishes unused)."""
        while len(self._entries) > self.limit_entries or (
            len(self._entries) > 1 and sum(e.nbytes for e in self._entries.values()) > self.limit_bytes
        ):
            self._entries.popitem(last=False)[1].future.cancel()  # one not begun is never read
