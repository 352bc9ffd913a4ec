"""The pack in a real ComfyUI server: node list, every API workflow run to a saved image, caching, errors.

Skipped unless ``COMFYUI_PATH`` names a ComfyUI checkout; ``COMFYUI_PYTHON`` is the Python that runs it (default:
this one). The server runs on a free loopback port with a temporary ``--base-directory`` holding this pack (as a
link in ``custom_nodes``), a random-weight SD1.5 checkpoint and a random SAM2.1-tiny checkpoint written here, and
64x64 input images. The SD1.5 checkpoint has SD1.5's widths (ComfyUI recognises SD1.5 by model_channels 320 and
context_dim 768) but one resnet per level, to keep CPU time low; CLIP and the VAE are full size.
"""

import copy
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from test_nodes import load_pack

from comfyui_harness import COMFYUI_PATH, COMFYUI_PYTHON, PACK_DIR, link_pack, running_comfyui
WORKFLOWS = sorted((PACK_DIR / "workflows" / "api").glob("*.json"))
SIZE = 64
CHECKPOINT = "sd15_random.safetensors"
SAM2_CHECKPOINT = "sam2.1_hiera_tiny.pt"
RUN_TIMEOUT = 600

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH (and COMFYUI_PYTHON) to run against ComfyUI"),
]

# Run with COMFYUI_PYTHON in the ComfyUI folder: builds the checkpoint with ComfyUI's own model classes.
WRITE_CHECKPOINT = r'''
import os, sys
output = sys.argv[1]
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, os.getcwd())
import comfy.options
comfy.options.enable_args_parsing()
import torch
from safetensors.torch import save_file
import comfy.ops
from comfy.ldm.models.autoencoder import AutoencoderKL
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.sd1_clip import SDClipModel

torch.manual_seed(0)
unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1, 1, 1],
                 channel_mult=[1, 1, 1, 1], transformer_depth=[1, 1, 1, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1, context_dim=768,
                 num_heads=8, use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False,
                 operations=comfy.ops.disable_weight_init)
vae = AutoencoderKL(ddconfig={"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                              "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                              "dropout": 0.0}, embed_dim=4)
clip = SDClipModel(device="cpu")
state = {}
for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae), ("cond_stage_model.", clip)):
    for key, value in module.state_dict().items():
        if value.is_floating_point():  # the modules skip initialisation: fill every weight here
            value = (torch.ones_like(value) if key.endswith("weight") else torch.zeros_like(value)) \
                if value.ndim == 1 else torch.randn_like(value) * 0.02
            value = value.half()
        state[prefix + key] = value.contiguous()
save_file(state, output)
'''


# Run with COMFYUI_PYTHON in the ComfyUI folder: the bridge on a real ComfyUI MODEL, with and without a patch
# like the ones LoraLoader adds. Prints the facts as JSON.
PROBE_BRIDGE = r'''
import importlib.util, json, os, sys
checkpoint, pack = sys.argv[1], sys.argv[2]
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, os.getcwd())
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.sd
spec = importlib.util.spec_from_file_location("adaptivedrag_pack", os.path.join(pack, "__init__.py"),
                                              submodule_search_locations=[pack])
module = importlib.util.module_from_spec(spec)
sys.modules["adaptivedrag_pack"] = module
spec.loader.exec_module(module)
from adaptivedrag_pack.nodes.bridge import core_model

facts = {}
with torch.inference_mode():  # as ComfyUI runs nodes
    model = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False, output_clip=False)[0]
    comfy_conv_in = model.model.diffusion_model.input_blocks[0][0].weight
    original = comfy_conv_in.clone()
    patched = model.clone()
    patched.add_patches({"diffusion_model.input_blocks.0.0.weight": (torch.ones_like(original),)})
    unet = core_model(patched).unet
    facts["patch_applied"] = bool(torch.allclose(unet.conv_in.weight, original + 1))
    shared = core_model(model).unet
    facts["unpatched_again"] = bool(torch.equal(shared.conv_in.weight, original))
    facts["shares_storage"] = shared.conv_in.weight.data_ptr() == model.model.diffusion_model.input_blocks[0][0].weight.data_ptr()
    trainable = core_model(model, trainable=True).unet
    facts["trainable_has_no_inference_tensors"] = not any(p.is_inference() for p in trainable.parameters())
    facts["given_model_has_no_patches"] = not model.patches
    x = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, 768)
    ours = shared(x, 500, encoder_hidden_states=context).sample
    theirs = model.model.diffusion_model(x, torch.tensor([500.0]), context=context)
    facts["max_output_difference"] = float((ours - theirs).abs().max())
print(json.dumps(facts))
'''


