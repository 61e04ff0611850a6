"""Inference: dose prediction and imputation on a case's own grid."""

from diffkt3d.inference.predictor import (
    Candidate,
    DosePrediction,
    ImputationResult,
    Predictor,
    default_model_path,
)

__all__ = ["Candidate", "DosePrediction", "ImputationResult", "Predictor", "default_model_path"]
