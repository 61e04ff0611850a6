"""Configuration and named size presets of PRDiT.

A :class:`PRDiTConfig` fully describes the architecture of :class:`~diffkt3d.models.prdit.model.PRDiT`;
checkpoints store ``config.to_dict()`` and loading rebuilds the model with
``PRDiTConfig.from_dict(...)``, from the file alone. Pick a preset with :func:`get_config` and
override single fields.

Paper values (PRDiT A.9 tables 9-10, docs/method.md): patch 12, stride 8, padding 2, local MLP ratio 1.0
(hidden = C * 12^3 = 1728), global DiT depth 4 / 8 / 12 with hidden 768 or 1152 and 12 or 16 heads,
MLP ratio 4, T = 1000 training timesteps. The paper does not say which width goes with which depth;
the ``paper-*`` presets below pair 768 / 12 heads with depth 4 and 1152 / 16 heads with depths 8 and
12 (our guess, stated here so nobody mistakes it for a published pairing).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from diffkt3d.errors import ConfigError, reject_unknown_fields

__all__ = ["PRDiTConfig", "PRDiTConfigError", "PRESETS", "get_config", "CT_IMPUTATION_CONDITIONS"]


class PRDiTConfigError(ConfigError, ValueError):
    """Invalid PRDiT config or preset name (a ``ConfigError`` for the CLI, a ``ValueError`` for the API)."""


# Conditions of the CT-imputation model in channel order, with channel counts as produced by
# ``diffkt3d.data.encoding`` (ptv: prescription map, 1 channel; oar: the 7 OpenKBP OARs; body: mask).
CT_IMPUTATION_CONDITIONS: dict[str, int] = {"ptv": 1, "oar": 7, "body": 1}


@dataclass
class PRDiTConfig:
    """Architecture of PRDiT (local MLP denoiser + global residual DiT).

    Args:
        in_channels: channels C of the generated volume (CT: 1).
        conditions: condition name -> channels, in channel order (empty = unconditional, the
            paper's setting). Condition volumes are patchified like the target and enter the local
            denoiser through a zero-initialised linear projection added to the flattened noisy patch
            (width stays C * p^3 as in the paper), and the global DiT as part of its token input.
        patch_size: cubic patch edge p in voxels (paper 12).
        stride: patch stride s in voxels (paper 8); each patch predicts its central s^3 voxels.
        padding: voxels added on every side of the volume before patch extraction (paper 2).
            Must satisfy p = s + 2 * padding so that patch i is centred on stride cell i and the
            outputs tile the volume exactly (no overlap = ``patch_size == stride``, ``padding 0``).
        pad_mode: ``torch.nn.functional.pad`` mode for that padding ("constant" = zeros,
            "replicate", "reflect").
        local_mlp_ratio: SwiGLU hidden width / (C * p^3) in the local denoiser (paper 1.0).
        time_freq_dim: width of the sinusoidal timestep features (fp32).
        time_dim: width h of the shared base time embedding c = TimeEmbed(t).
        global_depth: number of DiT blocks of the global residual DiT (paper 4 / 8 / 12; 0 builds
            no global module = the local denoiser alone, the "w/o global DiT" ablation).
        global_hidden: token width of the global DiT (must be divisible by 6 for the 3D sin/cos
            positions and by ``global_heads``).
        global_heads: attention heads of the global DiT.
        global_mlp_ratio: GELU MLP hidden / token width in the DiT blocks (paper 4.0).
        num_timesteps: T of the forward process x_t = cos(pi t / 2T) x + sin(pi t / 2T) eps.
        eps: LayerNorm epsilon.
    """

    in_channels: int = 1
    conditions: dict[str, int] = field(default_factory=dict)
    patch_size: int = 12
    stride: int = 8
    padding: int = 2
    pad_mode: str = "constant"
    local_mlp_ratio: float = 1.0
    time_freq_dim: int = 256
    time_dim: int = 256
    global_depth: int = 4
    global_hidden: int = 768
    global_heads: int = 12
    global_mlp_ratio: float = 4.0
    num_timesteps: int = 1000
    eps: float = 1e-6

    def __post_init__(self) -> None:
        self.conditions = {str(k): int(v) for k, v in dict(self.conditions).items()}
        self.validate()

    # -- derived sizes -----------------------------------------------------------------------
    @property
    def cond_channels(self) -> int:
        """Total condition channels C_c (sum over ``conditions``)."""
        return sum(self.conditions.values())

    @property
    def patch_dim(self) -> int:
        """d = C * p^3, the flattened noisy-patch width (the local denoiser's residual width)."""
        return self.in_channels * self.patch_size**3

    @property
    def cond_patch_dim(self) -> int:
        """C_c * p^3, the flattened condition-patch width (0 when unconditional)."""
        return self.cond_channels * self.patch_size**3

    @property
    def out_dim(self) -> int:
        """C * s^3 voxels each of x_hat and eps_hat predicted per patch (the stride cell)."""
        return self.in_channels * self.stride**3

    @property
    def overlapping(self) -> bool:
        return self.patch_size > self.stride

    def validate(self) -> None:
        """Raise :class:`PRDiTConfigError` naming every field that cannot build a model."""
        problems = []
        for name in ("in_channels", "patch_size", "stride", "time_freq_dim", "time_dim", "num_timesteps"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, found {getattr(self, name)}")
        if self.padding < 0:
            problems.append(f"padding must be >= 0, found {self.padding}")
        if self.patch_size != self.stride + 2 * self.padding:
            problems.append(
                f"patch_size must equal stride + 2 * padding so patches are centred on the stride grid; "
                f"found patch_size {self.patch_size}, stride {self.stride}, padding {self.padding}"
            )
        if self.pad_mode not in ("constant", "replicate", "reflect"):
            problems.append(f"pad_mode must be constant, replicate or reflect, found {self.pad_mode!r}")
        if any(c < 1 for c in self.conditions.values()):
            problems.append(f"condition channels must be >= 1, found {self.conditions}")
        if self.time_freq_dim % 2:
            problems.append(f"time_freq_dim must be even (cos/sin halves), found {self.time_freq_dim}")
        if self.local_mlp_ratio <= 0:
            problems.append(f"local_mlp_ratio must be > 0, found {self.local_mlp_ratio}")
        if self.global_depth < 0:
            problems.append(f"global_depth must be >= 0, found {self.global_depth}")
        if self.global_depth > 0:
            if self.global_hidden < 6 or self.global_hidden % 6:
                problems.append(
                    f"global_hidden must be a positive multiple of 6 (3D sin/cos), found {self.global_hidden}"
                )
            if self.global_heads < 1 or self.global_hidden % max(self.global_heads, 1):
                problems.append(
                    f"global_hidden {self.global_hidden} is not divisible by global_heads {self.global_heads}"
                )
            if self.global_mlp_ratio <= 0:
                problems.append(f"global_mlp_ratio must be > 0, found {self.global_mlp_ratio}")
        if problems:
            raise PRDiTConfigError("invalid PRDiTConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict for checkpoints."""
        out = dataclasses.asdict(self)
        out["conditions"] = dict(self.conditions)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PRDiTConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error (no silent ignore)."""
        reject_unknown_fields(data, cls, "PRDiTConfig", PRDiTConfigError)
        return cls(**data)


def _tiny() -> PRDiTConfig:
    """Unit-test size: patch 6 / stride 4 / padding 1, one DiT block of width 24 (milliseconds)."""
    return PRDiTConfig(
        patch_size=6,
        stride=4,
        padding=1,
        time_freq_dim=32,
        time_dim=32,
        global_depth=1,
        global_hidden=24,
        global_heads=2,
    )


def _cpu_small() -> PRDiTConfig:
    """CPU benchmark size for 48^3 volumes: the paper's patch geometry halved (6 / 4 / 1).

    48^3 / 4^3 = 1728 tokens, like the paper's 12 / 8 / 2 on a 96^3 volume; local width
    d = 216, global DiT depth 4, width 96, 4 heads.
    """
    return PRDiTConfig(
        patch_size=6,
        stride=4,
        padding=1,
        time_freq_dim=64,
        time_dim=96,
        global_depth=4,
        global_hidden=96,
        global_heads=4,
    )


def _cpu_default() -> PRDiTConfig:
    """Paper patch geometry (12 / 8 / 2) with a CPU-sized global DiT (depth 4, width 192, 4 heads)."""
    return PRDiTConfig(global_depth=4, global_hidden=192, global_heads=4)


def _paper(depth: int, hidden: int, heads: int):
    def make() -> PRDiTConfig:
        return PRDiTConfig(global_depth=depth, global_hidden=hidden, global_heads=heads)

    make.__doc__ = (
        f"Paper PRDiT-{depth}L: patch 12 / 8 / 2, DiT depth {depth}, width {hidden}, {heads} heads."
    )
    return make


PRESETS = {
    "tiny": _tiny,
    "cpu-small": _cpu_small,
    "cpu-default": _cpu_default,
    "paper-4l": _paper(4, 768, 12),
    "paper-8l": _paper(8, 1152, 16),
    "paper-12l": _paper(12, 1152, 16),
}


def get_config(name: str, **overrides: Any) -> PRDiTConfig:
    """Preset ``name`` with fields replaced by ``overrides``.

    Raises:
        PRDiTConfigError (a ValueError): unknown preset (lists the presets) or unknown field.
    """
    if name not in PRESETS:
        raise PRDiTConfigError(f"unknown PRDiT preset {name!r}; presets: {sorted(PRESETS)}")
    base = PRESETS[name]().to_dict()
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise PRDiTConfigError(
            f"unknown PRDiTConfig fields {unknown} for preset {name!r}; known: {sorted(base)}"
        )
    base.update(overrides)
    return PRDiTConfig.from_dict(base)
