"""PUT /session/: MONAI Label's session upload, rebuilt to refuse hostile uploads.

MONAI Label 0.8.5's own route (monailabel/endpoints/session.py + utils/sessions.py) writes every
upload to disk, unpacks an archive with `shutil.unpack_archive` when `uncompress=true` (members
may climb out with `..`, links are created and followed, a zip is written out in full before any
size check), never looks at what it stored, and leaves a single archive sent without the flag (the
stock `MONAILabelClient.create_session`) packed, so inference finds "no NIfTI files".

This route keeps its interface (form field `files`, query `uncompress`, `expiry`; answer
`{"session_id", "session_info"}`) and its session store, and changes how an upload gets there:

1. the files are written to a private staging folder under their base names, within the upload
   limit (`max_upload_mb`);
2. a single file that is an archive (by content: zip, tar, tar.gz ...) is unpacked with
   `diffkt3d.io.archive.unpack_archive` (members checked before anything is written, bytes
   counted while streaming); `uncompress=true` with a file that is not an archive is refused;
3. every NIfTI file's header is checked (`diffkt3d.io.image_guard`: real-valued 3D volume within
   `max_image_mb`) and its data confirmed complete, without reading the voxels into memory;
4. only then does MONAI Label's `Sessions.add_session` move the staged result into a new session
   folder. A refusal answers 4xx naming the problem and leaves no session and no staged files.

The audit trail (monailabel_app/auth.py, action `session.upload`) gets the session id, file count
and size, or the kind of refusal; never file names, which can carry a patient's name.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO

from fastapi import File, HTTPException, Request, UploadFile

from diffkt3d.errors import CaseError
from diffkt3d.io.archive import ArchiveError, ArchiveLimits, archive_format, unpack_archive
from diffkt3d.io.image_guard import ImageLimits, check_nifti_complete, check_nifti_header
from monailabel_app.auth import STATE_AUDIT, UserDep
from monailabel_app.redact import redact

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_ARCHIVE_STATUS = {"too_large": 413, "too_many_members": 413, "not_archive": 415}


@dataclass(frozen=True)
class UploadLimits:
    """Limits on one session upload.

    Args:
        max_upload_bytes: all files together, as sent and as unpacked (`--conf max_upload_mb`).
        image: per-image header limits (`--conf max_image_mb`).
        max_archive_members: files and folders one archive may hold.
    """

    max_upload_bytes: int
    image: ImageLimits = ImageLimits()
    max_archive_members: int = 10_000


class UploadRefused(Exception):
    """An upload that is not stored: HTTP `status`, a `detail` for the client, a one-word `kind`
    (no file names) for the audit trail."""

    def __init__(self, status: int, detail: str, kind: str):
        super().__init__(detail)
        self.status, self.detail, self.kind = status, detail, kind


def stage_upload(files: list[tuple[str, BinaryIO]], staging: Path, uncompress: bool, limits: UploadLimits) -> Path:
    """Write, unpack and check an upload inside `staging` (steps 1-3 of the module docstring).

    Args:
        files: (client's file name, readable stream) per uploaded file.
        staging: an empty folder of the server's; the caller removes it.
        uncompress: the client says the (single) file is an archive.

    Returns:
        What the session holds: the single uploaded file, or the folder of files.

    Raises:
        UploadRefused: the upload must not be stored.
    """
    received = staging / "received"
    received.mkdir()
    saved = [_save(name, stream, received, limits.max_upload_bytes) for name, stream in files]
    if not saved:
        raise UploadRefused(400, "no files in the upload (form field 'files')", "empty")
    image: Path = received if len(saved) > 1 else saved[0]
    if len(saved) == 1 and (uncompress or archive_format(saved[0]) is not None):
        try:
            unpack_archive(saved[0], staging / "case",
                           ArchiveLimits(limits.max_upload_bytes, limits.max_archive_members))
        except ArchiveError as exc:
            raise UploadRefused(_ARCHIVE_STATUS.get(exc.kind, 400), redact(str(exc)), exc.kind) from None
        saved[0].unlink()
        image = staging / "case"
    _check_images(image if image.is_dir() else image.parent, limits.image)
    return image


def _save(name: str, stream: BinaryIO, folder: Path, max_bytes: int) -> Path:
    """One uploaded file under its base name (MONAI Label's rule: path parts of a name are dropped)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if base in ("", ".", "..") or any(ord(c) < 32 for c in base):
        raise UploadRefused(400, "an uploaded file has no usable name (send each file with its base name, e.g. "
                                 "ct.nii.gz)", "bad_name")
    target = folder / base
    if target.exists():
        raise UploadRefused(400, redact(f"two uploaded files are named {base!r}"), "bad_name")
    budget = max_bytes - sum(p.stat().st_size for p in folder.iterdir())
    with open(target, "xb") as out:
        while chunk := stream.read(_CHUNK):
            budget -= len(chunk)
            if budget < 0:
                raise UploadRefused(413, f"the upload is larger than the server's upload limit of "
                                         f"{max_bytes / 2**20:.0f} MB (max_upload_mb)", "too_large")
            out.write(chunk)
    return target


def _check_images(folder: Path, limits: ImageLimits) -> None:
    """Header and completeness of every NIfTI file under `folder`, before anything reads its voxels."""
    for path in sorted(folder.rglob("*")):
        if not (path.is_file() and path.name.endswith((".nii", ".nii.gz"))):
            continue
        try:
            check_nifti_complete(path, check_nifti_header(path, limits))
        except CaseError as exc:
            name = path.relative_to(folder).as_posix()
            raise UploadRefused(422, redact(f"file {name}: {exc.problem}"), "bad_image") from None


def session_upload_endpoint(limits: UploadLimits) -> Callable[..., dict[str, Any]]:
    """The PUT /session/ endpoint (a plain `def`: FastAPI runs it in its thread pool, off the event loop)."""

    def create_session(request: Request, user: UserDep, files: Annotated[list[UploadFile], File()],
                       uncompress: bool = False, expiry: int = 0) -> dict[str, Any]:
        from monailabel.interfaces.utils.app import app_instance

        audit = getattr(request.state, STATE_AUDIT, {})
        sessions = app_instance().sessions()
        if sessions is None:
            raise HTTPException(status_code=406, detail="Session Feature is Not Enabled")
        # Counts only: MONAI Label logged the names here, and names can identify the patient.
        log.info("Request Files: %d file(s); uncompress: %s; expiry: %d", len(files), uncompress, expiry)
        staging = Path(tempfile.mkdtemp(prefix="diffkt3d-upload-"))
        try:
            image = stage_upload([(f.filename or "", f.file) for f in files], staging, uncompress, limits)
            session_id, info = sessions.add_session(str(image), expiry, False)
        except UploadRefused as exc:
            audit["refused"] = exc.kind
            log.info("session upload refused (%d, %s)", exc.status, exc.kind)
            raise HTTPException(status_code=exc.status, detail=exc.detail) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        stored = _files(Path(info.image))
        audit.update(session_id=session_id, files=len(stored), bytes=sum(p.stat().st_size for p in stored),
                     unpacked=image.name == "case")
        return {"session_id": session_id, "session_info": info.to_json()}

    return create_session


def _files(stored: Path) -> list[Path]:
    return [stored] if stored.is_file() else [p for p in stored.rglob("*") if p.is_file()]
