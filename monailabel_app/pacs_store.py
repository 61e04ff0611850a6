"""Store a prediction back into the study it came from (STOW-RS): RTDOSE for `dose`, RTSTRUCT for
`impute_oar` / `impute_ptv`.

Repeats do not pile up silently. A stored series' UIDs are derived from what makes the result
what it is (task, CT series, structure set, plan, model version and the request's parameters):

* the same request again finds its series already in the study and stores nothing
  (`stored.status` "already stored", same series UID);
  A request's `job_id` is not part of it: it names the run (for progress and cancel), not the
  result, and a client draws a new one per request;
* a different request (another model version, seed, step count, template...) stores a new
  series, numbered: SeriesDescription "DiffKT3D predicted dose v<N> ..." / "DiffKT3D imputed
  OARs v<N> ...", SeriesNumber 9000 + N (dose) or 9100 + N (structures), and the answer lists the
  earlier DiffKT3D series of that kind in the study (`stored.earlier`), so the client sees
  what the study already holds.
Nothing is deleted: DICOMweb has no delete, and a clinic's PACS decides what it keeps.

A preview dose (`preview`) and a fetched candidate (`request_id`) are answered but not stored.
Every store is audited (`monailabel_app.pacs_audit`): journalled before the STOW-RS request, the
outcome in the audit trail after, with the requesting user.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from diffkt3d.errors import CaseError
from diffkt3d.io.case_folder import load_nifti
from diffkt3d.io.dicom_study import (
    IMPUTED_PREFIX,
    PREDICTED_PREFIX,
    StudyRef,
    derived_rtdose,
    derived_rtstruct,
)
from infer_tasks.jobs import JOB_ID_KEY
from monailabel_app.pacs_audit import PacsWriteAudit
from monailabel_app.pacs_datastore import PacsDatastore, PacsError

log = logging.getLogger(__name__)

WRITE_BACK = {"dose": ("RTDOSE", PREDICTED_PREFIX, 9000),
              "impute_oar": ("RTSTRUCT", f"{IMPUTED_PREFIX} OARs", 9100),
              "impute_ptv": ("RTSTRUCT", f"{IMPUTED_PREFIX} PTVs", 9100)}
ROLE = {"impute_oar": "oar", "impute_ptv": "target"}


def identity(task: str, ref: StudyRef, model_version: str, params: dict[str, Any]) -> str:
    """What makes a result what it is; the stored series' UIDs are derived from it."""
    text = json.dumps([task, ref.ct_series_uid, ref.rtstruct_uid, ref.rtplan_uid, model_version, params],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _study_series(datastore: PacsDatastore, study: str, modality: str) -> list[Dataset]:
    found = datastore._call("the study's series search (QIDO-RS)", datastore.client.search_for_series,
                            study_instance_uid=study, search_filters={"Modality": modality},
                            fields=["SeriesDescription", "SeriesNumber"])
    return [Dataset.from_json(s) for s in found]


def store_result(datastore: PacsDatastore, case_id: str, task: str, result_file: str, result: dict[str, Any],
                 request: dict[str, Any], audit: PacsWriteAudit | None = None) -> dict[str, Any]:
    """Store one result in the case's study; returns the `stored` part of the answer.

    `request` holds the client's parameters of the task (nothing the server added). `audit`
    records the write (None: not audited; only for tests of the DICOM content).

    Raises:
        CaseError: the result does not fit the study's CT grid; PacsError: the PACS refused it.
    """
    if task not in WRITE_BACK:
        return {"status": "not stored", "reason": f"task {task!r} results are not stored in the PACS"}
    if request.get("request_id") is not None or result.get("preview"):
        return {"status": "not stored", "reason": "previews and fetched candidates are not stored"}
    modality, prefix, series_base = WRITE_BACK[task]
    ref, _ = datastore.study_ref(case_id)
    study = ref.attributes["StudyInstanceUID"]
    model_version = str(result.get("model_version") or "unknown")
    ident = identity(task, ref, model_version, request)
    ours = [s for s in _study_series(datastore, study, modality)
            if str(s.get("SeriesDescription", "")).startswith(prefix)]
    version = len(ours) + 1
    description = f"{prefix} v{version} (model {model_version})"
    if task == "dose":
        dose, _ = load_nifti(_path(result_file), case_id, np.float32, datastore.image_limits)
        details = (f"PREDICTED by DiffKT3D (model {model_version}): a dose prediction for plan review, not a planned "
                   f"or delivered dose. Computed from RTSTRUCT {ref.rtstruct_uid}"
                   + (f" and RTPLAN {ref.rtplan_uid}" if ref.rtplan_uid else " (no RTPLAN: preset beams)")
                   + f"; steps {result.get('steps')}, seed {result.get('seed')}, "
                     f"{len(result.get('candidates', []))} candidate(s).")
        d = derived_rtdose(dose, ref, model_version=model_version, identity=ident,
                           series_number=series_base + version, description=description, details=details)
    else:
        labels = {str(k): int(v) for k, v in (result.get("labels") or {}).items()}
        label_map, _ = load_nifti(_path(result_file), case_id, np.uint8, datastore.image_limits)
        masks = {name: (label_map == value, ROLE[task]) for name, value in labels.items()}
        d = derived_rtstruct(masks, ref, model_version=model_version, identity=ident, series_number=series_base + version,
                             description=description, label="DiffKT3D imputed")
    answer = {"study": study, "series": str(d.SeriesInstanceUID), "sop_instance": str(d.SOPInstanceUID),
              "modality": modality, "earlier": [str(s.SeriesInstanceUID) for s in ours
                                                if str(s.SeriesInstanceUID) != str(d.SeriesInstanceUID)]}
    same = [s for s in ours if str(s.SeriesInstanceUID) == str(d.SeriesInstanceUID)]
    if same:
        return {**answer, "status": "already stored", "series_description": str(same[0].get("SeriesDescription", ""))}
    details = {"case_id": case_id, "task": task, "modality": modality, "study": study,
               "series": answer["series"], "sop_instance": answer["sop_instance"], "model_version": model_version,
               "series_description": description}
    audit_id = None
    if audit is not None:
        try:
            audit_id = audit.before(details)
        except Exception:
            log.exception("AUDIT JOURNAL WRITE FAILED: case %s %s not stored in the PACS", case_id, modality)
            return {**answer, "status": "not stored",
                    "reason": "audit trail unavailable: the server could not record the PACS write, so it did not "
                              "store it; ask the server's administrator to check the audit directory"}
    try:
        response = datastore._call(f"storing the {modality} (STOW-RS)", datastore.client.store_instances, [d], study)
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reason = failed[0].get("FailureReason", "?")
            raise PacsError(f"the PACS refused the {modality} (STOW-RS FailureReason {reason})", case=case_id)
    except CaseError as exc:
        if audit is not None and audit_id is not None:
            audit.after(audit_id, getattr(exc, "status", 502), {**details, "reason": str(exc)})
        raise
    if audit is not None and audit_id is not None:
        audit.after(audit_id, 201, details)
    log.info("case %s: stored %s series %s (%s)", case_id, modality, d.SeriesInstanceUID, description)
    return {**answer, "status": "stored", "series_description": description, "version": version}


def _path(result_file: str) -> Path:
    path = Path(result_file)
    if not path.is_file():
        raise CaseError("the task wrote no result file to store", file=path.name)
    return path


def answer_from_pacs(datastore: PacsDatastore, case_id: str, task: str, request: dict[str, Any],
                     answer: dict[str, Any], param_names: frozenset[str], audit: PacsWriteAudit | None = None) -> None:
    """Add to a task's answer where its case came from in the PACS (every choice and inference) and,
    for the tasks that write back, what was stored (`stored`; a failed store is reported there, the
    prediction is still answered). `audit`: as in `store_result`."""
    result = answer.get("params")
    if not isinstance(result, dict):
        return
    ref, notes = datastore.study_ref(case_id)
    case = result.setdefault("case", {})
    case["dicom"] = {"study": ref.attributes["StudyInstanceUID"], "ct_series": ref.ct_series_uid,
                     "rtstruct": ref.rtstruct_uid, "rtplan": ref.rtplan_uid}
    case["inferred"] = [*notes, *(x for x in case.get("inferred", []) if x not in notes)]
    if task not in WRITE_BACK:
        return
    params = {k: v for k, v in request.items() if k in param_names and k != JOB_ID_KEY}
    try:
        result["stored"] = store_result(datastore, case_id, task, str(answer.get("file") or ""), result, params,
                                        audit)
    except CaseError as exc:
        log.error("case %s: %s result not stored in the PACS: %s", case_id, task, exc)
        result["stored"] = {"status": "failed", "reason": str(exc)}
