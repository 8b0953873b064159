"""``kernels/`` is the package ``tanuki_kernels``; imported as ``kernels`` it never poses as PyPI's ``kernels``.

With the repository root on ``sys.path`` (``python -m pytest``, a script run from the root), ``import
kernels`` finds our folder, and transformers probes for Hugging Face's ``kernels`` package exactly so.
The oracle is what Python gives without our folder: the PyPI package when it is installed, else absent.
"""

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO


def run_from_repo_root(code: str, pythonpath: str = "") -> dict:
    """Run ``code`` by ``python -c`` in the repository root (so the root is first on sys.path, as with
    ``python -m pytest``) and return the JSON object it prints last."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_without_the_pypi_package_kernels_reads_as_absent():
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
        }))
        """
    )
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
