"""Inference: dose prediction and imputation on a case's own grid, and their results."""

from diffkt3d.inference.predictor import Predictor, default_model_path
from diffkt3d.inference.result import (
    DOSE_RESULT_SCHEMA,
    Candidate,
    CaseInfo,
    DosePrediction,
    ImputationResult,
)

__all__ = ["DOSE_RESULT_SCHEMA", "Candidate", "CaseInfo", "DosePrediction", "ImputationResult", "Predictor",
           "default_model_path"]
