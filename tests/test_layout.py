"""The layers of docs/architecture.md are import-linter contracts in pyproject.toml; `make test` checks them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_every_stage_is_a_folder():
    pkg = ROOT / "pipeline"
    for stage in ("convert", "devices", "release"):
        assert (pkg / stage / "__init__.py").is_file(), stage
    top = sorted(p.stem for p in pkg.glob("*.py"))
    assert len(top) <= 10, f"pipeline/ holds {len(top)} modules side by side: {top}"


def test_the_cli_contract_names_every_other_module_of_the_library():
    """The CLI may import only api, inventory, errors and cli.*: its forbidden contract must list all the rest, so a
    new module of pipeline/ cannot slip past it."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (cli,) = [c for c in contracts if c.get("source_modules") == ["pipeline.cli"] and c["type"] == "forbidden"]
    pkg = ROOT / "pipeline"
    modules = {p.stem for p in pkg.glob("*.py")} | {p.parent.name for p in pkg.glob("*/__init__.py")}
    others = {f"pipeline.{m}" for m in modules - {"__init__", "api", "inventory", "errors", "cli"}}
    assert others <= set(cli["forbidden_modules"]), sorted(others - set(cli["forbidden_modules"]))
