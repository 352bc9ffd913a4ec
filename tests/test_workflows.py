"""The shipped workflows use only existing nodes, with valid widget values and well-typed links.

UI-format graphs are checked against the pack's node specs (and a table of the few ComfyUI core nodes they use);
the API-format copies must describe the same graphs. ``test_comfyui_server.py`` checks them against a real server.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from test_nodes import load_pack

PACK_DIR = Path(__file__).resolve().parents[1]
UI_WORKFLOWS = sorted((PACK_DIR / "example_workflows").glob("*.json"))
API_DIR = PACK_DIR / "example_workflows" / "api"
ADAPTIVE, FREEDRAG, DRAGDIFFUSION = "AdaptiveDrag - auto mask and CLoss", "FreeDrag", "DragDiffusion - painted mask"
SPECS = {spec.node_id: spec for spec in sys.modules[load_pack().__name__ + ".nodes"].NODE_SPECS}

# ComfyUI core nodes the workflows use: socket inputs, widget names, outputs (names and types as in ComfyUI).
CORE_NODES = {
    "CheckpointLoaderSimple": ({}, ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "LoadImage": ({}, ["image", "upload"], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "CLIPTextEncode": ({"clip": "CLIP"}, ["text"], [("CONDITIONING", "CONDITIONING")]),
    "SaveImage": ({"images": "IMAGE"}, ["filename_prefix"], []),
    "Note": ({}, ["text"], []),
}
VIRTUAL_NODES = {"Note"}  # frontend-only: in the graph, not in the API prompt


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def sockets(node_type: str) -> dict:
    if node_type in CORE_NODES:
        return CORE_NODES[node_type][0]
    return {item.name: item.kind for item in SPECS[node_type].inputs if not item.is_widget}


def outputs(node_type: str) -> list:
    if node_type in CORE_NODES:
        return CORE_NODES[node_type][2]
    return [(item.name, item.kind) for item in SPECS[node_type].outputs]


def widget_problem(spec, value):
    """Why ``value`` is not valid for the widget ``spec``, or None."""
    if spec.kind == "BOOLEAN":
        return None if isinstance(value, bool) else "not a boolean"
    if spec.kind == "STRING":
        return None if isinstance(value, str) else "not a string"
    if spec.kind == "COMBO":
        if callable(spec.options):  # a list of files on the user's disk: any plausible file name
            return None if isinstance(value, str) and value.endswith((".pt", ".safetensors")) else "not a file"
        return None if value in spec.choices() else f"not one of {spec.choices()}"
    if spec.kind == "INT" and (not isinstance(value, int) or isinstance(value, bool)):
        return "not an integer"
    if spec.kind == "FLOAT" and not isinstance(value, (int, float)):
        return "not a number"
    return None if spec.min <= value <= spec.max else f"outside {spec.min}..{spec.max}"


def named_widget_values(node: dict) -> dict:
    """A UI node's widget values by widget name (seed widgets carry a "control after generate" value)."""
    values = list(node["widgets_values"])
    if node["type"] in CORE_NODES:
        names = CORE_NODES[node["type"]][1]
        assert len(values) == len(names), node["type"]
        return dict(zip(names, values))
    named = {}
    for spec in SPECS[node["type"]].widgets:
        assert values, f"{node['type']}: too few widget values"
        named[spec.name] = values.pop(0)
    assert not values, f"{node['type']}: {len(values)} widget values too many"
    return named


def test_the_three_graphs_their_api_copies_and_thumbnails_are_shipped_under_readable_titles():
    assert {path.stem for path in UI_WORKFLOWS} == {ADAPTIVE, FREEDRAG, DRAGDIFFUSION}
    assert {path.stem for path in API_DIR.glob("*.json")} == {path.stem for path in UI_WORKFLOWS}
    for path in UI_WORKFLOWS:  # ComfyUI's template browser shows <name>.jpg beside <name>.json
        with Image.open(path.with_suffix(".jpg")) as thumbnail:
            assert thumbnail.format == "JPEG" and thumbnail.width >= 400


