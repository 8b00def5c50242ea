"""The layers of docs/architecture.md, checked on the source: what may import what, who calls collectives."""
import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "stage1_tokenizer", "dataprep", "stage2_ar")
# package -> the project packages it may import (besides itself)
ALLOWED = {
    "shared": set(),
    "stage1_tokenizer": {"shared"},
    "dataprep": {"shared", "stage1_tokenizer"},
    "stage2_ar": {"shared", "stage1_tokenizer"},
}
PROJECT = set(PACKAGES) | {"experiments", "bench", "scripts", "tests"}


def _imports(path: Path, names: bool = False):
    """(line, module) of every import; with ``names``, ``from a.b import c`` also gives ``a.b.c`` (c may be a
    submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            for a in node.names if names else ():
                yield node.lineno, f"{node.module}.{a.name}"


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_follow_the_layers(package):
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for line, name in _imports(path):
            top = name.split(".")[0]
            if top in PROJECT and top != package and top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


# Readers of token datasets use the reader contract ``shared.token_dataset`` exports, never the writers.
READERS = ("stage2_ar", "experiments")
WRITER_MODULES = ("shared.token_dataset.writer", "shared.token_dataset.checksums")


@pytest.mark.parametrize("package", READERS)
def test_readers_do_not_import_the_token_dataset_writers(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"{package} has no Python files"
    bad = [f"{path.relative_to(REPO)}:{line} imports {name}" for path in files
           for line, name in _imports(path, names=True)
           if name in WRITER_MODULES]
    assert not bad, "\n".join(bad)


def test_no_module_shadows_the_standard_library():
    names = {p.stem for pkg in PACKAGES for p in (REPO / pkg).glob("*.py")}
    assert not names & set(sys.stdlib_module_names)


def test_only_shared_collectives_calls_torch_distributed_collectives():
    """So every tensor handed to a collective goes through the move to the process group's device."""
    calls = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
             "broadcast_object_list", "reduce", "reduce_scatter", "barrier", "gather", "scatter", "send", "recv"}
    found = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            if path == REPO / "shared" / "collectives.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Attribute) and node.attr in calls and isinstance(node.value, ast.Name)
                        and node.value.id == "dist"):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} dist.{node.attr}")
    assert not found, "\n".join(found)
