"""ScardNFT: Scorecard-reward RL post-training of the dose DiT with LoRA (DiffusionNFT objective).

One iteration on one training case (DiffKT3D supplement B.5, DiffusionNFT; docs/scardnft.md):
  1. sample G candidate doses with the *old* policy, the deterministic 10-step Euler sampler and G
     initial noises (seeds), decode them to the case grid;
  2. reward each with :mod:`diffkt3d.training.reward` (Scorecard with template or learned weights,
     hinge penalties, MAE anchor), normalise in the group, A = (R − mean)/(std + 1e-4) clipped to
     ±5, r = clip(A/10 + 0.5, 0, 1);
  3. for ``inner_steps`` optimiser steps: noise every candidate at a fresh t, and minimise
        v⁺ = β·v_θ + (1 − β)·sg(v_old),   v⁻ = (1 + β)·sg(v_old) − β·v_θ,
        x̂0^p = x_t − t·v^p,   L^p = mean‖x̂0^p − x0‖² / sg(max(mean|x̂0^p − x0|, 1e-5)),
        loss = mean_batch[(r·L⁺ + (1 − r)·L⁻)/β] + kl_weight·mean‖v_θ − v_ref‖²
     (x0 = the candidate, v_ref = the frozen base model), updating only rank-64 LoRA adapters on
     every self-attention and FFN Linear plus the modulation MLP / tables;
  4. old policy θ_old ← d·θ_old + (1 − d)·θ.

With G = 4 candidates every case contributes four positive/negative pairs (each candidate enters
both branches, weighted r and 1 − r). Preference records, when given, are first turned into item
weights (:func:`diffkt3d.preferences.learner.learn_item_weights`) that replace the template's
weights in the reward.

Entry points: :func:`run_scardnft` (Python / MONAI Label) and :func:`run_scardnft_from_yaml`
(``diffkt3d train --stage scardnft --config configs/scardnft-cpu.yaml``). Outputs in ``out_dir``:
``adapter.pt`` (LoRA + modulation weights only), ``merged.pt`` (a full checkpoint loadable by
:func:`diffkt3d.models.checkpoint.load_checkpoint`), ``history.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from diffkt3d.data.case import Case
from diffkt3d.data.dataset import list_case_dirs
from diffkt3d.data.encoding import decode_dose, encode_case
from diffkt3d.errors import ConfigError, reject_unknown_fields
from diffkt3d.flow.matching import FlowConfig, add_noise, sample_timesteps, velocity_target
from diffkt3d.flow.sampler import sample_with_seeds
from diffkt3d.io.case_folder import load_case_folder
from diffkt3d.models.checkpoint import ModelBundle, file_digest, load_checkpoint, save_checkpoint
from diffkt3d.training.reward import RewardConfig, advantages_to_r, candidate_reward, group_advantages

log = logging.getLogger(__name__)

__all__ = ["ScardNFTConfig", "ScardNFTResult", "nft_loss", "add_lora", "trainable_state", "save_adapter",
           "load_adapter", "merge_lora", "ScardNFTTrainer", "run_scardnft", "run_scardnft_from_yaml",
           "LORA_TARGETS"]

ADAPTER_FORMAT = "diffkt3d-scardnft-adapter/1"
# All self-attention (q, k, v, o) and FFN (ffn.0, ffn.2) Linears of every block (regex, full match).
LORA_TARGETS = r".*blocks\.\d+\.(self_attn\.(q|k|v|o)|ffn\.(0|2))"
# Modulation MLP (time_projection) and the per-block / head modulation tables: trained in full.
_MODULATION_RE = re.compile(r"(^|\.)time_projection\.\d+\.(weight|bias)$|(^|\.)modulation$")
_PEFT_PREFIX = "base_model.model."

ProgressFn = Callable[[dict], None]


# -- config ----------------------------------------------------------------------------------------
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
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"ScardNFT config not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"ScardNFT config {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"ScardNFT config {path}: expected a mapping at the top level")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)


# -- objective -------------------------------------------------------------------------------------
def _adaptive_l2(x0_hat: Tensor, x0: Tensor) -> Tensor:
    """Per-sample mean‖x̂0 − x0‖² / sg(max(mean|x̂0 − x0|, 1e-5)) -> (B,)."""
    dims = tuple(range(1, x0.ndim))
    err = x0_hat - x0
    return err.pow(2).mean(dims) / err.abs().mean(dims).detach().clamp_min(1e-5)


def nft_loss(v_theta: Tensor, v_old: Tensor, x_t: Tensor, x0: Tensor, t: Tensor, r: Tensor, beta: float = 1.0,
             v_ref: Tensor | None = None, kl_weight: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """The DiffusionNFT loss (module docstring) on a batch.

    Args:
        v_theta: (B, C, D, H, W) current policy velocity (with grad).
        v_old: same shape, old policy velocity (detached here: sg).
        x_t: noised candidates (1 − t)·x0 + t·ε; x0: the candidates (B, C, D, H, W).
        t: (B,) flow times; r: (B,) optimality probabilities in [0, 1].
        v_ref: frozen base velocity for the KL term (None: no KL term).

    Returns:
        (scalar loss, {"nft", "kl", "l_pos", "l_neg"} floats for logging).
    """
    v_old = v_old.detach()
    tt = t.to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))  # (B, 1, 1, 1, 1)
    v_pos = beta * v_theta + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v_theta
    l_pos = _adaptive_l2(x_t - tt * v_pos, x0)  # (B,)
    l_neg = _adaptive_l2(x_t - tt * v_neg, x0)
    r = r.to(l_pos.dtype)
    nft = ((r * l_pos + (1.0 - r) * l_neg) / beta).mean()
    kl = (v_theta - v_ref.detach()).pow(2).mean() if v_ref is not None else v_theta.new_zeros(())
    loss = nft + kl_weight * kl
    stats = {"nft": nft.detach(), "kl": kl.detach(), "l_pos": l_pos.detach().mean(), "l_neg": l_neg.detach().mean()}
    return loss, {k: float(v) for k, v in stats.items()}


# -- LoRA ------------------------------------------------------------------------------------------
def _peft():
    """The peft module, imported lazily (it pulls in transformers: a slow import)."""
    try:
        import peft
    except ImportError:
        raise ConfigError("ScardNFT needs the 'peft' package (LoRA): pip install 'diffkt3d[transfer]'") from None
    return peft


def _lora_config(rank: int, alpha: float):
    return _peft().LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=0.0, bias="none",
                      target_modules=LORA_TARGETS)


def add_lora(model: nn.Module, rank: int = 64, alpha: float = 64.0, train_modulation: bool = True) -> nn.Module:
    """Wrap the DiT with peft LoRA on every self-attention and FFN Linear; freeze the base.

    Trainable afterwards: the LoRA A/B matrices (B zero-initialised, so the wrapped model starts
    identical to the base) and, with ``train_modulation``, ``time_projection`` and every
    ``modulation`` table. Everything else keeps ``requires_grad=False`` and is never touched, so
    base weights stay bit-identical.

    Note: ``model`` is modified in place (peft injects its layers) — pass a copy to keep the base.
    """
    peft_model = _peft().get_peft_model(model, _lora_config(rank, alpha))
    if train_modulation:
        for name, p in peft_model.named_parameters():
            if _MODULATION_RE.search(name):
                p.requires_grad_(True)
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA rank %d on %s: %s trainable of %s parameters", rank, LORA_TARGETS, f"{n_train:,}", f"{n_all:,}")
    return peft_model


def _strip(name: str) -> str:
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def trainable_state(peft_model: nn.Module) -> dict[str, Tensor]:
    """The trainable tensors (LoRA + modulation) by name without peft's wrapper prefix, CPU copies."""
    return {_strip(n): p.detach().cpu().clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def save_adapter(path: str | Path, peft_model: nn.Module, cfg: ScardNFTConfig, base_model_path: str | Path,
                 meta: dict | None = None) -> Path:
    """Write the adapter alone (LoRA + modulation tensors, ~a few MB) with what is needed to re-apply it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": ADAPTER_FORMAT,
        "lora": {"rank": int(cfg.lora_rank), "alpha": float(cfg.lora_alpha), "targets": LORA_TARGETS,
                 "train_modulation": bool(cfg.train_modulation)},
        "base_model": {"path": str(base_model_path), "digest": file_digest(base_model_path)},
        "meta": meta or {},
        "state_dict": trainable_state(peft_model),
    }
    tmp = path.with_name(path.name + ".part")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


def load_adapter(adapter_path: str | Path, base_model: str | Path | None = None,
                 device: str | torch.device = "cpu") -> tuple[nn.Module, ModelBundle]:
    """Rebuild base + adapter: (peft-wrapped model, base bundle).

    Args:
        base_model: the base checkpoint (default: the path stored in the adapter). A base whose
            digest differs from the one the adapter was trained on is refused.

    Raises:
        ConfigError: not an adapter file, wrong base, or tensors that do not match.
    """
    adapter_path = Path(adapter_path)
    try:
        blob = torch.load(adapter_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read ScardNFT adapter {adapter_path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(blob, dict) or blob.get("format") != ADAPTER_FORMAT:
        raise ConfigError(f"{adapter_path} is not a ScardNFT adapter (expected format {ADAPTER_FORMAT})")
    base_path = Path(base_model) if base_model is not None else Path(blob["base_model"]["path"])
    digest = file_digest(base_path) if base_path.is_file() else None
    if digest != blob["base_model"]["digest"]:
        raise ConfigError(f"adapter {adapter_path} was trained on base digest {blob['base_model']['digest']}, "
                          f"but {base_path} has digest {digest}")
    bundle = load_checkpoint(base_path, device=device)
    lora = blob["lora"]
    model = add_lora(bundle.model, lora["rank"], lora["alpha"], lora["train_modulation"])
    params = {_strip(n): p for n, p in model.named_parameters() if p.requires_grad}
    state = blob["state_dict"]
    if set(params) != set(state):
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ConfigError(f"adapter {adapter_path} does not fit the model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(p.device, p.dtype))
    return model.eval(), bundle


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """A plain Any2AnyDiT with W + (alpha/r)·B·A folded into every adapted Linear (copy; input kept)."""
    return copy.deepcopy(peft_model).merge_and_unload().eval()


# -- training --------------------------------------------------------------------------------------
@dataclass
class ScardNFTResult:
    """What a run produced.

    Attributes:
        adapter_path, merged_path: the adapter file and the merged full checkpoint.
        iterations: iterations done.
        cpu_minutes: process CPU time used.
        item_weights: the reward's item weights (None: template weights).
        weight_fit: preference fit summary (None: no preferences used).
        history: one dict per iteration (rewards, reward terms, losses).
    """

    adapter_path: Path
    merged_path: Path
    iterations: int
    cpu_minutes: float
    item_weights: dict[str, float] | None
    weight_fit: dict | None
    history: list[dict]


@dataclass
class _TrainCase:
    case: Case
    conditions: dict[str, Tensor]  # modality -> (1, C, D, H, W) on the working grid
    dose_x0: Tensor | None  # (1, 1, D, H, W) encoded reference dose (for the optional L_diff)


class ScardNFTTrainer:
    """Owns base, policy, old policy, reference, data and the loop. Create, then :meth:`run`."""

    def __init__(self, cfg: ScardNFTConfig, case_dirs: Sequence[str | Path], *, device: str | None = None,
                 progress: ProgressFn | None = None, item_weights: dict[str, float] | None = None,
                 weight_fit: dict | None = None):
        from diffkt3d.inference.predictor import default_model_path

        self.cfg = cfg
        self.progress = progress
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.base_path = Path(cfg.base_model) if cfg.base_model else default_model_path()
        self.bundle = load_checkpoint(self.base_path, device=self.device)
        self.encoding = self.bundle.encoding
        self.flow = FlowConfig(shift=self.bundle.flow_shift)
        # Frozen reference (KL term) = the base; the policy wraps a copy, so the base object stays clean.
        self.ref_model = self.bundle.model.eval().requires_grad_(False)
        self.model = add_lora(copy.deepcopy(self.ref_model), cfg.lora_rank, cfg.lora_alpha, cfg.train_modulation)
        self.model.train()
        self.old_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(list(self.trainable.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.reward_cfg = dataclasses.replace(cfg.reward, item_weights=item_weights or cfg.reward.item_weights)
        self.template = self.reward_cfg.load_template()
        self.weight_fit = weight_fit
        dirs = [Path(p) for p in case_dirs]
        random.Random(cfg.seed).shuffle(dirs)
        self.case_dirs = dirs[: cfg.max_cases] if cfg.max_cases else dirs
        if not self.case_dirs:
            raise ConfigError("ScardNFT needs at least one training case (train_roots / case_dirs are empty)")
        self._cases: dict[Path, _TrainCase] = {}
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.out_dir = Path(cfg.out_dir)
        self.history: list[dict] = []

    # -- data ------------------------------------------------------------------------------
    def _train_case(self, case_dir: Path) -> _TrainCase:
        if case_dir not in self._cases:
            from diffkt3d.inference.predictor import Predictor

            case = load_case_folder(case_dir)
            case.validate(require=("ptv",))
            conditions = Predictor(self.bundle, self.device).encode_conditions(case, exclude={"dose"})
            dose_x0 = None
            if self.cfg.diff_weight > 0 and case.dose_gy is not None:
                dose_x0 = encode_case(case, self.encoding, ("dose",))["dose"][None].to(self.device)
            self._cases[case_dir] = _TrainCase(case, conditions, dose_x0)
        return self._cases[case_dir]

    # -- reward ----------------------------------------------------------------------------
    def candidate_terms(self, dose_gy, case: Case):
        """Reward terms of one decoded candidate (I, J, K) Gy; override for another objective.

        The direction test (tests/training/test_scardnft_direction.py) overrides it with a reward
        that is a known function of the dose, so the whole loop can be checked to climb it.
        """
        return candidate_reward(dose_gy, case, self.reward_cfg, self.template)

    # -- sampling --------------------------------------------------------------------------
    def sample_candidates(self, model: nn.Module, conditions: dict[str, Tensor], seeds: Sequence[int]) -> Tensor:
        """(G, 1, D, H, W) candidates: deterministic Euler, ``cfg.sample_steps`` steps, one noise per seed.

        The Predictor's seeded sampler (``flow.sampler.sample_with_seeds``), so a candidate is the
        dose the Predictor gives for its seed; one candidate at a time: the same CPU cost as a
        batch, a quarter of the activation memory.
        """
        shape = (self.bundle.model.config.in_channels["dose"], *self.encoding.grid)
        return sample_with_seeds(model, conditions, "dose", shape, seeds, steps=self.cfg.sample_steps,
                                 shift=self.flow.shift, device=self.device, one_by_one=True)

    # -- one iteration ---------------------------------------------------------------------
    def step(self, it: int) -> dict:
        cfg = self.cfg
        tc = self._train_case(self.case_dirs[it % len(self.case_dirs)])
        t0 = time.process_time()
        # 1. Candidates from the old policy, G initial noises.
        seeds = [cfg.seed * 1_000_003 + it * cfg.group_size + k for k in range(cfg.group_size)]
        x0 = self.sample_candidates(self.old_model, tc.conditions, seeds)  # (G, 1, D, H, W)
        t1 = time.process_time()
        # 2. Rewards -> group advantages -> r.
        terms = [self.candidate_terms(decode_dose(x0[k].cpu(), tc.case.grid, self.encoding, tc.case.body), tc.case)
                 for k in range(len(seeds))]
        rewards = torch.tensor([tm.reward for tm in terms], dtype=torch.float64)
        adv = group_advantages(rewards, clip=cfg.adv_clip)
        r = advantages_to_r(adv).float().to(self.device)
        t2 = time.process_time()
        # 3. DiffusionNFT updates on the collected group (one candidate per micro-batch).
        g = len(seeds)
        losses: list[dict[str, float]] = []
        for _ in range(cfg.inner_steps):
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.shared_noise:
                t_s = sample_timesteps(1, self.flow, self.generator).to(self.device)  # (1,)
                eps_s = torch.randn(x0[:1].shape, generator=self.generator).to(self.device)
            for k in range(g):
                if cfg.shared_noise:
                    t, eps = t_s, eps_s
                else:
                    t = sample_timesteps(1, self.flow, self.generator).to(self.device)  # (1,)
                    eps = torch.randn(x0[k:k + 1].shape, generator=self.generator).to(self.device)
                x_t = add_noise(x0[k:k + 1], eps, t)
                vols = {**tc.conditions, "dose": x_t}
                v_theta = self.model(vols, "dose", t)
                with torch.no_grad():
                    v_old = self.old_model(vols, "dose", t)
                    v_ref = self.ref_model(vols, "dose", t) if cfg.kl_weight > 0 else None
                loss, stats = nft_loss(v_theta, v_old, x_t, x0[k:k + 1], t, r[k:k + 1], cfg.beta, v_ref, cfg.kl_weight)
                if cfg.diff_weight > 0 and tc.dose_x0 is not None:
                    eps_d = torch.randn(tc.dose_x0.shape, generator=self.generator).to(self.device)
                    x_t_d = add_noise(tc.dose_x0, eps_d, t)
                    v_d = self.model({**tc.conditions, "dose": x_t_d}, "dose", t)
                    l_diff = (v_d - velocity_target(tc.dose_x0, eps_d)).pow(2).mean()
                    loss = loss + cfg.diff_weight * l_diff
                    stats["diff"] = float(l_diff.detach())
                (loss / g).backward()
                losses.append({**stats, "loss": float(loss.detach())})
            grad_norm = torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), cfg.grad_clip)
            self.optimizer.step()
        # 4. Old policy: θ_old <- d·θ_old + (1 - d)·θ over the trainable tensors (the rest is shared base).
        with torch.no_grad():
            old = dict(self.old_model.named_parameters())
            for name, p in self.trainable.items():
                old[name].mul_(cfg.old_decay).add_(p.detach(), alpha=1.0 - cfg.old_decay)
        t3 = time.process_time()
        rec = {
            "iteration": it, "case": tc.case.case_id, "seeds": seeds,
            "reward": [tm.reward for tm in terms], "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)), "r": [float(v) for v in r],
            "scorecard_pct": [tm.scorecard_pct for tm in terms], "penalty": [tm.penalty for tm in terms],
            "mae_gy": [tm.mae_gy for tm in terms],
            "loss": sum(d["loss"] for d in losses) / len(losses),
            "nft": sum(d["nft"] for d in losses) / len(losses),
            "kl": sum(d["kl"] for d in losses) / len(losses),
            "grad_norm": float(grad_norm),
            "cpu_s": {"sample": t1 - t0, "reward": t2 - t1, "update": t3 - t2},
        }
        return rec

    def run(self) -> ScardNFTResult:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rw = self.reward_cfg
        log.info("ScardNFT on %d case(s) from %s: reward = %g x Scorecard %% (%s, %s weights) - %g x hinge "
                 "penalties - %g x MAE anchor (Gy); G=%d, %d sampler steps, beta %g, KL %g, lr %g",
                 len(self.case_dirs), self.base_path, rw.w_score, rw.template,
                 "learned" if rw.item_weights else "template", rw.w_hinge, rw.w_mae, cfg.group_size,
                 cfg.sample_steps, cfg.beta, cfg.kl_weight, cfg.lr)
        cpu0 = time.process_time()
        hist_path = self.out_dir / "history.jsonl"
        it = 0
        with hist_path.open("w") as hist:
            while it < cfg.iterations:
                rec = self.step(it)
                rec["cpu_minutes"] = (time.process_time() - cpu0) / 60.0
                self.history.append(rec)
                hist.write(json.dumps(rec) + "\n")
                hist.flush()
                log.info("[scardnft] it %d/%d %s: R %.2f±%.2f (Scorecard %.1f %%, penalty %.2f, MAE %.2f Gy) "
                         "loss %.4f (nft %.4f, kl %.2e) %.1f CPU-min", it + 1, cfg.iterations, rec["case"],
                         rec["reward_mean"], rec["reward_std"], _mean(rec["scorecard_pct"]), _mean(rec["penalty"]),
                         _mean(rec["mae_gy"]), rec["loss"], rec["nft"], rec["kl"], rec["cpu_minutes"])
                if self.progress is not None:
                    self.progress({"stage": "scardnft", "iteration": it + 1, "iterations": cfg.iterations,
                                   "reward_mean": rec["reward_mean"], "loss": rec["loss"]})
                it += 1
                if cfg.max_cpu_minutes is not None and rec["cpu_minutes"] >= cfg.max_cpu_minutes:
                    log.info("CPU budget of %.1f min reached after %d iterations", cfg.max_cpu_minutes, it)
                    break
        return self.save(it, (time.process_time() - cpu0) / 60.0)

    def save(self, iterations: int, cpu_minutes: float) -> ScardNFTResult:
        meta = {"iterations": iterations, "cpu_minutes": cpu_minutes, "reward": dataclasses.asdict(self.reward_cfg)}
        adapter = save_adapter(self.out_dir / "adapter.pt", self.model, self.cfg, self.base_path, meta)
        merged_model = merge_lora(self.model)
        bmeta = dict(self.bundle.meta)
        bmeta.update({"name": f"{bmeta.get('name', self.base_path.stem)}+scardnft",
                      "scardnft": {"base_digest": file_digest(self.base_path), **meta}})
        merged = save_checkpoint(self.out_dir / "merged.pt", merged_model, self.bundle.model.config, self.encoding,
                                 self.bundle.flow_shift, meta=bmeta)
        result = ScardNFTResult(adapter, merged, iterations, cpu_minutes, self.reward_cfg.item_weights,
                                self.weight_fit, self.history)
        summary = {"config": self.cfg.to_dict(), "base_model": str(self.base_path), "adapter": str(adapter),
                   "merged": str(merged), "iterations": iterations, "cpu_minutes": cpu_minutes,
                   "item_weights": self.reward_cfg.item_weights, "weight_fit": self.weight_fit,
                   "cases": [str(p) for p in self.case_dirs]}
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        log.info("ScardNFT done: adapter %s, merged checkpoint %s", adapter, merged)
        return result


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


# -- entry points ----------------------------------------------------------------------------------
def _read_preferences(preferences: str | Path | Sequence[Any]) -> list:
    """Records from a store folder / jsonl file, or a list of records (or their dicts)."""
    from diffkt3d.preferences import PreferenceRecord, PreferenceStore

    if isinstance(preferences, (str, Path)):
        p = Path(preferences)
        if p.is_file():
            p = p.parent
        if not p.is_dir():
            raise ConfigError(f"preference store not found: {preferences}")
        return PreferenceStore(p).read().records
    return [r if isinstance(r, PreferenceRecord) else PreferenceRecord.from_dict(r) for r in preferences]


def run_scardnft(cfg: ScardNFTConfig | Mapping[str, Any] | None = None, *,
                 case_dirs: Sequence[str | Path] | None = None,
                 preferences: str | Path | Sequence[Any] | None = None,
                 out_dir: str | Path | None = None, request: Mapping[str, Any] | None = None,
                 progress: ProgressFn | None = None, device: str | None = None,
                 trainer_cls: type[ScardNFTTrainer] | None = None) -> ScardNFTResult:
    """Run ScardNFT post-training (CLI and MONAI Label train task entry point).

    Args:
        cfg: the config (dataclass or mapping); None = defaults.
        case_dirs: training case folders, added to ``cfg.train_roots`` / ``cfg.case_dirs``.
        preferences: preference store folder / jsonl file, or a list of PreferenceRecord (or their
            dicts); overrides ``cfg.preferences``. With >= ``cfg.min_preferences`` usable records
            the reward uses item weights learned from them.
        out_dir: overrides ``cfg.out_dir``.
        request: MONAI Label request; keys that are ScardNFT config fields override ``cfg``
            (e.g. ``{"iterations": 20, "max_cpu_minutes": 10}``); other keys are logged and ignored.
        progress: called after every iteration with a small dict (iteration, reward_mean, loss).
        device: "cpu", "cuda" ... (default: CUDA when available).
        trainer_cls: a :class:`ScardNFTTrainer` subclass to run instead (e.g. the benchmark's
            control run, whose reward is random).
    """
    if cfg is None:
        cfg = ScardNFTConfig()
    elif isinstance(cfg, Mapping):
        cfg = ScardNFTConfig.from_dict(cfg)
    if request:
        known = {f.name for f in dataclasses.fields(ScardNFTConfig)}
        use = {k: v for k, v in request.items() if k in known}
        ignored = sorted(set(request) - known)
        if ignored:
            log.info("request keys not used by ScardNFT: %s", ignored)
        if use:
            cfg = ScardNFTConfig.from_dict({**cfg.to_dict(), **use})
    if out_dir is not None:
        cfg = dataclasses.replace(cfg, out_dir=str(out_dir))
    dirs = [Path(p) for p in cfg.case_dirs] + [Path(p) for p in (case_dirs or [])]
    if cfg.train_roots:
        dirs += list_case_dirs(cfg.train_roots)
    if any("test" in p.parts for p in dirs):
        log.warning("ScardNFT training cases include a folder named 'test': never post-train on a test split")

    item_weights, fit = None, None
    source = preferences if preferences is not None else cfg.preferences
    if source is not None:
        from diffkt3d.preferences.learner import learn_item_weights

        records = _read_preferences(source)
        usable = [r for r in records if all(c.scorecard_items for c in r.candidates)]
        if len(usable) >= cfg.min_preferences:
            wf = learn_item_weights(usable, cfg.reward.template, l2=cfg.preference_l2, seed=cfg.seed)
            item_weights, fit = wf.weights, wf.to_dict()
        else:
            log.warning("only %d usable preference record(s) (< min_preferences %d): template weights kept",
                        len(usable), cfg.min_preferences)
            fit = {"n_records": len(usable), "used": False}
    trainer = (trainer_cls or ScardNFTTrainer)(cfg, dirs, device=device, progress=progress, item_weights=item_weights,
                              weight_fit=fit)
    return trainer.run()


def run_scardnft_from_yaml(config_path: str | Path, out_dir: str | Path | None = None,
                           device: str | None = None) -> ScardNFTResult:
    """``diffkt3d train --stage scardnft --config FILE [--out-dir D] [--device X]``."""
    cfg = ScardNFTConfig.from_yaml(config_path)
    result = run_scardnft(cfg, out_dir=out_dir, device=device)
    log.info("adapter: %s; merged checkpoint: %s", result.adapter_path, result.merged_path)
    return result
