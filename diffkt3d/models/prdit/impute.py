"""CT imputation with PRDiT: the function ``diffkt3d impute --target ct`` and the server call.

Inputs and output follow ``diffkt3d.data.encoding``: condition volumes on the working grid in
[-1, 1]; the CT comes back in [-1, 1], i.e. CT_WINDOW_HU (-1000..1000 HU) scaled linearly
(``encoding.decode_ct`` maps it to HU on the case grid).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffkt3d.constants import CT_WINDOW_HU, PRDIT_DEFAULT_K
from diffkt3d.data.case import Case
from diffkt3d.data.encoding import EncodingConfig, decode_ct, encode_modality
from diffkt3d.errors import ConfigError
from diffkt3d.flow.sampler import StepCallback
from diffkt3d.models.prdit.checkpoint import load_checkpoint, read_checkpoint
from diffkt3d.models.prdit.model import PRDiT, stack_conditions
from diffkt3d.models.prdit.multires import PRDiTHighRes
from diffkt3d.models.prdit.sampler import sample_ancestral, sample_predictor_corrector

__all__ = ["impute_ct", "unit_to_hu", "hu_to_unit", "PRDiTImputer"]

log = logging.getLogger(__name__)


def hu_to_unit(ct_hu: Tensor) -> Tensor:
    """HU -> [-1, 1] over CT_WINDOW_HU (clipped), the scaling every CT model input uses."""
    lo, hi = CT_WINDOW_HU
    return (ct_hu.clamp(lo, hi) - lo) / (hi - lo) * 2.0 - 1.0


def unit_to_hu(ct_unit: Tensor) -> Tensor:
    """[-1, 1] -> HU over CT_WINDOW_HU (inverse of :func:`hu_to_unit` inside the window)."""
    lo, hi = CT_WINDOW_HU
    return lo + (ct_unit.clamp(-1.0, 1.0) + 1.0) * 0.5 * (hi - lo)


@torch.no_grad()
def impute_ct(model: PRDiT | PRDiTHighRes, conditions: Mapping[str, Tensor] | None, steps: int = 20,
              k: float = PRDIT_DEFAULT_K,
              generator: torch.Generator | None = None, *, shape: tuple[int, ...] | None = None,
              sampler: str = "predictor-corrector", use_global: bool = True,
              on_step: StepCallback | None = None) -> Tensor:
    """Sample a CT given the other modalities.

    Args:
        model: a trained PRDiT (or low -> high resolution PRDiT) with ``in_channels == 1``.
        conditions: name -> (B, C, D, H, W) in [-1, 1], the names and channels of
            ``model.config.conditions`` (e.g. ptv, oar, body); None / empty for an unconditional model.
        steps: sampler steps L.
        k: predictor multiplier of Algorithm 1 (1 = cold deterministic); the default is the
            product's ``diffkt3d.constants.PRDIT_DEFAULT_K`` (why: see there).
        generator: seeds x_T and the corrector noise (same seed, same CT).
        shape: (B, D, H, W) for an unconditional model (conditions give it otherwise).
        sampler: "predictor-corrector" (Algorithm 1) or "ancestral".
        use_global: False drops the global DiT (ablation; ignored for the high-resolution model).
        on_step: progress / cancellation hook, called after every sampler step (as the flow
            sampler's ``on_step``).

    Returns:
        (B, 1, D, H, W) float32 CT in [-1, 1].

    Raises:
        ValueError: wrong condition names / shapes, missing ``shape``, unknown sampler, or a
            volume size that is not a multiple of the patch stride.
    """
    cfg = model.config
    if cfg.in_channels != 1:
        raise ValueError(f"impute_ct needs a 1-channel (CT) model, found in_channels {cfg.in_channels}")
    if conditions:
        first = next(iter(conditions.values()))
        b, spatial, device = first.shape[0], tuple(first.shape[2:]), first.device
    elif shape is not None and len(shape) == 4:
        b, spatial, device = shape[0], tuple(shape[1:]), torch.device("cpu")
    else:
        raise ValueError("impute_ct needs conditions or shape=(B, D, H, W)")
    x_T = torch.randn((b, 1, *spatial), generator=generator).to(device)
    cond = stack_conditions(conditions, cfg, x_T)
    denoise = model.denoiser(cond, use_global=use_global)
    model.eval()
    log.debug("impute_ct: batch %d, grid %s, %d steps, k=%g, %s sampler", b, spatial, steps, k, sampler)
    if sampler == "predictor-corrector":
        out = sample_predictor_corrector(denoise, x_T, steps, k=k, num_timesteps=cfg.num_timesteps, generator=generator,
                                         on_step=on_step)
    elif sampler == "ancestral":
        out = sample_ancestral(denoise, x_T, steps, num_timesteps=cfg.num_timesteps, generator=generator,
                               on_step=on_step)
    else:
        raise ValueError(f"sampler must be 'predictor-corrector' or 'ancestral', found {sampler!r}")
    return out.sample.float().clamp(-1.0, 1.0)


class PRDiTImputer:
    """A PRDiT CT-imputation model with its data encoding: case in, CT in HU on the case grid out.

    This is what ``diffkt3d impute --target ct`` / the server task call when the configured
    backbone is PRDiT.

    Args:
        model: trained PRDiT / PRDiTHighRes whose ``config.conditions`` are modalities of
            ``diffkt3d.data.encoding`` (e.g. ptv, oar, body).
        encoding: the ``EncodingConfig`` the model was trained with (working grid, OAR order, window).
    """

    def __init__(self, model: PRDiT | PRDiTHighRes, encoding: EncodingConfig):
        self.model = model.eval()
        self.encoding = encoding

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> PRDiTImputer:
        """Rebuild model and encoding from a checkpoint written with ``encoding=...``.

        Raises:
            ConfigError: the checkpoint lacks the encoding (names the file).
        """
        enc = read_checkpoint(path)["preprocessing"].get("encoding")
        if not enc:
            raise ConfigError(f"PRDiT checkpoint {path}: no data encoding stored; cannot map cases to model inputs")
        return cls(load_checkpoint(path), EncodingConfig.from_dict(enc))

    def impute_case(self, case: Case, steps: int = 10, k: float = PRDIT_DEFAULT_K, seed: int = 0,
                    sampler: str = "predictor-corrector", on_step: StepCallback | None = None) -> np.ndarray:
        """CT of ``case`` in HU, (I, J, K) float32 on the case grid; -1000 HU (air) outside the body.

        ``k`` defaults to ``PRDIT_DEFAULT_K``, the same default as the CLI and server (``prdit_k``).

        Raises:
            CaseError: a condition the model needs cannot be built from the case (e.g. no body mask).
        """
        conds = {name: encode_modality(case, name, self.encoding)[None] for name in self.model.config.conditions}
        g = torch.Generator().manual_seed(int(seed))
        shape = (1, *self.encoding.grid)
        x = impute_ct(self.model, conds, steps=steps, k=k, generator=g, shape=shape,
                      sampler=sampler, on_step=on_step)  # (1, 1, D, H, W)
        ct = decode_ct(x[0], case.grid, self.encoding)
        if case.body is not None:  # outside the body is air, as the Any2Any predictor does
            ct = np.where(case.body, ct, self.encoding.ct_window_hu[0])
        return ct.astype(np.float32)
