"""MONAI Label datastore over a directory of case folders (sample-data/, OpenKBP splits).

MONAI Label's LocalDatastore expects one image FILE per case at the top level; our cases are
FOLDERS (ct + one mask per structure + plan.json), so this implements `Datastore` directly:

* a case id is a sub-folder name of the studies dir (hidden folders are ignored);
* the "image" URI of a case is its folder; the `final` label is its `dose.nii.gz` (when present),
  so `datalist()` gives exactly the cases usable for supervised training;
* listings a client can read (`GET /datastore/?output=all|train`, `json()` and `datalist()`) carry
  case ids, never server paths: where the studies live is nobody's business but the server's, and
  the train tasks ask for a case's folder by id (`get_image_uri`);
* server-side state (image info such as candidate Scorecard spreads, uploaded labels) lives in
  `<state_dir>` (default `<studies>/.diffkt3d/`), never inside a case folder, so the data a
  clinic hands us stays untouched.

Ids are checked against a strict pattern before they touch the file system (no path traversal).
Refusals carry an HTTP status (`status`): the server turns every `CaseError` from here into that
4xx (routes.install), never a 500: bad id 400, unknown case 404, a change refused by design 409
(removing a case, the read-only `final` label, an existing case id), anything else 422.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

from diffkt3d.constants import CT_FILE, DOSE_FILE
from diffkt3d.errors import CaseError
from diffkt3d.ids import check_id
from diffkt3d.io.archive import ArchiveError, ArchiveLimits, unpack_archive
from infer_tasks.common import find_case_root

log = logging.getLogger(__name__)

DEFAULT_ARCHIVE_BYTES = 512 * 2**20


class UnknownCaseError(CaseError):
    """A case id that is well formed but not in the datastore (HTTP 404)."""

    status = 404


class InvalidIdError(CaseError, ValueError):
    """A case id or label tag that does not match the id pattern (HTTP 400; also a ValueError)."""

    status = 400


class RefusedChange(CaseError):
    """A datastore change the server refuses by design, whoever asks (HTTP 409)."""

    status = 409


def _check_id(value: str, what: str) -> str:
    try:
        return check_id(value, what)
    except ValueError as exc:
        raise InvalidIdError(str(exc)) from None


class CaseFolderDatastore(Datastore):
    """Datastore whose images are case folders.

    Args:
        studies: directory whose sub-folders are case folders.
        state_dir: where server-side info/labels are kept (default `<studies>/.diffkt3d`).
        archive_limits: what an uploaded case archive may expand to (default 512 MiB, the app's
            default upload limit; the app passes its `max_upload_mb`).
    """

    def __init__(self, studies: str | Path, state_dir: str | Path | None = None,
                 archive_limits: ArchiveLimits | None = None):
        self.archive_limits = archive_limits or ArchiveLimits(max_bytes=DEFAULT_ARCHIVE_BYTES)
        self.root = Path(studies).resolve()
        if not self.root.is_dir():
            raise CaseError("studies directory does not exist", file=str(self.root))
        self.state_dir = Path(state_dir) if state_dir else self.root / ".diffkt3d"
        (self.state_dir / "info").mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.state_dir / "info.lock"), timeout=30)
        self._name = "DiffKT3D case folders"
        self._description = f"Case folders in {self.root.name}"

    # -- ids and paths ---------------------------------------------------------------------
    def case_dir(self, image_id: str) -> Path:
        """Folder of a case; raises InvalidIdError (a ValueError: bad id) or UnknownCaseError (no such case)."""
        _check_id(image_id, "case id")
        folder = self.root / image_id
        # resolve() guards against a case folder that is a symlink pointing outside the root
        if not folder.is_dir() or folder.resolve().parent != self.root:
            raise UnknownCaseError("no such case in the datastore", case=image_id)
        return folder

    def has_case(self, image_id: str) -> bool:
        try:
            self.case_dir(image_id)
            return True
        except (ValueError, CaseError):
            return False

    def list_images(self) -> list[str]:
        out = []
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and not p.name.startswith(".") and (
                    any(q.name.endswith((".nii.gz", ".nii")) for q in p.iterdir())):
                try:
                    check_id(p.name, "case id")
                except ValueError:
                    log.warning("skipping folder %r: not a valid case id", p.name)
                    continue
                out.append(p.name)
        return out

    # -- Datastore API -----------------------------------------------------------------------
    def name(self) -> str:
        return self._name

    def set_name(self, name: str):
        self._name = name

    def description(self) -> str:
        return self._description

    def set_description(self, description: str):
        self._description = description

    def datalist(self) -> list[dict[str, Any]]:
        """Cases with a reference dose: {"image": case id, "label": case id} (ids, not paths: this is
        what `GET /datastore/?output=train` shows)."""
        return [{"image": i, "label": i} for i in self.get_labeled_images()]

    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        tags = {}
        if (self.case_dir(image_id) / DOSE_FILE).exists():
            tags[DefaultLabelTag.FINAL.value] = image_id
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
            return str(self.case_dir(label_id) / DOSE_FILE)
        _check_id(label_tag, "label tag")
        return str(self.state_dir / "labels" / label_tag / f"{_check_id(label_id, 'case id')}.nii.gz")

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        folder = self.case_dir(image_id)
        names = sorted(p.name for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii")))
        info = {"case_id": image_id, "files": names, "has_ct": CT_FILE in names,
                "has_dose": DOSE_FILE in names}
        info.update(self._read_info(image_id))
        return info

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        return self._read_info(label_id).get("labels", {}).get(label_tag, {})

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        tag = label_tag or DefaultLabelTag.FINAL.value
        return [i for i in self.list_images() if tag in self.get_labels_by_image_id(i)]

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        labelled = set(self.get_labeled_images(label_tag, labels))
        return [i for i in self.list_images() if i not in labelled]

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        """A zip of the labelled case folders (at most `limit_cases`), in a temp file."""
        ids = self.get_labeled_images()[: limit_cases or None]
        staging = Path(tempfile.mkdtemp(prefix="diffkt3d-dataset-"))
        for i in ids:
            shutil.copytree(self.root / i, staging / i)
        archive = shutil.make_archive(str(staging), "zip", staging)
        shutil.rmtree(staging, ignore_errors=True)
        return archive

    def refresh(self) -> None:
        """Nothing cached: every call lists the folder afresh."""

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Add a case from a folder or an archive (.zip/.tar/.tar.gz) of a case folder."""
        _check_id(image_id, "case id")
        dest = self.root / image_id
        if dest.exists():
            raise RefusedChange("a case with this id already exists (choose another id)", case=image_id)
        src = Path(image_filename)
        tmp = Path(tempfile.mkdtemp(prefix=".adding-", dir=self.root))
        try:
            if src.is_dir():
                shutil.copytree(src, tmp / "case")
            else:
                unpack_archive(src, tmp / "case", self.archive_limits)
            # One wrapping folder is accepted (archives often have one), not deeper nesting.
            case_root = find_case_root(tmp / "case", max_depth=1)
            if case_root is None:
                raise ValueError("no NIfTI files found (expected the case folder's files at the top level or in "
                                 "one sub-folder)")
            case_root.rename(dest)
        except ArchiveError as exc:
            refused = CaseError(f"cannot add case: {exc}", case=image_id)
            if exc.kind in ("too_large", "too_many_members"):
                refused.status = 413  # type: ignore[attr-defined]
            raise refused from None
        except ValueError as exc:
            raise CaseError(f"cannot add case: {exc}", case=image_id) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if image_info:
            self.update_image_info(image_id, image_info)
        return image_id

    def remove_image(self, image_id: str) -> None:
        raise RefusedChange("removing cases through the server is not supported, for any role (case folders "
                            "are the clinic's data; an administrator removes the folder on disk)", case=image_id)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        if label_tag == DefaultLabelTag.FINAL.value:
            raise RefusedChange("the 'final' label is the case's reference dose.nii.gz and is read-only",
                                case=image_id)
        self.case_dir(image_id)
        dest = Path(self.get_label_uri(image_id, label_tag))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(label_filename, str(dest) + ".part")
        os.replace(str(dest) + ".part", dest)
        self.update_label_info(image_id, label_tag, label_info or {})
        return image_id

    def remove_label(self, label_id: str, label_tag: str) -> None:
        if label_tag == DefaultLabelTag.FINAL.value:
            raise RefusedChange("the 'final' label (dose.nii.gz) is read-only", case=label_id)
        Path(self.get_label_uri(label_id, label_tag)).unlink(missing_ok=True)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        """Shallow-merge `info` into the case's stored info (atomic write under a file lock)."""
        self.case_dir(image_id)
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
        labelled = self.get_labeled_images()
        return {"total": len(ids), "completed": len(labelled), "label_tags": {"final": len(labelled)},
                "train": {"total": len(labelled)}}

    def json(self):
        return {i: {"image": {"id": i}, "labels": self.get_labels_by_image_id(i), "info": self._read_info(i)}
                for i in self.list_images()}

    # -- info files ----------------------------------------------------------------------------
    def _info_path(self, image_id: str) -> Path:
        return self.state_dir / "info" / f"{_check_id(image_id, 'case id')}.json"

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
