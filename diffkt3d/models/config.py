"""Configuration and named size presets of the Any2Any DiT.

A :class:`DiTConfig` fully describes the architecture; checkpoints store ``config.to_dict()`` and
loading rebuilds the model with ``DiTConfig.from_dict(...)``, from the file alone. CLIs and apps
pick a preset with :func:`get_config` and override single fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from diffkt3d.constants import MODALITIES, OPENKBP_OARS
from diffkt3d.errors import ConfigError, reject_unknown_fields

__all__ = ["DiTConfig", "DiTConfigError", "PRESETS", "get_config", "default_in_channels"]


class DiTConfigError(ConfigError, ValueError):
    """Invalid model config or preset name.

    A ``ConfigError`` (so the CLI prints one line) and a ``ValueError`` (the API promise).
    """


def default_in_channels() -> dict[str, int]:
    """Channels per modality: 1 each, the 7 OpenKBP OARs stacked as 7 channels of ``oar``."""
    channels = {m: 1 for m in MODALITIES}
    channels["oar"] = len(OPENKBP_OARS)
    return channels


@dataclass
class DiTConfig:
    """Architecture of :class:`diffkt3d.models.any2any_dit.Any2AnyDiT`.

    Args:
        modalities: modality names in slot order. The position of a modality in this tuple is
            its 4D-RoPE slot index and its domain-embedding row, so reordering changes the
            model (checkpoints depend on it). Default ``constants.MODALITIES``.
        in_channels: channels per modality of the input volumes ``(B, C_m, D, H, W)``; also the
            number of output channels when that modality is the target. Default 1 each and 7
            for ``oar`` (one channel per OpenKBP OAR).
        patch: patch size in voxels (of the working grid) along (D, H, W); the Conv3d patch
            embedding uses kernel = stride = patch. Input sizes must be multiples of it.
        dim: token width (hidden size).
        depth: number of DiT blocks.
        heads: attention heads; ``dim // heads`` is the head dim, which must be even (RoPE
            rotates pairs of channels) and at least 8.
        ffn_dim: hidden width of the GELU(tanh) feed-forward network.
        freq_dim: width of the sinusoidal timestep embedding (Wan: 256).
        eps: epsilon of the LayerNorms and q/k RMSNorms (Wan: 1e-6).
        rope_theta: RoPE base period (Wan: 10000).
        qk_norm: RMSNorm over all heads of q and k before RoPE (Wan: True).
        time_scale: the flow time t in [0, 1] is embedded as sinusoid(t * time_scale); 1000
            matches Wan, whose timesteps run over [0, 1000].
        rope_slot_dims: head-dim channels given to the RoPE slot (modality) axis; ``None`` =
            ``max(2, 2 * (head_dim // 16))``. See ``layers.rope_axis_dims``.
        rope_slot_stride: 0 (default) gives the slot axis its own ``rope_slot_dims`` channels
            (the paper's d = d_S + d_D + d_H + d_W). > 0 selects the Wan-compatible layout used
            for Wan 2.1 weight transfer: the whole head dim is split like Wan's t/h/w
            (``layers.wan_rope_axis_dims``, 44/42/42 for head dim 128) and the slot enters as a
            D-position offset ``slot * rope_slot_stride``, i.e. the modalities are laid out as
            consecutive clips along Wan's time axis. With one modality the offset cancels in q.k
            (RoPE is relative), so the RoPE is exactly Wan's 3D RoPE; the stride must be >= the
            number of D tokens so clips of different modalities never share a position.
        gradient_checkpointing: recompute each block in the backward pass (saves activation
            memory on GPU at ~30 % more compute; only active in ``train()`` mode).
        zero_init_modulation: adaLN-Zero (DiT): zero ``time_projection`` and block modulation
            tables so every block starts as the identity. Good when training from scratch; set
            False to keep Wan's random modulation init (weights are loaded anyway).
        condition_shortcut: add the mean of the condition tokens' patch embeddings at the same
            spatial position to each target token, before the blocks. Not in the paper (there all
            cross-modal information flows through attention, whose spatial alignment a pretrained
            Wan already brings). From scratch on a CPU budget the plain model spends its first
            ~500 steps predicting the unconditional mean (measured: 1-step validation error 26 Gy
            at step 400); this aligned shortcut gives every target token its own position's
            anatomy at layer 0. Separate tokens, role/domain embeddings, 4D RoPE and full attention
            are unchanged; it is a no-op with one modality. Off for ``wan-1.3b``.
        prediction: what the output head parameterises. "v": the head outputs the velocity
            directly (Wan, latent space). "x0": the head outputs the clean target x0_hat and the
            model returns v_hat = (x_t - x0_hat) / max(t, x0_min_t), so training (v-loss), the
            flow and the sampler are unchanged. In voxel space a token carries prod(patch) * C
            values (512 for patch 8) through a `dim`-wide (128) bottleneck: a v-head cannot
            reproduce the noise part of v = eps - x0 and its 1-step x0 estimate keeps ~0.9 of the
            noise (measured: 24-26 Gy validation error after 300-500 steps, stuck at the
            unconditional mean); x0 lies on a low-dimensional manifold and passes the bottleneck
            (the "x-prediction" argument of Li & He, "Back to Basics: Let Denoising Generative
            Models Denoise", 2025).
        x0_min_t: lower clamp of t in the x0 -> v conversion (avoids dividing by ~0).
        dose_prior_falloffs: falloff factors per working-grid voxel of the geometric dose prior
            basis maps (``models.dose_prior``); empty (default) = no prior. When set (x0 head
            only), the dose head outputs per voxel a residual plus one weight per basis map and
            x0_hat = 2 * sum_j (w0_j + w_j) * P_j - 1 + residual whenever the prescription map
            (``ptv``) is a condition; without it the residual alone is x0_hat. Not in the paper:
            a patch-linear head cannot draw the PTV-edge dose gradient (module docstring).
        dose_prior_weights: w0, the initial mix of the basis maps (one per falloff), fitted on
            OpenKBP train cases so that a fresh model starts from the prior itself.
        dose_prior_reach: reach of the spread in voxels (the prior is 0 beyond it).
        dose_refiner_width: hidden width of the voxel-level dose refiner; 0 (default) = none.
            When > 0 (x0 head only), the dose head also emits ``dose_refiner_features`` feature
            channels per voxel, and a small convolutional network at working-grid resolution
            reads them together with the noised dose, every condition volume (zeros when
            absent) and the prior basis maps, and adds a correction to the head's dose
            channels (residual and prior weights). Not in the paper; the PRDiT idea (docs/method.md)
            of a pixel-level network under a patch-level DiT: a linear patch head decodes 512
            voxels from one token and cannot tie the dose to voxel-level anatomy (an OAR
            boundary, the body edge, the beam plate). Zero-initialised output, so a fresh
            refiner leaves the head's prediction unchanged.
        dose_refiner_features: feature channels per voxel the dose head hands to the refiner.
        dose_refiner_kernels: kernel size of each hidden convolution of the refiner (its
            receptive field is sum(k - 1) + 1 voxels); a final 1x1x1 convolution maps to the
            output channels.
        dose_refiner_unet: empty (default) = the convolution stack above; otherwise the six
            feature widths of a MONAI ``BasicUNet`` that replaces it (input -> ``dose_refiner_width``
            channels, then the same zero-initialised 1x1x1 output convolution; the kernels are
            not used). A multi-scale refiner: the convolution stack sees 5 voxels, while the dose
            between the PTV edge and an OAR a few centimetres away is shaped at the scale of a
            patch and above (``models.dose_refiner``).
    """

    modalities: tuple[str, ...] = MODALITIES
    in_channels: dict[str, int] = field(default_factory=default_in_channels)
    patch: tuple[int, int, int] = (4, 4, 4)
    dim: int = 48
    depth: int = 2
    heads: int = 2
    ffn_dim: int = 128
    freq_dim: int = 256
    eps: float = 1e-6
    rope_theta: float = 10000.0
    qk_norm: bool = True
    time_scale: float = 1000.0
    rope_slot_dims: int | None = None
    rope_slot_stride: int = 0
    gradient_checkpointing: bool = False
    zero_init_modulation: bool = True
    condition_shortcut: bool = False
    prediction: str = "v"
    x0_min_t: float = 0.05
    dose_prior_falloffs: tuple[float, ...] = ()
    dose_prior_weights: tuple[float, ...] = ()
    dose_prior_reach: int = 40
    dose_refiner_width: int = 0
    dose_refiner_features: int = 8
    dose_refiner_kernels: tuple[int, ...] = (3, 3)
    dose_refiner_unet: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        self.patch = tuple(int(p) for p in self.patch)  # type: ignore[assignment]
        self.in_channels = {str(k): int(v) for k, v in self.in_channels.items()}
        self.dose_prior_falloffs = tuple(float(g) for g in self.dose_prior_falloffs)
        self.dose_prior_weights = tuple(float(w) for w in self.dose_prior_weights)
        self.dose_refiner_kernels = tuple(int(k) for k in self.dose_refiner_kernels)
        self.dose_refiner_unet = tuple(int(f) for f in self.dose_refiner_unet)
        self.validate()

    @property
    def head_dim(self) -> int:
        """Channels per attention head (``dim // heads``)."""
        return self.dim // self.heads

    @property
    def patch_volume(self) -> int:
        """Voxels per patch (``prod(patch)``)."""
        return math.prod(self.patch)

    def head_channels(self, modality: str) -> int:
        """Output channels of the head of ``modality``: its channels, plus for ``dose`` one weight
        per prior basis map (``dose_prior_falloffs``) and the refiner's feature channels
        (``dose_refiner_width``), in that order."""
        return self.in_channels[modality] + (self.prior_weight_channels() + self.refiner_feature_channels()
                                             if modality == "dose" else 0)

    def prior_weight_channels(self) -> int:
        """Prior weights the dose head emits after the dose channel (0 without a prior)."""
        return len(self.dose_prior_falloffs)

    def refiner_feature_channels(self) -> int:
        """Feature channels the dose head hands to the voxel refiner (0 without one)."""
        return self.dose_refiner_features if self.dose_refiner_width else 0

    def validate(self) -> None:
        """Raise :class:`DiTConfigError` naming the field if the config cannot build a model."""
        problems = []
        if self.prediction not in ("v", "x0"):
            problems.append(f"prediction must be 'v' or 'x0', found {self.prediction!r}")
        if not 0 < self.x0_min_t < 1:
            problems.append(f"x0_min_t must be in (0, 1), found {self.x0_min_t}")
        if not self.modalities:
            problems.append("modalities is empty")
        if len(set(self.modalities)) != len(self.modalities):
            problems.append(f"modalities has duplicates: {self.modalities}")
        missing = [m for m in self.modalities if m not in self.in_channels]
        if missing:
            problems.append(f"in_channels has no entry for {missing}")
        if any(c < 1 for c in self.in_channels.values()):
            problems.append(f"in_channels must be >= 1, found {self.in_channels}")
        if len(self.patch) != 3 or any(p < 1 for p in self.patch):
            problems.append(f"patch must be 3 positive ints (D, H, W), found {self.patch}")
        for name in ("dim", "depth", "heads", "ffn_dim", "freq_dim"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, found {getattr(self, name)}")
        if self.freq_dim % 2:
            problems.append(f"freq_dim must be even (cos/sin halves), found {self.freq_dim}")
        if self.heads >= 1 and self.dim % self.heads:
            problems.append(f"dim {self.dim} is not divisible by heads {self.heads}")
        elif self.heads >= 1 and (self.head_dim % 2 or self.head_dim < 8):
            problems.append(f"head dim dim/heads = {self.head_dim} must be even and >= 8 (RoPE pairs)")
        if self.rope_slot_dims is not None and (
            self.rope_slot_dims < 2 or self.rope_slot_dims % 2 or self.rope_slot_dims > self.head_dim - 6
        ):
            problems.append(
                f"rope_slot_dims must be even, >= 2 and leave >= 6 dims for D/H/W, found {self.rope_slot_dims}"
            )
        if self.rope_slot_stride < 0:
            problems.append(f"rope_slot_stride must be >= 0, found {self.rope_slot_stride}")
        elif self.rope_slot_stride and self.heads >= 1 and self.head_dim < 6:
            problems.append(f"head dim {self.head_dim} too small for the Wan RoPE split")
        if self.dose_prior_falloffs:
            if any(not 0.0 < g < 1.0 for g in self.dose_prior_falloffs):
                problems.append(f"dose_prior_falloffs must lie in (0, 1), found {self.dose_prior_falloffs}")
            if len(self.dose_prior_weights) != len(self.dose_prior_falloffs):
                problems.append(f"dose_prior_weights needs one weight per falloff: "
                                f"{len(self.dose_prior_falloffs)} falloffs, {len(self.dose_prior_weights)} weights")
            if self.prediction != "x0":
                problems.append("dose_prior_falloffs needs prediction='x0' (the prior is part of x0_hat)")
            if not {"dose", "ptv"} <= set(self.modalities) or self.in_channels.get("dose") != 1:
                problems.append("dose_prior_falloffs needs modalities 'dose' (1 channel) and 'ptv'")
            if self.dose_prior_reach < 1:
                problems.append(f"dose_prior_reach must be >= 1, found {self.dose_prior_reach}")
        elif self.dose_prior_weights:
            problems.append("dose_prior_weights given without dose_prior_falloffs")
        if self.dose_refiner_width < 0:
            problems.append(f"dose_refiner_width must be >= 0, found {self.dose_refiner_width}")
        elif self.dose_refiner_width:
            if self.prediction != "x0":
                problems.append("dose_refiner_width needs prediction='x0' (the refiner corrects x0_hat)")
            if "dose" not in self.modalities:
                problems.append("dose_refiner_width needs the modality 'dose'")
            if self.dose_refiner_features < 1:
                problems.append(f"dose_refiner_features must be >= 1, found {self.dose_refiner_features}")
            if not self.dose_refiner_kernels or any(k < 1 or k % 2 == 0 for k in self.dose_refiner_kernels):
                problems.append(f"dose_refiner_kernels must be odd sizes >= 1, found {self.dose_refiner_kernels}")
            if self.dose_refiner_unet and (len(self.dose_refiner_unet) != 6 or min(self.dose_refiner_unet) < 1):
                problems.append(f"dose_refiner_unet must be 6 BasicUNet feature widths >= 1, found {self.dose_refiner_unet}")
        elif self.dose_refiner_unet:
            problems.append("dose_refiner_unet given without dose_refiner_width")
        if problems:
            raise DiTConfigError("invalid DiTConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict (tuples become lists) for checkpoints."""
        out = dataclasses.asdict(self)
        out["modalities"] = list(self.modalities)
        out["patch"] = list(self.patch)
        out["in_channels"] = dict(self.in_channels)
        out["dose_prior_falloffs"] = list(self.dose_prior_falloffs)
        out["dose_prior_weights"] = list(self.dose_prior_weights)
        out["dose_refiner_kernels"] = list(self.dose_refiner_kernels)
        out["dose_refiner_unet"] = list(self.dose_refiner_unet)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiTConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error (no silent ignore)."""
        reject_unknown_fields(data, cls, "DiTConfig", DiTConfigError)
        return cls(**data)


def _tiny() -> DiTConfig:
    """2 layers, dim 48, 2 heads, patch 4: for unit tests (well under a second per forward)."""
    return DiTConfig(patch=(4, 4, 4), dim=48, depth=2, heads=2, ffn_dim=128)


def _cpu_default() -> DiTConfig:
    """The shipped CPU model for the 64^3 working grid (OpenKBP 128^3 pooled 2x).

    Patch 8 -> 8^3 = 512 tokens per modality, 3584 tokens with all 7 modalities; 3.35 M
    parameters with the dose prior and the voxel refiner (2.66 M for the bare DiT measured
    below). Full self-attention over 3584 tokens dominates the cost (~65 % of a forward in the
    torch profiler), so depth and width are kept small for the CPU budget: one forward
    (batch 1, all 7 modalities) <= ~1 s and one training step (fwd + bwd + AdamW, batch 2)
    <= ~3 s on 2 threads.

    Measured with ``benchmarks/model_speed.py`` (torch 2.13 CPU) on the shared 2-core machine
    while other jobs kept the load average at 4-15, so wall times are inflated; the 1-thread
    process CPU time is the robust figure (2 idle threads assumed ~1.7x faster; not measured idle):

    =================  ======  ===============================  ==============================
    candidate          params  forward b1: CPU-s 1 thread       train step b2: CPU-s 1 thread
                               (wall, 2 threads)                (wall, 2 threads)
    =================  ======  ===============================  ==============================
    p8 d128 L4 h4 (*)  2.66 M  0.83 (0.42 s at load ~2)         4.8 (-> ~2.8 s, 2 idle threads)
    p8 d128 L6 h4      3.05 M  1.09                             6.8
    p8 d192 L6 h4      5.55 M  1.56 (3.4 s at load ~5)          9.9 (8.8 s at load ~5)
    =================  ======  ===============================  ==============================

    (*) chosen, then with 2 heads of 64 instead of 4 of 32 for the shipped model: the lead's
    measurement (b1, 2 threads, process CPU-s per training step at load ~14) gave 2.68 (h2) vs
    3.13 (h4), and a head dim of 64 leaves 8 RoPE channels to the slot axis and 56 to D/H/W.
    Wider/deeper candidates miss the training-step budget: SDPA fwd + bwd alone costs
    ~0.85 CPU-s per layer at batch 2 and 3584 tokens (1 thread). Patch (4, 8, 8) (7168 tokens,
    4x the attention cost) was not measured to completion for that reason.
    """
    # Dose prior (models.dose_prior): falloffs and initial mix fitted on 11 OpenKBP train cases by
    # grid search (dose MAE inside the body of the prior alone: 8.0 Gy at 64^3).
    # Voxel refiner (models.dose_refiner, since 2026-12-02): width 24, two 3^3 convolutions, 8
    # features per voxel from the dose head; +0.56 M parameters, ~1.6x the CPU time of a training
    # step (1.42 -> 2.27 CPU-s, batch 1, 2 threads, idle machine); 1-step validation dose MAE on
    # the same 50 CPU-min recipe 8.22 -> 6.10 Gy (docs/model-card.md).
    return DiTConfig(patch=(8, 8, 8), dim=128, depth=4, heads=2, ffn_dim=512, condition_shortcut=True,
                     prediction="x0", dose_prior_falloffs=(0.75, 0.92), dose_prior_weights=(0.85, 0.15),
                     dose_refiner_width=24, dose_refiner_features=8, dose_refiner_kernels=(3, 3))


def _wan_1_3b() -> DiTConfig:
    """Wan 2.1 1.3B dimensions (dim 1536, ffn 8960, 12 heads of 128, 30 layers, patch (1, 2, 2)).

    Meant for the latent space of the frozen Wan VAE (16 channels) on a GPU; the default
    per-modality channels here are the voxel-space ones and are overridden by the latent path.
    Wan keeps its random modulation init, hence ``zero_init_modulation=False``.
    """
    return DiTConfig(
        patch=(1, 2, 2),
        dim=1536,
        depth=30,
        heads=12,
        ffn_dim=8960,
        freq_dim=256,
        eps=1e-6,
        zero_init_modulation=False,
    )


PRESETS = {"tiny": _tiny, "cpu-default": _cpu_default, "wan-1.3b": _wan_1_3b}


def get_config(name: str, **overrides: Any) -> DiTConfig:
    """Preset ``name`` with fields replaced by ``overrides``.

    Raises:
        DiTConfigError (a ValueError): unknown preset (lists the presets) or unknown field.
    """
    if name not in PRESETS:
        raise DiTConfigError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
    base = PRESETS[name]().to_dict()
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise DiTConfigError(f"unknown DiTConfig fields {unknown} for preset {name!r}; known: {sorted(base)}")
    base.update(overrides)
    return DiTConfig.from_dict(base)
