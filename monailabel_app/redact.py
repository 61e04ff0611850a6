"""Keep patient-identifying text out of the server's log and error messages: upload file names.

A clinic's exports often name files after the patient ("DOE^JANE_CT_0001.dcm", "Doe_Jane.zip"),
and MONAI Label 0.8.5 logs every uploaded file name (session and datastore uploads: "Request
Files: [UploadFile(filename='...')]", "Image: ...; File: ...", the saved session path). DICOM
tags themselves are never read by the server (it accepts NIfTI case folders only, see
docs/request-format.md), so file names are what can leak. This filter, put on every log handler
at start-up (including MONAI Label's `task_train` / `task_scoring` / `task_batch_infer` loggers,
which relay the output of training, scoring and batch-inference subprocesses), replaces them
before a record is written anywhere; the app passes its error messages through `redact` too.

Names from the case-folder vocabulary (ct, dose, body, plates, plan and the OpenKBP structure
names, docs/case-format.md) are kept, because they say which input is wrong and cannot
identify anyone; any other name becomes "<name withheld>" + its extension. Directories are always
dropped (they would show server paths).
"""

from __future__ import annotations

import logging
import re

from diffkt3d.constants import (
    ANGLE_FILE,
    BEAM_FILE,
    BODY_FILES,
    CT_FILE,
    DOSE_FILE,
    MODALITIES,
    OPENKBP_OARS,
    OPENKBP_PTVS,
    PLAN_FILE,
)

WITHHELD = "<name withheld>"
# UploadFile(filename='...') / filename="..." as MONAI Label and starlette print them
_FILENAME_FIELD = re.compile(r"""(filename=)(['"])(.*?)\2""")
# any path or bare name ending in a data-file extension (.dcm, .nii, .nii.gz, .zip, .tar[.gz], .npz ...)
_DATA_FILE = re.compile(r"""[^\s'"(),;=\[\]{}<>]+?(\.(?:dcm|dicom|ima|nii\.gz|nii|nrrd|mha|zip|tar\.gz|tgz|tar|npz|npy))\b""",
                        re.IGNORECASE)


_SAFE_STEMS = frozenset(n.lower() for n in (
    *MODALITIES, *OPENKBP_OARS, *OPENKBP_PTVS,
    *(f.split(".")[0] for f in (CT_FILE, DOSE_FILE, *BODY_FILES, PLAN_FILE, BEAM_FILE, ANGLE_FILE))))


def _safe_name(path: str, ext: str) -> str:
    base = re.split(r"[/\\]", path)[-1]
    stem = base[: len(base) - len(ext)] if base.lower().endswith(ext.lower()) else base
    return base if stem.lower() in _SAFE_STEMS else WITHHELD + ext


def redact(text: str) -> str:
    """`text` with upload file names withheld (vocabulary names and extensions kept, directories dropped)."""
    def field(m: re.Match[str]) -> str:
        ext = _DATA_FILE.fullmatch(m.group(3))
        return f"{m.group(1)}{m.group(2)}{_safe_name(m.group(3), ext.group(1) if ext else '')}{m.group(2)}"

    text = _FILENAME_FIELD.sub(field, text)
    return _DATA_FILE.sub(lambda m: _safe_name(m.group(0), m.group(1)), text)


class RedactFileNames(logging.Filter):
    """Rewrites each record's message with `redact` (and drops exception text, which can hold paths)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.msg, record.args = redact(message), None
        return True


# Loggers MONAI Label 0.8.5 configures with handlers of their own and `propagate: false`
# (monailabel/logging.json): the output of training, scoring and batch-inference subprocesses, line
# by line, which can name case files and uploads. The root's filter never sees these records.
TASK_LOGGERS = ("task_train", "task_scoring", "task_batch_infer")
_NAMED_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "monailabel", "fastapi", *TASK_LOGGERS)


def install_log_redaction() -> None:
    """Put the filter on every handler of every logger configured so far (the root, uvicorn's,
    MONAI Label's, its `task_*` loggers and any other), idempotent.

    Call it after logging is configured (the app does, at server start-up): a handler added later
    is not covered.
    """
    f = RedactFileNames()
    names = {*_NAMED_LOGGERS, *(name for name, logger in list(logging.root.manager.loggerDict.items())
                                if isinstance(logger, logging.Logger))}
    for name in sorted(names):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(x, RedactFileNames) for x in handler.filters):
                handler.addFilter(f)
