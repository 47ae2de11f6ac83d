"""Checking an adapter folder against a model without touching the model: a probe load on a meta-device copy.

Mixed into the adapter mixin (`self` is the model); the model supplies `_new_skeleton()`, a fresh copy of its
architecture that this module builds on the meta device once and keeps.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .configuration import AdapterConfigBase, method_name

__all__ = ["NAME_CHARS", "AdapterInfo", "InspectionAPI"]

_INSPECT_LOCK = threading.Lock()
NAME_CHARS = frozenset(  # what an adapter name may hold
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter folder holds, checked against a model without loading it."""

    name: str
    method: str
    config: AdapterConfigBase
    nbytes: int
    n_params: int
    has_head: bool
    source_format: str


class InspectionAPI:
    """inspect_adapter_dir and the meta-device copy it (and fusion inspection) probes."""

    def inspect_adapter_dir(self, path: str | os.PathLike[str], allow_pickle: bool = False) -> AdapterInfo:
        """Validate a folder against this model's architecture without touching this model.

        The probe load runs on a copy of the architecture on the meta device (shapes only, no memory), so
        it checks every key and shape like load_adapter does, and any thread may call it while this model
        serves forward passes.
        """
        with self._inspection() as skeleton:
            return skeleton._probe(path, allow_pickle)  # type: ignore[no-any-return]

    @contextmanager
    def _inspection(self) -> Iterator[Any]:
        """This model's meta-device copy, held under the inspection lock while the caller probes it."""
        with _INSPECT_LOCK, torch.device("meta"):
            skeleton = self.__dict__.get("_skeleton")  # kept out of _modules: not part of this model's state
            if skeleton is None:
                skeleton = self.__dict__["_skeleton"] = self._new_skeleton()
            yield skeleton

    def _new_skeleton(self) -> Any:
        raise NotImplementedError

    def _probe(self: Any, path: str | os.PathLike[str], allow_pickle: bool) -> AdapterInfo:
        files = self.read_adapter_files(path, allow_pickle)
        self._check_compatible(files)
        probe = "__probe__" + files.name.replace(".", "_")[:40]
        probe = "".join(c if c in NAME_CHARS else "_" for c in probe)
        try:
            self.load_adapter(path, load_as=probe, allow_pickle=allow_pickle)
            nbytes = self.adapter_nbytes(probe)
            n_params = sum(p.numel() for p in self.adapter_parameters(probe))
        finally:
            if self.has_adapter(probe):
                self.delete_adapter(probe)
        return AdapterInfo(files.name, method_name(files.config), files.config, nbytes, n_params,
                           files.head_config is not None, "peft" if "peft_type" in files.meta else "adapterhub")
