"""Environments of the engines' own, with kvstore installed into them.

Each engine lives in a venv of its own under ``$KVSTORE_ENGINE_VENVS`` (default
``~/.cache/kvstore/engines``), built once and kept between runs: the engine's
requirements are installed first (then ``prepare`` commands, e.g. removing
wheels that cannot load on CPU) and a stamp records what was installed, so a
changed pin rebuilds it. kvstore (the SDK alone, from this tree) is then
installed into it on every run, and ``pip check`` must stay clean: kvstore
must never move what the engine pinned.

Commands run outside the source tree: its ``kvstore/`` would shadow the
installed package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENVS = Path(os.environ.get("KVSTORE_ENGINE_VENVS") or Path.home() / ".cache" / "kvstore" / "engines")


def run(*command: str, timeout: float = 1500, cwd: Path = VENVS) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def engine_python(
    name: str,
    requirements: list[str],
    *,
    prepare: list[list[str]] = (),
    kvstore_first: bool = False,
    removed: tuple[str, ...] = (),
) -> Path:
    """The python of venv ``name`` with ``requirements`` and this tree's kvstore SDK installed.

    ``kvstore_first`` builds it the other way round (kvstore, then the engine), the
    order a user who already has the SDK follows. ``removed`` names the packages
    that ``prepare`` uninstalls on purpose: ``pip check`` may report them missing,
    and nothing else. Skips when the engine cannot be installed from here (no index
    reachable); fails when kvstore breaks it."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    stamp = venv / ".engine-installed"
    wanted = "\n".join([*requirements, *(" ".join(c) for c in prepare), f"kvstore_first={kvstore_first}"])
    build = ("-C", f"build-dir={venv / 'kvstore-build'}")
    if not stamp.exists() or stamp.read_text() != wanted:
        run(sys.executable, "-m", "venv", "--clear", str(venv))
        steps = [[str(ROOT), *build], requirements] if kvstore_first else [requirements]
        for step in steps:
            installed = run(str(python), "-m", "pip", "install", "--quiet", *step)
            if installed.returncode != 0:
                if "Could not find a version" in installed.stderr or "No matching distribution" in installed.stderr:
                    pytest.skip(f"{' '.join(requirements)} does not install here: {installed.stderr[-500:]}")
                raise AssertionError(f"pip install {' '.join(step)} failed:\n{installed.stderr[-3000:]}")
        for command in prepare:
            done = run(str(python), "-m", *command)
            assert done.returncode == 0, f"{' '.join(command)}: {done.stderr[-2000:]}"
        stamp.write_text(wanted)
    # This tree's code on every run: the SDK with its dependencies (once), then the code alone.
    for extra in ((), ("--force-reinstall", "--no-deps")):
        kvstore = run(str(python), "-m", "pip", "install", "--quiet", *extra, *build, str(ROOT))
        assert kvstore.returncode == 0, kvstore.stderr[-3000:]
    check = run(str(python), "-m", "pip", "check")
    problems = [line for line in check.stdout.splitlines() if line.strip() and not _removed_on_purpose(line, removed)]
    assert check.returncode == 0 or (removed and not problems and not check.stderr.strip()), (
        f"pip check with kvstore beside {' '.join(requirements)}:\n{check.stdout}{check.stderr}"
    )
    return python


def _removed_on_purpose(line: str, removed: tuple[str, ...]) -> bool:
    """Whether a ``pip check`` line says only that a package of ``removed`` is not installed."""
    return line.endswith("which is not installed.") and line.split(" requires ")[-1].split(",")[0].strip() in removed


def engine_env(**extra: str) -> dict[str, str]:
    """The environment for a process of an engine's venv (no source tree on its path)."""
    return {**os.environ, "PYTHONPATH": "", **extra}
