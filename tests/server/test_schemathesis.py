"""Schemathesis over the real server's OpenAPI schema, with seeded adapters so every operation reaches its logic.

The server runs with API keys; two adapters (one with a classification head) and an AdapterFusion over
bottleneck adapters are uploaded first. Generated cases keep their shape from the schema, but names in path
parameters and in request bodies are drawn mostly from the seeded adapters, so operations answer from their
real logic instead of a 404. Every operation must return at least one answer other than 404, and no answer
may be a 5xx, break its documented response schema, or use an undocumented status code.
"""

from __future__ import annotations

import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from tests.server.conftest import Running, auth, make_fusion, serve, settings_for, upload_files

pytestmark = pytest.mark.slow

KEY = "acme-key"
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]
EXAMPLES_PER_OPERATION = 30
# Kept stable by re-uploading after every generated DELETE, so later cases still find them.
SEEDED = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, keys_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    store = tmp_path_factory.mktemp("store-schemathesis")
    settings_ = settings_for(tiny_model_dir, store, api_keys_file=keys_file, max_upload_mb=2, max_inputs=8)
    with serve(settings_) as running:
        yield running


@pytest.fixture(scope="module")
def seeded(srv: Running, tiny_model_dir: Path, adapter_factory: Callable[[str, int], Path],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folders = {"alpha": adapter_factory("seq_bn", 31), "beta": adapter_factory("lora", 32),
               "gamma": adapter_factory("par_bn", 33)}
    fusion = make_fusion(tiny_model_dir, {"alpha": folders["alpha"], "gamma": folders["gamma"]},
                         tmp_path_factory.mktemp("schemathesis-fusion") / "f", seed=34)
    with srv.client(KEY) as c:
        for name, folder in folders.items():
            assert upload_files(c, name, folder).status_code == 201
        assert upload_files(c, "fused", fusion).status_code == 201
    return folders


def _names() -> st.SearchStrategy[str]:
    return st.sampled_from(SEEDED)


def _composition() -> st.SearchStrategy[Any]:
    return st.one_of(
        _names(),
        st.lists(_names(), min_size=1, max_size=3).map(lambda xs: {"stack": xs}),
        st.lists(_names(), min_size=2, max_size=3).map(lambda xs: {"parallel": xs}),
        st.just({"fuse": ["alpha", "gamma"]}),
        st.lists(_names(), min_size=2, max_size=2).map(lambda xs: {"average": xs, "weights": [0.3, 0.7]}),
    )


def _seed_body(body: Any) -> st.SearchStrategy[Any]:
    """Replace the adapter names of a generated JSON body with seeded ones (most of the time)."""
    if not isinstance(body, dict):
        return st.just(body)
    replacements: dict[str, st.SearchStrategy[Any]] = {}
    if "adapters" in body:
        replacements["adapters"] = _composition()
    if "model" in body:
        replacements["model"] = _names()
    if "inputs" in body:
        replacements["inputs"] = st.lists(st.sampled_from(["the movie was great", "a very boring film", "fun"]),
                                          min_size=1, max_size=4)
    if "input" in body:
        replacements["input"] = st.one_of(st.just("love the music score"), st.lists(st.just("sad"), min_size=1, max_size=3))
    if not replacements:
        return st.just(body)
    seeded = st.fixed_dictionaries(replacements).map(lambda r: {**body, **r})
    return st.one_of(seeded, seeded, seeded, st.just(body))


@pytest.fixture(scope="module")
def schema(srv: Running, seeded: dict[str, Path]) -> Any:
    loaded = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    loaded.config.base_url = srv.url

    @loaded.hook("map_path_parameters")
    def _seed_path(context: Any, path_parameters: dict[str, Any] | None) -> dict[str, Any] | None:
        if path_parameters and "name" in path_parameters:
            path_parameters["name"] = SEEDED[zlib.crc32(str(path_parameters["name"]).encode()) % len(SEEDED)]
        return path_parameters

    @loaded.hook("flatmap_body")
    def _seed(context: Any, body: Any) -> st.SearchStrategy[Any]:
        return _seed_body(body)

    return loaded


def _restore(srv: Running, folders: dict[str, Path]) -> None:
    """Re-upload any seeded adapter a generated DELETE removed."""
    with srv.client(KEY) as c:
        for name, folder in folders.items():
            if c.get(f"/v1/adapters/{name}").status_code == 404:
                assert upload_files(c, name, folder).status_code == 201


def _can_be_invalid(operation: Any) -> bool:
    """Whether the operation takes any input that a negative case could break (a body or a parameter)."""
    definition = operation.definition.raw
    return bool(definition.get("requestBody") or definition.get("parameters"))


def _fuzz(operation: Any, mode: GenerationMode, srv: Running, seeded: dict[str, Path], statuses: Counter[int]) -> None:
    """Run one operation's generated cases in one mode, counting the answers by status."""
    deletes = operation.method.upper() == "DELETE"

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call_and_validate(headers=auth(KEY), checks=CHECKS)
        statuses[response.status_code] += 1
        if deletes:
            _restore(srv, seeded)

    run()


def test_every_operation_conforms_and_reaches_its_logic(srv: Running, schema: Any, seeded: dict[str, Path]) -> None:
    statuses: dict[str, Counter[int]] = defaultdict(Counter)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 11
    for operation in sorted(operations, key=lambda op: op.method.upper() == "DELETE"):
        label = f"{operation.method.upper()} {operation.path}"
        _fuzz(operation, GenerationMode.POSITIVE, srv, seeded, statuses[label])
        if _can_be_invalid(operation):
            try:
                _fuzz(operation, GenerationMode.NEGATIVE, srv, seeded, statuses[label])
            except Unsatisfiable:
                pass  # nothing in its schema can be made invalid in a form HTTP can carry
    unreached = {label: dict(counts) for label, counts in statuses.items() if set(counts) <= {404}}
    assert not unreached, f"operations that only ever answered 404: {unreached}"
    assert len(statuses) == len(operations)
