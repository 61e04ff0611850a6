"""ScardNFT run configuration (YAML: configs/scardnft-cpu.yaml)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffkt3d.errors import ConfigError, reject_unknown_fields
from diffkt3d.training.reward import RewardConfig

__all__ = ["ScardNFTConfig"]


@dataclass
class ScardNFTConfig:
    """A ScardNFT run (YAML: configs/scardnft-cpu.yaml).

    Args:
        base_model: trained checkpoint to post-train (None: the shipped model, see
            ``diffkt3d.inference.predictor.default_model_path``).
        train_roots: folders of training case folders (cases need a reference dose for the MAE
            anchor); never the validation or test split.
        case_dirs: explicit case folders (used instead of / in addition to ``train_roots``).
        max_cases: use at most this many cases (shuffled with ``seed``); None = all.
        out_dir: outputs (adapter, merged checkpoint, history, summary).
        preferences: preference store folder or ``preferences.jsonl`` file; its records are turned
            into item weights for the reward (None: template weights).
        preference_l2: L2 penalty of the Bradley-Terry fit.
        min_preferences: fewer usable records than this -> keep the template weights (logged).
        reward: reward term weights and template (:class:`RewardConfig`).
        group_size: candidates (initial noises) per case, G; 4 = four positive/negative pairs.
        sample_steps: Euler steps of the candidate sampler (deterministic, 10 in the paper).
        iterations: cases (groups) processed; also stops at ``max_cpu_minutes``.
        inner_steps: optimiser steps on each collected group.
        beta: DiffusionNFT β (1 default; 0.1 for multi-reward in the paper).
        kl_weight: weight of mean‖v_θ − v_ref‖² to the frozen base model.
        diff_weight: λ of an optional supervised flow-matching loss on the reference dose (DiffKT3D
            main text, L = L_NFT + λ L_diff); 0 = the DiffusionNFT objective alone.
        adv_clip: advantage clip (±5).
        shared_noise: in each optimiser step, noise all G candidates of the group at the same t
            with the same ε (common random numbers). Each candidate's loss has the same
            distribution as with independent draws, so the expected gradient is unchanged; but
            the candidates of one case are nearly identical, and with independent draws the
            per-candidate denoising errors (large, random) swamp their differences (small, what
            the reward ranks). With shared draws those errors are almost the same for every
            candidate and cancel in Σ(2r − 1)·(…) because the advantages sum to zero
            (docs/scardnft.md, "Why shared noise").
        old_decay: d of θ_old ← d·θ_old + (1 − d)·θ after every iteration (0 = on-policy).
        lora_rank, lora_alpha: LoRA rank (64) and alpha (scaling alpha / rank).
        train_modulation: also train time_projection and the modulation tables (paper: yes).
        lr, weight_decay: AdamW (lr 3e-4 as in DiffusionNFT).
        grad_clip: global grad-norm clip of the trainable parameters.
        max_cpu_minutes: process CPU-time budget (None: no limit).
        seed: case order, noises and timesteps.
        threads: torch CPU threads (None: torch default).
    """

    base_model: str | None = None
    train_roots: list[str] = field(default_factory=list)
    case_dirs: list[str] = field(default_factory=list)
    max_cases: int | None = None
    out_dir: str = "runs/scardnft"
    preferences: str | None = None
    preference_l2: float = 1.0
    min_preferences: int = 10
    reward: RewardConfig = field(default_factory=RewardConfig)
    group_size: int = 4
    sample_steps: int = 10
    iterations: int = 100
    inner_steps: int = 2
    beta: float = 1.0
    kl_weight: float = 0.01
    diff_weight: float = 0.0
    adv_clip: float = 5.0
    shared_noise: bool = True
    old_decay: float = 0.5
    lora_rank: int = 64
    lora_alpha: float = 64.0
    train_modulation: bool = True
    lr: float = 3e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    max_cpu_minutes: float | None = None
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.reward, Mapping):
            bad = sorted(set(self.reward) - {f.name for f in dataclasses.fields(RewardConfig)})
            if bad:
                raise ConfigError(f"unknown reward keys {bad}; known: "
                                  f"{sorted(f.name for f in dataclasses.fields(RewardConfig))}")
            self.reward = RewardConfig(**self.reward)
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 (rewards are normalised in the group), found {self.group_size}")
        if not 0 < self.beta:
            raise ConfigError(f"beta must be > 0, found {self.beta}")
        if not 0 <= self.old_decay < 1:
            raise ConfigError(f"old_decay must be in [0, 1), found {self.old_decay}")
        for name in ("sample_steps", "iterations", "inner_steps", "lora_rank"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, found {getattr(self, name)}")
        if self.kl_weight < 0 or self.diff_weight < 0:
            raise ConfigError("kl_weight and diff_weight must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScardNFTConfig:
        reject_unknown_fields(d, cls, "ScardNFT config")
        return cls(**dict(d))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> ScardNFTConfig:
        """The recipe at `path` with top-level `overrides` (None values skipped); see recipe.load_scardnft_recipe."""
        from diffkt3d.training.recipe import load_scardnft_recipe

        return load_scardnft_recipe(path, {k: v for k, v in overrides.items() if v is not None})
