"""bench/engine_mix.py at a tiny size: the mixed batches hold several adapters and every row of the table prints."""

from __future__ import annotations

import re

import pytest

from bench import engine_mix
from bench.serve_load import CONFIGS


def test_tiny_run_prints_the_mix_and_each_method(capsys: pytest.CaptureFixture[str]) -> None:
    engine_mix.main(["--adapters", "6", "--repeats", "2", "--methods"])
    text = capsys.readouterr().out
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(r"^\| ([^|]+?) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)}
    assert set(rows) == {"mix of all", *CONFIGS}, text
    count, distinct, none_ms, mixed_ms, ratio = rows["mix of all"]
    assert int(count) == 6 and float(distinct) > 1, "a mixed batch holds several adapters"
    assert float(none_ms) > 0 and float(mixed_ms) > 0 and float(ratio) > 0
