"""Hostile session uploads against a REAL MONAI Label server with the DiffKT3D app (one server for
the module): archives that climb out of their folder, links, devices, bombs, lying sizes, and
image headers that lie about their size or hold no real numbers.

Each row of `HOSTILE` asserts the HTTP status (a 4xx, never a 500), a message naming the problem,
that nothing stored changed (studies, sessions, state, the server's temp folder) and that the
audit trail gained exactly one `session.upload` entry for the refused attempt. The stock
`MONAILabelClient.create_session` (one archive, no `uncompress`) works end to end, and the
server's memory stays bounded under the header and archive bombs (psutil + /proc).
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import requests

from diffkt3d.inference import default_model_path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "io"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from hostile_files import (  # noqa: E402
    nifti_bytes,
    nifti_header_only,
    rgb_nifti,
    tar_bytes,
    tar_entry,
    tar_gz_bomb,
    truncated,
    zip_bomb,
    zip_bytes,
    zip_with_lying_size,
)
from server_process import start_server, stop_server  # noqa: E402
from tiny_model import write_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.server

VALIDATION = Path(__file__).resolve().parents[2].parent / "shared" / "datasets/openkbp/validation"
CASE = "pt_201"
MAX_UPLOAD_MB = 20
MB, GB = 2**20, 2**30
HEADER_BOMB_NII = nifti_header_only((2000, 2000, 2000), "int16")  # 1.4 kB claiming 16 GB
HEADER_BOMB_NII_GZ = nifti_header_only((1000, 1000, 1000), "uint8", gz=True)  # < 100 bytes claiming 1 GB (4 GB as float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (VALIDATION / CASE).is_dir():
        pytest.skip("OpenKBP validation cases not available")
    pytest.importorskip("monailabel", reason="server dependencies not installed (docs/server.md)")
    root = tmp_path_factory.mktemp("hostile")
    studies = root / "studies"
    shutil.copytree(VALIDATION / CASE, studies / CASE)
    # datastore cases whose CT is a header bomb or junk: inference must refuse them without allocating
    for name, ct_name, data in (("bomb_nii", "ct.nii", HEADER_BOMB_NII), ("bomb_niigz", "ct.nii.gz", HEADER_BOMB_NII_GZ),
                                ("junk", "ct.nii.gz", b"junk")):
        (studies / name).mkdir()
        (studies / name / ct_name).write_bytes(data)
        shutil.copy(VALIDATION / CASE / "PTV70.nii.gz", studies / name)
    (root / "tmp").mkdir()  # the server's TMPDIR: staged uploads must not stay behind
    conf = {"max_upload_mb": str(MAX_UPLOAD_MB), "model_dir": str(root / "model"), "state_dir": str(root / "state"),
            "device": "cpu"}
    env = {"TMPDIR": str(root / "tmp")}
    if not default_model_path().is_file():
        env["DIFFKT3D_MODEL"] = str(write_tiny_checkpoint(root / "tiny.pt"))
    try:
        proc, url = start_server(root, studies, conf, env)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield {"url": url, "root": root, "studies": studies, "proc": proc}
    stop_server(proc)


# -- what must not change ------------------------------------------------------------------------------
def _stored(root: Path) -> dict[str, tuple[int, int]]:
    """Every file the server keeps (studies, sessions, state, model, temp) -> (size, mtime), except
    the audit trail, which a refusal adds to, and the server's own log."""
    audit = root / "state" / "audit"
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and audit not in p.parents and not p.name.startswith("server-")}


def _audit_lines(root: Path) -> list[str]:
    path = root / "state" / "audit" / "audit.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def _put(server, files: list[tuple[str, bytes]], **params) -> requests.Response:
    return requests.put(f"{server['url']}/session/", files=[("files", f) for f in files], params=params, timeout=120)


def _case_tar_gz(tmp: Path) -> Path:
    path = tmp / "case.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for p in sorted((VALIDATION / CASE).glob("*.nii.gz")):
            if p.name != "dose.nii.gz":
                tf.add(p, arcname=f"{CASE}/{p.name}")
    return path


