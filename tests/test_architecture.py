"""The layout's import rules (docs/architecture.md), checked on the source: which part may import which."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flexkd_ds"
PARTS = ("method", "inputs", "runtime", "evaluation", "jobs")
DISTRIBUTED = ("deepspeed", "torch.distributed")

# part -> the flexkd_ds parts and third-party roots it must never import (at module level or in a function)
FORBIDDEN = {
    "method": ("flexkd_ds.runtime", "flexkd_ds.evaluation", "flexkd_ds.jobs", *DISTRIBUTED),
    "inputs": (
        "flexkd_ds.method",
        "flexkd_ds.runtime",
        "flexkd_ds.evaluation",
        "flexkd_ds.jobs",
        *DISTRIBUTED,
    ),
    "evaluation": ("flexkd_ds.runtime", "flexkd_ds.jobs", *DISTRIBUTED),
    "runtime": ("flexkd_ds.method", "flexkd_ds.evaluation", "flexkd_ds.jobs"),
    "jobs": (),
}


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` statement in ``path`` names (``from a import b`` gives
    ``a`` and ``a.b``, so ``from flexkd_ds import jobs`` is caught)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, (
                f"{path}: relative import; the layout uses absolute flexkd_ds.<part> imports"
            )
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def modules_of(part: str) -> list[Path]:
    """Every module of ``part``, those of its sub-packages (``method/prune/``) included."""
    return sorted((PACKAGE / part).rglob("*.py"))


def module_name(path: Path) -> str:
    """``flexkd_ds/method/prune/cut.py`` -> ``flexkd_ds.method.prune.cut``."""
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def test_every_part_exists_and_every_file_belongs_to_one():
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(PARTS)
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "launcher.py"]  # launcher.py: the stable `python -m flexkd_ds.launcher`


@pytest.mark.parametrize("part", PARTS)
def test_import_rules(part):
    for path in modules_of(part):
        bad = sorted(
            m
            for m in imported_modules(path)
            for root in FORBIDDEN[part]
            if m == root or m.startswith(root + ".")
        )
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}, which {part}/ must not"


@pytest.mark.parametrize("part", PARTS)
def test_every_module_says_what_it_is_for(part):
    for path in modules_of(part):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc and len(doc.splitlines()[0]) > 10, f"{path}: no one-line purpose at the top"


def test_the_pure_parts_load_without_deepspeed():
    """Transitively too: importing every module of method/, inputs/ and evaluation/ leaves deepspeed and
    torch.distributed's process-group module unloaded."""
    names = [module_name(p) for part in ("method", "inputs", "evaluation") for p in modules_of(part)]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'deepspeed' or m.startswith('deepspeed.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout[-2000:]


def test_every_package_is_listed_in_pyproject():
    """setuptools lists packages explicitly: a sub-package missing there is missing from a wheel."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(root).parts)
        for init in (root / "flexkd_ds").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"


def test_the_repository_root_shadows_no_installed_package():
    """Python started in the repository root (``python -m pytest``, ``python -c``, a notebook) puts the root
    first on sys.path, so a top-level folder there named like an installed distribution hides it. That broke
    every model import once transformers (5.25) began importing the PyPI ``kernels`` while the Triton folder
    was called ``kernels/``. Checked the way a user meets it, and for every top-level folder."""
    import importlib.metadata

    root = Path(__file__).resolve().parents[1]
    installed = {
        name.replace("-", "_").lower()
        for dist in importlib.metadata.distributions()
        for name in [dist.metadata["Name"] or "", *(dist.read_text("top_level.txt") or "").split()]
    }
    folders = {p.name.lower() for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert not folders & (installed - {"flexkd_ds"}), f"rename: {sorted(folders & installed)}"
    code = "from transformers import LlamaConfig, GPT2Config; import flexkd_ds.kernels; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
