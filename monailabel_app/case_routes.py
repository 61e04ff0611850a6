"""GET /diffkt3d/cases/{case_id}: one datastore case's files as a zip, for a viewer to load.

MONAI Label's GET /datastore/image serves one image FILE per case and answers 404 for our case
folders; "Next case" in the Slicer module needs the whole case (CT, structure masks, plan.json and
the reference dose when there is one). Reading one case is viewing (the auth policy's READ); bulk
download stays GET /datastore/dataset (data role). Only the case's own image and plan files are
sent, never a sub-folder, and the archive names are bare file names.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, HTTPException, Response

from diffkt3d.constants import PLAN_FILE
from monailabel_app.auth import UserDep

CASES_PATH = "/diffkt3d/cases"
CASE_FILE_SUFFIXES = (".nii.gz", ".nii")


def case_router(case_dir: Callable[[str], Path]) -> APIRouter:
    """Args: case_dir: case id -> its folder (raises the datastore's CaseError, a 4xx, for bad ids)."""
    router = APIRouter(prefix=CASES_PATH, tags=["DiffKT3D cases"])

    @router.get("/{case_id}", summary="A datastore case's images and plan as a zip (bare file names)")
    def download_case(case_id: str, user: UserDep) -> Response:
        folder = case_dir(case_id)
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and (p.name.endswith(CASE_FILE_SUFFIXES) or p.name == PLAN_FILE))
        if not files:
            raise HTTPException(404, f"case {case_id!r} has no image files")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # NIfTI files are already gzipped
            for path in files:
                archive.write(path, arcname=path.name)
        return Response(buffer.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{case_id}.zip"'})

    return router
