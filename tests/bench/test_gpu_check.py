"""bench/gpu_check.py's CPU smoke: every section runs at tiny sizes, prints its header and passes its checks."""

from __future__ import annotations

import pytest

from bench import gpu_check


def test_small_cpu_run_prints_every_section(capsys: pytest.CaptureFixture[str]) -> None:
    rc = gpu_check.main(["--device", "cpu", "--small", "--threads", "2"])
    text = capsys.readouterr().out
    assert text.startswith("# gpu_check: ")
    assert "torch " in text.splitlines()[0] and "command `python bench/gpu_check.py --device cpu --small" in text
    for number, title in gpu_check.SECTIONS.items():
        assert f"## {number}. {title}" in text
    assert "section failed" not in text and "skipped" not in text
    assert "FAIL" not in text
    assert rc == 0, text


def test_budget_stops_new_sections(capsys: pytest.CaptureFixture[str]) -> None:
    rc = gpu_check.main(["--device", "cpu", "--small", "--budget-s", "0"])
    text = capsys.readouterr().out
    assert text.count("- skipped: ") == len(gpu_check.SECTIONS)
    assert rc == 0


def test_a_failing_section_does_not_stop_the_run(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(state: gpu_check.State) -> None:
        raise RuntimeError("boom")

    # the backbone, a broken section, then one that needs no adapters: it still runs, and so does the summary
    monkeypatch.setattr(gpu_check, "RUNS", {1: gpu_check.section_backbone, 2: broken, 6: gpu_check.section_memory})
    rc = gpu_check.main(["--device", "cpu", "--small", "--threads", "2"])
    text = capsys.readouterr().out
    assert "RuntimeError: boom" in text
    after = text.split("## 2. ")[1]
    assert "## 6. " in after and "- section 6 took" in after and "## summary" in after
    assert "sections failed: [2]" in text and rc == 1


def test_without_cuda_the_default_run_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_check.main(["--small"]) == 2
    assert "--device cpu --small" in capsys.readouterr().out


def test_cuda_only_branches_with_torch_cuda_faked(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Sync counting, the memory table and the device name, on CPU tensors with torch.cuda's calls faked (one
    synchronising op reported per forward or step), so the GPU run meets no untried code there."""
    import warnings

    import torch

    def sync_debug_mode(mode: str) -> None:
        if mode == "warn":  # as if the counted forward or step synchronised once
            warnings.warn("called a synchronizing CUDA operation", stacklevel=2)

    monkeypatch.setattr(gpu_check.State, "cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", sync_debug_mode)
    for name, mib in (("memory_allocated", 5), ("max_memory_allocated", 7), ("memory_reserved", 9)):
        monkeypatch.setattr(torch.cuda, name, lambda *a, n=mib: n * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    rc = gpu_check.main(["--device", "cpu", "--small", "--threads", "2"])
    text = capsys.readouterr().out
    assert "device Fake GPU" in text.splitlines()[0]
    assert "no host sync per layer in a mixed forward: **PASS** (1 syncs" in text
    assert "no host sync per layer in a decode step (bare (block None)): **PASS** (1 syncs" in text
    assert "| sync call site | count |" in text
    assert "| float32 copy | 5 | 7 | 9 |" in text
    assert rc == 0, text
