"""The house rules that import-linter (pyproject.toml, run by `make lint`) cannot express, checked on the source:
no module imports another module's private names; diffusers' and torch's private names only through
engine/compat.py; fis/ stays the pure algorithm; model names only in engine/models/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = [p for d in ("engine", "parallel", "fis", "launch") for p in sorted((ROOT / d).rglob("*.py"))]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imports(path: Path):
    """(line, imported module, [names]) of every import statement, in-function ones included."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            yield node.lineno, ("." * node.level) + (node.module or ""), [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_no_private_names_are_imported():
    """A `_name` belongs to its module; another module reaching for it is coupling that breaks without a sign. The
    third-party ones we cannot avoid (diffusers' backend registry, torch's mesh flattening) live in engine/compat.py,
    so a version bump is a one-file diff."""
    compat = ROOT / "engine" / "compat.py"
    bad = []
    for path in PRODUCT:
        for line, module, names in _imports(path):
            private_module = any(_private(part) for part in module.lstrip(".").split("."))
            private_names = [n for n in names if _private(n)]
            if (private_module or private_names) and path != compat:
                bad.append(f"{_where(path, line)}: {module} {private_names}")
    assert not bad, "private names imported:\n" + "\n".join(bad)


def test_fis_is_the_pure_algorithm():
    """fis/ imports torch and the standard library only: no diffusers, no torch.distributed, nothing of ours."""
    bad = []
    for path in sorted((ROOT / "fis").rglob("*.py")):
        for line, module, _ in _imports(path):
            top = module.lstrip(".").split(".")[0]
            if module.startswith("torch.distributed") or top in ("diffusers", "transformers", "engine", "parallel"):
                bad.append(f"{_where(path, line)}: {module}")
    assert not bad, bad


def test_model_knowledge_lives_in_engine_models():
    """The family names and the transformer classes are spelled only in engine/models/ (and the benchmarks and
    tiny pipelines that build a model of one family on purpose; fis/flops.py holds the paper's Table 1 sizes):
    adding a family touches one folder."""
    words = ("hunyuanvideo1.5", "WanTransformer3DModel", "HunyuanVideo15Transformer3DModel", '"wan"')
    allowed = ("engine/models/", "engine/bench/", "engine/testbed/", "engine/evaluation/", "fis/flops.py")
    bad = []
    for path in PRODUCT:
        rel = str(path.relative_to(ROOT))
        if rel.startswith(allowed):
            continue
        for n, text in enumerate(path.read_text().splitlines(), 1):
            code = text.split("#", 1)[0]
            if any(w in code for w in words):
                bad.append(f"{rel}:{n}: {text.strip()}")
    assert not bad, "model names outside engine/models:\n" + "\n".join(bad)


@pytest.mark.slow
def test_a_lower_floor_imports_without_the_upper_ones():
    """parallel/ and engine.models import without loading the runtime, serving or Ray (a fresh interpreter)."""
    code = (
        "import sys, parallel, engine.models, engine.hooks.fis\n"
        "up = [m for m in sys.modules if m.startswith(('engine.runtime', 'engine.serving', 'ray', 'launch'))]\n"
        "assert not up, up\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("path", PRODUCT, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_say_what_they_are(path):
    """Every module opens with a docstring (the package map in docs/architecture.md relies on them)."""
    tree = ast.parse(path.read_text())
    if path.name == "__init__.py" and not tree.body:
        return
    assert ast.get_docstring(tree), f"{path.relative_to(ROOT)} has no module docstring"
