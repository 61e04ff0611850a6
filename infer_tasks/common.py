"""What every DiffKT3D infer task shares: the model provider, case loading from a request, errors.

Kept thin, so the core stays the one truth: a request is parsed once into a small dataclass and a core `Case`;
the model work is `diffkt3d.inference.Predictor`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffkt3d.data.case import Case
from diffkt3d.errors import CaseError
from diffkt3d.inference import Predictor, default_model_path
from diffkt3d.inference.ct_backbone import CTImputationConfig
from diffkt3d.inference.prdit_predictor import PRDiTCTPredictor
from diffkt3d.io.case_folder import load_case_folder
from diffkt3d.metrics import dvh

log = logging.getLogger(__name__)

# Request keys the app sets before a task runs (see monailabel_app/main.py).
CASE_ID_KEY = "diffkt3d_case_id"
SOURCE_KEY = "diffkt3d_source"  # "datastore" | "session"


class TaskError(Exception):
    """A request the task cannot serve; the app turns it into an HTTP error with this status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _ReloadingModel:
    """Caches one loaded model and reloads it when the file `current_path()` names changes.

    Subclasses say which file is served (`current_path`), how to load it (`_load`) and what to tell
    the client when there is none (`_missing`); the cache key is (path, mtime), so a new training
    run or a replaced checkpoint takes over at the next request without a restart.
    """

    label = "model"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, int] | None = None
        self._predictor = None

    def current_path(self) -> Path | None:
        raise NotImplementedError

    def _load(self, path: Path):
        raise NotImplementedError

    def _missing(self) -> str:
        raise NotImplementedError

    def get(self):
        path = self.current_path()
        if path is None:
            raise TaskError(503, self._missing())
        key = (str(path), path.stat().st_mtime_ns)
        with self._lock:
            if key != self._key:
                log.info("loading %s %s", self.label, path)
                self._predictor = self._load(path)
                self._key = key
            assert self._predictor is not None
            return self._predictor

    def version(self) -> str | None:
        """Model version if a model is loadable, else None (for /info/)."""
        try:
            return self.get().model_version
        except Exception as exc:  # /info/ must keep working without a model
            log.warning("%s not loadable: %s", self.label, exc)
            return None


class ModelProvider(_ReloadingModel):
    """Loads the predictor once and reloads it when the served checkpoint changes (new training run).

    Which checkpoint is served: `override` when given (`--conf model`); else the NEWEST of the models
    this server trained (`trained`, e.g. any2any and scardnft outputs), so a finished training run
    takes over at the next request without a restart; else the shipped model.

    Args:
        shipped: the shipped default model (may not exist).
        trained: checkpoints written by the train tasks (may not exist yet).
        override: explicit checkpoint, always served when given.
        device: torch device string (None: CUDA if available).
    """

    def __init__(self, shipped: Path, trained: list[Path], override: Path | None = None,
                 device: str | None = None):
        self.shipped = Path(shipped)
        self.trained = [Path(p) for p in trained]
        self.override = Path(override) if override else None
        self.device = device
        super().__init__()
        # One model instance serves every request; running two samplers on it at once would only
        # double the memory on a CPU box, so predictions are serialised.
        self.run_lock = threading.Lock()

    def current_path(self) -> Path | None:
        if self.override is not None:
            return self.override if self.override.is_file() else None
        trained = [p for p in self.trained if p.is_file()]
        if trained:
            return max(trained, key=lambda p: p.stat().st_mtime_ns)
        return self.shipped if self.shipped.is_file() else None

    def _missing(self) -> str:
        where = [self.override] if self.override else [self.shipped, *self.trained]
        return ("no model available: none of " + ", ".join(str(p) for p in where)
                + " exists (ship weights, set DIFFKT3D_MODEL, or train with POST /train/any2any)")

    def _load(self, path: Path) -> Predictor:
        return Predictor.load(path, device=self.device)

    def get(self) -> Predictor:
        return super().get()


class PRDiTModelProvider(_ReloadingModel):
    """Serves the PRDiT CT-imputation checkpoint of ``--conf ct_backbone prdit``.

    Same ``get()`` / ``run_lock`` / ``version()`` surface as :class:`ModelProvider`, so the
    ``impute_ct`` task does not know which backbone it runs. The checkpoint is loaded at the first
    request and again when the file changes; ``run_lock`` is the Any2Any provider's, so one
    prediction runs at a time whichever model it uses.

    Args:
        config: the parsed CT-imputation config (backbone "prdit", checkpoint, k, sampler).
        run_lock: the lock that serialises all predictions of the app.
    """

    label = "PRDiT CT model"

    def __init__(self, config: CTImputationConfig, run_lock: threading.Lock):
        self.config = config
        self.run_lock = run_lock
        super().__init__()

    def current_path(self) -> Path | None:
        path = self.config.prdit_model
        return path if path is not None and path.is_file() else None

    def _missing(self) -> str:
        return f"PRDiT CT model not available: {self.config.prdit_model} does not exist"

    def _load(self, path: Path) -> PRDiTCTPredictor:
        return PRDiTCTPredictor.load(self.config)

    def get(self) -> PRDiTCTPredictor:
        return super().get()


