"""The module's workflow (real MRML scene, slicer-core) against a server whose cases live in a REAL
Orthanc (DICOMweb, basic auth): the client does not care where the server's cases are.

The server serves the shared random `tiny` checkpoint: values are not meaningful, the flow is.
"""

from __future__ import annotations

import pydicom
import pytest
from orthanc_process import Orthanc
from server_process import start_server, stop_server

pytest.importorskip("slicer_core", reason="slicer-core (headless MRML) is not installed")
from DiffKT3DLib.client import DiffKT3DClient
from DiffKT3DLib.worker import ThreadRunner, wait_for
from DiffKT3DLib.workflow import DoseRequest, Workflow

from diffkt3d.io.dicom_study import PREDICTED_PREFIX

pytestmark = [pytest.mark.server, pytest.mark.slow]

STEPS = 2
USERS = {"slicer-test": "pacs-secret"}
SAMPLE = __import__("pathlib").Path(__file__).resolve().parents[2] / "sample-data" / "dicom" / "pt_201"


@pytest.fixture(scope="module")
def pacs_server(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("pacs-slicer")
    orthanc = Orthanc(root / "orthanc", users=USERS)
    try:
        sample = orthanc.upload_folder(SAMPLE)
        env = {"MONAI_LABEL_DICOMWEB_USERNAME": "slicer-test", "MONAI_LABEL_DICOMWEB_PASSWORD": USERS["slicer-test"]}
        conf = {"model": str(tiny_checkpoint), "model_dir": str(root / "model"), "state_dir": str(root / "state"),
                "device": "cpu"}
        try:
            proc, url = start_server(root, orthanc.dicomweb, conf, env)  # type: ignore[arg-type]
        except RuntimeError as exc:
            pytest.fail(str(exc))
        ct = next(d for d in sample if d.Modality == "CT")
        yield {"url": url.removeprefix("http://"), "orthanc": orthanc, "ct": str(ct.SeriesInstanceUID),
               "study": str(ct.StudyInstanceUID)}
        stop_server(proc)
    finally:
        orthanc.stop()


def test_module_workflow_against_a_pacs_backed_server(scene, loaded_case, pacs_server, tmp_path):
    wf = Workflow(scene, DiffKT3DClient(pacs_server["url"]), ThreadRunner(), work_dir=tmp_path / "work")
    try:
        errors: list[BaseException] = []
        wait_for(wf.runner, wf.connect(on_error=errors.append), 60)
        assert not errors and wf.tasks["dose"] == ["dose"], errors
        # the case in the scene goes up as a session, as with any server
        ct, seg = loaded_case
        request = DoseRequest(ct, seg, wf.scene_logic.segment_roles(seg), candidates=2, steps=STEPS, seed=3)
        job = wf.request_dose(request, on_error=errors.append)
        wait_for(wf.runner, job, 600)
        assert not errors and job.state == "done", errors
        assert len(wf.candidate_set.candidates) == 2 and all(c.id in wf.dose_nodes for c in wf.candidate_set.candidates)
        # the strategy hands out the PACS's CT series
        nxt: list[dict] = []
        wait_for(wf.runner, wf.next_case("dr_pacs", on_done=nxt.append, on_error=errors.append), 120)
        assert not errors and nxt[0]["id"] == pacs_server["ct"], (errors, nxt)
        # the Lib's client on that case: the dose comes back and lands in the study as an RTDOSE
        result = wf.client.infer("dose", tmp_path / "out", image=pacs_server["ct"], params={"steps": STEPS})
        assert result.image_path is not None and result.image_path.is_file()
        stored = result.params["stored"]
        assert stored["status"] == "stored" and stored["study"] == pacs_server["study"], stored
        [rd] = pacs_server["orthanc"].client().retrieve_series(pacs_server["study"], stored["series"])
        assert isinstance(rd, pydicom.Dataset) and rd.Modality == "RTDOSE"
        assert rd.SeriesDescription.startswith(PREDICTED_PREFIX)
    finally:
        wf.close()