# ------------------------------------------------------------------------------------------------ the server
def write_inputs(base: Path) -> None:
    from PIL import Image

    link_pack(base)
    for folder in ("checkpoints", "sam2"):
        (base / "models" / folder).mkdir(parents=True)
    subprocess.run([COMFYUI_PYTHON, "-c", WRITE_CHECKPOINT, str(base / "models" / "checkpoints" / CHECKPOINT)],
                   cwd=COMFYUI_PATH, check=True, capture_output=True, timeout=600)
    write_sam2_checkpoint(base / "models" / "sam2" / SAM2_CHECKPOINT)

    (base / "input").mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(base / "input" / "drag.png")
    # ComfyUI's Load Image makes MASK = 1 - alpha: the transparent (painted) part is the editable region.
    alpha = np.full((SIZE, SIZE), 255, dtype=np.uint8)
    alpha[16:48, 8:56] = 0
    Image.fromarray(np.dstack([pixels, alpha]), "RGBA").save(base / "input" / "drag_masked.png")


def write_sam2_checkpoint(path: Path) -> None:
    import torch

    from adaptivedrag_core.sam2_keys import to_original
    from adaptivedrag_core.sam2_loader import random_sam2

    # Meta's tensor names, as the files users put in models/sam2.
    torch.save({"model": to_original(random_sam2("tiny", seed=0).model.state_dict())}, path)


class Server:
    def __init__(self, url: str, base: Path):
        self.url = url
        self.base = base

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return json.load(response)

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        body = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode()
        request = urllib.request.Request(self.url + "/prompt", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    def run(self, prompt: dict) -> dict:
        """Queue a prompt and wait for its history entry."""
        status, answer = self.post_prompt(prompt)
        assert status == 200, answer
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {RUN_TIMEOUT} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui")
    write_inputs(base)
    with running_comfyui(base, timeout=180) as url:
        yield Server(url, base)


# --------------------------------------------------------------------------------------------- graph helpers
def points_json(pairs, width=SIZE, height=SIZE) -> str:
    return json.dumps({"version": 1, "width": width, "height": height,
                       "pairs": [{"handle": list(h), "target": list(t)} for h, t in pairs]})


def node_of(prompt: dict, class_type: str) -> tuple[str, dict]:
    (match,) = [(key, node) for key, node in prompt.items() if node["class_type"] == class_type]
    return match


def quick(workflow: Path, pairs=(((20, 30), (28, 30)),)) -> dict:
    """The API workflow with this test's files, 64x64 points and few steps."""
    prompt = copy.deepcopy(json.loads(workflow.read_text()))
    settings = {
        "CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT},
        "AdaptiveDrag_DragPoints": {"points_json": points_json(pairs)},
        "AdaptiveDrag_SAM2Loader": {"model_name": SAM2_CHECKPOINT},
        "AdaptiveDrag_IdentityLoRA": {"steps": 2, "rank": 2, "batch_size": 1},
        "AdaptiveDrag_DDIMInversion": {"steps": 10, "strength": 0.3},
        "AdaptiveDrag_SemanticDrag": {"steps": 2, "max_steps": 3},
        "SaveImage": {"filename_prefix": f"test_{workflow.stem}"},
    }
    for node in prompt.values():
        node["inputs"].update(settings.get(node["class_type"], {}))
    load_id, load_image = node_of(prompt, "LoadImage")
    uses_mask = any(value == [load_id, 1] for node in prompt.values() for value in node["inputs"].values())
    load_image["inputs"]["image"] = "drag_masked.png" if uses_mask else "drag.png"
    return prompt


def messages(entry: dict, event: str) -> list[dict]:
    return [data for name, data in entry["status"]["messages"] if name == event]


def errors(entry: dict) -> list[str]:
    return [f"{error['node_type']}: {error['exception_message']}" for error in messages(entry, "execution_error")]


# ------------------------------------------------------------------------------------------------------ tests
def pack_specs():
    return {spec.node_id: spec for spec in sys.modules[load_pack().__name__ + ".nodes"].NODE_SPECS}


def test_bridge_shares_weights_includes_patches_and_matches_comfyuis_unet(server):
    result = subprocess.run([COMFYUI_PYTHON, "-c", PROBE_BRIDGE, str(server.base / "models" / "checkpoints" / CHECKPOINT),
                             str(PACK_DIR)], cwd=COMFYUI_PATH, check=True, capture_output=True, text=True, timeout=300)
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts.pop("max_output_difference") < 1e-4
    assert facts == {"patch_applied": True, "unpatched_again": True, "shares_storage": True,
                     "trainable_has_no_inference_tensors": True, "given_model_has_no_patches": True}


def test_every_node_is_in_object_info_with_its_schema(server):
    info = server.get("/object_info")
    for node_id, spec in pack_specs().items():
        assert node_id in info, f"{node_id} not loaded; see {server.base / 'server.log'}"
        node = info[node_id]
        assert node["category"] == "AdaptiveDrag" and node["display_name"] == spec.display_name
        inputs = {**node["input"]["required"], **node["input"].get("optional", {})}
        assert sorted(inputs) == sorted(item.name for item in spec.inputs)
        assert all(inputs[item.name][1]["tooltip"] == item.tooltip for item in spec.inputs)
        assert node["output"] == [item.kind for item in spec.outputs]
    assert info["AdaptiveDrag_SAM2Loader"]["input"]["required"]["model_name"][1]["options"] == [SAM2_CHECKPOINT]


def test_ui_workflows_match_the_servers_node_schemas(server):
    """Every node type exists and every node stores one value per widget (as the browser would load it)."""
    info = server.get("/object_info")
    for workflow in sorted((PACK_DIR / "workflows").glob("*.json")):
        for node in json.loads(workflow.read_text())["nodes"]:
            assert node["type"] in info, (workflow.name, node["type"])
            schema = info[node["type"]]["input"]
            widgets = 0
            for name, (kind, *options) in {**schema["required"], **schema.get("optional", {})}.items():
                extra = options[0] if options else {}
                if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                    widgets += 1 + bool(extra.get("control_after_generate")) + bool(extra.get("image_upload"))
            assert len(node["widgets_values"]) == widgets, (workflow.name, node["type"])


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[path.stem for path in WORKFLOWS])
def test_api_workflow_runs_to_a_saved_image(server, workflow):
    from PIL import Image

    prompt = quick(workflow)
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", errors(entry)
    save_id, _ = node_of(prompt, "SaveImage")
    (saved,) = entry["outputs"][save_id]["images"]
    with Image.open(server.base / "output" / saved["subfolder"] / saved["filename"]) as image:
        assert image.size == (SIZE, SIZE)
    points_id, _ = node_of(prompt, "AdaptiveDrag_DragPoints")
    (shown,) = entry["outputs"][points_id]["adaptivedrag_image"]
    assert shown["type"] == "temp" and (server.base / "temp" / shown["subfolder"] / shown["filename"]).is_file()


