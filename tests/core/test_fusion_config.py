"""Tests for the AdapterFusion configs: names, defaults, overrides, AdapterHub JSON."""

from __future__ import annotations

import dataclasses

import pytest

from adapters_core import (
    AdapterFusionConfig,
    DynamicAdapterFusionConfig,
    StaticAdapterFusionConfig,
)


def test_fusion_configs() -> None:
    dynamic = AdapterFusionConfig.load("dynamic")
    assert type(dynamic) is DynamicAdapterFusionConfig
    assert dynamic.to_dict() == {
        "key": True,
        "query": True,
        "value": True,
        "query_before_ln": False,
        "regularization": True,
        "residual_before": False,
        "temperature": False,
        "value_before_softmax": True,
        "value_initialized": True,
        "dropout_prob": None,
    }
    static = AdapterFusionConfig.load("static", temperature=True)
    assert type(static) is StaticAdapterFusionConfig
    assert (static.value, static.regularization, static.value_initialized, static.temperature) == (
        False,
        False,
        False,
        True,
    )
    assert AdapterFusionConfig.load(dynamic.to_dict()) == dynamic
    assert AdapterFusionConfig.load(dynamic) is dynamic
    assert AdapterFusionConfig.from_dict(static.to_dict()) == static
    with pytest.raises(ValueError, match="unknown AdapterFusion config name 'fancy'"):
        AdapterFusionConfig.load("fancy")
    with pytest.raises(ValueError, match="missing required"):
        AdapterFusionConfig.from_dict({"key": True})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bogus'\]"):
        AdapterFusionConfig.load({**dynamic.to_dict(), "bogus": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        dynamic.key = False  # type: ignore[misc]
