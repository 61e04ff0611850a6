"""Dose prediction and imputation with a trained Any2Any DiT, on the case's own grid.

The CLI, the MONAI Label tasks, the benchmarks and ScardNFT all go through `Predictor`, so what a
clinician sees in Slicer is what the benchmark measured.
Pipeline: case -> (plates if the plan allows) -> encode conditions on the working grid ->
N-step Euler flow sampling (seeded) -> decode to the case grid -> [full-resolution stage, when the
checkpoint has one for the target: ``inference.full_res``] -> Scorecard per candidate.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from diffkt3d.constants import (
    AGGREGATES,
    DEFAULT_AGGREGATE,
    DEFAULT_CANDIDATES,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEFAULT_TEMPLATE,
    IMPUTABLE,
    OPENKBP_PTVS,
    PREVIEW_STEPS,
)
from diffkt3d.data.case import Case
from diffkt3d.data.encoding import (
    available_modalities,
    decode_ct,
    decode_dose,
    decode_oar,
    decode_ptv,
    encode_case,
)
from diffkt3d.errors import CaseError, ConfigError
from diffkt3d.flow.sampler import StepCallback, sample_with_seeds
from diffkt3d.inference.quality import target_quality
from diffkt3d.inference.result import Candidate, CaseInfo, DosePrediction, ImputationResult
from diffkt3d.metrics.dvh_table import dvh_table
from diffkt3d.models.checkpoint import ModelBundle, load_checkpoint

if TYPE_CHECKING:  # the Scorecard is imported lazily below; only its type is needed here
    from diffkt3d.scorecard import ScorecardTemplate

log = logging.getLogger(__name__)

DEFAULT_MODEL_ENV = "DIFFKT3D_MODEL"
# What a case must have for dose prediction, for the CLI and the server alike: a target with a
# prescription. The CT is not required: the Any2Any model was trained with modalities dropped and
# treats a missing CT as a missing condition (sample-data/pt_205 is such a case), so refusing it on
# the server only while the CLI predicted it was two policies for one model.
DOSE_PREDICTION_INPUTS = ("ptv",)


def default_model_path() -> Path:
    """The shipped CPU model (package data), unless DIFFKT3D_MODEL points elsewhere."""
    env = os.environ.get(DEFAULT_MODEL_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "weights" / "cpu-default.pt"


@dataclass(frozen=True)
class StageProgress:
    """Progress over the sampling steps and, when a full-res stage follows, one more step for it.

    The sampler counts only its own steps: a client reading "10 of 10" while a full-res stage still
    runs for seconds would see a job as finished that is not, so the stage is the count's last step.
    A cancel asked for during sampling stops before the stage (the last sampling step's report).

    Args:
        on_step: the caller's hook (None: nothing reported).
        stage: whether a full-res stage follows the sampling.
    """

    on_step: StepCallback | None
    stage: bool

    def sampling(self) -> StepCallback | None:
        """The hook the sampler is given: its own count, plus one when a stage follows."""
        on_step = self.on_step
        if on_step is None or not self.stage:
            return on_step
        return lambda done, total: on_step(done, total + 1)

    def stage_done(self, sampling_total: int) -> None:
        """Report the stage's step, once it ran after ``sampling_total`` sampling steps."""
        if self.on_step is not None and self.stage:
            self.on_step(sampling_total + 1, sampling_total + 1)


def ptv_levels(case: Case) -> list[float]:
    """Prescription levels (Gy, ascending) a PTV imputation returns: the case's, OpenKBP's if it has none."""
    return sorted({s.prescription_gy for s in case.targets.values() if s.prescription_gy}) or \
        sorted(float(n[3:]) for n in OPENKBP_PTVS)


class Predictor:
    """A loaded model ready to predict. Thread-safe for sequential calls (one model, no state)."""

    def __init__(self, bundle: ModelBundle, device: torch.device):
        self.bundle = bundle
        self.device = device
        self.model = bundle.model
        self.encoding = bundle.encoding
        self.model_version = bundle.version
        # target -> full-resolution stage stored in the checkpoint (models.full_res); {} for most.
        self.full_res = dict(getattr(bundle, "full_res", {}) or {})

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | None = None, vae_dir: str | Path | None = None,
             latent_cache_dir: str | Path | None = None) -> Predictor:
        """Load a checkpoint; the checkpoint decides the path.

        A latent-space checkpoint (``meta["latent"]``, trained on Wan VAE latents) comes back as a
        :class:`~diffkt3d.inference.latent_predictor.LatentPredictor` and needs ``vae_dir``, the
        VAE it was trained with (checked by fingerprint); ``latent_cache_dir`` keeps its condition
        latents on disk too. A voxel-space checkpoint ignores both.
        """
        path = Path(path) if path is not None else default_model_path()
        if not path.is_file():
            raise ConfigError(f"model not found: {path} (pass --model, set {DEFAULT_MODEL_ENV}, or train "
                              "one with `diffkt3d train`)")
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        bundle = load_checkpoint(path, device=dev)
        log.info("loaded model %s (%s parameters) on %s", bundle.version,
                 f"{sum(p.numel() for p in bundle.model.parameters()):,}", dev)
        if bundle.meta.get("latent") is not None:
            from diffkt3d.inference.latent_predictor import LatentPredictor

            if bundle.full_res:
                raise ConfigError(f"{path}: a latent-space model with full-res stages {sorted(bundle.full_res)} is "
                                  "not supported (a stage refines a voxel-space model's case-grid output)")

            return LatentPredictor.from_bundle(bundle, dev, vae_dir, latent_cache_dir, source=path.name)
        if vae_dir is not None:
            log.info("%s is a voxel-space model: the VAE folder %s is not used", path.name, vae_dir)
        return cls(bundle, dev)

    # -- helpers ---------------------------------------------------------------------------
    def encode_conditions(self, case: Case, exclude: set[str]) -> dict[str, torch.Tensor]:
        """The case's conditions as the model reads them: {modality: (1, C, D, H, W)} on the device.

        Every modality the model knows and the case has, minus ``exclude`` (e.g. ``{"dose"}``: a
        stored dose is never an input to dose prediction). Beam and angle plates are rasterised
        first when the model uses them and the plan has beams. Public so that training code
        (ScardNFT) conditions exactly as inference does.
        """
        wanted = set(self.model.config.modalities)
        if ("beam" in wanted or "angle" in wanted) and case.plan.beams is not None:
            from diffkt3d.data.plates import ensure_plates

            ensure_plates(case)
        mods = tuple(m for m in available_modalities(case, self.encoding) if m in wanted and m not in exclude)
        return {m: v[None].to(self.device) for m, v in encode_case(case, self.encoding, mods).items()}

    def _sample(self, conditions: dict[str, torch.Tensor], target: str, seeds: list[int], steps: int,
                on_step: StepCallback | None = None) -> torch.Tensor:
        """(len(seeds), C, D, H, W) samples on the CPU; candidate k starts from the noise of seeds[k]."""
        shape = (self.model.config.in_channels[target], *self.encoding.grid)
        return sample_with_seeds(self.model, conditions, target, shape, seeds, steps=steps,
                                 shift=self.bundle.flow_shift, device=self.device, on_step=on_step).cpu()

    def predict_coarse(self, case: Case, target: str, steps: int = DEFAULT_STEPS,
                       seed: int = DEFAULT_SEED) -> torch.Tensor:
        """The base model's continuous prediction of ``target`` on the case grid, before any threshold.

        (C, I, J, K) float32 in the [-1, 1] encoding: one candidate from ``seed``, conditioned as
        ``predict_dose`` (dose) or ``impute`` (ct / ptv / oar) condition it, upsampled as they
        upsample it (``inference.full_res.coarse_on_case_grid``). A full-resolution stage is
        trained on this, so it is what the stage is given when serving.
        """
        from diffkt3d.inference.full_res import coarse_on_case_grid

        if target == "dose":
            case.validate(require=DOSE_PREDICTION_INPUTS)
        elif target not in IMPUTABLE:
            raise ValueError(f"no coarse prediction of {target!r}; targets: ('dose', *{IMPUTABLE})")
        if target not in self.model.config.modalities:
            raise ConfigError(f"this model was not trained with modality {target!r}")
        conditions = self.encode_conditions(case, exclude={target})
        if not conditions:
            raise CaseError(f"nothing to condition the {target} prediction on", case=case.case_id)
        x0 = self._sample(conditions, target, [int(seed)], int(steps))[0]
        return coarse_on_case_grid(x0, target, case, self.encoding)

    def _refine_doses(self, case: Case, cands: list[Candidate], flip_average: bool = False) -> float:
        """Replace each candidate's dose by the full-res stage's; returns the seconds it took."""
        from diffkt3d.inference.full_res import refine_dose, stage_inputs

        t0 = time.perf_counter()
        stage = self.full_res["dose"]
        conditions = stage_inputs(case, stage)
        for c in cands:
            c.dose_gy = refine_dose(stage, case, c.dose_gy, conditions, self.device, flip_average=flip_average)
        return time.perf_counter() - t0

    # -- dose ------------------------------------------------------------------------------
    def predict_dose(self, case: Case, steps: int = DEFAULT_STEPS, candidates: int = DEFAULT_CANDIDATES,
                     seed: int = DEFAULT_SEED, preview: bool = False, aggregate: str = DEFAULT_AGGREGATE,
                     template: str | ScorecardTemplate | None = DEFAULT_TEMPLATE,
                     with_dvh: bool = True, on_step: StepCallback | None = None,
                     flip_average: bool = False) -> DosePrediction:
        """Predict the dose of a case.

        Args:
            steps: Euler steps (network evaluations per candidate); `preview` forces PREVIEW_STEPS.
                With a full-res dose stage the DiT samples the steps the stage was trained on
                (its ``coarse_steps``), and a stage that reads no coarse prediction runs alone (no
                sampling, one candidate, ``steps`` 0 in the result). A preview skips a stage that
                refines the DiT's dose: it is the DiT's 1-step dose on the working grid.
            candidates: independent samples from seeds seed, seed+1, ...
            aggregate: "best" = the candidate with the highest Scorecard total (best-of-n);
                "mean" = the per-voxel mean of the candidates (scored as its own entry).
            template: Scorecard template name/path or a parsed template (None: no Scorecard; "best"
                then means the first).
            with_dvh: build the DVH table of the returned dose (what a planner reads; False for
                callers that score the dose themselves, such as the benchmarks, so their timings
                stay the model's).
            on_step: called after each sampling step with (done, total); a server reports progress
                with it and cancels by raising `diffkt3d.errors.Cancelled` from it. A full-res
                stage, when the checkpoint has one, is counted as one more step (`StageProgress`).
            flip_average: test-time augmentation: each candidate is the mean of the sample on the
                case and the mirrored sample on its left-right mirror (the OpenKBP winner's
                test-time flip); twice the sampling time (`on_step` counts both passes). A full-res
                dose stage is flip-averaged the same way (twice its time). Off by default.
        """
        if steps < 1 or candidates < 1:
            raise ValueError(f"steps and candidates must be >= 1 (got steps={steps}, candidates={candidates})")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        case.validate(require=DOSE_PREDICTION_INPUTS)
        steps = PREVIEW_STEPS if preview else int(steps)
        stage = self.full_res.get("dose")
        if stage is not None and not stage.config.coarse_input:
            # the stage predicts the dose outright: no sampling, and one deterministic candidate
            return self._predict_dose_stage_only(case, seed, preview, template, with_dvh, on_step, flip_average)
        if stage is not None and preview:
            stage = None  # a preview is the DiT's quick look; the stage's seconds belong to the full prediction
        if stage is not None and stage.config.coarse_steps:
            steps = stage.config.coarse_steps  # the coarse prediction the stage was trained on
        t0 = time.perf_counter()
        conditions = self.encode_conditions(case, exclude={"dose"})  # a stored dose is never an input
        t1 = time.perf_counter()
        seeds = [int(seed) + k for k in range(int(candidates))]
        progress = StageProgress(on_step, stage is not None)
        sampling_step = progress.sampling()
        if not flip_average:
            x0 = self._sample(conditions, "dose", seeds, steps, sampling_step)
        else:
            from diffkt3d.training.augment import mirror_volumes

            first = second = None
            if sampling_step is not None:  # one progress count over both passes
                def first(done: int, total: int) -> None:
                    sampling_step(done, 2 * total)

                def second(done: int, total: int) -> None:
                    sampling_step(total + done, 2 * total)
            x0 = self._sample(conditions, "dose", seeds, steps, first)
            mirrored = self._sample(mirror_volumes(conditions, self.encoding.oar_channels), "dose", seeds, steps,
                                    second)
            x0 = 0.5 * (x0 + mirror_volumes({"dose": mirrored})["dose"])
        t2 = time.perf_counter()
        cands = [Candidate(id=f"c{k}-seed{s}", seed=s,
                           dose_gy=decode_dose(x0[k], case.grid, self.encoding, case.body))
                 for k, s in enumerate(seeds)]
        full_res_s = None
        if progress.stage:
            full_res_s = self._refine_doses(case, cands, flip_average)
            progress.stage_done(steps * (2 if flip_average else 1))
        if aggregate == "mean" and len(cands) > 1:
            mean = np.mean([c.dose_gy for c in cands], axis=0).astype(np.float32)
            cands.append(Candidate(id="mean", seed=int(seed), dose_gy=mean))
        t3 = time.perf_counter()
        tmpl = None
        if template:
            from diffkt3d.scorecard import load_template, score_case

            tmpl = load_template(template)
            for c in cands:
                c.scorecard = score_case(c.dose_gy, case, tmpl)
        t4 = time.perf_counter()
        if aggregate == "mean" and len(cands) > 1:
            chosen = cands[-1]
        elif tmpl is not None:
            chosen = max(cands, key=lambda c: c.total_score)
        else:
            chosen = cands[0]
        dvh = dvh_table(chosen.dose_gy, case) if with_dvh else {}
        t5 = time.perf_counter()
        timings = {"encode_s": t1 - t0, "sample_s": t2 - t1, "decode_s": t3 - t2, "scorecard_s": t4 - t3,
                   "dvh_s": t5 - t4, "total_s": t5 - t0}
        if full_res_s is not None:  # only then, so a model without a stage reports what it always did
            timings["full_res_s"] = full_res_s
        return DosePrediction(candidates=cands, chosen_id=chosen.id, steps=steps, seed=int(seed),
                              model_version=self.model_version, aggregate=aggregate,
                              template=str(template) if template else None, preview=bool(preview),
                              case=CaseInfo.of(case), dvh=dvh, timings={k: round(v, 4) for k, v in timings.items()},
                              full_res=full_res_s is not None)

    def _predict_dose_stage_only(self, case: Case, seed: int, preview: bool,
                                 template: str | ScorecardTemplate | None, with_dvh: bool,
                                 on_step: StepCallback | None, flip_average: bool = False) -> DosePrediction:
        """The dose of a full-res stage that reads no coarse prediction (a plain U-Net stage)."""
        from diffkt3d.inference.full_res import refine_dose

        t0 = time.perf_counter()
        stage = self.full_res["dose"]
        dose = refine_dose(stage, case, np.zeros(case.grid.shape, np.float32), device=self.device,
                           flip_average=flip_average)
        t1 = time.perf_counter()
        if on_step is not None:
            on_step(1, 1)
        cand = Candidate(id=f"c0-seed{int(seed)}", seed=int(seed), dose_gy=dose)
        if template:
            from diffkt3d.scorecard import load_template, score_case

            cand.scorecard = score_case(dose, case, load_template(template))
        t2 = time.perf_counter()
        dvh = dvh_table(dose, case) if with_dvh else {}
        t3 = time.perf_counter()
        timings = {"encode_s": 0.0, "sample_s": 0.0, "decode_s": 0.0, "full_res_s": t1 - t0,
                   "scorecard_s": t2 - t1, "dvh_s": t3 - t2, "total_s": t3 - t0}
        return DosePrediction(candidates=[cand], chosen_id=cand.id, steps=0, seed=int(seed),
                              model_version=self.model_version, aggregate="best",
                              template=str(template) if template else None, preview=bool(preview),
                              case=CaseInfo.of(case), dvh=dvh, timings={k: round(v, 4) for k, v in timings.items()},
                              full_res=True)

    # -- imputation ------------------------------------------------------------------------
    def imputable_structures(self, case: Case, target: str) -> list[str]:
        """Names of the masks an ``oar`` / ``ptv`` imputation of ``case`` returns, in their order.

        OARs: the model's OAR channels. PTVs: one per prescription level, the levels of the case's
        targets (OpenKBP's when it has none), or those a full-res PTV stage was trained on.
        """
        from diffkt3d.inference.full_res import mask_names

        if target not in ("oar", "ptv"):
            raise ValueError(f"{target!r} imputation returns no structures (only oar and ptv do)")
        if target in self.full_res:
            return mask_names(self.full_res[target])
        if target == "oar":
            return list(self.encoding.oar_channels)
        return [f"PTV{rx:g}" for rx in ptv_levels(case)]

    def check_structures(self, case: Case, target: str, structures: Sequence[str] | None) -> list[str] | None:
        """The requested structure names, checked: unknown names raise a ValueError naming the known ones."""
        if structures is None:
            return None
        if isinstance(structures, str) or not all(isinstance(n, str) for n in structures):
            raise ValueError(f"structures must be a list of names, found {structures!r}")
        known = self.imputable_structures(case, target)
        unknown = [n for n in structures if n not in known]
        if unknown or not structures:
            raise ValueError(f"cannot impute {target} structure(s) {unknown or '[] (an empty list)'} with this model; "
                             f"it imputes {known}")
        return list(dict.fromkeys(structures))

    def impute(self, case: Case, target: str, steps: int = DEFAULT_STEPS, seed: int = DEFAULT_SEED,
               on_step: StepCallback | None = None, structures: Sequence[str] | None = None) -> ImputationResult:
        """Generate a missing modality (ct / ptv / oar) from everything else the case has.

        The dose may be a condition here (Any2Any), unlike in dose prediction. `on_step`: as in
        `predict_dose` (called ``steps`` times, ``steps + 1`` when a full-res stage runs).
        `structures`: oar / ptv only, the masks to return (default: every one the model imputes,
        :meth:`imputable_structures`); checked before any work, unknown names raise a ValueError.
        The model imputes its structures jointly, so a subset costs the same time.
        """
        if target not in IMPUTABLE:
            raise ValueError(f"cannot impute {target!r}; imputable modalities: {IMPUTABLE}")
        if target not in self.model.config.modalities:
            raise ConfigError(f"this model was not trained with modality {target!r}")
        if structures is not None and target == "ct":
            raise ValueError("structures select masks of an oar or ptv imputation; a ct imputation has none")
        wanted = self.check_structures(case, target, structures) if target != "ct" else None
        t0 = time.perf_counter()
        conditions = self.encode_conditions(case, exclude={target})
        if not conditions:
            raise CaseError(f"nothing to condition the {target} imputation on", case=case.case_id)
        stage = self.full_res.get(target)
        progress = StageProgress(on_step, stage is not None)
        if stage is not None and not stage.config.coarse_input:
            # a stage that reads no coarse prediction (a peer): no sampling run to throw away
            steps = 0
            x0 = torch.zeros((self.encoding.channels()[target], *self.encoding.grid))
        else:
            if stage is not None and stage.config.coarse_steps:
                steps = stage.config.coarse_steps  # the coarse prediction the stage was trained on
            x0 = self._sample(conditions, target, [int(seed)], int(steps), progress.sampling())[0]
        t1 = time.perf_counter()
        result = ImputationResult(target=target, steps=int(steps), seed=int(seed), model_version=self.model_version)
        if stage is not None:
            result.full_res = True
            from diffkt3d.inference.full_res import refine_ct, refine_masks

            if target == "ct":
                result.ct_hu = refine_ct(stage, case, x0, self.device)
            else:
                result.masks = refine_masks(stage, case, x0, self.device)
            progress.stage_done(int(steps))
        elif target == "ct":
            ct = decode_ct(x0, case.grid, self.encoding)
            if case.body is not None:  # outside the body is air
                ct = np.where(case.body, ct, self.encoding.ct_window_hu[0]).astype(np.float32)
            result.ct_hu = ct
        elif target == "oar":
            result.masks = decode_oar(x0, case.grid, self.encoding)
        else:
            result.masks = decode_ptv(x0, case.grid, self.encoding, ptv_levels(case))
        if wanted is not None:
            result.masks = {n: result.masks[n] for n in wanted}
        if target in ("oar", "ptv") and case.body is not None:
            result.masks = {n: m & case.body for n, m in result.masks.items()}
        result.timings = {"total_s": round(time.perf_counter() - t0, 4), "sample_s": round(t1 - t0, 4)}
        if stage is not None:
            result.timings["full_res_s"] = round(time.perf_counter() - t1, 4)
        return result.gate(self.bundle.meta)

    def quality(self) -> dict[str, dict]:
        """The quality gate's verdict on each imputation target this model knows (``inference.quality``)."""
        return {t: target_quality(self.bundle.meta, t).to_dict() for t in IMPUTABLE
                if t in self.model.config.modalities}
