"""The library's stack cache reservation (stacked weights kept between mixed batches, and the slot pools' free
rows) is inside the server's adapter cache budget, so resident adapters plus that overhead stay within ADAPTER_CACHE_MB."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from server.settings import Settings
from tests.server.conftest import serve, settings_for, upload_files

pytestmark = pytest.mark.slow


def test_default_stack_cache_is_an_eighth_of_the_adapter_cache_at_most_64_mb() -> None:
    assert Settings(adapter_cache_mb=512).stack_cache_bytes == 64 << 20
    assert Settings(adapter_cache_mb=8).stack_cache_bytes == 1 << 20
    assert Settings(adapter_cache_mb=8, stack_cache_mb=0).stack_cache_bytes == 0
    with pytest.raises(ValueError, match="stack_cache_mb .* must be less than adapter_cache_mb"):
        Settings(adapter_cache_mb=8, stack_cache_mb=8)


def test_mixed_batches_keep_adapters_and_stacks_within_the_budget(
        tiny_model_dir: Path, adapter_factory: Callable[[str, int], Path], tmp_path: Path) -> None:
    """Twelve LoRAs in one batch take the gathered path, which reads their weights from the slot pools: the
    pools' free rows stay under the reserved part and the residency budget is what is left of the adapter cache."""
    folders = [adapter_factory("lora", 700 + i) for i in range(12)]
    one = sum(p.stat().st_size for p in folders[0].glob("*.safetensors"))
    adapter_mb, stack_mb = 40 * one / 2**20, 3 * one / 2**20
    settings = settings_for(tiny_model_dir, tmp_path / "store", inference_worker=False, max_wait_ms=200,
                            adapter_cache_mb=adapter_mb, stack_cache_mb=stack_mb)
    with serve(settings) as srv, srv.client() as c:
        for i, folder in enumerate(folders):
            assert upload_files(c, f"l{i}", folder).status_code == 201
        rt = srv.app.state.runtime
        model = rt.engine.model
        assert rt.residency.budget == settings.adapter_cache_bytes - settings.stack_cache_bytes
        assert model._host.stack_cache.limit == settings.stack_cache_bytes

        def embed(i: int) -> int:
            return c.post("/v1/embeddings", json={"model": f"l{i % 12}", "input": "the movie was great"}).status_code

        for _ in range(3):
            with ThreadPoolExecutor(12) as pool:
                assert set(pool.map(embed, range(24))) == {200}
            # the gathered path reads the resident LoRAs from their slot pools: nothing is stacked, and the pools'
            # free rows (plus any stacks) stay within the reserved part, give or take the one row a full pool grows by
            slots = model._host.stack_cache.slots
            assert model.stack_cache_nbytes() == 0 and slots.stats()["rows"] > 0
            row = max(p.row_bytes for p in slots._pools.values())
            overhead = slots.free_nbytes + model.stack_cache_nbytes()
            assert overhead <= settings.stack_cache_bytes + row
            resident = sum(rt.engine.model.adapter_nbytes(n) for n in rt.residency.resident())
            assert resident + overhead <= settings.adapter_cache_bytes + row
