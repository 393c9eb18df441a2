"""The import graph follows the house of docs/ARCHITECTURE (and ../shared/DESIGN.md): no module imports from a
layer above it, and imports sit at the top of their module.

Imports are read with `ast` from every file of interplab/ (nothing is imported). An import inside
``if TYPE_CHECKING:`` only names types and is not an edge. A function-level (lazy) interplab import is an
edge like any other and must also be listed in `LAZY`, with why it cannot be at the top.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "interplab"

# Bottom to top. A unit (a top-level module or subpackage of interplab; "interplab" is the package's own
# __init__) may import from units of lower levels and from itself, never from its own level or above.
LAYERS: list[tuple[str, ...]] = [
    ("io",),  # atomic writes, safetensors and JSON helpers: the stdlib, torch and safetensors only
    ("integrity",),  # content hashes of what was written
    ("runs",),  # the run-directory contract (names, kinds, openers)
    # plots.py is listed last in DESIGN.md's tree but is a leaf helper (Plotly is imported in its
    # functions): every result's .plot() uses it, so it sits with the other foundations
    ("hooks", "data", "plots"),
    ("model",),  # reads a model folder's tokenizer.json through data.tokenizer
    ("interplab",),  # re-exports hooks, model and load_model
    ("tasks",),
    ("train",),
    ("analysis",),
    ("circuits",),
    ("scrub",),
    ("sae",),
    ("toy",),
    ("features",),
    ("data_attribution",),
    ("routing",),
    ("dynamics", "graphs", "rl"),
    ("web",),
    ("cli",),
    ("__main__",),
]
LEVEL = {unit: i for i, units in enumerate(LAYERS) for unit in units}

# The in-function interplab imports that remain, (file, imported module) -> why it is not at the top. Lazy
# imports are kept only for heavy optional dependencies and for the CLI command groups (so `interplab
# --help` does not load the whole library), and to break a cycle that a method's convenience creates; whoever
# moves one to the top deletes its line here.
CLI_GROUP = "a CLI command group: the library loads when its command runs, so `interplab --help` stays fast"
LAZY: dict[tuple[str, str], str] = {
    (
        "model/transformer.py",
        "interplab.model.io",
    ): "Transformer.save: model/io.py imports the transformer module",
    (
        "sae/base.py",
        "interplab.sae.io",
    ): "SAE.save: sae/io.py builds SAEs through the registry, which imports base",
    (
        "sae/registry.py",
        "interplab.sae.architectures",
    ): "the built-in architectures register themselves on import, and each imports the registry",
    (
        "cli/common.py",
        "interplab.features.database",
    ): "db_source (is a --db a URL?): every command imports cli/common, and the database module loads SQLAlchemy",
    (
        "web/runs.py",
        "interplab.web.dt_page",
    ): "the home page's numbers of DT folders: dt_page reads every file through this module",
    (
        "features/schema.py",
        "interplab.features.packed",
    ): "the migration to schema 4 converts contexts with packed, which is built on the tables defined here",
    (
        "web/guard.py",
        "interplab.features.reader",
    ): "the 414 message's MAX_QUERY: `interplab serve` imports the guard before the app, and reader loads SQLAlchemy",
}
# files whose every function may import the library lazily
LAZY_FILES: dict[str, str] = {
    f"cli/{name}.py": CLI_GROUP
    for name in ("analysis", "attribute", "demo", "discover", "features", "formation", "info", "llc", "route")
    + ("sae", "scrub", "serve", "train", "dt")
}


@dataclass(frozen=True)
class Import:
    file: str  # relative to interplab/
    line: int
    module: str  # the interplab module imported (``from interplab import plots`` -> interplab.plots)
    lazy: bool  # inside a function

    @property
    def where(self) -> str:
        return f"interplab/{self.file}:{self.line}"


def _module_name(path: Path) -> str:
    parts = ("interplab", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).is_dir() or (PACKAGE / rel).with_suffix(".py").is_file()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def _imports(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    lazy_ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lazy_ids |= {id(n) for n in ast.walk(node) if n is not node}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            submodules = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
            names = submodules or [base]
        rel = path.relative_to(PACKAGE).as_posix()
        out += [
            Import(rel, node.lineno, n, id(node) in lazy_ids)
            for n in names
            if n == "interplab" or n.startswith("interplab.")
        ]
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "interplab"


FILES = sorted(PACKAGE.rglob("*.py"))
IMPORTS = [imp for path in FILES for imp in _imports(path)]


def test_every_unit_has_a_layer():
    units = {_unit(_module_name(p)) for p in FILES}
    missing = sorted(units - set(LEVEL))
    assert not missing, f"give {missing} a place in LAYERS (tests/test_layers.py) and docs/ARCHITECTURE"


def test_no_module_imports_from_a_layer_above():
    upward = []
    for imp in IMPORTS:
        src = _unit(_module_name(PACKAGE / imp.file))
        dst = _unit(imp.module)
        if src != dst and LEVEL[dst] >= LEVEL[src]:
            upward.append(
                f"{imp.where}: {src} (level {LEVEL[src]}) imports {imp.module} (level {LEVEL[dst]})"
            )
    assert not upward, "imports that do not flow upwards:\n" + "\n".join(upward)


def test_the_bottom_layer_imports_only_the_bottom():
    for imp in IMPORTS:
        if imp.file in ("io.py", "integrity.py") or imp.file.startswith("runs/"):
            allowed = imp.module in ("interplab.io", "interplab.integrity") or imp.module.startswith(
                "interplab.runs"
            )
            assert allowed, f"{imp.where} imports {imp.module}"


def test_in_function_imports_are_only_the_allowed_ones():
    lazy = [imp for imp in IMPORTS if imp.lazy and imp.file not in LAZY_FILES]
    unexpected = sorted(f"{imp.where}: {imp.module}" for imp in lazy if (imp.file, imp.module) not in LAZY)
    assert not unexpected, (
        "import these at the top of their module (a cycle means a function is in the wrong layer), or add "
        "them to LAZY with why they must stay lazy:\n" + "\n".join(unexpected)
    )


def test_the_allow_list_has_no_stale_entries():
    present = {(imp.file, imp.module) for imp in IMPORTS if imp.lazy}
    stale = sorted(f"{f}: {m}" for f, m in set(LAZY) - present)
    assert not stale, "these lazy imports are gone: delete their lines from LAZY:\n" + "\n".join(stale)
    gone = sorted(f for f in LAZY_FILES if not (PACKAGE / f).is_file())
    assert not gone, f"LAZY_FILES names files that no longer exist: {gone}"


@pytest.mark.parametrize("reason", sorted(set(LAZY.values()) | set(LAZY_FILES.values())))
def test_every_allowed_lazy_import_says_why(reason):
    assert len(reason) >= 10
