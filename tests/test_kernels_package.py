"""``kernels/`` is the package ``tanuki_kernels``; imported as ``kernels`` it never poses as PyPI's ``kernels``.

With the repository root on ``sys.path`` (``python -m pytest``, a script run from the root), ``import
kernels`` finds our folder, and transformers probes for Hugging Face's ``kernels`` package exactly so.
The oracle is what Python gives without our folder: the PyPI package when it is installed, else absent.

Both cases are real: transformers >= 5.25 depends on the PyPI package (so it is in every fresh
environment), older releases do not pull it. The "absent" case is simulated by hiding the installed
package from the child process (:data:`HIDE_PYPI_KERNELS`); the "present" case uses it as installed.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

# Prepended to a child's code: before anything else is imported, every sys.path entry (but the repository
# root) holding the PyPI package is replaced by a twin directory of symlinks to all its entries except
# ``kernels/`` and ``kernels-*.dist-info``/``.egg-info``. transformers' probe
# (``utils/import_utils.py:_is_package_available``) looks at ``importlib.util.find_spec``, then
# ``importlib.metadata.version`` under the import name and under the distribution names of
# ``importlib.metadata.packages_distributions()``, then imports the module: the twin hides the package from
# all of them, as an environment without it would. ``SIMULATION`` records that it does.
HIDE_PYPI_KERNELS = """
import os as _os, re as _re, sys as _sys

def _hide_pypi_kernels(tmp):
    here = _os.path.realpath(_os.getcwd())
    for i, entry in enumerate(list(_sys.path)):
        if not isinstance(entry, str):
            continue
        real = _os.path.realpath(entry or _os.curdir)
        if real == here or not _os.path.isdir(real):
            continue
        names = _os.listdir(real)
        hidden = {n for n in names if n == "kernels" or _re.fullmatch(r"kernels-[^-]+\\.(dist|egg)-info", n)}
        if not hidden:
            continue
        twin = _os.path.join(tmp, str(i))
        _os.mkdir(twin)
        for n in names:
            if n not in hidden:
                _os.symlink(_os.path.join(real, n), _os.path.join(twin, n))
        _sys.path[i] = twin

def _simulation():
    import importlib.machinery, importlib.metadata
    here = _os.path.realpath(_os.getcwd())
    others = [p for p in _sys.path if isinstance(p, str) and _os.path.realpath(p or _os.curdir) != here]
    try:
        importlib.metadata.version("kernels")
        metadata = "found"
    except importlib.metadata.PackageNotFoundError:
        metadata = "PackageNotFoundError"
    return {
        "found_elsewhere": importlib.machinery.PathFinder.find_spec("kernels", others) is not None,
        "metadata": metadata,
        "distributions": importlib.metadata.packages_distributions().get("kernels", []),
    }

_hide_pypi_kernels(TMP)
SIMULATION = _simulation()
"""


def pypi_kernels_version() -> str | None:
    """Version of the installed PyPI package ``kernels``, None when it is not installed."""
    try:
        return importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None


def run_from_repo_root(code: str, pythonpath: str = "", prelude: str = "", cwd=REPO) -> dict:
    """Run ``prelude`` then ``code`` by ``python -c`` in the repository root (so the root is first on
    sys.path, as with ``python -m pytest``) and return the JSON object it prints last."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(prelude) + textwrap.dedent(code)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_without_the_pypi_package_kernels_reads_as_absent(tmp_path):
    got = run_from_repo_root(
        """
        import importlib.util, json, sys
        import kernels
        shadow = {
            "found_here": importlib.util.find_spec("kernels") is not None,
            "file": getattr(kernels, "__file__", None),
            "version": getattr(kernels, "__version__", None),
            "is_package": hasattr(kernels, "__path__"),
            "has_our_helpers": hasattr(kernels, "check_launchable"),
            "triton_imported": "triton" in sys.modules,
        }
        try:
            from kernels import get_kernel  # noqa: F401
            shadow["from_import"] = "ok"
        except ImportError:
            shadow["from_import"] = "ImportError"

        from transformers.utils.import_utils import _is_package_available, is_kernels_available
        import transformers.modeling_utils  # noqa: F401  (imports hub_kernels, which probes)
        import tanuki_kernels
        print(json.dumps({
            **shadow,
            "probe": list(_is_package_available("kernels", return_version=True)),
            "available": is_kernels_available(),
            "tanuki_kernels_ok": callable(tanuki_kernels.check_launchable) and tanuki_kernels is not kernels,
            "simulation": SIMULATION,
        }))
        """,
        prelude=f"TMP = {str(tmp_path)!r}\n" + HIDE_PYPI_KERNELS,
    )
    # The child saw an environment without the PyPI package, whether or not this one has it.
    assert got.pop("simulation") == {
        "found_elsewhere": False,
        "metadata": "PackageNotFoundError",
        "distributions": [],
    }
    assert (
        got
        == {
            "found_here": True,  # find_spec cannot be told otherwise: the folder is there
            "file": None,
            "version": None,
            "is_package": False,  # so kernels.rms_norm cannot register the custom ops a second time
            "has_our_helpers": False,
            "triton_imported": False,
            "from_import": "ImportError",
            "probe": [False, "N/A"],
            "available": False,
            "tanuki_kernels_ok": True,
        }
    )


