"""Writes the example workflows: ``example_workflows/<title>.json`` (the graphs ComfyUI's template browser lists,
with the title as file name) and ``example_workflows/api/<title>.json`` (the same graphs in API format, for
``POST /prompt`` and the tests).

Each graph is described once below; widget order, sockets and outputs come from the pack's node specs, so the
files always match the nodes. Run after changing a node's inputs; the JSON files are committed. The thumbnails
(``<title>.jpg``) are screenshots of the loaded graphs: ``tests/test_browser_widget.py`` writes them when
``ADAPTIVEDRAG_TEMPLATE_THUMBNAILS`` names a folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nodes import NODE_SPECS  # noqa: E402  (the pack's specs; no ComfyUI needed)

OUT = REPO / "example_workflows"
SPECS = {spec.node_id: spec for spec in NODE_SPECS}
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"

# ComfyUI core nodes the graphs use: title, sockets (name, type), widgets, outputs (name, type).
CORE_NODES = {
    "CheckpointLoaderSimple": ("Load Checkpoint", [], ["ckpt_name"],
                               [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "LoadImage": ("Load Image", [], ["image", "upload"], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "CLIPTextEncode": ("CLIP Text Encode (Prompt)", [("clip", "CLIP")], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "SaveImage": ("Save Image", [("images", "IMAGE")], ["filename_prefix"], []),
    "Note": ("Note", [], ["text"], []),
}
# Frontend-only nodes: in the graph, not in the API prompt.
VIRTUAL_NODES = {"Note"}


def note_text(uses_sam2: bool, painted_mask: bool) -> str:
    lines = [
        "MODEL FILES",
        f"- An SD1.5 checkpoint (or any SD1.x fine-tune, .safetensors) in ComfyUI/models/checkpoints/: pick it "
        f"in Load Checkpoint ({CHECKPOINT} is SD1.5's own).",
    ]
    if uses_sam2:
        lines.append("- A SAM2 or SAM2.1 checkpoint, e.g. sam2.1_hiera_tiny.pt, in ComfyUI/models/sam2/ (make the "
                     "folder): pick it in SAM2 Loader. Without SAM2 the mask node falls back to colour superpixels "
                     "and says so on the node.")
    lines += [
        "",
        "IMAGE",
        "- Any size. Encode Working Copy edits a copy whose longer side is work_size (512: SD1.5's own size) and "
        "the CLoss Sampler gives the result back at the input's size. Keep work_size near 512.",
    ]
    if painted_mask:
        lines.append("- Paint the region that may change in Load Image's mask editor (right click > Open in "
                     "MaskEditor). An unpainted picture runs without a mask, and Semantic Drag says so.")
    lines += [
        "",
        "STEPS",
        "1. Pick the image in Load Image.",
        "2. Click handle -> target pairs on the Drag Points canvas (red handle, then blue target).",
        "3. Queue. The result and a preview (input with arrows | result with where each handle ended) appear on "
        "the CLoss Sampler; facts and warnings on each node.",
        "Moving only the points re-runs the drag and sampling: the identity LoRA and the inversion stay cached "
        "(the LoRA also on disk, across restarts).",
    ]
    return "\n".join(lines)


def graph(method: str, mask: str) -> list[tuple]:
    """The nodes of one workflow: (id, type, position, size, widget values by name) and its links."""
    uses_sam2, painted = mask == "auto", mask == "painted"
    drag_widgets = {"method": method}
    nodes = [
        (1, "CheckpointLoaderSimple", [20, 40], [320, 100], {"ckpt_name": CHECKPOINT}),
        (2, "LoadImage", [20, 180], [320, 360], {"image": "example.png", "upload": "image"}),
        (3, "CLIPTextEncode", [380, 40], [400, 120], {"text": ""}),
        (4, "AdaptiveDrag_EncodeWorkingCopy", [380, 200], [300, 90], {}),
        (5, "AdaptiveDrag_DragPoints", [380, 330], [440, 520], {}),
        (6, "AdaptiveDrag_IdentityLoRA", [860, 40], [320, 260], {}),
        (7, "AdaptiveDrag_DDIMInversion", [1220, 40], [320, 140], {}),
        (8, "AdaptiveDrag_SemanticDrag", [1220, 220], [340, 330], drag_widgets),
        (9, "AdaptiveDrag_CLossSampler", [1600, 40], [420, 560], {"closs": method == "adaptive"}),
        (10, "SaveImage", [2060, 40], [400, 460], {"filename_prefix": f"AdaptiveDrag_{method}"}),
        (11, "Note", [20, 580], [330, 460], {"text": note_text(uses_sam2, painted)}),
    ]
    links = [
        (1, "CLIP", 3, "clip"), (2, "IMAGE", 4, "image"), (1, "VAE", 4, "vae"), (2, "IMAGE", 5, "image"),
        (1, "MODEL", 6, "model"), (4, "latent", 6, "latent"), (3, "CONDITIONING", 6, "positive"),
        (1, "MODEL", 7, "model"), (4, "latent", 7, "latent"), (3, "CONDITIONING", 7, "positive"),
        (6, "lora", 7, "lora"), (7, "inverted", 8, "inverted"), (5, "drag_points", 8, "drag_points"),
        (8, "dragged", 9, "dragged"), (1, "VAE", 9, "vae"), (9, "image", 10, "images"),
    ]
    if uses_sam2:
        nodes += [
            (12, "AdaptiveDrag_SAM2Loader", [860, 340], [320, 100], {"model_name": "sam2.1_hiera_tiny.pt"}),
            (13, "AdaptiveDrag_SAM2SuperpixelMask", [860, 480], [320, 420], {}),
        ]
        links += [(2, "IMAGE", 13, "image"), (5, "drag_points", 13, "drag_points"), (12, "sam2_model", 13, "sam2_model"),
                  (13, "mask", 8, "mask"), (13, "superpixels", 8, "superpixels")]
    if painted:
        links.append((2, "MASK", 8, "mask"))
    return nodes, links


def node_io(node_type: str):
    """(title, sockets, widget names in stored order, outputs) of a node type."""
    if node_type in CORE_NODES:
        return CORE_NODES[node_type]
    spec = SPECS[node_type]
    sockets = [(item.name, item.kind) for item in spec.inputs if not item.is_widget]
    return (spec.display_name, sockets, [item.name for item in spec.widgets],
            [(item.name, item.kind) for item in spec.outputs])


def widget_value(node_type: str, name: str, given: dict):
    if name in given:
        return given[name]
    return SPECS[node_type].input(name).default


def ui_workflow(title: str, nodes: list, links: list) -> dict:
    """ComfyUI's graph format (what the browser saves and the template browser loads)."""
    by_id = {node[0]: node for node in nodes}
    link_rows = []
    for link_id, (origin, output, target, socket) in enumerate(links, start=1):
        outputs, sockets = node_io(by_id[origin][1])[3], node_io(by_id[target][1])[1]
        origin_slot = [name for name, _ in outputs].index(output)
        target_slot = [name for name, _ in sockets].index(socket)
        link_rows.append([link_id, origin, origin_slot, target, target_slot, outputs[origin_slot][1]])
    ui_nodes = []
    for order, (node_id, node_type, pos, size, given) in enumerate(nodes):
        node_title, sockets, widgets, outputs = node_io(node_type)
        ui_nodes.append({
            "id": node_id, "type": node_type, "pos": pos, "size": size, "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": name, "type": kind,
                        "link": next((row[0] for row in link_rows if row[3] == node_id and row[4] == slot), None)}
                       for slot, (name, kind) in enumerate(sockets)],
            "outputs": [{"name": name, "type": kind, "slot_index": slot,
                         "links": [row[0] for row in link_rows if row[1] == node_id and row[2] == slot]}
                        for slot, (name, kind) in enumerate(outputs)],
            "properties": {"Node name for S&R": node_type},
            "widgets_values": [given[name] if node_type in CORE_NODES else widget_value(node_type, name, given)
                               for name in widgets],
            **({"color": "#432", "bgcolor": "#653"} if node_type == "Note" else {}),
        })
    return {"last_node_id": max(by_id), "last_link_id": len(link_rows), "nodes": ui_nodes, "links": link_rows,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [0, 0]}, "info": {"name": title}},
            "version": 0.4}


