"""Every constant of the Slicer logic, defined once.

Slicer's Python does not have the `diffkt3d` package, so the Lib cannot import
`diffkt3d.constants`. The few values shared with the core are copied here and a test
(tests/slicer_extension/test_lib_units.py) checks they still equal the core's.
"""

from __future__ import annotations

# -- server -----------------------------------------------------------------------------------
DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
# (connect, read) timeouts in seconds. Small calls (info, preference) must fail fast; a dose
# request on a CPU server may take minutes, so it has its own read timeout (user setting).
CONNECT_TIMEOUT_S = 5.0
SMALL_CALL_TIMEOUT_S = 30.0
INFER_TIMEOUT_S = 900.0
PREVIEW_TIMEOUT_S = 120.0
CASE_DOWNLOAD_TIMEOUT_S = 300.0  # a whole case folder (CT + structures + dose) as one zip
# How often a running dose request's sampling step is read from the server (GET /diffkt3d/jobs/{id}).
JOB_POLL_INTERVAL_S = 0.5
# How often the panel reads a training run's status (GET /train/).
TRAIN_POLL_INTERVAL_S = 5.0
# Names of the server's tasks (listed by /info/; docs/request-format.md).
DOSE_TASK = "dose"
IMPUTE_TASKS: dict[str, str] = {"ct": "impute_ct", "ptv": "impute_ptv", "oar": "impute_oar"}
# Request folders (exported case + results) kept in the work dir; older ones are deleted.
KEEP_REQUEST_DIRS = 8

# -- request defaults (copied from diffkt3d.constants; a test keeps them equal) -------------------
DEFAULT_STEPS = 10  # the panel's initial number of sampling steps
DEFAULT_TEMPLATE = "openkbp_hn"  # the Scorecard template selected after connecting, if the server has it

# -- case files (copied from diffkt3d.constants; a test keeps them equal) ---------------------
CT_FILE = "ct.nii.gz"
DOSE_FILE = "dose.nii.gz"
BODY_FILE = "body.nii.gz"
PLAN_FILE = "plan.json"
DOSE_SCALE_GY = 80.0  # core's dose normalisation, used only as the fallback window top

# -- structure roles (a copy of diffkt3d.data.case.ROLES) -------------------------------------
ROLES: tuple[str, ...] = ("target", "oar", "body", "other")
# The panel also lets the user leave a segment out of the request.
IGNORE_ROLE = "ignore"

# -- dose display (SlicerRT conventions, docs/slicer.md) ------------------------------------------
DOSE_VOLUME_ATTRIBUTE = "DicomRtImport.DoseVolume"  # value "1" marks a dose volume
DOSE_COLOR_TABLE_NAME = "Dose_ColorTable"
# Window of the dose display as a share of the prescription (0-110 % Rx).
DOSE_WINDOW_FRACTION: tuple[float, float] = (0.0, 1.10)
# Isodose levels as % of the prescription with Eclipse-like colours (RGB 0-1).
ISODOSE_LEVELS_PCT: tuple[float, ...] = (80.0, 90.0, 100.0, 105.0, 110.0)
ISODOSE_COLORS: dict[float, tuple[float, float, float]] = {
    80.0: (0.0, 0.0, 1.0),  # blue
    90.0: (0.0, 0.75, 1.0),  # light blue
    100.0: (1.0, 1.0, 0.0),  # yellow
    105.0: (1.0, 0.55, 0.0),  # orange
    110.0: (1.0, 0.0, 0.0),  # red
}

# -- DVH ----------------------------------------------------------------------------------------
# SlicerRT uses 0.2 Gy bins; users ask for finer (SlicerRT #244).
DVH_BIN_WIDTH_GY = 0.1
DVH_DOSE_COLUMN = "Dose [Gy]"
# One line style per candidate (vtkMRMLPlotSeriesNode::GetLineStyleAsString names), cycled.
CANDIDATE_LINE_STYLES: tuple[str, ...] = ("solid", "dash", "dot", "dash-dot", "dash-dot-dot")

# -- Scorecard table ----------------------------------------------------------------------------
SCORECARD_COLUMNS: tuple[str, ...] = (
    "Structure", "Metric", "Value", "Unit", "Score", "Weight", "Hard constraint", "Pass",
)
SCORECARD_TOTAL_LABEL = "Total"

# -- node attributes written by the module (so a scene reload finds its nodes) -------------------
ATTRIBUTE_PREFIX = "DiffKT3D."
CANDIDATE_ATTRIBUTE = ATTRIBUTE_PREFIX + "CandidateId"
ROLE_ATTRIBUTE = ATTRIBUTE_PREFIX + "Role"  # segment tag holding the role
PRESCRIPTION_ATTRIBUTE = ATTRIBUTE_PREFIX + "PrescriptionGy"  # segment tag
IMPUTED_ATTRIBUTE = ATTRIBUTE_PREFIX + "Imputed"  # "1" on a segment / volume a DiffKT3D model generated
IMPUTED_BY_ATTRIBUTE = ATTRIBUTE_PREFIX + "ImputedBy"  # segment tag: the model version (plan.json imputed_by)

# -- segment-to-dose preview -----------------------------------------------------------------------
PREVIEW_DEBOUNCE_S = 1.0  # wait this long after the last edit before asking for a preview
PREVIEW_STEPS = 1  # a copy of diffkt3d.constants.PREVIEW_STEPS (a test keeps them equal)
POLL_INTERVAL_MS = 100  # QTimer period of the main-thread poll of the worker queue
