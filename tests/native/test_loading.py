"""Loading kvstore._native: UCX through libucx.load_library(), then the
extension; importing never fails, and available() says whether it loaded.
Each case runs in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

REPORT = """
import json, os
before = dict(os.environ)
from kvstore import _native
result = {"available": _native.available(), "reason": _native.unavailable_reason(),
          "environ_unchanged": dict(os.environ) == before}
try:
    _native.Context("tcp", settings={"NET_DEVICES": "lo"})
    result["context"] = "ok"
except _native.TransportError as exc:
    result["context"] = exc.code
print(json.dumps(result))
"""


def run(prelude: str = "", env: dict | None = None) -> dict:
    code = textwrap.dedent(prelude) + REPORT
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_loads():
    result = run()
    assert result == {"available": True, "reason": None, "environ_unchanged": True, "context": "ok"}


def test_missing_extension():
    result = run(
        """
        import sys
        class HideExtension:
            def find_spec(self, name, path=None, target=None):
                if name == "kvstore._native._ext":
                    raise ImportError("no compiled extension in this test")
        sys.meta_path.insert(0, HideExtension())
        """
    )
    assert result["available"] is False
    assert "kvstore._native._ext" in result["reason"]
    assert result["context"] == "DATA_PLANE_UNAVAILABLE"


def test_missing_libucx():
    result = run("import sys; sys.modules['libucx'] = None\n")
    assert result["available"] is False
    assert "libucx" in result["reason"]
    assert result["context"] == "DATA_PLANE_UNAVAILABLE"


def test_unloadable_ucx():
    result = run(
        """
        import libucx
        def load_library():
            raise OSError("libucp.so: cannot open shared object file")
        libucx.load_library = load_library
        """
    )
    assert result["available"] is False
    assert "cannot load the UCX libraries" in result["reason"]


def test_runpath_finds_the_wheel_without_preloading():
    # Without load_library() the extension's RPATH still finds the wheel's UCX.
    result = run("import libucx; libucx.load_library = lambda: []\n")
    assert result["available"] is True and result["context"] == "ok"


def test_prefer_system_library_falls_back_to_the_wheel():
    # With no system UCX installed, libucx falls back to the wheel's copy.
    result = run(env={"RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY": "true"})
    assert result["available"] is True and result["context"] == "ok"


def test_error_classes_do_not_need_the_extension():
    code = REPORT.replace("from kvstore import _native", "import sys; sys.modules['libucx'] = None\nfrom kvstore import _native")
    code += "print(json.dumps(issubclass(_native.EndpointClosedError, _native.TransportError)))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) is True
