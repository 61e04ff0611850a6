"""MONAI Label datastore over a PACS's DICOMweb endpoint (`--studies http(s)://<host>/dicom-web`).

MONAI Label's own DICOMweb datastore lists series, converts one series to NIfTI and writes DICOM
SEG back; it knows no RT objects and downloads a converter when it starts. This one:

* a case id is the SeriesInstanceUID of a CT series (`list_images`: QIDO-RS for CT series,
  cached `list_ttl_s` seconds);
* a case is assembled from the CT series' study (`diffkt3d.io.dicom_study.select_case_objects`:
  the structure set referencing the CT series, the plan referencing that structure set, the
  plan's clinical dose), fetched with WADO-RS, read by `read_dicom_case` (the same reader as
  `diffkt3d import dicom`) and kept as a case folder in the cache (`case_dir`), keyed by the
  chosen instances: a new structure set or plan in the PACS makes a new cache entry, an unchanged
  study is fetched once;
* what the server keeps (image info such as candidate Scorecard spreads, uploaded labels, the
  preference store and audit log of the app) lives in `<state_dir>`, never in the PACS;
* cases are added to and removed from the PACS by the clinic (DIMSE or STOW-RS), not through
  MONAI Label's datastore routes (409).

The cache holds patient data: by default `<state_dir>/dicomweb-cache`, or MONAI Label's
`MONAI_LABEL_DATASTORE_CACHE_PATH` / `MONAI_LABEL_DICOMWEB_CACHE_PATH`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests
from filelock import FileLock
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from pydicom.dataset import Dataset

from diffkt3d.errors import CaseError
from diffkt3d.ids import check_id
from diffkt3d.io.case_folder import save_case_folder
from diffkt3d.io.dicom import read_dicom_case
from diffkt3d.io.dicom_study import StudyRef, is_derived, select_case_objects
from diffkt3d.io.image_guard import ImageLimits, check_dicom_volume
from monailabel_app.datastore import InvalidIdError, RefusedChange, UnknownCaseError

log = logging.getLogger(__name__)

REF_FILE = "study_ref.json"  # beside the cached case folder: the study the case came from
CASE_SUBDIR = "case"
# Bound on a CT series fetched for one case (a whole-body scan has ~1000 slices).
MAX_CT_INSTANCES = 2000
# What case selection reads of an RT instance's header (a structure set's full metadata holds all
# its contour points: kept per series, only these are kept in memory).
HEADER_KEYWORDS = ("SOPInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDescription", "StructureSetLabel",
                   "StructureSetDate", "StructureSetTime", "InstanceCreationDate", "InstanceCreationTime",
                   "RTPlanLabel", "RTPlanDate", "RTPlanTime", "DoseSummationType", "ReferencedFrameOfReferenceSequence",
                   "ReferencedStructureSetSequence", "ReferencedRTPlanSequence")
MAX_CACHED_SERIES = 1024


class PacsError(CaseError):
    """The PACS did not answer as DICOMweb should (HTTP 502 to the client: the server's upstream)."""

    status = 502


def dicomweb_client(url: str):
    """A DICOMweb client for `url` with MONAI Label's own settings: user name and password
    (`MONAI_LABEL_DICOMWEB_USERNAME` / `_PASSWORD`, or `MONAI_LABEL_DATASTORE_USERNAME` /
    `_PASSWORD`) for HTTP basic auth, and the QIDO/WADO/STOW prefixes."""
    from dicomweb_client.session_utils import create_session_from_user_pass
    from monailabel.config import settings
    from monailabel.datastore.dicom import DICOMwebClientX

    user = settings.MONAI_LABEL_DICOMWEB_USERNAME or settings.MONAI_LABEL_DATASTORE_USERNAME
    password = settings.MONAI_LABEL_DICOMWEB_PASSWORD or settings.MONAI_LABEL_DATASTORE_PASSWORD
    session = create_session_from_user_pass(user, password) if user and password else None
    return DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                           wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                           stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)


