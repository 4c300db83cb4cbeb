"""The README's Layout section names real paths, and every package under ``placer/``; every
function-level import under ``placer/`` says why it is deferred."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout_paths() -> set[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return {p for p in re.findall(r"`([^`\s]+)`", section)
            if p.startswith(("placer/", "tests/", "docs/", "benchmarks/", "notebooks/"))}


def test_every_path_named_in_the_layout_exists():
    paths = _layout_paths()
    assert len(paths) >= 10
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README Layout names paths that do not exist: {missing}"


def test_every_package_is_named_in_the_layout():
    named = _layout_paths()
    packages = sorted(f"placer/{d.name}/" for d in (ROOT / "placer").iterdir()
                      if (d / "__init__.py").is_file())
    assert packages, "no packages found under placer/"
    unnamed = [p for p in packages if p not in named]
    assert not unnamed, f"packages the README's Layout section does not name: {unnamed}"


# A function-level import defers an optional extra (torch, ray, transformers, triton, safetensors,
# or a module that imports one), keeps a heavy import off the start-up path of ``placer --help``,
# or would point up the layers; its line says which, in a ``# deferred: <reason>`` comment.
DEFERRED = re.compile(r"#.*\bdeferred:\s*\S")


def _comments(source: str) -> dict[int, str]:
    """Line number -> the comment on that line (comments only: not text inside strings)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {tok.start[0]: tok.string for tok in tokens if tok.type == tokenize.COMMENT}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _function_level_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """The import statements inside a def (at any depth), not under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST, in_def: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:
                    visit_one(other, in_def)
                continue
            visit_one(child, in_def)

    def visit_one(node: ast.AST, in_def: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            if in_def:
                found.append(node)
            return
        visit(node, in_def or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(tree, False)
    return found


def test_every_function_level_import_says_why_it_is_deferred():
    undocumented = []
    for path in sorted((ROOT / "placer").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        comments = _comments(source)
        lines = source.splitlines()
        for node in _function_level_imports(ast.parse(source, filename=str(path))):
            span = range(node.lineno, (node.end_lineno or node.lineno) + 1)
            if not any(DEFERRED.search(comments.get(n, "")) for n in span):
                undocumented.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not undocumented, (
        f"{len(undocumented)} function-level imports without a '# deferred: <reason>' comment (move "
        "each to module level, or say why it must wait: an optional extra, placer --help start-up, "
        "an upward import):\n" + "\n".join(undocumented))
