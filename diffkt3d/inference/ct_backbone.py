"""Which backbone imputes the CT: the Any2Any DiT (default) or a PRDiT checkpoint.

PRDiT (docs/method.md) generates the CT at voxel level without an autoencoder; in our product it is an
alternative CT-imputation backbone selected by config. One :class:`CTImputationConfig` is parsed
once from the CLI flags (``diffkt3d impute --target ct --ct-backbone prdit --prdit-model F``) or the
server's ``--conf`` strings (``ct_backbone``, ``prdit_model``, ``prdit_k``, ``prdit_sampler``) and
flows down to :class:`~diffkt3d.inference.prdit_predictor.PRDiTCTPredictor`, which answers ``impute(case, "ct", steps, seed)`` with the
same ``ImputationResult`` as the Any2Any ``Predictor``, so the CLI and the ``impute_ct`` task need no
PRDiT-specific code beyond picking the predictor. This module imports no torch (the CLI parser uses it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from diffkt3d.constants import PRDIT_DEFAULT_K
from diffkt3d.errors import ConfigError

__all__ = ["CT_BACKBONES", "PRDIT_SAMPLERS", "PRDIT_DEFAULT_K", "CTImputationConfig"]

CT_BACKBONES = ("any2any", "prdit")
PRDIT_SAMPLERS = ("predictor-corrector", "ancestral")



@dataclass
class CTImputationConfig:
    """CT-imputation backbone selection.

    Args:
        backbone: "any2any" (the served Any2Any DiT checkpoint, the default) or "prdit".
        prdit_model: PRDiT checkpoint written by ``diffkt3d.training.prdit_trainer`` (required for
            "prdit"; it stores its own data encoding).
        prdit_k: predictor multiplier k of Algorithm 1 (>= 1; 1 = the cold deterministic sampler);
            default ``constants.PRDIT_DEFAULT_K`` (why 1: see there).
        prdit_sampler: "predictor-corrector" (Algorithm 1) or "ancestral".
    """

    backbone: str = "any2any"
    prdit_model: Path | None = None
    prdit_k: float = PRDIT_DEFAULT_K
    prdit_sampler: str = "predictor-corrector"

    def __post_init__(self) -> None:
        if self.prdit_model is not None and str(self.prdit_model) != "":
            self.prdit_model = Path(self.prdit_model)
        else:
            self.prdit_model = None
        self.prdit_k = float(self.prdit_k)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the bad field, expected vs found."""
        if self.backbone not in CT_BACKBONES:
            raise ConfigError(f"ct_backbone must be one of {CT_BACKBONES}, found {self.backbone!r}")
        if self.prdit_sampler not in PRDIT_SAMPLERS:
            raise ConfigError(f"prdit_sampler must be one of {PRDIT_SAMPLERS}, found {self.prdit_sampler!r}")
        if not self.prdit_k >= 1.0:
            raise ConfigError(f"prdit_k (predictor multiplier) must be >= 1, found {self.prdit_k}")
        if self.backbone == "prdit":
            if self.prdit_model is None:
                raise ConfigError("ct_backbone 'prdit' needs a PRDiT checkpoint (prdit_model / --prdit-model)")
            if not self.prdit_model.is_file():
                raise ConfigError(f"PRDiT checkpoint not found: {self.prdit_model}")

    @property
    def uses_prdit(self) -> bool:
        return self.backbone == "prdit"

    @classmethod
    def from_conf(cls, conf: Mapping[str, str]) -> CTImputationConfig:
        """From MONAI Label ``--conf`` strings: ``ct_backbone``, ``prdit_model``, ``prdit_k``, ``prdit_sampler``.

        Raises:
            ConfigError: bad value (e.g. a k that is not a number), naming the key.
        """
        try:
            k = float(conf.get("prdit_k", cls.prdit_k))
        except ValueError:
            raise ConfigError(f"prdit_k must be a number, found {conf.get('prdit_k')!r}") from None
        return cls(backbone=str(conf.get("ct_backbone", cls.backbone)), prdit_model=conf.get("prdit_model") or None,
                   prdit_k=k, prdit_sampler=str(conf.get("prdit_sampler", cls.prdit_sampler)))