def _ct() -> np.ndarray:
    return np.zeros((8, 8, 8), np.int16)


# -- the table -----------------------------------------------------------------------------------------
# row -> (files as (name, bytes) or a builder of them, query parameters, status, audit kind, words in the answer)
HOSTILE: dict[str, tuple] = {
    # archives
    "tar ../": (lambda: [("c.tar", tar_bytes([("ct.nii.gz", nifti_bytes(_ct())),
                                              ("../../state/audit/audit.jsonl", b"{}\n")]))],
                {"uncompress": "true"}, 400, "unsafe_member", "'..'"),
    "tar absolute": (lambda: [("c.tar", tar_bytes([("/tmp/escaped.txt", b"x")]))], {}, 400, "unsafe_member",
                     "absolute path"),
    "tar symlink": (lambda: [("c.tar", tar_bytes([tar_entry("ct.nii.gz", tarfile.SYMTYPE,
                                                            f"../../../studies/{CASE}/ct.nii.gz")]))],
                    {"uncompress": "true"}, 400, "unsafe_member", "symbolic link"),
    "tar hardlink": (lambda: [("c.tar", tar_bytes([tar_entry("ct.nii.gz", tarfile.LNKTYPE, "/etc/passwd")]))],
                     {}, 400, "unsafe_member", "hard link"),
    "tar device": (lambda: [("c.tar", tar_bytes([tar_entry("dev", tarfile.CHRTYPE)]))], {}, 400, "unsafe_member",
                   "device"),
    "tar fifo": (lambda: [("c.tar", tar_bytes([tar_entry("pipe", tarfile.FIFOTYPE)]))], {}, 400, "unsafe_member",
                 "FIFO"),
    "zip ../": (lambda: [("c.zip", zip_bytes({"../../escaped.txt": b"x"}))], {"uncompress": "true"}, 400,
                "unsafe_member", "'..'"),
    "zip absolute": (lambda: [("c.zip", zip_bytes({"/tmp/escaped.txt": b"x"}))], {}, 400, "unsafe_member",
                     "absolute path"),
    "zip symlink": (lambda: [("c.zip", zip_bytes({}, symlinks={"ct.nii.gz": f"../../studies/{CASE}/ct.nii.gz"}))],
                    {}, 400, "unsafe_member", "symbolic link"),
    "zip bomb by ratio": (lambda: [("c.zip", zip_bomb(30 * MB))], {"uncompress": "true"}, 413, "too_large",
                          "upload limit of 20 MB"),
    "tar.gz bomb": (lambda: [("c.tar.gz", tar_gz_bomb(30 * MB))], {}, 413, "too_large", "upload limit of 20 MB"),
    "zip declared-size lie": (lambda: [("c.zip", zip_with_lying_size(2 * MB, 1000))], {}, 400, "corrupt", "CRC"),
    "nested archive": (lambda: [("c.zip", zip_bytes({"inner.zip": zip_bytes({"ct.nii.gz": b"x"})}))], {}, 400,
                       "nested", "nested archives"),
    "empty zip": (lambda: [("c.zip", zip_bytes({}))], {"uncompress": "true"}, 400, "empty", "no files"),
    "empty tar": (lambda: [("c.tar", tar_bytes([]))], {"uncompress": "true"}, 400, "empty", "no files"),
    "not an archive": (lambda: [("notes.txt", b"just some text")], {"uncompress": "true"}, 415, "not_archive",
                       "not an archive"),
    # uploads
    "duplicate file names": (lambda: [("ct.nii.gz", nifti_bytes(_ct())), ("ct.nii.gz", nifti_bytes(_ct()))], {}, 400,
                             "bad_name", "two uploaded files"),
    # image headers
    "huge dims .nii": (lambda: [("ct.nii", HEADER_BOMB_NII)], {}, 422, "bad_image", "MiB in memory, the limit is 1024 MiB (max_image_mb)"),
    "huge dims .nii.gz": (lambda: [("ct.nii.gz", HEADER_BOMB_NII_GZ), ("PTV70.nii.gz", nifti_bytes(_ct()))], {}, 422,
                          "bad_image", "file ct.nii.gz: image of shape (1000, 1000, 1000)"),
    "huge dims inside a zip": (lambda: [("c.zip", zip_bytes({f"{CASE}/ct.nii": HEADER_BOMB_NII}))], {}, 422,
                               "bad_image", "file ct.nii: image of shape (2000, 2000, 2000)"),  # folders are dropped (redact)
    "complex dtype": (lambda: [("ct.nii.gz", nifti_bytes(np.zeros((8, 8, 8), np.complex64)))], {}, 422, "bad_image",
                      "data type complex64 is not supported"),
    "RGB": (lambda: [("ct.nii.gz", rgb_nifti())], {}, 422, "bad_image", "must hold real numbers"),
    "truncated .nii": (lambda: [("ct.nii", truncated(nifti_bytes(np.ones((32, 32, 32), np.float32), gz=False)))],
                       {}, 422, "bad_image", "truncated image data"),
    "truncated .nii.gz": (lambda: [("ct.nii.gz", truncated(nifti_bytes(np.random.default_rng(0).normal(
        size=(32, 32, 32)).astype(np.float32))))], {}, 422, "bad_image", "truncated"),
    "4D": (lambda: [("ct.nii.gz", nifti_bytes(np.zeros((8, 8, 8, 2), np.float32)))], {}, 422, "bad_image",
           "expected a 3D volume, found shape (8, 8, 8, 2)"),
    "not a NIfTI": (lambda: [("ct.nii.gz", b"GIF89a not an image")], {}, 422, "bad_image", "not a readable NIfTI"),
}


