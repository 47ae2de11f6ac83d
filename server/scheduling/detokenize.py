"""Incremental detokenization with stop strings: text deltas that never take back what they gave."""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence


class Detokenizer:
    """Token ids in, text deltas out. A delta holds back a tail that may still change: an incomplete character,
    or the start of a stop string. A stop string found across token boundaries ends the text before it."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; the text it makes safe to show (empty while held back, and after a stop)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        full = self._decode(self.ids)
        cut = self._stop_at(full)
        if cut is not None:
            self.stopped = True
            return self._emit(full[:cut])
        return self._emit(full[: len(full) - self._held(full)])

    def flush(self) -> str:
        """The rest of the text once the sequence ended (an incomplete character is shown as the decoder shows it)."""
        if self.stopped:
            return ""
        full = self._decode(self.ids)
        cut = self._stop_at(full)
        if cut is not None:
            self.stopped = True
            full = full[:cut]
        return self._emit(full)

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.text) or not upto.startswith(self.text):
            return ""
        delta = upto[len(self.text):]
        self.text = upto
        return delta

    def _stop_at(self, full: str) -> int | None:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := full.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held(self, full: str) -> int:
        """Characters at the end of `full` not to show yet."""
        held = len(full) - len(full.rstrip(REPLACEMENT))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held
