"""The shape of the house (docs/architecture.md): every module documented, modules of
one concern and bounded size, one fit path, a worker loop on one screen, typed plans."""

import ast
import re
from pathlib import Path

from ..conftest import REPO

PKG = Path(REPO) / "simpo_ray"
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
MAX_LINES = 420  # "~400 lines at most" (issue 13); sections.py, the config schema, is the longest


def _code(root: Path):
    for p in sorted(root.rglob("*.py")):
        yield p, p.read_text()


def test_every_module_is_in_the_architecture_table_and_the_readme_layout():
    arch = (Path(REPO) / "docs" / "architecture.md").read_text()
    table = set(re.findall(r"^\| `(\w+)` \| \d \|", arch, flags=re.M))
    assert table == set(MODULES), f"missing: {set(MODULES) - table}, stale: {table - set(MODULES)}"
    readme = (Path(REPO) / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 5)]
    missing = [m for m in MODULES if not re.search(rf"\b{m}\b", layout)]
    assert not missing, f"README layout omits {missing}"


def test_modules_stay_small():
    long = {p.name: n for p in PKG.glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_exactly_one_place_builds_a_torch_trainer():
    places = [f"{p.relative_to(REPO)}:{i + 1}" for root in (PKG, Path(REPO) / "benchmarks")
              for p, text in _code(root) for i, line in enumerate(text.splitlines())
              if "TorchTrainer(" in line and not line.lstrip().startswith("#") and "``" not in line]
    assert len(places) == 1 and places[0].startswith("simpo_ray/train.py:"), places


def test_the_worker_loop_fits_on_one_screen():
    tree = ast.parse((PKG / "worker.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train_loop_per_worker")
    assert fn.end_lineno - fn.lineno + 1 <= 60


def test_no_string_indexing_of_plans_or_states():
    hits = [f"{p.name}:{i + 1}" for p, text in _code(PKG) for i, line in enumerate(text.splitlines())
            if re.search(r"\b(plan|state)\[\s*['\"]", line)]
    assert not hits, hits
