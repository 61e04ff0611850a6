"""No upload file names in any of the server's log outputs, configured exactly as MONAI Label 0.8.5
configures them (monailabel/logging.json via its `init_log_config`): the root and uvicorn handlers
and the `task_train` / `task_scoring` / `task_batch_infer` loggers, which have handlers of their own,
do not propagate, and relay the output of training, scoring and batch-inference subprocesses."""

from __future__ import annotations

import io
import json
import logging
import logging.config
from pathlib import Path

import pytest

from monailabel_app.redact import TASK_LOGGERS, WITHHELD, install_log_redaction

PHI = ("Doe_Janet_PHI-470815_CT_0001.dcm", "/data/export/Doe^Janet/Doe_Janet.zip")


@pytest.fixture
def monailabel_logging(tmp_path):
    """MONAI Label's own logging config, writing to tmp_path/logs/app.log; the previous config restored after."""
    pytest.importorskip("monailabel")
    from monailabel.utils.others.generic import init_log_config

    names = ["", "uvicorn", "uvicorn.access", "uvicorn.error", "urllib3.connectionpool", *TASK_LOGGERS]
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate)
             for n in names}
    config = json.loads(Path(init_log_config(None, str(tmp_path), "app.log")).read_text())
    stream = io.StringIO()
    for handler in config["handlers"].values():  # console handlers into a buffer we can read
        if handler["class"] == "logging.StreamHandler":
            handler["stream"] = stream
    logging.config.dictConfig(config)
    yield tmp_path / "logs" / "app.log", stream
    for n, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(n)
        for h in logger.handlers:
            if h not in handlers:
                h.close()
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def test_task_loggers_and_every_other_handler_withhold_upload_names(monailabel_logging):
    log_file, console = monailabel_logging
    install_log_redaction()
    install_log_redaction()  # idempotent: one filter per handler
    for name in (*TASK_LOGGERS, "monailabel.endpoints.datastore", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.warning("Image: %s; File: UploadFile(filename='%s')", PHI[0], PHI[1])
        try:
            raise ValueError(f"cannot read {PHI[0]}")
        except ValueError:
            logger.exception("failed on %s", PHI[1])
    for handler in (h for n in ("", *TASK_LOGGERS) for h in logging.getLogger(n).handlers):
        handler.flush()
        assert sum(type(f).__name__ == "RedactFileNames" for f in handler.filters) == 1
    text = log_file.read_text() + console.getvalue()
    assert text.count(WITHHELD) >= 4 * len(TASK_LOGGERS)  # the task lines were written ... without the names
    for phi in ("Doe", "Janet", "470815", "/data/export"):
        assert phi not in text, (phi, text[:2000])
