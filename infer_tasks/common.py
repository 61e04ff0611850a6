"""What every DiffKT3D infer task shares: the model provider, case loading from a request, errors.

Kept thin: a request is parsed once into a small dataclass and a core `Case`;
the model work is `diffkt3d.inference.Predictor`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffkt3d.data.case import Case
from diffkt3d.errors import CaseError, ConfigError
from diffkt3d.inference import CaseInfo, Predictor, default_model_path
from diffkt3d.inference.ct_backbone import CTImputationConfig
from diffkt3d.inference.prdit_predictor import PRDiTCTPredictor
from diffkt3d.io.case_folder import load_case_folder
from diffkt3d.io.image_guard import ImageLimits

log = logging.getLogger(__name__)

# Request keys the app sets before a task runs (see monailabel_app/main.py).
CASE_ID_KEY = "diffkt3d_case_id"
SOURCE_KEY = "diffkt3d_source"  # "datastore" | "session"
# Keys of an infer request that MONAI Label's route and the app set, not the client's `params`
# (monailabel_app/request_checks.py refuses them inside `params`).
SERVER_KEYS = frozenset({"model", "image", "session", "label", CASE_ID_KEY, SOURCE_KEY})
_SHOWN_CHARS = 80  # how much of a refused value an error message repeats

# Largest `steps` and `seed` a request may ask for (a seed must fit torch's 32-bit generators).
MAX_STEPS = 100
MAX_SEED = 2**31 - 1


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
    """Loads the predictor once and reloads it when the served checkpoint changes (a promotion).

    Which checkpoint is served: `override` when given (`--conf model`); else the one `served`
    names (the model registry's served version, `diffkt3d.models.registry`), so a promotion or a
    rollback takes over at the next request without a restart; else the shipped model.

    Args:
        shipped: the shipped default model (may not exist).
        served: returns the served checkpoint (None: the shipped model).
        override: explicit checkpoint, always served when given.
        device: torch device string (None: CUDA if available).
        vae_dir: Wan VAE folder for a latent-space checkpoint (`--conf vae_dir`); the checkpoint
            decides whether it is used, and a VAE other than its own is refused at load.
        latent_cache_dir: also keep condition latents on disk (`--conf latent_cache_dir`).
    """

    def __init__(self, shipped: Path, served: Callable[[], Path | None] | None = None, override: Path | None = None,
                 device: str | None = None, vae_dir: Path | None = None, latent_cache_dir: Path | None = None):
        self.shipped = Path(shipped)
        self.served = served
        self.override = Path(override) if override else None
        self.device = device
        self.vae_dir = Path(vae_dir) if vae_dir else None
        self.latent_cache_dir = Path(latent_cache_dir) if latent_cache_dir else None
        super().__init__()
        # One model instance serves every request; running two samplers on it at once would only
        # double the memory on a CPU box, so predictions are serialised.
        self.run_lock = threading.Lock()

    def current_path(self) -> Path | None:
        if self.override is not None:
            return self.override if self.override.is_file() else None
        path = self.served() if self.served is not None else None
        if path is None:
            path = self.shipped
        return path if path.is_file() else None

    def _missing(self) -> str:
        where = self.override or (self.served() if self.served is not None else None) or self.shipped
        return (f"no model available: {where} does not exist (ship weights, set DIFFKT3D_MODEL, train with "
                "POST /train/any2any, or promote an existing version: GET /diffkt3d/models)")

    def _load(self, path: Path) -> Predictor:
        try:
            return Predictor.load(path, device=self.device, vae_dir=self.vae_dir,
                                  latent_cache_dir=self.latent_cache_dir)
        except ConfigError as exc:  # the server's configuration, not the request, is at fault
            raise TaskError(503, f"the served model cannot be loaded: {exc}") from None

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


def find_case_root(folder: Path, max_depth: int | None = None) -> Path | None:
    """The folder holding a case's NIfTI files, or None if there is none.

    That is `folder` itself or, since archives and uploads often wrap the files in a directory, its
    only sub-folder (hidden and `__MACOSX` folders ignored), followed down at most `max_depth`
    levels (None: any depth). Both the session upload path and the datastore's add-case path use
    this, so a case archive is accepted or refused the same way on both.
    """
    if any(p.name.endswith((".nii.gz", ".nii")) for p in folder.iterdir()):
        return folder
    if max_depth == 0:
        return None
    subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
    if len(subdirs) != 1:
        return None
    return find_case_root(subdirs[0], None if max_depth is None else max_depth - 1)


def session_case_root(image: Path) -> Path:
    """The case folder of a session: the session's directory (several files), the directory of a
    single uploaded file, or the only sub-folder of an unpacked archive."""
    root = find_case_root(image if image.is_dir() else image.parent)
    if root is None:
        raise TaskError(400, "the session holds no NIfTI files: send ct.nii.gz and one <Structure>.nii.gz "
                             "per structure (see docs/request-format.md)")
    return root


def folder_size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def load_request_case(request: dict[str, Any], max_upload_bytes: int, image_limits: ImageLimits | None = None,
                      with_dose: bool = False) -> Case:
    """Load the case a request points at (datastore folder or session upload), without its dose
    unless `with_dose` (a reference to compare the prediction with; never a model input).

    `image_limits` (None: `ImageLimits.from_env()`) are checked on every image header before its
    data are read, so a header claiming a huge volume is refused without allocating it.

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
        case = load_case_folder(folder, with_dose=with_dose, limits=image_limits)
    except CaseError as exc:
        # Re-issue with the client's case id and bare file names: no server paths in messages.
        raise CaseError(exc.problem, case=case_id,
                        file=Path(exc.file).name if exc.file and exc.file != str(folder) else None) from None
    case.case_id = case_id
    return case


def case_summary(case: Case, source: str) -> dict[str, Any]:
    """The core's description of the case (`CaseInfo`) plus where the server read it from."""
    return {**CaseInfo.of(case).to_dict(), "source": source}


def shown(value: Any) -> str:
    """`repr(value)`, cut short: an error names the value without echoing a megabyte back."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + f"... ({len(text)} characters)"


def check_param_keys(request: dict[str, Any], known: frozenset[str], task: str) -> None:
    """Refuse parameters a task does not know: a misspelt `step` silently ran the default 10 steps.

    Raises:
        TaskError: 422 listing the unknown keys and the task's known parameters.
    """
    unknown = sorted(str(k) for k in set(request) - SERVER_KEYS - known)
    if unknown:
        raise TaskError(422, f"task {task!r}: unknown parameter(s) {shown(unknown)}; known parameters: "
                             f"{sorted(known)}")


def int_param(request: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = request.get(key, default)
    if isinstance(value, str) and len(value) <= 20:  # form fields arrive as text; "²".isdigit() is True
        try:
            value = int(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise TaskError(422, f"parameter {key!r} must be an integer in [{lo}, {hi}], found {shown(value)}")
    return value


def bool_param(request: dict[str, Any], key: str, default: bool) -> bool:
    value = request.get(key, default)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if not isinstance(value, bool):
        raise TaskError(422, f"parameter {key!r} must be true or false, found {shown(value)}")
    return value


def model_provider(served: Callable[[], Path | None], conf_model: str | None, device: str | None,
                   vae_dir: str | None = None, latent_cache_dir: str | None = None) -> ModelProvider:
    """The app's provider: `--conf model` when given, else the registry's served version, else the
    shipped model; and the VAE folder a latent-space checkpoint needs (`--conf vae_dir`,
    `latent_cache_dir`).

    Raises:
        ConfigError: `vae_dir` is given but is not a folder (refused at start, not at the first request).
    """
    if vae_dir and not Path(vae_dir).is_dir():
        raise ConfigError(f"--conf vae_dir {vae_dir}: not a folder (expected a diffusers AutoencoderKLWan folder)")
    return ModelProvider(default_model_path(), served, Path(conf_model) if conf_model else None, device,
                         vae_dir=Path(vae_dir) if vae_dir else None,
                         latent_cache_dir=Path(latent_cache_dir) if latent_cache_dir else None)