def test_an_installed_pypi_package_gets_the_name(tmp_path):
    site = tmp_path / "site"
    (site / "kernels" / "layer").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(
        "__version__ = '0.12.0'\nORIGIN = 'pypi'\n"
    )
    (site / "kernels" / "layer" / "__init__.py").write_text("")
    (site / "kernels" / "layer" / "mode.py").write_text("Mode = 'mode'\n")
    got = run_from_repo_root(
        """
        import json, sys
        import kernels
        from kernels.layer.mode import Mode
        print(json.dumps({
            "origin": kernels.ORIGIN,
            "version": kernels.__version__,
            "file": kernels.__file__,
            "submodule": Mode,
            "same_module": sys.modules["kernels"] is kernels,
        }))
        """,
        pythonpath=str(site),
    )
    assert got == {
        "origin": "pypi",
        "version": "0.12.0",
        "file": str(site / "kernels" / "__init__.py"),
        "submodule": "mode",
        "same_module": True,
    }


def test_a_failing_pypi_package_fails_as_itself(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(
        "raise RuntimeError('broken install')\n"
    )
    got = run_from_repo_root(
        """
        import json, sys
        try:
            import kernels
            error = None
        except RuntimeError as e:
            error = str(e)
        print(json.dumps({"error": error, "left_in_sys_modules": "kernels" in sys.modules}))
        """,
        pythonpath=str(site),
    )
    assert got == {"error": "broken install", "left_in_sys_modules": False}


# What the probe says when the repository root is not on sys.path: the oracle for the "present" case.
PROBE = """
import json
from transformers.utils.import_utils import _is_package_available, is_kernels_available
print(json.dumps({
    "probe": list(_is_package_available("kernels", return_version=True)),
    "available": is_kernels_available(),
}))
"""


@pytest.mark.parametrize("first", ["kernels", "transformers"])
def test_the_installed_pypi_package_gets_the_name(first, tmp_path):
    version = pypi_kernels_version()
    if version is None:
        pytest.skip("the PyPI package kernels is not installed (transformers < 5.25 does not pull it)")
    oracle = run_from_repo_root(PROBE, cwd=tmp_path)
    assert oracle["probe"] == [True, version]
    got = run_from_repo_root(
        f"""
        import importlib.metadata, importlib.util, json, os, site, sys
        if {first!r} == "kernels":
            import kernels
        from transformers.utils.import_utils import _is_package_available, is_kernels_available
        import transformers.modeling_utils  # noqa: F401  (imports hub_kernels, which probes and imports kernels)
        import kernels
        import tanuki_kernels

        real = os.path.realpath
        sites = {{real(p) for p in [*site.getsitepackages(), site.getusersitepackages()]}}
        installed = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
        print(json.dumps({{
            "file_is_the_installed_one": real(kernels.__file__) == real(installed),
            "file_in_site_packages": real(os.path.dirname(os.path.dirname(kernels.__file__))) in sites,
            "version": kernels.__version__,
            "metadata_version": importlib.metadata.version("kernels"),
            "spec_is_the_module's": importlib.util.find_spec("kernels") is kernels.__spec__,
            "path": [real(p) for p in kernels.__path__],
            "has_our_helpers": hasattr(kernels, "check_launchable"),
            "probe": list(_is_package_available("kernels", return_version=True)),
            "available": is_kernels_available(),
            "tanuki_kernels_file": tanuki_kernels.__file__,
            "tanuki_kernels_ok": callable(tanuki_kernels.check_launchable) and tanuki_kernels is not kernels,
            "kernels_in_sys_modules": sys.modules["kernels"] is kernels,
        }}))
        """
    )
    installed = importlib.metadata.distribution("kernels").locate_file("kernels")
    assert got == {
        "file_is_the_installed_one": True,
        "file_in_site_packages": True,
        "version": version,
        "metadata_version": version,
        "spec_is_the_module's": True,
        "path": [os.path.realpath(installed)],
        "has_our_helpers": False,
        "probe": [True, version],
        "available": oracle["available"],
        "tanuki_kernels_file": str(REPO / "kernels" / "__init__.py"),
        "tanuki_kernels_ok": True,
        "kernels_in_sys_modules": True,
    }
