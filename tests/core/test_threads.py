"""Many threads, one model instance: each thread's AdapterSetup is its own.

Eight threads run 200 forward passes each on one tiny Llama (GQA, sdpa), each under a different setup
(single, Stack, BatchSplit, Average, Parallel, prefix, LoRA, a bare row; two of them with prediction
heads), overlapping through a barrier. Every result must equal the single-threaded reference.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from adapters_core import AdapterSetup, Average, BatchSplit, Fuse, Parallel, Stack
from adapters_core.routing import ForwardContext

from .tiny_models import (
    METHODS,
    add_adapter,
    add_noise,
    build,
    hidden_states,
    one_torch_thread,
    padded_inputs,
)

ITERATIONS = 200
SYNC_EVERY = 25  # the threads meet at a barrier this often, so their forwards keep overlapping
TIMEOUT = 120.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    model = build("llama", "sdpa")
    adapters = {"bn": "seq_bn", "bn2": "seq_bn", "lo": "lora", "pt": METHODS["prefix_tuning"], "par": "par_bn"}
    for seed, (name, config) in enumerate(adapters.items()):
        add_adapter(model, name, config, seed=500 + seed)
    model.add_classification_head("h_bn", num_labels=3, set_active=False)
    model.add_classification_head("h_lo", num_labels=3, set_active=False)
    add_noise(model, list(model.heads.parameters()), seed=600)
    return model.eval()


def _result(out: object) -> torch.Tensor:
    """Head logits when a head ran (several heads: concatenated), else the backbone's last hidden state."""
    parts = getattr(out, "head_outputs", None)
    if parts is not None:
        return torch.cat([_result(p).reshape(-1) for p in parts])
    logits = getattr(out, "logits", None)
    return logits if logits is not None else hidden_states(out)


def _setups() -> list[tuple[object, object]]:
    """(adapter setup, head setup) per thread; two of them run prediction heads."""
    return [
        ("bn", "h_bn"),
        (Stack("bn", "bn2"), None),
        (BatchSplit("bn", "lo", batch_sizes=[1, 1]), BatchSplit("h_bn", "h_lo", batch_sizes=[1, 1])),
        (Average("bn", "bn2", weights=[1, 3]), None),
        (Parallel("bn", "lo"), None),
        ("pt", None),
        ("lo", None),
        (BatchSplit(None, "pt", batch_sizes=[1, 1]), None),
    ]


def _forward(model: torch.nn.Module, inputs: dict, setup: object, head: object) -> torch.Tensor:
    with torch.no_grad(), AdapterSetup(setup, head_setup=head):
        return _result(model(**inputs))


def _inputs() -> dict:
    return padded_inputs("llama", [5, 3], "right", seed=61)  # batch 2, seq 5, second row padded


def test_eight_threads_each_see_only_their_own_setup(model: torch.nn.Module) -> None:
    setups = _setups()
    inputs = _inputs()
    references = [_forward(model, inputs, s, h) for s, h in setups]
    # The references differ pairwise, so a thread that ran another thread's setup would be caught.
    for i in range(len(references)):
        for j in range(i + 1, len(references)):
            a, b = references[i], references[j]
            assert a.shape != b.shape or not torch.allclose(a, b, atol=1e-4), f"setups {i} and {j} agree"

    barrier = threading.Barrier(len(setups), timeout=TIMEOUT)
    failures: list[str] = []
    counts = [0] * len(setups)

    def worker(k: int) -> None:
        setup, head = setups[k]
        try:
            barrier.wait()
            for it in range(ITERATIONS):
                if it and it % SYNC_EVERY == 0:
                    barrier.wait()
                with torch.no_grad(), AdapterSetup(setup, head_setup=head) as ctx:
                    assert AdapterSetup.get_context() is ctx
                    got = _result(model(**inputs))
                assert ForwardContext.current() is None and AdapterSetup.get_context() is None
                diff = float((got - references[k]).abs().max()) if got.shape == references[k].shape else float("inf")
                if diff > 1e-6:
                    failures.append(f"thread {k} ({setup!r}), iteration {it}: differs by {diff:.3g}")
                    barrier.abort()
                    return
                counts[k] += 1
        except Exception as exc:
            barrier.abort()
            failures.append(f"thread {k} ({setup!r}): {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(k,), name=f"setup-{k}") for k in range(len(setups))]
    _run_all(threads, failures)
    assert counts == [ITERATIONS] * len(setups)
    # and afterwards, on this thread, every setup still gives its reference
    for (setup, head), ref in zip(setups, references, strict=True):
        assert torch.equal(_forward(model, inputs, setup, head), ref)


def test_heads_are_present_for_the_threaded_test(model: torch.nn.Module) -> None:
    """Two of the eight threads run prediction heads."""
    assert set(model.heads) == {"h_bn", "h_lo"}
    out = _forward(model, _inputs(), *_setups()[0])
    assert out.shape == (2, 3)


def test_failing_threads_do_not_disturb_the_others(model: torch.nn.Module) -> None:
    """Threads whose forward raises a ValueError leave no state behind that other threads, or their own
    next pass, could see."""
    inputs = _inputs()
    good = [("pt", None), (BatchSplit("lo", "bn", batch_sizes=[1, 1]), None)]
    bad = [
        BatchSplit("bn", "lo", batch_sizes=[1, 2]),  # rejected before the forward
        Fuse("bn", "bn2"),  # no fusion layer was added
    ]
    references = [_forward(model, inputs, s, h) for s, h in good]
    n = len(good) + len(bad)
    barrier = threading.Barrier(n, timeout=TIMEOUT)
    failures: list[str] = []

    def good_worker(k: int) -> None:
        setup, head = good[k]
        try:
            barrier.wait()
            for it in range(ITERATIONS // 4):
                got = _forward(model, inputs, setup, head)
                if not torch.equal(got, references[k]):
                    failures.append(f"good thread {k} ({setup!r}) iteration {it} differs")
                    return
        except Exception as exc:
            barrier.abort()
            failures.append(f"good thread {k}: {type(exc).__name__}: {exc}")

    def bad_worker(k: int) -> None:
        try:
            barrier.wait()
            for it in range(ITERATIONS // 4):
                try:
                    _forward(model, inputs, bad[k], None)
                except ValueError:
                    pass
                else:
                    failures.append(f"bad thread {k} ({bad[k]!r}) iteration {it} did not raise")
                    return
                if ForwardContext.current() is not None or AdapterSetup.get_context() is not None:
                    failures.append(f"bad thread {k}: a context was left behind after the error")
                    return
            # after all those errors this thread's own plain forward is the backbone's
            if not torch.equal(_forward(model, inputs, None, None), base):
                failures.append(f"bad thread {k}: the bare forward changed after the errors")
        except Exception as exc:
            barrier.abort()
            failures.append(f"bad thread {k}: {type(exc).__name__}: {exc}")

    base = _forward(model, inputs, None, None)
    threads = [threading.Thread(target=good_worker, args=(k,)) for k in range(len(good))]
    threads += [threading.Thread(target=bad_worker, args=(k,)) for k in range(len(bad))]
    _run_all(threads, failures)


def _run_all(threads: list[threading.Thread], failures: list[str]) -> None:
    """Start the threads, wait for them (bounded), and fail with the first recorded failures."""
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not failures, "\n".join(failures[:10])
