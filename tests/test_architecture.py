"""The layering is checked, not hoped for: import-linter's contracts (pyproject.toml) pass, and
every core module of steer/ is under the contract that keeps it from importing upward."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")  # the venv's own, beside this python
    run = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert f"{len(_contracts())} kept, 0 broken" in run.stdout


def test_every_core_module_is_forbidden_to_import_upward():
    (core,) = [c for c in _contracts() if c["type"] == "forbidden"]
    listed = set(core["source_modules"])
    on_disk = {f"steer.{p.stem}" for p in (ROOT / "steer").glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert on_disk == listed, f"add new core modules to the forbidden contract: {sorted(on_disk ^ listed)}"
    layers = next(c for c in _contracts() if c["type"] == "layers")["layers"]
    packages = {f"steer.{p.name}" for p in (ROOT / "steer").iterdir() if (p / "__init__.py").exists()}
    assert packages == set(layers), f"every subpackage is a layer: {sorted(packages ^ set(layers))}"


def test_no_generic_top_level_names_are_installed():
    import steer.evaluation
    import steer.generation
    import steer.ui

    assert steer.generation.__name__ == "steer.generation" and steer.ui.__name__ == "steer.ui"
    found = subprocess.run([sys.executable, "-c", "import generation"], cwd="/", capture_output=True)
    assert found.returncode != 0, "a top-level 'generation' module is importable from outside the repository"
