"""The package layering the README states: common/ imports none of Tandem's other packages; the
process packages (actors/, learner/, realrobot/) import only common/ besides themselves; tools/
sits above them all, and no process package imports it."""
import ast
from pathlib import Path

import pytest
from paths import REPO_ROOT

ROOT = REPO_ROOT
TANDEM = {"common", "actors", "learner", "realrobot", "tools", "benchmarks"}
ALLOWED = {"common": {"common"}, "actors": {"common", "actors"}, "learner": {"common", "learner"},
           "realrobot": {"common", "realrobot"}}


def tandem_imports(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops & TANDEM


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_is_below_it(package):
    offenders = {str(p.relative_to(ROOT)): sorted(tandem_imports(p) - ALLOWED[package])
                 for p in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}