def test_the_generator_writes_the_shipped_files(tmp_path, monkeypatch):
    """scripts/make_workflows.py describes each graph once; the shipped JSON is its output."""
    spec = importlib.util.spec_from_file_location("make_workflows", PACK_DIR / "scripts" / "make_workflows.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    monkeypatch.setattr(generator, "OUT", tmp_path)
    generator.main()
    for path in UI_WORKFLOWS + sorted(API_DIR.glob("*.json")):
        written = tmp_path / path.relative_to(PACK_DIR / "example_workflows")
        assert json.loads(written.read_text()) == load(path), path.name


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[path.stem for path in UI_WORKFLOWS])
def test_each_graph_has_a_note_naming_the_model_files_folders_and_image_size(path):
    (note,) = [node for node in load(path)["nodes"] if node["type"] == "Note"]
    text = note["widgets_values"][0]
    assert "ComfyUI/models/checkpoints/" in text and "work_size" in text and "512" in text
    uses_sam2 = any(node["type"] == "AdaptiveDrag_SAM2Loader" for node in load(path)["nodes"])
    assert ("ComfyUI/models/sam2/" in text) == uses_sam2


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[path.stem for path in UI_WORKFLOWS])
def test_ui_workflow_uses_existing_nodes_with_valid_widgets_and_typed_links(path):
    graph = load(path)
    nodes = {node["id"]: node for node in graph["nodes"]}
    for node in nodes.values():
        assert node["type"] in SPECS or node["type"] in CORE_NODES, node["type"]
        values = named_widget_values(node)
        if node["type"] in SPECS:
            for spec in SPECS[node["type"]].widgets:
                problem = widget_problem(spec, values[spec.name])
                assert problem is None, f"{path.name} {node['type']}.{spec.name}={values[spec.name]!r}: {problem}"
        assert [slot["name"] for slot in node["inputs"]] == list(sockets(node["type"]))
        assert [(slot["name"], slot["type"]) for slot in node["outputs"]] == outputs(node["type"])
    for link_id, origin, origin_slot, target, target_slot, kind in graph["links"]:
        assert outputs(nodes[origin]["type"])[origin_slot][1] == kind
        input_slot = nodes[target]["inputs"][target_slot]
        assert input_slot["type"] == kind and input_slot["link"] == link_id
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"]
    for node in nodes.values():  # every required socket of the pack's nodes is connected
        if node["type"] in SPECS:
            required = {item.name for item in SPECS[node["type"]].inputs if not item.is_widget and not item.optional}
            linked = {slot["name"] for slot in node["inputs"] if slot["link"] is not None}
            assert required <= linked, (path.name, node["type"], required - linked)
    types = {node["type"] for node in nodes.values()}
    assert {"CheckpointLoaderSimple", "LoadImage", "SaveImage"} <= types


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[path.stem for path in UI_WORKFLOWS])
def test_api_copy_describes_the_same_graph(path):
    graph, api = load(path), load(API_DIR / path.name)
    nodes = {str(node["id"]): node for node in graph["nodes"] if node["type"] not in VIRTUAL_NODES}
    assert set(api) == set(nodes)
    links = {(str(target), nodes[str(target)]["inputs"][slot]["name"]): [str(origin), origin_slot]
             for _, origin, origin_slot, target, slot, _ in graph["links"]}
    for node_id, node in api.items():
        assert node["class_type"] == nodes[node_id]["type"]
        expected = {name: value for name, value in named_widget_values(nodes[node_id]).items() if name != "upload"}
        expected.update({name: link for (target, name), link in links.items() if target == node_id})
        assert node["inputs"] == expected, (path.name, node_id)


def semantic_drag_inputs(path: Path) -> tuple[dict, dict]:
    api = load(API_DIR / path.name)
    (drag,) = [node for node in api.values() if node["class_type"] == "AdaptiveDrag_SemanticDrag"]
    (sampler,) = [node for node in api.values() if node["class_type"] == "AdaptiveDrag_CLossSampler"]
    return api, {**drag["inputs"], "closs": sampler["inputs"]["closs"]}


def test_each_graph_is_set_up_for_its_method():
    api, adaptive = semantic_drag_inputs(API_DIR / f"{ADAPTIVE}.json")
    mask_node = api[adaptive["mask"][0]]["class_type"]
    assert adaptive["method"] == "adaptive" and adaptive["closs"] is True
    assert mask_node == "AdaptiveDrag_SAM2SuperpixelMask" and adaptive["superpixels"][0] == adaptive["mask"][0]

    _, freedrag = semantic_drag_inputs(API_DIR / f"{FREEDRAG}.json")
    assert freedrag["method"] == "freedrag" and freedrag["closs"] is False

    api, dragdiffusion = semantic_drag_inputs(API_DIR / f"{DRAGDIFFUSION}.json")
    assert dragdiffusion["method"] == "dragdiffusion" and dragdiffusion["closs"] is False
    assert api[dragdiffusion["mask"][0]]["class_type"] == "LoadImage" and dragdiffusion["mask"][1] == 1


@pytest.mark.parametrize("path", sorted(API_DIR.glob("*.json")), ids=lambda path: path.stem)
def test_every_graph_works_on_a_working_copy_and_saves_the_image_at_the_inputs_size(path):
    api = load(path)
    (encode,) = [node for node in api.values() if node["class_type"] == "AdaptiveDrag_EncodeWorkingCopy"]
    (sampler_id,) = [key for key, node in api.items() if node["class_type"] == "AdaptiveDrag_CLossSampler"]
    (save,) = [node for node in api.values() if node["class_type"] == "SaveImage"]
    assert encode["inputs"]["work_size"] == 512
    assert save["inputs"]["images"] == [sampler_id, 1]  # the sampler's image output, at the input's size
    assert "vae" in api[sampler_id]["inputs"]
