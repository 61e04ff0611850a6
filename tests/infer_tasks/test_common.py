"""The one case-root finder shared by session uploads (infer_tasks) and the datastore's add-case path."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("monailabel", reason="server dependencies not installed (docs/server.md)")

from infer_tasks.common import TaskError, find_case_root, session_case_root  # noqa: E402


def _case(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "ct.nii.gz").write_bytes(b"")
    return folder


def test_case_root_is_the_folder_or_its_only_visible_subfolder(tmp_path):
    assert find_case_root(_case(tmp_path / "flat")) == tmp_path / "flat"
    inner = _case(tmp_path / "wrapped" / "inner")
    (tmp_path / "wrapped" / "__MACOSX").mkdir()
    (tmp_path / "wrapped" / ".hidden").mkdir()
    assert find_case_root(tmp_path / "wrapped") == inner


def test_case_root_depth_limit_and_ambiguity(tmp_path):
    deep = _case(tmp_path / "a" / "b" / "c")
    assert find_case_root(tmp_path / "a") == deep
    assert find_case_root(tmp_path / "a", max_depth=1) is None
    assert find_case_root(tmp_path / "a", max_depth=2) == deep
    _case(tmp_path / "two" / "x")
    _case(tmp_path / "two" / "y")
    assert find_case_root(tmp_path / "two") is None


def test_session_case_root_from_a_file_and_its_error(tmp_path):
    folder = _case(tmp_path / "session")
    assert session_case_root(folder / "ct.nii.gz") == folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskError, match="no NIfTI files") as exc:
        session_case_root(tmp_path / "empty")
    assert exc.value.status == 400