def session_case_root(image: Path) -> Path:
    """The case folder of a session: the session's directory (several files), the directory of a
    single uploaded file, or the only sub-folder of an unpacked archive."""
    folder = image if image.is_dir() else image.parent
    if any(p.name.endswith((".nii.gz", ".nii")) for p in folder.iterdir()):
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
    if len(subdirs) == 1:
        return session_case_root(subdirs[0])
    raise TaskError(400, "the session holds no NIfTI files: send ct.nii.gz and one <Structure>.nii.gz "
                         "per structure (see docs/request-format.md)")


def folder_size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def load_request_case(request: dict[str, Any], max_upload_bytes: int) -> Case:
    """Load the case a request points at (datastore folder or session upload), without its dose.

    Raises:
        CaseError: the case cannot be used; file names are reported without server paths.
        TaskError: 400 (not a case), 413 (upload too large).
    """
    case_id = str(request.get(CASE_ID_KEY) or "case")
    image = Path(str(request["image"]))
    folder = image
    if request.get(SOURCE_KEY) == "session":
        folder = session_case_root(image)
        size = folder_size_bytes(folder)
        if size > max_upload_bytes:
            raise TaskError(413, f"case {case_id}: upload is {size / 2**20:.1f} MB, the limit is "
                                 f"{max_upload_bytes / 2**20:.0f} MB")
    try:
        case = load_case_folder(folder, with_dose=False)
    except CaseError as exc:
        # Re-issue with the client's case id and bare file names: no server paths in messages.
        raise CaseError(exc.problem, case=case_id,
                        file=Path(exc.file).name if exc.file and exc.file != str(folder) else None) from None
    case.case_id = case_id
    return case


@dataclass
class StructureDvh:
    """DVH summary of one structure on a dose (Gy) - what the response JSON reports."""

    Dmean: float
    Dmax: float
    Dmin: float
    D95: float
    D99: float
    D1: float
    D0_1cc: float
    volume_cc: float

    def to_dict(self) -> dict[str, float]:
        return {"Dmean": self.Dmean, "Dmax": self.Dmax, "Dmin": self.Dmin, "D95%": self.D95,
                "D99%": self.D99, "D1%": self.D1, "D0.1cc": self.D0_1cc, "volume_cc": self.volume_cc}


def dvh_table(dose_gy: np.ndarray, case: Case) -> dict[str, dict[str, float]]:
    """DVH metrics (Gy) of every non-empty structure, via diffkt3d.metrics.dvh."""
    voxel_cc = case.grid.voxel_volume_mm3 / 1000.0
    out: dict[str, dict[str, float]] = {}
    for name, s in case.structures.items():
        if not s.mask.any():
            continue
        row = StructureDvh(
            Dmean=dvh.mean_dose(dose_gy, s.mask), Dmax=dvh.max_dose(dose_gy, s.mask),
            Dmin=dvh.min_dose(dose_gy, s.mask), D95=dvh.dose_at_volume_pct(dose_gy, s.mask, 95.0),
            D99=dvh.dose_at_volume_pct(dose_gy, s.mask, 99.0), D1=dvh.dose_at_volume_pct(dose_gy, s.mask, 1.0),
            D0_1cc=dvh.dose_at_volume_cc(dose_gy, s.mask, 0.1, voxel_cc),
            volume_cc=float(s.mask.sum()) * voxel_cc)
        out[name] = {k: round(v, 4) for k, v in row.to_dict().items()}
    return out


def case_summary(case: Case, source: str) -> dict[str, Any]:
    return {"id": case.case_id, "source": source, "shape": list(case.grid.shape),
            "spacing_mm": [round(v, 4) for v in case.grid.spacing_mm],
            "structures": {n: {"role": s.role, "prescription_gy": s.prescription_gy}
                           for n, s in case.structures.items()},
            "inferred": list(case.plan.inferred)}


def int_param(request: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = request.get(key, default)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise TaskError(422, f"parameter {key!r} must be an integer in [{lo}, {hi}], found {value!r}")
    return value


def bool_param(request: dict[str, Any], key: str, default: bool) -> bool:
    value = request.get(key, default)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if not isinstance(value, bool):
        raise TaskError(422, f"parameter {key!r} must be true or false, found {value!r}")
    return value


def model_provider(model_dir: Path, conf_model: str | None, device: str | None) -> ModelProvider:
    """The app's provider: shipped model, models trained into `model_dir`, optional `--conf model`."""
    return ModelProvider(default_model_path(), [model_dir / "any2any" / "model.pt", model_dir / "scardnft" / "model.pt"],
                         Path(conf_model) if conf_model else None, device)
