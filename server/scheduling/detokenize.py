"""Incremental detokenization with stop strings: text deltas that never take back what they gave."""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence


class Detokenizer:
    """Token ids in, text deltas out. Each token decodes only a short window (the tokens since the last settled
    point, with the one before as context, so decoders that drop a leading space stay right), never the whole text.
    A delta holds back an incomplete character and a tail that may start a stop string; a stop string found across
    token boundaries ends the text before it."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self.stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.full = ""  # the decoded text so far (complete characters)
        self.text = ""  # what has been emitted
        self.stopped = False
        self._prefix = 0  # window start: context tokens
        self._read = 0  # tokens before this are in `full`
        self._prefix_text = ""

    def push(self, token: int) -> str:
        """Add a token; the text it makes safe to show (empty while held back, and after a stop)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        window = self._decode(self.ids[self._prefix :])
        if len(window) > len(self._prefix_text) and not window.endswith(REPLACEMENT):
            self.full += window[len(self._prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_text = self._decode(self.ids[self._prefix : self._read])
        return self._progress(final=False)

    def flush(self) -> str:
        """The rest of the text once the sequence ended (an incomplete character as the decoder shows it)."""
        if self.stopped:
            return ""
        if self._read < len(self.ids):
            window = self._decode(self.ids[self._prefix :])
            self.full += window[len(self._prefix_text) :]
            self._prefix = self._read = len(self.ids)
            self._prefix_text = ""
        return self._progress(final=True)

    def _progress(self, final: bool) -> str:
        start = max(0, len(self.text) - self._longest_stop)
        hits = [i for s in self.stop if (i := self.full.find(s, start)) >= 0]
        if hits:
            self.stopped = True
            return self._emit(self.full[: min(hits)])
        return self._emit(self.full if final else self.full[: len(self.full) - self._held()])

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        delta = upto[len(self.text) :]
        self.text = upto
        return delta

    def _held(self) -> int:
        """Characters at the end of `full` that may start a stop string."""
        for k in range(min(self._longest_stop - 1, len(self.full)), 0, -1):
            if any(s.startswith(self.full[-k:]) for s in self.stop):
                return k
        return 0
