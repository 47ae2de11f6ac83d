"""Keys file parsing, hashing, lookup; settings' open-mode bind rule; CLI hash-key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from server.cli import main
from server.http.auth import KeyRing, hash_key, parse_keys
from server.settings import Settings


def test_lookup_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"sha256": hash_key("k1"), "tenant": "acme", "role": "tenant"}]}))
    ring = KeyRing(path)
    p = ring.lookup("k1")
    assert p is not None and p.tenant == "acme" and not p.is_admin
    assert ring.lookup("nope") is None
    assert ring.tenants() == {"acme"}
    path.write_text(json.dumps({"keys": [{"sha256": hash_key("k2"), "tenant": "beta", "role": "admin"}]}))
    os.utime(path, (1, 1))
    p2 = ring.lookup("k2")
    assert p2 is not None and p2.is_admin and ring.lookup("k1") is None


@pytest.mark.parametrize(
    "data,match",
    [
        ({}, "keys"),
        ({"keys": [{"sha256": "zz", "tenant": "a"}]}, "64 hex"),
        ({"keys": [{"sha256": "0" * 64, "tenant": "_shared"}]}, "tenant"),
        ({"keys": [{"sha256": "0" * 64, "tenant": "a", "role": "root"}]}, "role"),
    ],
)
def test_bad_keys_files(data: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_keys(data, "keys.json")


def test_open_mode_refuses_public_bind(tmp_path: Path) -> None:
    Settings(host="127.0.0.1").check_bind()
    with pytest.raises(ValueError, match="refusing to bind"):
        Settings(host="0.0.0.0").check_bind()
    keys = tmp_path / "k.json"
    keys.write_text('{"keys": []}')
    Settings(host="0.0.0.0", api_keys_file=keys).check_bind()
    assert main(["serve", "--host", "0.0.0.0", "--store", str(tmp_path / "s")]) == 2


def test_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("ADAPTERSERVE_DTYPE", "bfloat16")
    monkeypatch.setenv("ADAPTERSERVE_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("ADAPTERSERVE_API_KEYS_FILE", "")
    s = Settings()
    assert (s.max_batch_size, s.dtype, s.log_level, s.api_keys_file) == (7, "bfloat16", "debug", None)
    assert s.model_path.endswith("model")


def test_hash_key_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash-key", "secret"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("secret")
    assert main(["hash-key", "secret", "--tenant", "acme", "--role", "admin"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry == {"sha256": hash_key("secret"), "tenant": "acme", "role": "admin"}
