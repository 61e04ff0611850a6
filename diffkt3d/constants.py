"""Constants shared by training, inference, the server and the Slicer logic.

Defined once here: change a value here and every layer follows. The Slicer module cannot import
this package; its copies (slicer_extension/DiffKT3D/DiffKT3DLib/constants.py) carry the same names
and tests/slicer_extension/test_lib_units.py checks they still equal these.
"""

from __future__ import annotations

# The seven modalities of the DiffKT3D paper, in slot order (the 4D RoPE slot index is the
# position in this tuple, so never reorder: checkpoints depend on it).
MODALITIES: tuple[str, ...] = ("ct", "ptv", "oar", "body", "beam", "angle", "dose")

# Modalities a user may ask the model to impute (besides dose prediction).
IMPUTABLE: tuple[str, ...] = ("ct", "ptv", "oar")

# CT window (HU) used before scaling to [-1, 1] (paper supplement B.1).
CT_WINDOW_HU: tuple[float, float] = (-1000.0, 1000.0)

# Dose normalisation: Gy / DOSE_SCALE_GY maps the highest usual prescription to ~1 before the
# affine map to [-1, 1]. 80 Gy leaves head-room for hot spots above 70 Gy (PTV70 D1 ~ 75 Gy).
DOSE_SCALE_GY: float = 80.0

# OpenKBP structure names (the benchmark's 7 OARs and 3 PTVs).
OPENKBP_OARS: tuple[str, ...] = (
    "Brainstem",
    "SpinalCord",
    "RightParotid",
    "LeftParotid",
    "Esophagus",
    "Larynx",
    "Mandible",
)
OPENKBP_PTVS: tuple[str, ...] = ("PTV56", "PTV63", "PTV70")
OPENKBP_FRACTIONS: int = 35
# OpenKBP plans: 9 coplanar 6 MV fields at 0, 40, ..., 320 degrees (documented preset).
OPENKBP_GANTRY_ANGLES_DEG: tuple[float, ...] = tuple(float(a) for a in range(0, 360, 40))

# Source-axis distance of a linac (mm), used to rasterise the beam plate.
SAD_MM: float = 1000.0

# File names inside a case folder (docs/case-format.md).
CT_FILE = "ct.nii.gz"
DOSE_FILE = "dose.nii.gz"
BODY_FILES: tuple[str, ...] = ("possible_dose_mask.nii.gz", "body.nii.gz")
PLAN_FILE = "plan.json"
BEAM_FILE = "beam_plate.nii.gz"
ANGLE_FILE = "angle_plate.nii.gz"

# The one default of the predictor multiplier k of PRDiT's Algorithm 1 (docs/method.md) for CT imputation: the
# CLI (--prdit-k), the server (prdit_k), ``diffkt3d.models.prdit.impute.impute_ct`` /
# ``PRDiTImputer.impute_case`` and ``sample_predictor_corrector`` all default to it. 1 = the cold
# deterministic sampler. Why 1 and not the paper's best k = 2: a single imputed CT is judged
# voxel-wise (MAE in HU), and in benchmarks/results/prdit_ct.md (cpu-small, 48^3, 10 steps,
# 10 OpenKBP validation cases) k = 1 had the lowest case-grid MAE of k = 1 / 2 / 3:
# 316 / 335 / 367 HU (2026-12-01 run; case-grid PSNR 24.4 / 24.3 / 23.9 dB; only the working-grid
# PSNR favoured k = 2 / 3). The paper's gains for k > 1 are in FID / MMD (sample realism), which we do
# not measure; k stays a config switch.
PRDIT_DEFAULT_K = 1.0

# Defaults of a prediction request, shared by `Predictor`, the CLI (`predict`, `impute`, `evaluate`),
# the server's `dose` / `impute_*` tasks, the benchmarks and (as copies) the Slicer panel.
# Euler steps of the flow sampler (network evaluations per candidate).
DEFAULT_STEPS: int = 10
# Steps of a preview (live segment editing): one network evaluation.
PREVIEW_STEPS: int = 1
DEFAULT_SEED: int = 0
DEFAULT_CANDIDATES: int = 1
# How the returned dose is picked from the candidates: "best" = highest Scorecard total,
# "mean" = the voxel-wise mean of the candidates.
AGGREGATES: tuple[str, ...] = ("best", "mean")
DEFAULT_AGGREGATE: str = "best"
# The shipped Scorecard template (diffkt3d/scorecard/templates/openkbp_hn.yaml).
DEFAULT_TEMPLATE: str = "openkbp_hn"
