"""ScardNFT end to end climbs a reward that is a known function of the dose (the toy check).

The unit tests check the loss formula and the sign of one gradient step; this one runs the whole
loop (old-policy sampling, group advantages, NFT updates, old-policy decay) with the reward
replaced by ±(mean dose in Gy). The policy must move the way the reward says, and the opposite
way when the sign flips, which no sign error anywhere in the loop would survive.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffkt3d.data.encoding import EncodingConfig, decode_dose
from diffkt3d.models.any2any_dit import Any2AnyDiT
from diffkt3d.models.checkpoint import save_checkpoint
from diffkt3d.models.config import get_config
from diffkt3d.training.reward import RewardTerms
from diffkt3d.training.scardnft import ScardNFTConfig, ScardNFTTrainer

pytest.importorskip("peft")
EVAL_SEEDS = [900, 901, 902, 903]


class MeanDoseTrainer(ScardNFTTrainer):
    """Reward = sign · mean dose (Gy) over the case grid."""

    sign = 1.0

    def candidate_terms(self, dose_gy, case):
        value = self.sign * float(np.mean(dose_gy))
        return RewardTerms(scorecard_pct=value, scorecard_total=value, penalty=0.0, mae_gy=0.0, reward=value,
                           item_scores={})


@pytest.fixture(scope="module")
def x0_prior_checkpoint(tmp_path_factory):
    """A tiny DiT with the shipped model's head (x0 prediction, condition shortcut, dose prior)."""
    torch.manual_seed(0)
    enc = EncodingConfig(grid=(16, 16, 16))
    cfg = get_config("tiny", in_channels=enc.channels(), modalities=list(enc.modalities), prediction="x0",
                     condition_shortcut=True,
                     dose_head={"prior_falloffs": (0.75, 0.92), "prior_weights": (0.85, 0.15), "prior_reach": 8})
    model = Any2AnyDiT(cfg)
    with torch.no_grad():  # a non-zero head, so candidates differ and the LoRA layers get gradients
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return save_checkpoint(tmp_path_factory.mktemp("dir") / "tiny-x0.pt", model, cfg, enc, flow_shift=3.0)


def _mean_dose_after(sign, checkpoint, case_dir, tmp_path, iterations):
    torch.set_num_threads(1)
    cfg = ScardNFTConfig(base_model=str(checkpoint), case_dirs=[str(case_dir)], group_size=4, sample_steps=4,
                         iterations=iterations, inner_steps=2, lora_rank=4, lora_alpha=4, lr=3e-3, kl_weight=0.0,
                         threads=1, out_dir=str(tmp_path / f"out{sign:+.0f}"))
    trainer = MeanDoseTrainer(cfg, [case_dir])
    trainer.sign = sign
    tc = trainer._train_case(trainer.case_dirs[0])

    def mean_dose(model):
        x = trainer.sample_candidates(model, tc.conditions, EVAL_SEEDS)
        return float(np.mean([decode_dose(x[k], tc.case.grid, trainer.encoding, tc.case.body).mean()
                              for k in range(len(EVAL_SEEDS))]))

    before = mean_dose(trainer.model)
    for it in range(iterations):
        trainer.step(it)
    return before, mean_dose(trainer.model)


def test_policy_climbs_a_known_reward_and_descends_its_negative(x0_prior_checkpoint, synthetic_case_dir, tmp_path):
    start_up, up = _mean_dose_after(+1.0, x0_prior_checkpoint, synthetic_case_dir, tmp_path, iterations=10)
    start_down, down = _mean_dose_after(-1.0, x0_prior_checkpoint, synthetic_case_dir, tmp_path, iterations=10)
    assert start_up == pytest.approx(start_down)  # same base, same evaluation noises
    # Seeds used for evaluation are never sampled in training, so this is the policy, not a memorised noise.
    assert up > start_up + 0.01
    assert down < start_down - 0.01


def test_shared_noise_gives_every_candidate_the_same_t_and_eps(tiny_checkpoint, synthetic_case_dir, tmp_path,
                                                               monkeypatch):
    import diffkt3d.training.scardnft.trainer as scardnft

    seen = []
    real_add_noise = scardnft.add_noise

    def spy(x0, eps, t):
        seen.append((eps.clone(), t.clone()))
        return real_add_noise(x0, eps, t)

    monkeypatch.setattr(scardnft, "add_noise", spy)
    for shared in (True, False):
        seen.clear()
        cfg = ScardNFTConfig(base_model=str(tiny_checkpoint), case_dirs=[str(synthetic_case_dir)], group_size=3,
                             sample_steps=2, iterations=1, inner_steps=2, lora_rank=4, lora_alpha=4, threads=1,
                             shared_noise=shared, out_dir=str(tmp_path / str(shared)))
        ScardNFTTrainer(cfg, [synthetic_case_dir]).step(0)
        assert len(seen) == 6  # 2 inner steps x 3 candidates
        for step in (seen[:3], seen[3:]):
            same = [torch.equal(step[0][0], e) and torch.equal(step[0][1], t) for e, t in step[1:]]
            assert all(same) if shared else not any(same)
        assert not torch.equal(seen[0][0], seen[3][0])  # a fresh draw for every optimiser step
