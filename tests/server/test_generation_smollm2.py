"""The embedded chat backbone through the server: a short greedy chat answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.execution.builtin_models import is_converted
from server.settings import builtin_model_dir, resolve_model_path
from tests.server.conftest import serve, settings_for


@pytest.mark.slow
def test_smollm2_answers_a_chat_question_through_the_server(tmp_path: Path) -> None:
    assert is_converted(builtin_model_dir("smollm2")), "`make install` runs `adapterserve convert smollm2`"
    settings = settings_for(Path(resolve_model_path("smollm2")), tmp_path, torch_threads=1)
    with serve(settings) as running, running.client(timeout=120) as c:
        backbone = c.get("/v1/models").json()["data"][0]["id"]
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        r = c.post("/v1/chat/completions", json={"model": backbone, "messages": messages, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "The capital of France is Paris."
        assert r.json()["choices"][0]["finish_reason"] == "stop"
