"""Incremental detokenization: the deltas add up to the whole decode, stop strings cut across tokens."""

from __future__ import annotations

from pathlib import Path

from server.scheduling.detokenize import Detokenizer
from tests.server.gen_support import make_tokenizer


def test_deltas_add_up_to_the_full_decode_also_through_split_characters(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path)
    text = "the movie was great: ünïcödé ✓ and 漢字 😀 paris is the capital."
    ids = tok(text, add_special_tokens=False)["input_ids"]

    def decode(x: list[int]) -> str:
        return str(tok.decode(x, skip_special_tokens=True))

    d = Detokenizer(decode)
    deltas = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(deltas) == decode(ids) == text
    assert all("\ufffd" not in x for x in deltas)


def test_stop_strings_across_tokens_and_held_back_prefixes(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path)
    ids = tok("once upon a time a small robot", add_special_tokens=False)["input_ids"]

    def decode(x: list[int]) -> str:
        return str(tok.decode(x, skip_special_tokens=True))

    d = Detokenizer(decode, stop=["e a s", "zzz"])
    out = ""
    for i in ids:
        out += d.push(i)
        assert "e a" not in out or d.stopped
        if d.stopped:
            break
    assert d.stopped and out == "once upon a tim"
