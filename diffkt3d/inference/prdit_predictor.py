"""PRDiT CT imputation behind the ``Predictor.impute`` interface.

Selected by :class:`~diffkt3d.inference.ct_backbone.CTImputationConfig`; returns the same
:class:`~diffkt3d.inference.result.ImputationResult` as the Any2Any ``Predictor`` so the CLI and
the ``impute_ct`` server task treat both backbones alike.
"""

from __future__ import annotations

import hashlib
import logging
import time

from diffkt3d.constants import DEFAULT_SEED, DEFAULT_STEPS
from diffkt3d.data.case import Case
from diffkt3d.errors import ConfigError
from diffkt3d.flow.sampler import StepCallback
from diffkt3d.inference.ct_backbone import CTImputationConfig
from diffkt3d.inference.quality import target_quality
from diffkt3d.inference.result import ImputationResult
from diffkt3d.models.prdit.checkpoint import read_checkpoint
from diffkt3d.models.prdit.impute import PRDiTImputer

__all__ = ["PRDiTCTPredictor"]

log = logging.getLogger(__name__)


class PRDiTCTPredictor:
    """A PRDiT CT-imputation checkpoint behind the ``Predictor.impute`` interface (CPU).

    Args:
        imputer: the loaded model with its data encoding.
        config: sampler settings (k, sampler).
        model_version: reported with every result (``prdit:<file>@<sha256[:12]>``).
    """

    def __init__(self, imputer: PRDiTImputer, config: CTImputationConfig, model_version: str,
                 meta: dict | None = None):
        self.imputer = imputer
        self.config = config
        self.model_version = model_version
        self.meta = meta or {}  # the checkpoint's metadata: its quality record gates the CT target

    @classmethod
    def load(cls, config: CTImputationConfig) -> PRDiTCTPredictor:
        """Load ``config.prdit_model``.

        Raises:
            ConfigError: no PRDiT backbone configured, or the file is not a usable PRDiT checkpoint.
        """
        if not config.uses_prdit or config.prdit_model is None:
            raise ConfigError("PRDiTCTPredictor needs ct_backbone 'prdit' and a prdit_model")
        path = config.prdit_model
        imputer = PRDiTImputer.from_checkpoint(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        version = f"prdit:{path.stem}@{digest}"
        log.info("loaded PRDiT CT model %s (%s parameters, grid %s)", version,
                 f"{sum(p.numel() for p in imputer.model.parameters()):,}", imputer.encoding.grid)
        meta = read_checkpoint(path).get("meta") or {}
        return cls(imputer, config, version, meta if isinstance(meta, dict) else {})

    def impute(self, case: Case, target: str, steps: int = DEFAULT_STEPS, seed: int = DEFAULT_SEED,
               on_step: StepCallback | None = None) -> ImputationResult:
        """CT of ``case`` in HU on the case grid, -1000 HU outside the body.

        ``on_step`` as in ``Predictor.impute``: called after each of the ``steps`` sampler steps (a
        PRDiT checkpoint has no full-res stage), so a server reports and cancels either backbone alike.

        Raises:
            ConfigError: ``target`` is not "ct" (PRDiT is a CT backbone only).
            CaseError: the case lacks a condition the model needs (e.g. the body mask).
        """
        if target != "ct":
            raise ConfigError(f"the PRDiT backbone imputes CT only, not {target!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, found {steps}")
        t0 = time.perf_counter()
        ct_hu = self.imputer.impute_case(case, steps=int(steps), k=self.config.prdit_k, seed=int(seed),
                                         sampler=self.config.prdit_sampler, on_step=on_step)
        total = round(time.perf_counter() - t0, 4)
        return ImputationResult(target="ct", ct_hu=ct_hu, steps=int(steps), seed=int(seed),
                                model_version=self.model_version,
                                timings={"total_s": total, "sample_s": total}).gate(self.meta)

    def quality(self) -> dict[str, dict]:
        """The quality gate's verdict on the CT target (``inference.quality``)."""
        return {"ct": target_quality(self.meta, "ct").to_dict()}
