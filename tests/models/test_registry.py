"""Model versions: kept whole and unchanged, one served, any of them (the shipped one too) servable again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffkt3d.models.checkpoint import file_digest
from diffkt3d.models.registry import SHIPPED, ModelRegistry, UnknownVersionError


@pytest.fixture
def weights(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("shipped", "a", "b"):
        out[name] = tmp_path / f"{name}.pt"
        out[name].write_bytes(name.encode() * 100)
    return out


def test_versions_are_kept_numbered_and_only_a_promotion_serves_them(tmp_path: Path, weights) -> None:
    reg = ModelRegistry(tmp_path / "models", weights["shipped"])
    assert reg.served_id() == SHIPPED and reg.served_path() == weights["shipped"]
    v1 = reg.add(weights["a"], "any2any", SHIPPED, {"seed": 0}, {"train": ["pt_1"], "validation": ["pt_2"]})
    v2 = reg.add(weights["b"], "scardnft", v1.id)
    assert (v1.id, v2.id) == ("v1-any2any", "v2-scardnft")
    assert [v.id for v in reg.list()] == [SHIPPED, "v1-any2any", "v2-scardnft"]
    assert reg.served_id() == SHIPPED  # adding never serves
    # the version holds its own copy: the run folder may change or go away
    weights["a"].write_bytes(b"overwritten")
    assert reg.path(v1.id).read_bytes() == b"a" * 100 and reg.get(v1.id).digest == file_digest(reg.path(v1.id))
    assert reg.get(v1.id).data == {"train": ["pt_1"], "validation": ["pt_2"]} and reg.get(v2.id).parent == v1.id

    pointer = reg.promote(v2.id, "root.admin", "better on our cases")
    assert pointer["previous"] == SHIPPED and reg.served_path() == reg.path(v2.id)
    assert ModelRegistry(tmp_path / "models", weights["shipped"]).served_id() == v2.id  # survives a restart
    back = reg.promote(SHIPPED, "root.admin", "roll back")
    assert back["previous"] == v2.id and reg.served_path() == weights["shipped"]
    assert json.loads((tmp_path / "models" / "served.json").read_text())["by"] == "root.admin"


def test_validation_is_recorded_and_unknown_versions_are_named(tmp_path: Path, weights) -> None:
    reg = ModelRegistry(tmp_path / "models", weights["shipped"])
    v1 = reg.add(weights["a"], "any2any", None)
    reg.record_validation(v1.id, {"decision": "keep", "reasons": ["only 1 validation case(s)"]})
    assert reg.get(v1.id).validation["decision"] == "keep"
    assert reg.path(v1.id).read_bytes() == b"a" * 100
    for bad in ("v9-any2any", "../etc", "v1-any2any/../../x"):
        with pytest.raises(UnknownVersionError, match="no model version") as err:
            reg.promote(bad, "x", "")
        assert "v1-any2any" in str(err.value)  # the known ones are listed
    assert reg.served_id() == SHIPPED
    with pytest.raises(ValueError, match="task name"):
        reg.add(weights["a"], "../x", None)


def test_a_half_written_version_is_never_listed(tmp_path: Path, weights) -> None:
    reg = ModelRegistry(tmp_path / "models", None)
    (tmp_path / "models" / "versions" / ".v1-any2any.part").mkdir()
    assert reg.list() == [] and reg.served_path() is None
    assert reg.add(weights["a"], "any2any", None).id == "v1-any2any"
    with pytest.raises(UnknownVersionError, match="no shipped model"):
        reg.promote(SHIPPED, "x", "")
