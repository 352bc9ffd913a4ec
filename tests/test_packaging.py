"""What the Comfy Registry, ComfyUI-Manager and a new user read first: pyproject.toml and the README's start."""

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_node_id_and_version_are_what_the_registry_accepts():
    name, version = PYPROJECT["project"]["name"], PYPROJECT["project"]["version"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name) and len(name) < 100
    assert "comfyui" not in name.lower()  # the registry's advice: the node id does not repeat "ComfyUI"
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)


def test_the_registry_table_names_publisher_display_name_icon_and_repository():
    comfy, urls = PYPROJECT["tool"]["comfy"], PYPROJECT["project"]["urls"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "AdaptiveDrag"
    assert urls["Repository"].startswith("https://")
    icon = comfy["Icon"]
    assert icon.startswith("https://") and icon.startswith(urls["Repository"].replace(
        "https://github.com/", "https://raw.githubusercontent.com/"))
    assert (REPO / icon.split("/main/", 1)[1]).is_file()  # the icon the URL names is in the repository


def test_the_runtime_dependencies_match_requirements_txt():
    lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines == PYPROJECT["project"]["dependencies"]


def test_the_readme_starts_with_the_comfyui_install():
    readme = (REPO / "README.md").read_text()
    sections = re.findall(r"^## (.+)$", readme, flags=re.MULTILINE)
    assert sections[0] == "Install in ComfyUI"
    install = readme.split("## Install in ComfyUI", 1)[1].split("\n## ", 1)[0]
    assert "ComfyUI-Manager" in install and f"comfy node install {PYPROJECT['project']['name']}" in install
    assert PYPROJECT["project"]["urls"]["Repository"] in install
    assert "<URL" not in readme
    for image in re.findall(r"\]\((docs/images/[^)]+)\)", readme):
        assert (REPO / image).is_file(), image
