"""Packaging: the repository's top-level ``kernels/`` folder never shadows another package
named ``kernels``, and the installed ``fastmerge.kernels`` holds every kernel module.

``python -m pytest`` (and any script run from the repository root) puts the root first on
``sys.path``. A regular package ``kernels`` there (a folder with an ``__init__.py``) would
win over the PyPI package ``kernels`` that transformers imports; as a plain folder it is
at most a namespace-package portion, which an installed regular package always beats.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNELS_DIR = ROOT / "kernels"
PACKAGE_INIT_DIR = ROOT / "python" / "fastmerge" / "kernels"


def _kernel_modules_in_repo() -> list[str]:
    """The op modules of the top-level kernels/ folder (helpers start with `_`)."""
    return sorted(p.stem for p in KERNELS_DIR.glob("*.py") if not p.name.startswith("_"))


def test_top_level_kernels_folder_is_not_a_regular_package():
    assert KERNELS_DIR.is_dir()
    assert not (KERNELS_DIR / "__init__.py").exists(), (
        "kernels/__init__.py makes the top-level folder a regular package that shadows the "
        "PyPI package `kernels` from the repository root; the package init lives in "
        "python/fastmerge/kernels/__init__.py"
    )


def test_package_init_dir_holds_only_the_init():
    # The kernel modules are installed beside it from kernels/ by CMakeLists.txt; a module
    # here as well would be a second copy competing for the same path in the wheel.
    assert sorted(p.name for p in PACKAGE_INIT_DIR.glob("*.py")) == ["__init__.py"]


def test_kernels_folder_cannot_shadow_a_kernels_package_from_the_repo_root(tmp_path):
    """With the root first on sys.path, as under `python -m pytest`, and a stand-in regular
    package `kernels` after it, `import kernels` must give the stand-in."""
    stand_in = tmp_path / "kernels"
    stand_in.mkdir()
    (stand_in / "__init__.py").write_text("MARKER = 'stand-in'\n")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(tmp_path)!r}]
        import kernels
        print(getattr(kernels, "MARKER", None), getattr(kernels, "__file__", None))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    marker, _, origin = result.stdout.strip().partition(" ")
    assert marker == "stand-in", f"`import kernels` from the repository root gave {origin}"


def test_installed_fastmerge_kernels_has_every_kernel_module():
    pytest.importorskip("triton")
    kernels = importlib.import_module("fastmerge.kernels")
    in_repo = _kernel_modules_in_repo()
    assert in_repo, "no kernel modules found in kernels/"
    missing = sorted(set(in_repo) - set(kernels.KERNEL_MODULES))
    assert not missing, (
        f"kernels/{missing[0]}.py is not listed in KERNEL_MODULES of "
        "python/fastmerge/kernels/__init__.py (add its name there)"
    )
    installed = Path(kernels.__file__).parent
    for name in in_repo:
        assert (installed / f"{name}.py").is_file(), (
            f"fastmerge/kernels/{name}.py is not installed (reinstall the package)"
        )
        module = getattr(kernels, name)
        assert module.__name__ == f"fastmerge.kernels.{name}"
        assert set(module.AOT_SIGNATURES) <= set(kernels.AOT_SIGNATURES), name
    assert set(kernels.__all__) >= {"AOT_SIGNATURES", *in_repo}
