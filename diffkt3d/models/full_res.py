"""Full-resolution cascade stage: a MONAI U-Net on the case grid under the 64^3 Any2Any DiT.

Why: the DiT works on a 64^3 working grid and its outputs are upsampled to the case grid. That
caps quality regardless of training: on OpenKBP the reference dose itself, sent through the 64^3
grid and back, scores 0.82 Gy (dose score) / 1.36 Gy (DVH score), and thin OARs (spinal cord,
larynx) become blocky or vanish in imputed masks. The OpenKBP winner cascaded two U-Nets for the
same reason; here the first network is the DiT and the second is this stage.

The stage reads, at the case's own resolution, the conditions of the target (encoded as the DiT
reads them, in [-1, 1]) and the DiT's coarse prediction of the target upsampled to the case grid
(continuous, before any threshold), and returns:

- dose and CT: a residual added to the coarse prediction. The last layer is zero-initialised, so
  a fresh stage returns the coarse output exactly and training starts from the DiT's answer;
- oar (one channel per OAR, multi-label) and ptv (one channel per prescription level): logits,
  thresholded at sigmoid 0.5 (logit 0); the last layer's bias starts at the logit of a 1 % prior.

With ``coarse_input=False`` the stage never sees the coarse prediction and predicts the target
outright: it is then a plain MONAI BasicUNet with the same inputs, crops, loss and budget, which
is how the benchmark's fair peer is built.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import asdict, dataclass

import torch
from monai.networks.nets import BasicUNet
from torch import Tensor, nn

from diffkt3d.constants import MODALITIES
from diffkt3d.data.encoding import EncodingConfig
from diffkt3d.errors import ConfigError, reject_unknown_fields

FULL_RES_TARGETS: tuple[str, ...] = ("dose", "ct", "oar", "ptv")
# Targets whose stage output is added to the coarse prediction; the others are mask logits.
RESIDUAL_TARGETS: tuple[str, ...] = ("dose", "ct")
MASK_PRIOR = 0.01  # initial foreground probability of a mask stage's logits
MASK_TARGETS: tuple[str, ...] = ("oar", "ptv")
DEFAULT_FEATURES: tuple[int, ...] = (8, 16, 32, 64, 128, 8)
DEFAULT_PTV_LEVELS_GY: tuple[float, ...] = (56.0, 63.0, 70.0)
MIN_CROP = 32

__all__ = ["DEFAULT_FEATURES", "FULL_RES_TARGETS", "MASK_TARGETS", "RESIDUAL_TARGETS", "FullResConfig",
           "FullResStage", "full_res_encoding", "stage_conditions_tensor", "target_channels"]


@dataclass
class FullResConfig:
    """Architecture and inputs of one full-resolution stage; stored with its weights.

    Args:
        target: "dose", "ct", "oar" or "ptv".
        features: BasicUNet features (six ints: five encoder levels and the last decoder's width).
        conditions: modalities read at full resolution, in this channel order. Empty = every
            modality of the base model except the target (resolved by :meth:`resolved`). A
            condition a case lacks enters as -1, the empty value of every encoding.
        coarse_input: read the base model's coarse prediction (and, for dose and CT, add the
            output to it). False = a plain U-Net peer that ignores it.
        crop: (I, J, K) voxels of the training crops; also the sliding window at inference, so
            the network always sees inputs of the size it was trained on (a grid smaller than
            the crop is padded).
        ptv_levels_gy: prescription levels of a ``ptv`` stage, one output channel each
            (masks named ``PTV<level>``).
        coarse_steps: sampling steps of the coarse prediction the stage was trained on (set by
            the trainer). An imputation through the stage samples exactly this many steps, whatever
            the request asks: the stage learned on that prediction, and a 1-step coarse input
            keeps the training precompute affordable on a CPU. None: the request's steps.
    """

    target: str = "dose"
    features: tuple[int, ...] = DEFAULT_FEATURES
    conditions: tuple[str, ...] = ()
    coarse_input: bool = True
    crop: tuple[int, int, int] = (96, 96, 64)
    ptv_levels_gy: tuple[float, ...] = DEFAULT_PTV_LEVELS_GY
    coarse_steps: int | None = None

    def __post_init__(self) -> None:
        self.features = tuple(self.features)
        self.conditions = tuple(self.conditions)
        self.crop = tuple(self.crop)  # type: ignore[assignment]
        self.ptv_levels_gy = tuple(float(v) for v in self.ptv_levels_gy)
        self.validate()

    def validate(self) -> None:
        if self.target not in FULL_RES_TARGETS:
            raise ConfigError(f"full-res stage target must be one of {FULL_RES_TARGETS}, found {self.target!r}")
        if len(self.features) != 6 or not all(isinstance(f, int) and f > 0 for f in self.features):
            raise ConfigError(f"full-res stage features must be six positive ints (BasicUNet), found "
                              f"{list(self.features)}")
        unknown = [m for m in self.conditions if m not in MODALITIES]
        if unknown:
            raise ConfigError(f"full-res stage conditions {unknown} are not modalities; expected some of {MODALITIES}")
        if self.target in self.conditions:
            raise ConfigError(f"full-res {self.target} stage cannot read its own target as a condition "
                              f"(conditions {list(self.conditions)})")
        if len(set(self.conditions)) != len(self.conditions):
            raise ConfigError(f"full-res stage conditions repeat a modality: {list(self.conditions)}")
        # The U-Net halves the crop four times and instance-normalises the deepest level, which
        # needs more than one voxel there: 32 is the smallest side that works.
        if len(self.crop) != 3 or not all(isinstance(c, int) and c >= MIN_CROP for c in self.crop):
            raise ConfigError(f"full-res stage crop must be three ints >= {MIN_CROP}, found {list(self.crop)}")
        if self.coarse_steps is not None and (not isinstance(self.coarse_steps, int) or self.coarse_steps < 1):
            raise ConfigError(f"full-res stage coarse_steps must be an int >= 1 or null, found {self.coarse_steps!r}")
        if self.target == "ptv" and (not self.ptv_levels_gy or any(v <= 0 for v in self.ptv_levels_gy)):
            raise ConfigError(f"a full-res ptv stage needs positive prescription levels, found "
                              f"{list(self.ptv_levels_gy)}")

    def resolved(self, base_modalities: tuple[str, ...]) -> FullResConfig:
        """This config with explicit conditions, checked against the base model's modalities.

        The base model's conditions for the target are what the stage reads by default: the
        stage must be usable on every case the base model is.
        """
        missing = [m for m in self.conditions if m not in base_modalities]
        if missing:
            raise ConfigError(f"full-res stage conditions {missing} are not modalities of the base model "
                              f"{list(base_modalities)}")
        if self.target not in base_modalities:
            raise ConfigError(f"the base model was not trained with target {self.target!r}; its modalities: "
                              f"{list(base_modalities)}")
        if self.conditions:
            return self
        conds = tuple(m for m in base_modalities if m != self.target)
        return FullResConfig(**{**asdict(self), "conditions": conds})

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> FullResConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"full-res stage config must be a mapping, found {type(data).__name__}")
        reject_unknown_fields(data, cls, "full-res stage config")
        return cls(**data)


def full_res_encoding(encoding: EncodingConfig, shape: tuple[int, ...]) -> EncodingConfig:
    """The base model's encoding with the case grid as working grid: same channels, window, scale.

    Encoding a case onto its own grid makes every resampling an identity, so the stage reads the
    very values the DiT reads, at full resolution.
    """
    return EncodingConfig(grid=tuple(int(s) for s in shape), oar_channels=encoding.oar_channels,
                          ct_window_hu=encoding.ct_window_hu, dose_scale_gy=encoding.dose_scale_gy,
                          modalities=encoding.modalities, ptv_resampling=encoding.ptv_resampling)


def target_channels(config: FullResConfig, encoding: EncodingConfig) -> int:
    """Output channels: one per OAR channel of the base encoding, one per PTV level, else one."""
    if config.target == "oar":
        return len(encoding.oar_channels)
    if config.target == "ptv":
        return len(config.ptv_levels_gy)
    return 1


def coarse_channels(config: FullResConfig, encoding: EncodingConfig) -> int:
    """Channels of the coarse prediction the stage reads (the base model's channels of the target)."""
    return encoding.channels()[config.target] if config.target in encoding.channels() else 1


class FullResStage(nn.Module):
    """(conditions at full res [+ coarse prediction]) -> BasicUNet -> residual or mask logits.

    Inputs are tensors in the [-1, 1] encoding on the case grid (or a crop of it):
    ``conditions`` (B, sum of condition channels, ...) in ``config.conditions`` order and
    ``coarse`` (B, coarse channels, ...). The output is in the same encoding: for dose and CT the
    refined target (coarse + residual, or the U-Net's answer without coarse input), for masks
    the logits.
    """

    def __init__(self, config: FullResConfig, encoding: EncodingConfig):
        super().__init__()
        if not config.conditions and not config.coarse_input:
            raise ConfigError(f"full-res {config.target} stage reads nothing: no conditions and coarse_input false")
        self.config = config
        self.encoding = encoding
        channels = encoding.channels()
        unknown = [m for m in config.conditions if m not in channels]
        if unknown:
            raise ConfigError(f"full-res stage conditions {unknown} are not in the base encoding {list(channels)}")
        self.condition_channels = sum(channels[m] for m in config.conditions)
        self.coarse_channels = coarse_channels(config, encoding) if config.coarse_input else 0
        self.out_channels = target_channels(config, encoding)
        with contextlib.redirect_stdout(io.StringIO()):  # BasicUNet prints its features; stdout is the CLI's
            self.net = BasicUNet(spatial_dims=3, in_channels=self.condition_channels + self.coarse_channels,
                                 out_channels=self.out_channels, features=config.features)
        final = self.net.final_conv.conv if hasattr(self.net.final_conv, "conv") else self.net.final_conv
        if self.residual:
            nn.init.zeros_(final.weight)
            nn.init.zeros_(final.bias)
        elif config.target in MASK_TARGETS:
            # Organs fill ~1 % of a crop: start every logit at that prior instead of p = 0.5, or the
            # first hundreds of steps (the bias moves ~lr per step) are spent learning "background".
            nn.init.constant_(final.bias, math.log(MASK_PRIOR / (1.0 - MASK_PRIOR)))

    @property
    def residual(self) -> bool:
        """Whether the output is added to the coarse prediction (dose/CT with coarse input)."""
        return self.config.coarse_input and self.config.target in RESIDUAL_TARGETS

    def network_input(self, conditions: Tensor, coarse: Tensor | None) -> Tensor:
        """The U-Net's input: conditions, then the coarse prediction when the stage reads it."""
        if conditions.shape[1] != self.condition_channels:
            raise ConfigError(f"full-res {self.config.target} stage expects {self.condition_channels} condition "
                              f"channels ({list(self.config.conditions)}), found {conditions.shape[1]}")
        if not self.config.coarse_input:
            return conditions
        if coarse is None or coarse.shape[1] != self.coarse_channels:
            found = None if coarse is None else coarse.shape[1]
            raise ConfigError(f"full-res {self.config.target} stage expects a coarse prediction with "
                              f"{self.coarse_channels} channels, found {found}")
        if coarse.shape[2:] != conditions.shape[2:]:
            raise ConfigError(f"coarse prediction grid {tuple(coarse.shape[2:])} differs from the conditions' "
                              f"{tuple(conditions.shape[2:])}")
        return torch.cat([conditions, coarse.to(conditions.dtype)], dim=1)

    def forward(self, conditions: Tensor, coarse: Tensor | None = None) -> Tensor:
        """The raw U-Net output: the residual (dose/CT with coarse input), the target or the logits.

        The residual is returned, not added, so that callers add it in physical units (Gy, HU) and
        a fresh stage's zero reproduces the coarse output to the bit.
        """
        return self.net(self.network_input(conditions, coarse))

    def combine(self, coarse: Tensor | None, out: Tensor) -> Tensor:
        """The refined target in the encoding: coarse + residual for dose/CT, else ``out`` itself."""
        if self.residual:
            assert coarse is not None
            return coarse + out
        return out


def stage_conditions_tensor(volumes: dict[str, Tensor], config: FullResConfig, encoding: EncodingConfig,
                            shape: tuple[int, ...]) -> Tensor:
    """(C, *shape) float32: the stage's conditions in order; a missing one is -1 (empty)."""
    channels = encoding.channels()
    parts = []
    for m in config.conditions:
        v = volumes.get(m)
        parts.append(v.float() if v is not None else torch.full((channels[m], *shape), -1.0))
    return torch.cat(parts) if parts else torch.zeros((0, *shape))