def default_cache_dir(state_dir: Path) -> Path:
    from monailabel.config import settings

    configured = (settings.MONAI_LABEL_DATASTORE_CACHE_PATH or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
    return Path(configured) if configured else state_dir / "dicomweb-cache"


class PacsDatastore(Datastore):
    """Datastore whose cases are CT series of a DICOMweb server.

    Args:
        client: a `dicomweb_client.DICOMwebClient` (see `dicomweb_client(url)`).
        url: the DICOMweb base URL (for the name shown in /info/ and in messages).
        state_dir: server-side info, labels.
        cache_dir: assembled case folders (default `default_cache_dir(state_dir)`).
        image_limits: size limits checked on the DICOM headers before pixel data are decoded.
        list_ttl_s: how long a listing of the PACS is reused.
    """

    def __init__(self, client, url: str, state_dir: str | Path, cache_dir: str | Path | None = None,
                 image_limits: ImageLimits | None = None, list_ttl_s: float = 10.0):
        self.client = client
        self.url = url
        self.state_dir = Path(state_dir)
        (self.state_dir / "info").mkdir(parents=True, exist_ok=True)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(self.state_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.image_limits = image_limits
        self.list_ttl_s = list_ttl_s
        self._lock = FileLock(str(self.state_dir / "info.lock"), timeout=30)
        self._list_lock = threading.Lock()
        self._listing: tuple[float, dict[str, str]] | None = None  # (time, CT series -> study)
        self._headers: dict[tuple[str, int], list[Dataset]] = {}  # (series, instance count) -> headers
        self._name = f"DICOMweb {url}"
        self._description = "CT series of a PACS (DICOMweb); cases are assembled from their studies"

    # -- talking to the PACS --------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except requests.RequestException as exc:
            raise self._pacs_error(what, exc) from None

    def _pacs_error(self, what: str, exc: requests.RequestException) -> PacsError:
        if isinstance(exc, requests.HTTPError):
            code = exc.response.status_code if exc.response is not None else "?"
            hint = " (check MONAI_LABEL_DICOMWEB_USERNAME / _PASSWORD)" if code in (401, 403) else ""
            return PacsError(f"the PACS refused {what}: HTTP {code}{hint}", file=self.url)
        return PacsError(f"the PACS did not answer {what} ({type(exc).__name__})", file=self.url)

    def _ct_series(self) -> dict[str, str]:
        with self._list_lock:
            if self._listing is None or time.monotonic() - self._listing[0] > self.list_ttl_s:
                found = self._call("the CT series search (QIDO-RS)", self.client.search_for_series,
                                   search_filters={"Modality": "CT"})
                series = {}
                for item in found:
                    d = Dataset.from_json(item)
                    series[str(d.SeriesInstanceUID)] = str(d.StudyInstanceUID)
                self._listing = (time.monotonic(), series)
            return dict(self._listing[1])

    def study_of(self, image_id: str) -> str:
        """StudyInstanceUID of a CT series; UnknownCaseError (404) when the PACS has no such CT series."""
        _check(image_id)
        study = self._ct_series().get(image_id)
        if study is None:
            self._listing = None  # maybe it arrived a moment ago
            study = self._ct_series().get(image_id)
        if study is None:
            raise UnknownCaseError("the PACS has no CT series with this SeriesInstanceUID", case=image_id)
        return study

    def study_headers(self, study_uid: str) -> dict[str, list[Dataset]]:
        """Modality -> instance headers of the study's RT series (WADO-RS metadata, no pixel data)."""
        series = self._call("the study's series search (QIDO-RS)", self.client.search_for_series,
                            study_instance_uid=study_uid)
        headers: dict[str, list[Dataset]] = {}
        for item in series:
            d = Dataset.from_json(item)
            modality = str(d.get("Modality", "")).upper()
            if modality not in ("RTSTRUCT", "RTPLAN", "RTDOSE"):
                headers.setdefault(modality, [])
                continue
            key = (str(d.SeriesInstanceUID), int(d.get("NumberOfSeriesRelatedInstances") or -1))
            if key not in self._headers:
                meta = self._call(f"the metadata of a {modality} series (WADO-RS)",
                                  self.client.retrieve_series_metadata, study_uid, key[0])
                if len(self._headers) >= MAX_CACHED_SERIES:
                    self._headers.clear()
                self._headers[key] = [_keep(Dataset.from_json(m, bulk_data_uri_handler=lambda *a: b"")) for m in meta]
            headers.setdefault(modality, []).extend(self._headers[key])
        return headers

    # -- the case folder of a CT series ---------------------------------------------------------
    def case_dir(self, image_id: str) -> Path:
        """The assembled case folder of a CT series (fetched and converted on first use).

        Raises:
            InvalidIdError (400), UnknownCaseError (404), CaseError (422: e.g. no structure set
            references the CT series), PacsError (502).
        """
        return self.assemble(image_id)[0]

    def study_ref(self, image_id: str) -> tuple[StudyRef, list[str]]:
        """The study reference and assembly notes of a case (what derived objects need)."""
        entry = self.assemble(image_id)[0].parent
        data = json.loads((entry / REF_FILE).read_text())
        return StudyRef.from_dict(data["ref"]), list(data["notes"])

    def assemble(self, image_id: str) -> tuple[Path, str]:
        """(case folder, study UID) of a CT series, fetched unless the cache holds the same objects."""
        study = self.study_of(image_id)
        headers = self.study_headers(study)
        selection = select_case_objects(image_id, headers, image_id)
        key = hashlib.sha256(json.dumps([image_id, selection.instances()]).encode()).hexdigest()[:16]
        series_dir = self.cache_dir / image_id
        entry = series_dir / key
        if (entry / REF_FILE).exists():
            return entry / CASE_SUBDIR, study
        series_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(series_dir / ".lock"), timeout=600):
            if not (entry / REF_FILE).exists():
                self._fetch(image_id, study, selection, entry)
                for old in series_dir.iterdir():  # earlier assemblies of this CT series are stale now
                    if old.is_dir() and old != entry:
                        shutil.rmtree(old, ignore_errors=True)
        return entry / CASE_SUBDIR, study

    def _fetch(self, image_id: str, study: str, selection, entry: Path) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=entry.parent))
        try:
            dicom = tmp / "dicom"
            dicom.mkdir()
            ct = self._call("the CT series (WADO-RS)", self.client.retrieve_series_metadata, study, image_id)
            if len(ct) > MAX_CT_INSTANCES:
                raise CaseError(f"the CT series has {len(ct)} instances, more than {MAX_CT_INSTANCES}", case=image_id)
            ct_headers = [Dataset.from_json(m, bulk_data_uri_handler=lambda *a: b"") for m in ct]
            # the size the headers promise is checked before anything is downloaded
            first = ct_headers[0]
            check_dicom_volume((int(first.get("Columns", 0) or 0), int(first.get("Rows", 0) or 0), len(ct)), 4,
                               int(first.get("SamplesPerPixel", 1) or 1), self.image_limits or ImageLimits.from_env(),
                               image_id, None, "CT series")
            try:  # one instance at a time: a long series never sits in memory whole
                for d in self.client.iter_series(study, image_id):
                    d.save_as(str(dicom / f"CT_{d.SOPInstanceUID}.dcm"))
            except requests.RequestException as exc:
                raise self._pacs_error("the CT series (WADO-RS)", exc) from None
            for modality, header in (("RTSTRUCT", selection.rtstruct), ("RTPLAN", selection.rtplan),
                                     ("RTDOSE", selection.rtdose)):
                if header is None:
                    continue
                d = self._call(f"the {modality} (WADO-RS)", self.client.retrieve_instance, study,
                               str(header.SeriesInstanceUID), str(header.SOPInstanceUID))
                d.save_as(str(dicom / f"{modality}_{d.SOPInstanceUID}.dcm"))
            case = read_dicom_case(dicom, with_dose=selection.rtdose is not None, case_id=image_id,
                                   limits=self.image_limits)
            save_case_folder(case, tmp / CASE_SUBDIR)
            ref = StudyRef.of(ct_headers, selection, case.grid)
            notes = [*selection.notes, *case.plan.inferred]
            (tmp / REF_FILE).write_text(json.dumps({"ref": ref.to_dict(), "notes": notes,
                                                   "study": study, "instances": selection.instances()}))
            shutil.rmtree(dicom)
            os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def has_case(self, image_id: str) -> bool:
        try:
            self.study_of(image_id)
            return True
        except (ValueError, CaseError):
            return False

    def list_images(self) -> list[str]:
        return sorted(self._ct_series())

    # -- Datastore API ----------------------------------------------------------------------------
    def name(self) -> str:
        return self._name

    def set_name(self, name: str):
        self._name = name

    def description(self) -> str:
        return self._description

    def set_description(self, description: str):
        self._description = description

    def datalist(self) -> list[dict[str, Any]]:
        return [{"image": i, "label": i} for i in self.get_labeled_images()]

    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        tags = {}
        for tag_dir in (self.state_dir / "labels").glob("*"):
            if (tag_dir / f"{image_id}.nii.gz").exists():
                tags[tag_dir.name] = image_id
        return tags

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        return image_id if tag in self.get_labels_by_image_id(image_id) else ""

    def get_image(self, image_id: str, params=None) -> Any:
        return str(self.case_dir(image_id))

    def get_image_uri(self, image_id: str) -> str:
        return str(self.case_dir(image_id))

    def get_label(self, label_id: str, label_tag: str, params=None) -> Any:
        return self.get_label_uri(label_id, label_tag)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        if label_tag == DefaultLabelTag.FINAL.value:
            return str(self.case_dir(label_id) / "dose.nii.gz")
        _check(label_tag, "label tag")
        return str(self.state_dir / "labels" / label_tag / f"{_check(label_id)}.nii.gz")

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        """Server-side info only: the strategies call this for every case, so it never fetches."""
        return {"case_id": image_id, "study": self._ct_series().get(image_id), **self._read_info(image_id)}

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        return self._read_info(label_id).get("labels", {}).get(label_tag, {})

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """CT series whose study holds a clinical RTDOSE (not a DiffKT3D prediction): the training cases.
        Which dose belongs to which plan is settled when the case is assembled."""
        if label_tag not in (None, DefaultLabelTag.FINAL.value):
            return [i for i in self.list_images() if label_tag in self.get_labels_by_image_id(i)]
        doses = self._call("the RTDOSE series search (QIDO-RS)", self.client.search_for_series,
                           search_filters={"Modality": "RTDOSE"})
        studies = {str(d.StudyInstanceUID) for d in map(Dataset.from_json, doses) if not is_derived(d)}
        return [i for i, s in sorted(self._ct_series().items()) if s in studies]

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        labelled = set(self.get_labeled_images(label_tag, labels))
        return [i for i in self.list_images() if i not in labelled]

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        raise RefusedChange("the PACS datastore does not export archives: the PACS is the archive")

    def refresh(self) -> None:
        self._listing = None

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        raise RefusedChange("cases are added to the PACS (DICOM C-STORE or STOW-RS), not through this server",
                            case=image_id)

    def remove_image(self, image_id: str) -> None:
        raise RefusedChange("cases are removed in the PACS, not through this server", case=image_id)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        if label_tag == DefaultLabelTag.FINAL.value:
            raise RefusedChange("the 'final' label is the study's clinical RTDOSE and is read-only", case=image_id)
        self.study_of(image_id)
        dest = Path(self.get_label_uri(image_id, label_tag))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(label_filename, str(dest) + ".part")
        os.replace(str(dest) + ".part", dest)
        self.update_label_info(image_id, label_tag, label_info or {})
        return image_id

    def remove_label(self, label_id: str, label_tag: str) -> None:
        if label_tag == DefaultLabelTag.FINAL.value:
            raise RefusedChange("the 'final' label (the clinical RTDOSE) is read-only", case=label_id)
        Path(self.get_label_uri(label_id, label_tag)).unlink(missing_ok=True)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        _check(image_id)
        with self._lock:
            data = self._read_info(image_id)
            data.update(info)
            self._write_info(image_id, data)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        with self._lock:
            data = self._read_info(label_id)
            data.setdefault("labels", {}).setdefault(label_tag, {}).update(info)
            self._write_info(label_id, data)

    def status(self) -> dict[str, Any]:
        ids = self.list_images()
        return {"total": len(ids), "completed": 0, "label_tags": {}, "train": {"total": 0},
                "pacs": self.url}

    def json(self):
        return {i: {"image": {"id": i}, "labels": self.get_labels_by_image_id(i), "info": self._read_info(i)}
                for i in self.list_images()}

    # -- info files (as the case-folder datastore keeps them) ---------------------------------------
    def _info_path(self, image_id: str) -> Path:
        return self.state_dir / "info" / f"{_check(image_id)}.json"

    def _read_info(self, image_id: str) -> dict[str, Any]:
        path = self._info_path(image_id)
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("info file %s is unreadable; ignoring it", path)
            return {}

    def _write_info(self, image_id: str, data: dict[str, Any]) -> None:
        path = self._info_path(image_id)
        tmp = path.with_suffix(".json.part")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)


def _keep(header: Dataset) -> Dataset:
    out = Dataset()
    for keyword in HEADER_KEYWORDS:
        if keyword in header:
            setattr(out, keyword, header.get(keyword))
    return out


def _check(value: str, what: str = "case id (CT SeriesInstanceUID)") -> str:
    try:
        return check_id(value, what)
    except ValueError as exc:
        raise InvalidIdError(str(exc)) from None
