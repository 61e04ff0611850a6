"""Install commands of the README and docs: what they install is what CI's `scripts/setup_env.sh test`
installs, and the optional `transfer` extra (`pip install -e '.[transfer]'`) provides what needs it."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_transfer_extra_declares_and_provides_peft_and_diffusers() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0] for req in extras["transfer"]}
    assert {"peft", "diffusers"} <= names
    # the CI profile installs `.[dev,transfer]`, so both must import here
    for module in ("peft", "diffusers"):
        assert importlib.util.find_spec(module) is not None, f"{module} missing: run pip install -e '.[transfer]'"


def test_server_install_runs_scardnft() -> None:
    """The server's quick start runs the preference -> ScardNFT loop: peft is in the server set, at a
    version the `transfer` extra accepts."""
    server = (REPO / "requirements-server.txt").read_text().splitlines()
    pins = [line for line in server if line.startswith("peft==")]
    assert len(pins) == 1, "requirements-server.txt must pin peft (ScardNFT's LoRA)"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    floor = next(r for r in extras["transfer"] if r.startswith("peft>="))

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(p) for p in text.split("=")[-1].split(".")[:2])

    assert version(pins[0]) >= version(floor), (pins[0], floor)


def test_documented_install_steps_are_the_ones_setup_env_runs() -> None:
    """docs/server.md and docs/slicer.md list pip commands; setup_env.sh (run by scripts/test.sh in CI)
    must run the same ones, so the documented install is the tested one."""
    setup = (REPO / "scripts" / "setup_env.sh").read_text()
    assert 'pip install --progress-bar on -e ".$extras"' in setup and 'extras="[dev,transfer]"' in setup
    assert "pip install --progress-bar on -r requirements-server.txt" in setup
    assert "pip install --progress-bar on --no-deps -r requirements-server-nodeps.txt" in setup
    assert 'pip install --progress-bar on "torch==2.13.0"' in setup
    pinned = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in pinned
    nodeps = (REPO / "requirements-server-nodeps.txt").read_text()
    assert "monailabel==0.8.5" in nodeps


def test_app_and_task_packages_install_beside_the_core() -> None:
    """`monailabel start_server --app monailabel_app` loads main.py by path; its imports of
    monailabel_app.*, infer_tasks.* and train_tasks.* resolve because the project installs them."""
    from setuptools import find_namespace_packages

    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = set(find_namespace_packages(str(REPO), include=find["include"], exclude=find.get("exclude", ())))
    assert {"diffkt3d", "infer_tasks", "train_tasks", "monailabel_app"} <= packages
    assert not {p for p in packages if p.startswith(("monailabel_app.model", "monailabel_app.logs"))}
