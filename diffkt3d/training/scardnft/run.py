"""Entry points: :func:`run_scardnft` (Python / MONAI Label) and :func:`run_scardnft_from_yaml` (CLI)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffkt3d.errors import ConfigError
from diffkt3d.training.dataset import list_case_dirs
from diffkt3d.training.scardnft.config import ScardNFTConfig
from diffkt3d.training.scardnft.trainer import ProgressFn, ScardNFTResult, ScardNFTTrainer

__all__ = ["run_scardnft", "run_scardnft_from_yaml"]

log = logging.getLogger(__name__)


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