@pytest.mark.parametrize("row", list(HOSTILE))
def test_hostile_upload_is_refused_and_changes_nothing_but_the_audit_trail(server, row):
    make, params, status, kind, words = HOSTILE[row]
    files = make()
    root = server["root"]
    stored, audit = _stored(root), _audit_lines(root)
    r = _put(server, files, **params)
    assert r.status_code == status, (row, r.status_code, r.text[:300])
    assert words in r.json()["detail"], (row, r.text[:300])
    assert str(root) not in r.text  # no server paths in the answer
    assert _stored(root) == stored, row
    assert not list((root / "tmp").glob("diffkt3d-upload-*"))
    assert not list(root.parent.rglob("escaped*")) and not list(Path("/tmp").glob("escaped*"))
    new = _audit_lines(root)
    assert new[: len(audit)] == audit and len(new) == len(audit) + 1, row
    entry = json.loads(new[-1])
    assert (entry["action"], entry["status"], entry["details"]["refused"]) == ("session.upload", status, kind)
    assert not any(name in new[-1] for name, _ in files if name not in ("ct.nii", "ct.nii.gz"))  # no upload names


def test_the_table_covers_what_the_security_doc_promises():
    kinds = {row.split()[0] for row in HOSTILE}
    assert len(HOSTILE) >= 18 and {"tar", "zip", "huge", "complex", "RGB", "truncated", "4D"} <= kinds
    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    assert "## Hostile uploads" in doc and "test_hostile_uploads.py" in doc


def test_stock_client_create_session_with_one_archive_works(server, tmp_path):
    """MONAI Label's own client sends one file without `uncompress`: the archive is unpacked, and
    the session is a case inference can use."""
    from monailabel.client import MONAILabelClient

    archive = _case_tar_gz(tmp_path)
    answer = MONAILabelClient(server["url"]).create_session(str(archive))
    sid = answer["session_id"]
    image = Path(answer["session_info"]["image"])
    assert image.is_dir() and (image / CASE / "ct.nii.gz").is_file() and not (image.parent / archive.name).exists()
    entry = json.loads(_audit_lines(server["root"])[-1])
    assert (entry["action"], entry["status"], entry["details"]["session_id"]) == ("session.upload", 200, sid)
    assert entry["details"]["unpacked"] is True and entry["details"]["files"] == 12
    r = requests.post(f"{server['url']}/infer/dose", params={"session_id": sid, "output": "json"},
                      data={"params": json.dumps({"preview": True})}, timeout=600)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["case"]["source"] == "session"
    # plain uploads are unchanged: several files, or one NIfTI kept as it was sent
    ct = (VALIDATION / CASE / "ct.nii.gz").read_bytes()
    r = _put(server, [("ct.nii.gz", ct)])
    assert r.status_code == 200 and Path(r.json()["session_info"]["image"]).read_bytes() == ct


