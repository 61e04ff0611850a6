"""PRDiT: pixel-level residual diffusion transformer (docs/method.md) as an alternative CT backbone.

Local MLP denoiser on overlapping 3D patches (stage 1) + global residual DiT (stage 2),
predictor-corrector sampling with multiplier k, low -> high resolution refinement, CT imputation.
"""

from diffkt3d.models.prdit.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from diffkt3d.models.prdit.config import CT_IMPUTATION_CONDITIONS, PRESETS, PRDiTConfig, get_config
from diffkt3d.models.prdit.impute import PRDiTImputer, hu_to_unit, impute_ct, unit_to_hu
from diffkt3d.models.prdit.model import PRDiT, prdit_loss, q_sample, stack_conditions
from diffkt3d.models.prdit.multires import PRDiTHighRes, refiner_config
from diffkt3d.models.prdit.sampler import sample_ancestral, sample_predictor_corrector

__all__ = [
    "CT_IMPUTATION_CONDITIONS",
    "PRESETS",
    "PRDiT",
    "PRDiTConfig",
    "PRDiTHighRes",
    "PRDiTImputer",
    "get_config",
    "hu_to_unit",
    "impute_ct",
    "load_checkpoint",
    "prdit_loss",
    "q_sample",
    "read_checkpoint",
    "refiner_config",
    "sample_ancestral",
    "sample_predictor_corrector",
    "save_checkpoint",
    "stack_conditions",
    "unit_to_hu",
]