def api_prompt(nodes: list, links: list) -> dict:
    """The same graph in API format: named inputs, links as [node id, output slot]."""
    by_id = {node[0]: node for node in nodes}
    prompt = {}
    for node_id, node_type, _, _, given in nodes:
        if node_type in VIRTUAL_NODES:
            continue
        title, _, widgets, _ = node_io(node_type)
        inputs = {name: given[name] if node_type in CORE_NODES else widget_value(node_type, name, given)
                  for name in widgets if name != "upload"}
        for origin, output, target, socket in links:
            if target == node_id:
                inputs[socket] = [str(origin), [name for name, _ in node_io(by_id[origin][1])[3]].index(output)]
        prompt[str(node_id)] = {"class_type": node_type, "inputs": inputs, "_meta": {"title": title}}
    return prompt


WORKFLOWS = {
    "AdaptiveDrag - auto mask and CLoss": ("adaptive", "auto"),
    "FreeDrag": ("freedrag", None),
    "DragDiffusion - painted mask": ("dragdiffusion", "painted"),
}


def main() -> None:
    (OUT / "api").mkdir(parents=True, exist_ok=True)
    for title, (method, mask) in WORKFLOWS.items():
        nodes, links = graph(method, mask)
        (OUT / f"{title}.json").write_text(json.dumps(ui_workflow(title, nodes, links), indent=2) + "\n")
        (OUT / "api" / f"{title}.json").write_text(json.dumps(api_prompt(nodes, links), indent=2) + "\n")


if __name__ == "__main__":
    main()
