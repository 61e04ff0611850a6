"""Training: Stage A Any2Any, Stage B dose fine-tune and ScardNFT (preference fine-tuning).

Entry point for the CLI and the MONAI Label train task: `run_training(TrainConfig, ...)`.
"""

from diffkt3d.training.config import StageConfig, TrainConfig
from diffkt3d.training.scardnft import ScardNFTConfig, run_scardnft
from diffkt3d.training.trainer import Trainer, run_training

__all__ = ["ScardNFTConfig", "StageConfig", "TrainConfig", "Trainer", "run_scardnft", "run_training"]
