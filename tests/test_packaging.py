"""pyproject.toml against the code and the lock: every third-party import is declared (as a
dependency or an extra), and every pin in requirements.txt lies inside its declared range."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

from packaging.requirements import Requirement

from helpers import ROOT

# import name -> distribution name, where they differ and the installed metadata may not say
KNOWN = {"yaml": "pyyaml", "huggingface_hub": "huggingface-hub", "google": "protobuf"}
LOCAL = {"clm", "helpers", "train_clm", "generate"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return {normalize(r.name): r for r in reqs}


def third_party_imports() -> dict[str, str]:
    """Top-level module -> a file importing it, over the package and the entry points."""
    files = sorted((ROOT / "clm").rglob("*.py")) + [ROOT / "train_clm.py", ROOT / "generate.py"]
    files += sorted((ROOT / "finetune").rglob("*.py"))
    found = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in LOCAL:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_declared():
    deps, installed = declared(), packages_distributions()
    imports = third_party_imports()
    assert {"torch", "transformers", "accelerate", "yaml"} <= set(imports)
    missing = []
    for module, where in sorted(imports.items()):
        dists = {normalize(d) for d in installed.get(module, [])}
        dists.add(normalize(KNOWN.get(module, module)))
        if not dists & set(deps):
            missing.append(f"{module} (imported in {where})")
    assert not missing, f"not declared in pyproject.toml: {missing}"


def test_every_pin_is_inside_its_declared_range():
    deps = declared()
    pins = [Requirement(line.split("#")[0].strip())
            for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.split("#")[0].strip()]
    assert pins
    for pin in pins:
        (spec,) = pin.specifier
        assert spec.operator == "==", f"requirements.txt pins exactly: {pin}"
        name = normalize(pin.name)
        assert name in deps, f"{pin} is pinned but not declared in pyproject.toml"
        assert deps[name].specifier.contains(spec.version, prereleases=True), \
            f"pin {pin} is outside pyproject's range {deps[name]}"
