"""The ScardNFT loop: sample a group from the old policy, reward it, update LoRA, move the old policy."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from diffkt3d.data.case import Case
from diffkt3d.data.encoding import decode_dose, encode_case
from diffkt3d.errors import ConfigError
from diffkt3d.flow.matching import FlowConfig, add_noise, sample_timesteps, velocity_target
from diffkt3d.flow.sampler import sample_with_seeds
from diffkt3d.io.case_folder import load_case_folder
from diffkt3d.models.checkpoint import carry_full_res_stages, file_digest, load_checkpoint, save_checkpoint
from diffkt3d.training.reward import advantages_to_r, candidate_reward, group_advantages
from diffkt3d.training.scardnft.adapter import save_adapter
from diffkt3d.training.scardnft.config import ScardNFTConfig
from diffkt3d.training.scardnft.lora import add_lora, merge_lora
from diffkt3d.training.scardnft.loss import nft_loss

__all__ = ["ScardNFTResult", "ScardNFTTrainer", "ProgressFn"]

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict], None]


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
        carry_full_res_stages(self.base_path, merged)  # the served model's stages stay in the merged model
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