def test_moving_only_the_points_reuses_the_cached_lora_and_inversion(server):
    workflow = PACK_DIR / "workflows" / "api" / "freedrag.json"
    first = server.run(quick(workflow, pairs=[((20, 30), (28, 30))]))
    prompt = quick(workflow, pairs=[((40, 20), (40, 30))])
    second = server.run(prompt)
    assert first["status"]["status_str"] == second["status"]["status_str"] == "success", errors(second)
    (cached,) = messages(second, "execution_cached")
    lora_id, _ = node_of(prompt, "AdaptiveDrag_IdentityLoRA")
    inversion_id, _ = node_of(prompt, "AdaptiveDrag_DDIMInversion")
    drag_id, _ = node_of(prompt, "AdaptiveDrag_SemanticDrag")
    assert lora_id in cached["nodes"] and inversion_id in cached["nodes"]
    assert drag_id not in cached["nodes"]


@pytest.mark.parametrize("checkpointing", [None, "on"], ids=["saved-before-the-input", "on"])
def test_identity_lora_gradient_checkpointing_choice_runs(server, checkpointing):
    """A prompt without the input (saved before it existed) still runs, and so does checkpointing on."""
    prompt = quick(PACK_DIR / "workflows" / "api" / "freedrag.json", pairs=[((24, 24), (30, 28))])
    _, lora_node = node_of(prompt, "AdaptiveDrag_IdentityLoRA")
    if checkpointing is None:
        del lora_node["inputs"]["gradient_checkpointing"]
    else:
        lora_node["inputs"]["gradient_checkpointing"] = checkpointing
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", errors(entry)


def test_a_bad_graph_is_refused_with_the_node_and_input_named(server):
    prompt = quick(PACK_DIR / "workflows" / "api" / "freedrag.json")
    drag_id, drag_node = node_of(prompt, "AdaptiveDrag_SemanticDrag")
    del drag_node["inputs"]["drag_points"]
    drag_node["inputs"]["steps"] = 0
    status, answer = server.post_prompt(prompt)
    assert status == 400
    problems = answer["node_errors"][drag_id]["errors"]
    assert {problem["type"] for problem in problems} == {"required_input_missing", "value_smaller_than_min"}
    assert {problem["extra_info"]["input_name"] for problem in problems} == {"drag_points", "steps"}


def test_an_unknown_option_is_reported_on_its_node(server):
    # This ComfyUI does not check V3 combo values when a prompt is queued; the node itself names the problem.
    prompt = quick(PACK_DIR / "workflows" / "api" / "freedrag.json")
    drag_id, drag_node = node_of(prompt, "AdaptiveDrag_SemanticDrag")
    drag_node["inputs"]["method"] = "teleport"
    entry = server.run(prompt)
    (error,) = messages(entry, "execution_error")
    assert error["node_id"] == drag_id and "unknown method 'teleport'" in error["exception_message"]


def test_an_error_in_a_node_is_reported_on_that_node_and_the_server_keeps_running(server):
    prompt = quick(PACK_DIR / "workflows" / "api" / "freedrag.json")
    points_id, points_node = node_of(prompt, "AdaptiveDrag_DragPoints")
    points_node["inputs"]["points_json"] = points_json([((100, 100), (300, 200))], width=640, height=480)
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "error"
    (error,) = messages(entry, "execution_error")
    assert error["node_id"] == points_id
    assert "image is 64x64 but points were placed on 640x480" in error["exception_message"]
    assert server.get("/system_stats")["system"]
