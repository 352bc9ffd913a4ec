"""Installing ``requirements.txt`` where torch and torchvision are already installed, as in ComfyUI's environment,
plans no change to either and builds nothing from source (a source package is built in an environment of its own,
into which pip may fetch another torch, as ``sam2``'s build did).

pip plans (``install --dry-run --report``) for a fresh virtual environment that holds only torch's and
torchvision's metadata at the running environment's versions: pip decides from installed versions, so their files
are not needed. It asks the package index; the test is skipped, with pip's reason, where pip cannot reach it."""

import importlib.metadata
import json
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REQUIREMENTS = Path(__file__).parents[1] / "requirements.txt"
OWNED_BY_COMFYUI = ("torch", "torchvision")
# pip's words when the index cannot be reached (it then finds no versions at all).
UNREACHABLE = ("NewConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ProxyError", "Max retries exceeded",
               "Network is unreachable", "Connection refused", "Temporary failure in name resolution",
               "Could not fetch URL")
PLAN_TIMEOUT_S = 600


def environment_with_torch(folder: Path) -> Path:
    """A virtual environment in ``folder`` holding only torch's and torchvision's metadata; its Python."""
    builder = venv.EnvBuilder(with_pip=False)
    builder.create(folder)
    python = builder.ensure_directories(folder).env_exe
    site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    for name in OWNED_BY_COMFYUI:
        version = importlib.metadata.version(name)
        info = Path(site_packages) / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return Path(python)


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_plan(python: Path, requirements: Path) -> dict:
    """pip's installation report for ``requirements`` in the environment of ``python`` (nothing is installed)."""
    command = [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--quiet",
               "--report", "-", "--retries", "1", "--timeout", "30", "-r", str(requirements)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=PLAN_TIMEOUT_S)
    network_errors = [line for line in done.stderr.splitlines() if any(words in line for words in UNREACHABLE)]
    if done.returncode != 0 and network_errors:
        pytest.skip(f"pip cannot reach the package index: {network_errors[0].strip()[:300]}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_requirements_leave_torch_alone_and_build_nothing_from_source(tmp_path):
    pip_version = tuple(int(part) for part in importlib.metadata.version("pip").split(".")[:2])
    if pip_version < (22, 3):
        pytest.skip(f"pip {importlib.metadata.version('pip')} cannot plan for another environment (--python)")
    plan = pip_plan(environment_with_torch(tmp_path / "env"), REQUIREMENTS)
    planned = {normalised(item["metadata"]["name"]): item for item in plan["install"]}
    assert "diffusers" in planned  # the plan is the requirements', not an empty one
    assert not set(planned) & set(OWNED_BY_COMFYUI)
    from_source = sorted(name for name, item in planned.items() if not item["download_info"]["url"].endswith(".whl"))
    assert from_source == []
