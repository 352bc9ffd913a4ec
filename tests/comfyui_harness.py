"""Starting a real ComfyUI server for the integration tests (used only when COMFYUI_PATH is set).

The server runs ``COMFYUI_PYTHON`` (default: this interpreter) ``main.py --cpu`` on a free loopback port, with a
temporary ``--base-directory`` whose ``custom_nodes`` holds only this pack, linked as ComfyUI-AdaptiveDrag.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
PACK_DIR = Path(os.environ.get("ADAPTIVEDRAG_PACK_DIR", Path(__file__).resolve().parents[1])).resolve()
PACK_DIR_NAME = "ComfyUI-AdaptiveDrag"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def link_pack(base: Path) -> None:
    """Make ``base/custom_nodes`` hold only this pack."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_DIR_NAME).symlink_to(PACK_DIR, target_is_directory=True)


@contextmanager
def running_comfyui(base: Path, ready_path: str = "/system_stats", timeout: float = 300):
    """Start ComfyUI on ``base``, wait until ``ready_path`` answers, yield its URL, stop it afterwards."""
    port = free_port()
    log_path = base / "server.log"
    # Low priority (nice 15), like the tests themselves: the server computes on the CPU.
    command = ["nice", "-n", "15", COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--disable-auto-launch"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(url + ready_path, timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer {ready_path} in {timeout} s:\n{log_path.read_text()[-4000:]}")
                time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