# -- memory under bombs ---------------------------------------------------------------------------------
def _memory(pid: int) -> tuple[int, int]:
    """(resident bytes now, peak resident bytes) summed over the server's process tree (/proc)."""
    import psutil

    rss = peak = 0
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        status = Path(f"/proc/{p.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss += int(fields["VmRSS"].split()[0]) * 1024
        peak += int(fields["VmHWM"].split()[0]) * 1024
    return rss, peak


def test_server_memory_stays_bounded_under_header_and_archive_bombs(server):
    url, pid = server["url"], server["proc"].pid
    # warm up the code paths (a refused inference and upload import everything they use)
    assert requests.post(f"{url}/infer/dose", params={"image": "junk", "output": "json"}, data={"params": "{}"},
                         timeout=120).status_code == 422
    assert _put(server, [("ct.nii.gz", b"junk")]).status_code == 422
    idle_rss, _ = _memory(pid)
    bombs = [
        ("session .nii header bomb", lambda: _put(server, [("ct.nii", HEADER_BOMB_NII)]), 422),
        ("session .nii.gz header bomb", lambda: _put(server, [("ct.nii.gz", HEADER_BOMB_NII_GZ)]), 422),
        ("zip expanding to 700 MB", lambda: _put(server, [("c.zip", zip_bomb(700 * MB))]), 413),
        ("tar.gz expanding to 700 MB", lambda: _put(server, [("c.tgz", tar_gz_bomb(700 * MB))]), 413),
        ("datastore .nii header bomb", lambda: requests.post(
            f"{url}/infer/dose", params={"image": "bomb_nii", "output": "json"}, data={"params": "{}"}, timeout=300), 422),
        ("datastore .nii.gz header bomb", lambda: requests.post(
            f"{url}/infer/dose", params={"image": "bomb_niigz", "output": "json"}, data={"params": "{}"}, timeout=300),
         422),
    ]
    for what, send, status in bombs:
        r = send()
        assert r.status_code == status, (what, r.status_code, r.text[:300])
        rss, peak = _memory(pid)
        assert peak - idle_rss < 1.5 * GB, f"{what}: peak {peak / MB:.0f} MB, idle {idle_rss / MB:.0f} MB"
        assert rss - idle_rss < 200 * MB, f"{what}: {rss / MB:.0f} MB kept, idle {idle_rss / MB:.0f} MB"
    assert "image of shape (1000, 1000, 1000)" in r.json()["detail"]


# -- datastore case archives use the same unpacker --------------------------------------------------
@pytest.mark.parametrize("archive, status", [
    (lambda: zip_bytes({"../escaped.txt": b"x"}), 422),
    (lambda: tar_bytes([tar_entry("ct.nii.gz", tarfile.SYMTYPE, "/etc/passwd")]), 422),
    (lambda: zip_bomb(3 * MB), 413),
])
def test_datastore_case_archives_are_refused_without_leftovers(tmp_path, archive, status):
    from diffkt3d.errors import CaseError
    from diffkt3d.io.archive import ArchiveLimits
    from monailabel_app.datastore import CaseFolderDatastore

    studies = tmp_path / "studies"
    studies.mkdir()
    store = CaseFolderDatastore(studies, state_dir=tmp_path / "state", archive_limits=ArchiveLimits(2 * MB))
    upload = tmp_path / "upload.bin"
    upload.write_bytes(archive())
    with pytest.raises(CaseError) as err:
        store.add_image("case_x", str(upload), {})
    assert getattr(err.value, "status", 422) == status and "cannot add case" in str(err.value)
    assert list(studies.iterdir()) == [] and not list(tmp_path.rglob("escaped*"))
