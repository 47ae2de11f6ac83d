"""LoRAConfig: low-rank updates of attention and MLP weights (Hu et al., 2021) [``lora``]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...configuration import UNSUPPORTED, AdapterConfigBase, register_architecture, register_config_names

__all__ = ["LoRAConfig"]


@dataclass(frozen=True, eq=False, kw_only=True)
class LoRAConfig(AdapterConfigBase):
    """Low-rank updates of attention/MLP weights (Hu et al., 2021) [``lora``]; scaling = alpha / r."""

    architecture: ClassVar[str | None] = "lora"
    _writes_architecture: ClassVar[bool] = True

    selfattn_lora: bool = True
    intermediate_lora: bool = False
    output_lora: bool = False
    leave_out: tuple[int, ...] = ()
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    attn_matrices: tuple[str, ...] = ("q", "v")
    composition_mode: str = "add"
    init_weights: str = "lora"
    init_weights_seed: int | None = None
    use_gating: bool = False
    use_dora: bool = False
    vera_d: float | None = None
    vera_b: float | None = None
    dtype: str | None = None

    @property
    def scaling(self) -> float:
        """The factor applied to B @ A: alpha / r."""
        return self.alpha / self.r

    def method_label(self) -> str:
        return "ia3" if self.composition_mode == "scale" else "lora"

    def _validate(self) -> None:
        self._check_range("r", 1)
        if self.alpha <= 0:
            self._fail("alpha", "must be > 0")
        self._check_range("dropout", 0.0, 1.0)
        bad = [m for m in self.attn_matrices if m not in ("q", "k", "v", "o")]
        if bad:
            self._fail("attn_matrices", f"entries {bad} are not among 'q', 'k', 'v', 'o'")
        if len(set(self.attn_matrices)) != len(self.attn_matrices):
            self._fail("attn_matrices", "entries must be unique")
        self._check_choice("composition_mode", ("add", "scale"))
        if self.composition_mode == "scale" and self.r != 1:
            self._fail("r", "composition_mode='scale' (IA3) requires r=1")
        if self.init_weights == "vera":
            self._fail("init_weights", f"VeRA {UNSUPPORTED}")
        self._check_choice("init_weights", ("lora", "bert", "ia3"))
        if self.use_gating:
            self._fail("use_gating", f"LoRA gating {UNSUPPORTED}")
        if self.use_dora:
            self._fail("use_dora", f"DoRA {UNSUPPORTED}")
        for name in ("vera_d", "vera_b"):
            if getattr(self, name) is not None:
                self._fail(name, f"VeRA {UNSUPPORTED}")
        self._check_leave_out()


register_architecture("lora", LoRAConfig)
register_config_names(lora=LoRAConfig)
