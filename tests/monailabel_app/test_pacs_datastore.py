"""The PACS datastore against a REAL Orthanc (no MONAI Label server): credentials, the case cache
and how it follows the study when a new structure set arrives."""

from __future__ import annotations

import copy

import pytest
from orthanc_process import Orthanc
from pydicom.uid import generate_uid

from diffkt3d.errors import CaseError
from diffkt3d.io.case_folder import load_case_folder
from diffkt3d.io.image_guard import ImageLimits
from monailabel_app.pacs_datastore import PacsDatastore, PacsError

SAMPLE = __import__("pathlib").Path(__file__).resolve().parents[2] / "sample-data" / "dicom" / "pt_201"
USERS = {"reader": "s3cret"}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), users=USERS)
    try:
        yield server, server.upload_folder(SAMPLE)
    finally:
        server.stop()


def _client(url: str, user: str, password: str):
    from dicomweb_client import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    return DICOMwebClient(url, session=create_session_from_user_pass(user, password))


def test_wrong_credentials_are_a_clear_502(orthanc, tmp_path):
    server, _ = orthanc
    store = PacsDatastore(_client(server.dicomweb, "reader", "wrong"), server.dicomweb, tmp_path / "state")
    with pytest.raises(PacsError, match="HTTP 401.*MONAI_LABEL_DICOMWEB_USERNAME") as err:
        store.list_images()
    assert err.value.status == 502


def test_case_is_cached_and_follows_a_new_structure_set(orthanc, tmp_path):
    server, sample = orthanc
    store = PacsDatastore(_client(server.dicomweb, *next(iter(USERS.items()))), server.dicomweb, tmp_path / "state")
    ct_series = str(next(d for d in sample if d.Modality == "CT").SeriesInstanceUID)
    assert store.list_images() == [ct_series] and store.has_case(ct_series) and not store.has_case("1.2.3")
    first = store.case_dir(ct_series)
    assert first.is_relative_to(tmp_path / "state" / "dicomweb-cache")
    case = load_case_folder(first, with_dose=True)
    assert case.targets["PTV70"].prescription_gy == 70.0 and case.dose_gy is not None  # plan + clinical dose
    assert store.case_dir(ct_series) == first  # unchanged study: the cache entry is reused
    assert store.get_labeled_images() == [ct_series]  # the study holds a clinical RTDOSE
    # a revised structure set (newer, one ROI renamed) arrives: the next request uses it
    rs = copy.deepcopy(next(d for d in sample if d.Modality == "RTSTRUCT"))
    rs.SeriesInstanceUID, rs.SOPInstanceUID = generate_uid(), generate_uid()
    rs.file_meta.MediaStorageSOPInstanceUID = rs.SOPInstanceUID
    rs.StructureSetDate = "29991231"
    names = {r.ROIName: r for r in rs.StructureSetROISequence}
    names["Larynx"].ROIName = "Larynx_rev"
    server.upload([rs])
    second = store.case_dir(ct_series)
    assert second != first and not first.exists()
    ref, notes = store.study_ref(ct_series)
    assert ref.rtstruct_uid == rs.SOPInstanceUID and "newest of 2 structure sets" in notes[0]
    # the sample's plan references the first structure set only: now no plan, and the answer says so
    assert ref.rtplan_uid is None and any("RTPLAN: none references" in n for n in notes)
    assert (second / "Larynx_rev.nii.gz").is_file()


def test_a_ct_series_over_the_image_limit_is_refused_before_it_is_downloaded(orthanc, tmp_path):
    server, sample = orthanc
    store = PacsDatastore(_client(server.dicomweb, *next(iter(USERS.items()))), server.dicomweb, tmp_path / "state",
                          image_limits=ImageLimits.from_setting("1"))
    ct_series = str(next(d for d in sample if d.Modality == "CT").SeriesInstanceUID)
    with pytest.raises(CaseError, match=r"CT series of shape \(128, 128, 128\) would take 8 MiB"):
        store.case_dir(ct_series)
    assert not list((tmp_path / "state" / "dicomweb-cache").rglob("*.dcm"))
