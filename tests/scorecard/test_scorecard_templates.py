"""Scorecard templates: discovery, validation errors, and the shipped templates' coverage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from diffkt3d.constants import OPENKBP_OARS, OPENKBP_PTVS
from diffkt3d.data.case import Case, Grid, Structure, infer_role
from diffkt3d.errors import ConfigError
from diffkt3d.scorecard import list_templates, load_template, score_case

SHIPPED = Path(__file__).resolve().parents[2] / "diffkt3d" / "scorecard" / "templates"

GOOD_ITEM = {"id": "cord", "structure": "SpinalCord", "metric": "D0.1cc",
             "points": [[40, 10], [45, 6], [50, 0]], "weight": 2, "hard": {"max": 45, "penalty": 1}}


def _write(tmp_path: Path, items: list, name: str = "inst.yaml", **top) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"name": "inst", "items": items, **top}))
    return path


# -- discovery --------------------------------------------------------------------------------------
def test_shipped_templates_are_discovered_by_name_and_path() -> None:
    assert {"openkbp_hn", "lung", "prostate"} <= set(list_templates())
    by_name = load_template("openkbp_hn")
    by_path = load_template(SHIPPED / "openkbp_hn.yaml")
    assert by_name.items == by_path.items
    assert by_name.name == "openkbp_hn"


def test_unknown_template_name_lists_shipped(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown Scorecard template 'nope'.*openkbp_hn"):
        load_template("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_template(tmp_path / "missing.yaml")


def test_user_template_file_loads(tmp_path: Path) -> None:
    tpl = load_template(_write(tmp_path, [GOOD_ITEM]))
    item = tpl.item("cord")
    assert item.points == ((40.0, 10.0), (45.0, 6.0), (50.0, 0.0))
    assert item.weight == 2.0 and item.hard is not None and item.hard.max == 45.0
    assert item.unit == "Gy" and item.max_score == 10.0


# -- validation errors name the template file and the item -------------------------------------------
@pytest.mark.parametrize(("change", "message"), [
    ({"metric": "D95"}, "unknown metric 'D95'"),
    ({"metric": "Dfoo"}, "unknown metric"),
    ({"points": [[40, 10], [50, 6], [45, 0]]}, "strictly increasing"),
    ({"points": [[40, 10], [40, 0]]}, "strictly increasing"),
    ({"points": [[40, 10]]}, "at least two"),
    ({"points": [[40, -1], [50, 0]]}, "scores must be >= 0"),
    ({"points": [[40, 0], [50, 0]]}, "score > 0"),
    ({"points": [[40, "x"], [50, 0]]}, "expected a number"),
    ({"weight": 0}, "weight must be > 0"),
    ({"weight": -2}, "weight must be > 0"),
    ({"weight": "heavy"}, "bad weight"),
    ({"weight": float("nan")}, "bad weight"),
    ({"hard": {"min": 50, "max": 40}}, "above max"),
    ({"hard": {"penalty": 1}}, "'min' and/or 'max'"),
    ({"hard": {"max": 45, "penalty": -1}}, "penalty must be >= 0"),
    ({"structure": "re:(bad"}, "bad structure selector"),
    ({"structure": "target:middle"}, "unknown role selector"),
    ({"required": "yes"}, "'required' must be true or false"),
    ({"rx": "plan"}, "'rx' must be"),
    ({"colour": "red"}, "unknown key"),
])
def test_invalid_items_raise_config_error_naming_file_and_item(tmp_path: Path, change: dict,
                                                               message: str) -> None:
    bad = {**GOOD_ITEM, **change}
    path = _write(tmp_path, [GOOD_ITEM | {"id": "ok"}, bad])
    with pytest.raises(ConfigError, match=message) as exc:
        load_template(path)
    text = str(exc.value)
    assert str(path) in text
    assert "item #2 ('cord')" in text


def test_template_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="non-empty list"):
        load_template(_write(tmp_path, []))
    with pytest.raises(ConfigError, match="duplicate item id"):
        load_template(_write(tmp_path, [GOOD_ITEM, GOOD_ITEM]))
    with pytest.raises(ConfigError, match="unknown top-level key"):
        load_template(_write(tmp_path, [GOOD_ITEM], owner="x"))
    (tmp_path / "broken.yaml").write_text("items: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_template(tmp_path / "broken.yaml")
    missing = {k: v for k, v in GOOD_ITEM.items() if k != "metric"}
    with pytest.raises(ConfigError, match="missing 'metric'"):
        load_template(_write(tmp_path, [missing]))


# -- shipped templates cover their structure sets -------------------------------------------------------
def _synthetic_case(names: list[str], rx: dict[str, float]) -> Case:
    """One 1-slice slab per structure on a (len(names), 6, 6) grid; roles from the names."""
    shape = (len(names), 6, 6)
    structures = {}
    for i, name in enumerate(names):
        mask = np.zeros(shape, dtype=bool)
        mask[i] = True
        role, _ = infer_role(name)
        structures[name] = Structure(name, mask, role, rx.get(name))
    return Case("synthetic", Grid(shape, np.diag([3.0, 3.0, 3.0, 1.0])), structures=structures)


@pytest.mark.parametrize(("template", "names", "rx"), [
    ("openkbp_hn", [*OPENKBP_OARS, *OPENKBP_PTVS], {"PTV70": 70.0, "PTV63": 63.0, "PTV56": 56.0}),
    ("lung", ["PTV60", "Lungs", "Heart", "Esophagus", "SpinalCord"], {"PTV60": 60.0}),
    ("prostate", ["PTV78", "Rectum", "Bladder", "Femoral_Head_L", "Femoral_Head_R"], {"PTV78": 78.0}),
])
def test_shipped_template_scores_every_item_on_its_structure_set(template: str, names: list[str],
                                                                 rx: dict[str, float]) -> None:
    case = _synthetic_case(names, rx)
    dose = np.zeros(case.grid.shape, dtype=np.float32)
    for s in case.structures.values():
        dose[s.mask] = s.prescription_gy if s.prescription_gy else 5.0
    result = score_case(dose, case, template)
    assert result.skipped == []
    scored = {r.structure for r in result.items}
    assert scored == set(names), f"structures never scored: {set(names) - scored}"
    # every structure's items meet their goals here (targets at 100 % Rx, OARs at 5 Gy)
    assert result.total == pytest.approx(result.max_total)
    assert result.penalty_total == 0.0


def test_openkbp_hn_hard_constraints_from_the_brief() -> None:
    tpl = load_template("openkbp_hn")
    cord, stem = tpl.item("cord_d01cc"), tpl.item("brainstem_d01cc")
    assert (cord.metric, cord.hard.max) == ("D0.1cc", 45.0)
    assert (stem.metric, stem.hard.max) == ("D0.1cc", 54.0)
    ptv = tpl.item("ptv_high_d95")
    assert ptv.required and ptv.unit == "%Rx"
    # D95 >= 100 % Rx scores full marks; parotid mean 26 Gy is below full marks
    assert ptv.points[-1] == (100.0, ptv.max_score)
    parotid = tpl.item("parotid_dmean")
    assert dict(parotid.points)[26.0] < parotid.max_score


def test_every_shipped_item_cites_a_source() -> None:
    for name in list_templates():
        for item in load_template(name).items:
            assert item.source, f"{name}:{item.id} has no source"
