"""The rooms' seam before an LM head's output embeddings (`Method.before_output_embeddings`).

A recording room that doubles the states stands in for a real one: on an init()'d *ForCausalLM the outer
`lm_head` sees the doubled states, on an AdapterModel every causal_lm head does (for its own rows), and
nothing changes while no setup is active.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters_core import AdapterSetup, BatchSplit, init
from adapters_core import model as model_module
from adapters_core.methods.base import Host, Method, OutputRows

from .conftest import build, make_inputs, tiny_config


class _Doubling(Method):
    name = "test_doubling"

    def __init__(self) -> None:
        self.calls: list[tuple[object, int, int, int]] = []

    def before_output_embeddings(self, host: Host, hidden: torch.Tensor, rows: OutputRows) -> torch.Tensor:
        self.calls.append((rows.setup, rows.n_rows, rows.start, int(hidden.shape[0])))
        return hidden * 2


@pytest.fixture
def doubling(monkeypatch: pytest.MonkeyPatch) -> _Doubling:
    room = _Doubling()
    monkeypatch.setattr(model_module, "METHODS", (*model_module.METHODS, room))
    return room


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lm_head_of_an_init_model_sees_the_rooms_states(arch: str, doubling: _Doubling) -> None:
    torch.manual_seed(0)
    model = init(AutoModelForCausalLM.from_config(tiny_config(arch))).eval()
    model.add_adapter("a", "lora")  # identity at init: the backbone output is the bare one
    x = make_inputs(arch)
    with torch.no_grad():
        bare = model(**x, output_hidden_states=True)
        assert doubling.calls == []
        with AdapterSetup("a"):
            out = model(**x, output_hidden_states=True)
        want = model.lm_head(2 * out.hidden_states[-1])
    assert torch.equal(out.logits, want)
    assert torch.equal(out.hidden_states[-1], bare.hidden_states[-1])
    assert [c[1:] for c in doubling.calls] == [(3, 0, 3)]


def test_causal_lm_heads_see_the_rooms_states_for_their_rows(doubling: _Doubling) -> None:
    model = build("gpt2")
    for name in "ab":
        model.add_adapter(name, "lora")
        model.add_causal_lm_head(name)
    x = make_inputs("gpt2", batch=4, pad_last=0)
    setup = BatchSplit("a", "b", batch_sizes=[1, 3])
    with torch.no_grad(), AdapterSetup(setup):
        out = model(**x)
        hidden = model.base_model(**x).last_hidden_state
    for i, (name, rows) in enumerate((("a", slice(0, 1)), ("b", slice(1, 4)))):
        head = model.heads[name]
        with torch.no_grad():
            states = hidden[rows]
            for module in list(head)[:-1]:
                states = module(states)
            want = head.output_embeddings(2 * states)
        assert torch.allclose(out[i].logits, want, atol=1e-6), name
    assert [c[1:] for c in doubling.calls] == [(4, 0, 1), (4, 1, 3)]
