"""The official `openai` Python client, with its defaults, against our OpenAI-compatible routes."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from transformers import BertTokenizerFast

from tests.server.conftest import SENTENCES, Reference, Running, serve, settings_for, upload_files

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, keys_file: Path, tmp_path_factory: pytest.TempPathFactory,
        adapter_factory: Callable[[str, int], Path]) -> Iterator[Running]:
    settings = settings_for(tiny_model_dir, tmp_path_factory.mktemp("store-openai"), api_keys_file=keys_file)
    with serve(settings) as running:
        with running.client("acme-key") as c:
            assert upload_files(c, "oai", adapter_factory("lora", 81)).status_code == 201
        yield running


@pytest.fixture(scope="module")
def client(srv: Running) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="acme-key") as c:
        yield c


def test_embeddings_with_the_clients_defaults(client: openai.OpenAI, adapter_factory: Callable[[str, int], Path],
                                              reference: Reference) -> None:
    """openai-python asks for base64 by default and decodes it to floats: they equal the library's."""
    out = client.embeddings.create(model="oai", input=SENTENCES[:3])
    got = np.array([d.embedding for d in out.data], dtype=np.float32)
    np.testing.assert_allclose(got, reference.embed(adapter_factory("lora", 81), SENTENCES[:3]), atol=1e-5)
    assert [d.index for d in out.data] == [0, 1, 2] and out.usage.prompt_tokens > 0


def test_base64_is_little_endian_float32_of_the_float_form(srv: Running) -> None:
    with srv.client("acme-key") as c:
        floats = c.post("/v1/embeddings", json={"model": "oai", "input": SENTENCES[:2]}).json()["data"]
        packed = c.post("/v1/embeddings", json={"model": "oai", "input": SENTENCES[:2], "encoding_format": "base64"}).json()["data"]
    for f, b in zip(floats, packed, strict=True):
        assert isinstance(b["embedding"], str)
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4"),
                                      np.array(f["embedding"], dtype=np.float32))


def test_token_id_inputs_equal_the_text_they_encode(client: openai.OpenAI, tiny_model_dir: Path) -> None:
    tok = BertTokenizerFast.from_pretrained(str(tiny_model_dir))
    ids = [tok(s)["input_ids"] for s in SENTENCES[:2]]
    by_text = client.embeddings.create(model="oai", input=SENTENCES[:2], encoding_format="float")
    by_ids = client.embeddings.create(model="oai", input=ids, encoding_format="float")
    one = client.embeddings.create(model="oai", input=ids[0], encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in by_ids.data], [d.embedding for d in by_text.data], atol=1e-6)
    np.testing.assert_allclose(one.data[0].embedding, by_text.data[0].embedding, atol=1e-6)


def test_dimensions_other_than_the_models_are_a_clear_422(client: openai.OpenAI) -> None:
    assert len(client.embeddings.create(model="oai", input="fun", dimensions=32).data[0].embedding) == 32
    with pytest.raises(openai.UnprocessableEntityError, match="this model's embeddings have 32 dimensions"):
        client.embeddings.create(model="oai", input="fun", dimensions=16)


@pytest.mark.parametrize(("payload", "detail"), [
    ({"input": [[5, 99999]]}, "token id 99999"),
    ({"input": [[]]}, "empty list of token ids"),
    ({"input": [-1, 5]}, "token id -1"),
    ({"input": []}, "at least one"),
])
def test_bad_token_ids(srv: Running, payload: dict, detail: str) -> None:
    with srv.client("acme-key") as c:
        r = c.post("/v1/embeddings", json={"model": "oai", **payload})
    assert r.status_code == 422 and detail in r.json()["detail"], r.text


def test_models_list_through_the_client(client: openai.OpenAI) -> None:
    assert "oai" in [m.id for m in client.models.list()]


def test_wrong_key_is_an_authentication_error(srv: Running) -> None:
    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="nope", http_client=httpx.Client()) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.embeddings.create(model="oai", input="fun")
