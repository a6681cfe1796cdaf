"""The layers: every module is in a layer of an import-linter contract (pyproject.toml), the contracts hold
(lint-imports, as `make lint` runs it), and docs/architecture.md's picture names every layer the contracts name."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
CONTRACTS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _layered() -> dict[str, set[str]]:
    """{container: names of its layers' modules}; the top-level contract's container is ''."""
    out: dict[str, set[str]] = {}
    for c in CONTRACTS:
        if c["type"] != "layers":
            continue
        names = {n.strip() for layer in c["layers"] for n in re.split(r"[|:]", layer)}
        for container in c.get("containers", [""]):
            out.setdefault(container, set()).update(names)
    return out


def _modules(package: str) -> set[str]:
    """The modules and sub-packages directly inside ``package`` (a folder of the repository)."""
    folder = REPO / package.replace(".", "/")
    return {p.stem for p in folder.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}


def test_every_module_of_every_package_is_in_a_layer():
    layered = _layered()
    assert layered[""] == {"launch", "evaluation", "pipeline"}
    for package in ("pipeline", "evaluation", "pipeline.data", "pipeline.model", "pipeline.checkpoint",
                    "pipeline.tracking", "pipeline.train"):
        assert _modules(package) == layered[package], package


def test_the_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    kept = re.search(r"Contracts: (\d+) kept, (\d+) broken", r.stdout)
    assert kept and int(kept.group(1)) == len(CONTRACTS) and kept.group(2) == "0", r.stdout[-2000:]


def test_the_architecture_picture_names_every_layer():
    doc = (REPO / "docs" / "architecture.md").read_text()
    picture = doc.split("## Layers", 1)[1].split("```", 2)[1]
    words = set(re.findall(r"[a-z_]+", picture))
    for container, names in _layered().items():
        missing = {n for n in names if n.split(".")[-1] not in words}
        assert not missing, f"{container or 'top level'}: {missing} not in docs/architecture.md's picture"
