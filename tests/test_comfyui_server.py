"""The pack in a real ComfyUI server: node list, every API workflow run to a saved image, caching, errors, what
each node shows in the page (notes, previews), images of any size, the bridge's refusals and warnings.

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
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_nodes import load_pack

from comfyui_harness import COMFYUI_PATH, COMFYUI_PYTHON, PACK_DIR, PACK_DIR_NAME, link_pack, running_comfyui
WORKFLOWS = sorted((PACK_DIR / "example_workflows" / "api").glob("*.json"))
WORKFLOW = {path.stem: path for path in WORKFLOWS}
FREEDRAG = WORKFLOW["FreeDrag"]
ADAPTIVE = WORKFLOW["AdaptiveDrag - auto mask and CLoss"]
PAINTED = WORKFLOW["DragDiffusion - painted mask"]
SAVED_BEFORE = PACK_DIR / "tests" / "data" / "saved_0.1_freedrag_api.json"
VIRTUAL_NODES = {"Note"}
SIZE = 64
PHOTO = (1600, 1200)
WIDE = (96, 72)
CHECKPOINT = "sd15_random.safetensors"
SAM2_CHECKPOINT = "sam2.1_hiera_tiny.pt"
RUN_TIMEOUT = 1800  # a safety net: a loaded 2-core machine can take minutes per graph

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
# like the ones LoraLoader adds, its cache between node runs, the memory it asks ComfyUI for, and fp8 weights.
# Prints the facts as JSON.
PROBE_BRIDGE = r'''
import importlib.util, json, os, sys
checkpoint, pack = sys.argv[1], sys.argv[2]
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, os.getcwd())
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.model_management
import comfy.sd
spec = importlib.util.spec_from_file_location("adaptivedrag_pack", os.path.join(pack, "__init__.py"),
                                              submodule_search_locations=[pack])
module = importlib.util.module_from_spec(spec)
sys.modules["adaptivedrag_pack"] = module
spec.loader.exec_module(module)
from adaptivedrag_pack.nodes.bridge import bridged_model, stage_memory
from adaptivedrag_core.lora import train_identity_lora

asked = []
load_models_gpu = comfy.model_management.load_models_gpu
def recording_load(models, **options):
    asked.append(options.get("memory_required"))
    return load_models_gpu(models, **options)
comfy.model_management.load_models_gpu = recording_load

facts = {}
x = torch.randn(1, 4, 8, 8)
context = torch.randn(1, 77, 768)
with torch.inference_mode():  # as ComfyUI runs nodes
    model = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False, output_clip=False)[0]
    comfy_conv_in = model.model.diffusion_model.input_blocks[0][0].weight
    original = comfy_conv_in.clone()
    patched = model.clone()
    patched.add_patches({"diffusion_model.input_blocks.0.0.weight": (torch.ones_like(original),)})
    with bridged_model(patched) as core:
        facts["patch_applied"] = bool(torch.allclose(core.unet.conv_in.weight, original + 1))
    with bridged_model(model) as core:
        shared = core.unet
        facts["unpatched_again"] = bool(torch.equal(shared.conv_in.weight, original))
        facts["shares_storage"] = shared.conv_in.weight.data_ptr() == model.model.diffusion_model.input_blocks[0][0].weight.data_ptr()
        ours = shared(x, 500, encoder_hidden_states=context).sample
    theirs = model.model.diffusion_model(x, torch.tensor([500.0]), context=context)
    facts["max_output_difference"] = float((ours - theirs).abs().max())
    facts["keeps_no_weights_between_runs"] = all(p.is_meta for p in shared.parameters())
    latent = torch.zeros(1, 4, 64, 48)
    with bridged_model(model, trainable=True, stage="lora", latent=latent) as core:
        facts["same_unet_next_run"] = core.unet is shared
        facts["trainable_has_no_inference_tensors"] = not any(p.is_inference() for p in core.unet.parameters())
        # ComfyUI's inference-mode weights are aliased for autograd, not copied (1.6 GiB at full size).
        facts["trainable_shares_storage"] = core.unet.conv_in.weight.data_ptr() == comfy_conv_in.data_ptr()
        facts["memory_required_is_the_estimate"] = asked[-1] == stage_memory("lora", latent, core.dtype) > 2**30
        state = train_identity_lora(core.unet, torch.randn(1, 4, 8, 8), context, steps=1, rank=2, batch_size=1)
        facts["trains_on_the_shared_weights"] = bool(state) and all(bool(v.isfinite().all()) for v in state.values())
    facts["given_model_has_no_patches"] = not model.patches

    fp8 = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False, output_clip=False,
                                                model_options={"dtype": torch.float8_e4m3fn})[0]
    facts["fp8_stored"] = str(fp8.model.diffusion_model.input_blocks[0][0].weight.dtype)
    with bridged_model(fp8) as core:
        facts["fp8_computes_in"] = str(core.dtype)
        ours = core.unet(x.to(core.dtype), 500, encoder_hidden_states=context.to(core.dtype)).sample.float()
    theirs = fp8.model.diffusion_model(x, torch.tensor([500.0]), context=context).float()
    facts["fp8_max_output_difference"] = float((ours - theirs).abs().max())
print(json.dumps(facts))
'''


# ------------------------------------------------------------------------------------------------ the server
def write_inputs(base: Path) -> None:
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
    # A phone-sized photo (no alpha: Load Image gives a 64x64 empty MASK for it), and a small wide one.
    Image.fromarray(rng.integers(0, 256, (PHOTO[1], PHOTO[0], 3), dtype=np.uint8)).save(base / "input" / "photo.jpg")
    Image.fromarray(rng.integers(0, 256, (WIDE[1], WIDE[0], 3), dtype=np.uint8)).save(base / "input" / "wide.png")


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
        with urllib.request.urlopen(self.url + path, timeout=300) as response:
            return json.load(response)

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        body = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode()
        request = urllib.request.Request(self.url + "/prompt", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
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
    with running_comfyui(base, timeout=600) as url:
        yield Server(url, base)


# --------------------------------------------------------------------------------------------- graph helpers
def points_json(pairs, width=SIZE, height=SIZE) -> str:
    return json.dumps({"version": 1, "width": width, "height": height,
                       "pairs": [{"handle": list(h), "target": list(t)} for h, t in pairs]})


def node_of(prompt: dict, class_type: str) -> tuple[str, dict]:
    (match,) = [(key, node) for key, node in prompt.items() if node["class_type"] == class_type]
    return match


def quick(workflow: Path, pairs=(((20, 30), (28, 30)),), image=None, size=(SIZE, SIZE)) -> dict:
    """The API workflow with this test's files, points on a ``size`` image, a 64-pixel working copy, few steps
    and no LoRA disk cache (each test trains its own)."""
    prompt = copy.deepcopy(json.loads(workflow.read_text()))
    settings = {
        "CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT},
        "AdaptiveDrag_DragPoints": {"points_json": points_json(pairs, *size)},
        "AdaptiveDrag_EncodeWorkingCopy": {"work_size": 64},
        "AdaptiveDrag_SAM2Loader": {"model_name": SAM2_CHECKPOINT},
        "AdaptiveDrag_IdentityLoRA": {"steps": 2, "rank": 2, "batch_size": 1, "keep_on_disk": False},
        "AdaptiveDrag_DDIMInversion": {"steps": 10, "strength": 0.3},
        "AdaptiveDrag_SemanticDrag": {"steps": 2, "max_steps": 3},
        "SaveImage": {"filename_prefix": "test_" + workflow.stem.replace(" ", "_")},
    }
    for node in prompt.values():
        node["inputs"].update(settings.get(node["class_type"], {}))
    load_id, load_image = node_of(prompt, "LoadImage")
    uses_mask = any(value == [load_id, 1] for node in prompt.values() for value in node["inputs"].values())
    load_image["inputs"]["image"] = image or ("drag_masked.png" if uses_mask else "drag.png")
    return prompt


def notes(entry: dict, node_id: str) -> list[str]:
    """What a node showed in the page as notes during the run."""
    return entry["outputs"].get(node_id, {}).get("adaptivedrag_notes", [])


def saved_image_size(server, entry: dict, save_id: str) -> tuple[int, int]:
    (saved,) = entry["outputs"][save_id]["images"]
    with Image.open(server.base / "output" / saved["subfolder"] / saved["filename"]) as image:
        return image.size


def messages(entry: dict, event: str) -> list[dict]:
    return [data for name, data in entry["status"]["messages"] if name == event]


def errors(entry: dict) -> list[str]:
    return [f"{error['node_type']}: {error['exception_message']}" for error in messages(entry, "execution_error")]


# ------------------------------------------------------------------------------------------------------ tests
def pack_specs():
    return {spec.node_id: spec for spec in sys.modules[load_pack().__name__ + ".nodes"].NODE_SPECS}


def test_bridge_shares_weights_includes_patches_matches_comfyuis_unet_and_caches_what_it_builds(server):
    result = subprocess.run([COMFYUI_PYTHON, "-c", PROBE_BRIDGE, str(server.base / "models" / "checkpoints" / CHECKPOINT),
                             str(PACK_DIR)], cwd=COMFYUI_PATH, check=True, capture_output=True, text=True, timeout=300)
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts.pop("max_output_difference") < 1e-4
    # fp8 storage computes in a compute dtype and still gives ComfyUI's own output (ComfyUI casts the same way).
    assert facts.pop("fp8_max_output_difference") < 1e-3
    assert facts == {"patch_applied": True, "unpatched_again": True, "shares_storage": True,
                     "keeps_no_weights_between_runs": True, "same_unet_next_run": True,
                     "trainable_has_no_inference_tensors": True, "trainable_shares_storage": True,
                     "memory_required_is_the_estimate": True,
                     "trains_on_the_shared_weights": True, "given_model_has_no_patches": True,
                     "fp8_stored": "torch.float8_e4m3fn", "fp8_computes_in": "torch.float32"}


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
    # A plain INT: no "control after generate" widget (the page adds one to an INT named seed unless told not to,
    # and sets it to randomize on a new node).
    seed = info["AdaptiveDrag_IdentityLoRA"]["input"]["required"]["seed"]
    assert seed[0] == "INT" and seed[1]["control_after_generate"] is False


def test_ui_workflows_match_the_servers_node_schemas(server):
    """Every node type exists and every node stores one value per widget (as the browser would load it)."""
    info = server.get("/object_info")
    for workflow in sorted((PACK_DIR / "example_workflows").glob("*.json")):
        for node in json.loads(workflow.read_text())["nodes"]:
            if node["type"] in VIRTUAL_NODES:
                continue
            assert node["type"] in info, (workflow.name, node["type"])
            schema = info[node["type"]]["input"]
            widgets = 0
            for name, (kind, *options) in {**schema["required"], **schema.get("optional", {})}.items():
                extra = options[0] if options else {}
                if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                    widgets += 1 + bool(extra.get("control_after_generate")) + bool(extra.get("image_upload"))
            assert len(node["widgets_values"]) == widgets, (workflow.name, node["type"])


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[path.stem for path in WORKFLOWS])
def test_api_workflow_runs_to_a_saved_image_and_shows_its_preview_and_notes(server, workflow):
    prompt = quick(workflow)
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", errors(entry)
    save_id, _ = node_of(prompt, "SaveImage")
    assert saved_image_size(server, entry, save_id) == (SIZE, SIZE)
    points_id, _ = node_of(prompt, "AdaptiveDrag_DragPoints")
    (shown,) = entry["outputs"][points_id]["adaptivedrag_image"]
    assert shown["type"] == "temp" and (server.base / "temp" / shown["subfolder"] / shown["filename"]).is_file()
    sampler_id, _ = node_of(prompt, "AdaptiveDrag_CLossSampler")
    (preview,) = entry["outputs"][sampler_id]["images"]  # input with arrows | result with the final handles
    with Image.open(server.base / "temp" / preview["subfolder"] / preview["filename"]) as image:
        assert image.height % SIZE == 0 and image.width > 2 * image.height  # input | result, enlarged
    assert any(note.startswith("final handles (target in brackets): 1 (") for note in notes(entry, sampler_id))
    drag_id, _ = node_of(prompt, "AdaptiveDrag_SemanticDrag")
    assert any(" steps; handles ended at" in note for note in notes(entry, drag_id))


def test_moving_only_the_points_reuses_the_cached_lora_and_inversion(server):
    workflow = FREEDRAG
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
    prompt = quick(FREEDRAG, pairs=[((24, 24), (30, 28))])
    _, lora_node = node_of(prompt, "AdaptiveDrag_IdentityLoRA")
    if checkpointing is None:
        del lora_node["inputs"]["gradient_checkpointing"]
    else:
        lora_node["inputs"]["gradient_checkpointing"] = checkpointing
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", errors(entry)


def test_a_bad_graph_is_refused_with_the_node_and_input_named(server):
    prompt = quick(FREEDRAG)
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
    prompt = quick(FREEDRAG)
    drag_id, drag_node = node_of(prompt, "AdaptiveDrag_SemanticDrag")
    drag_node["inputs"]["method"] = "teleport"
    entry = server.run(prompt)
    (error,) = messages(entry, "execution_error")
    assert error["node_id"] == drag_id and "unknown method 'teleport'" in error["exception_message"]


def test_an_error_in_a_node_is_reported_on_that_node_and_the_server_keeps_running(server):
    prompt = quick(FREEDRAG)
    points_id, points_node = node_of(prompt, "AdaptiveDrag_DragPoints")
    points_node["inputs"]["points_json"] = points_json([((100, 100), (300, 200))], width=640, height=480)
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "error"
    (error,) = messages(entry, "execution_error")
    assert error["node_id"] == points_id
    assert "image is 64x64 but points were placed on 640x480" in error["exception_message"]
    assert server.get("/system_stats")["system"]


# ------------------------------------------------------------------------------------- any image, any mask
def test_a_phone_photo_runs_at_the_working_size_and_comes_back_at_its_own_size(server):
    prompt = quick(FREEDRAG, pairs=[((500, 600), (700, 500))], image="photo.jpg", size=PHOTO)
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", errors(entry)
    encode_id, _ = node_of(prompt, "AdaptiveDrag_EncodeWorkingCopy")
    assert notes(entry, encode_id) == ["working copy 64x48 of the 1600x1200 input"]
    save_id, _ = node_of(prompt, "SaveImage")
    assert saved_image_size(server, entry, save_id) == PHOTO
    sampler_id, _ = node_of(prompt, "AdaptiveDrag_CLossSampler")
    assert "result 1600x1200 (worked at 64x48)" in notes(entry, sampler_id)


@pytest.mark.parametrize("image, size, expected", [
    ("wide.png", WIDE, "mask: Load Image's empty placeholder (the picture has no alpha channel), so no mask is used"),
    ("drag.png", (SIZE, SIZE), "mask: empty (nothing may change), so no mask is used"),
], ids=["other-size", "same-size"])
def test_an_unpainted_mask_runs_and_says_so_on_the_node(server, image, size, expected):
    prompt = quick(PAINTED, pairs=[((30, 40), (50, 30))], image=image, size=size)
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", errors(entry)
    drag_id, _ = node_of(prompt, "AdaptiveDrag_SemanticDrag")
    assert any(note.startswith(expected) for note in notes(entry, drag_id)), notes(entry, drag_id)


def test_warnings_of_the_core_are_shown_on_the_node(server):
    prompt = quick(ADAPTIVE)
    mask_id, mask_node = node_of(prompt, "AdaptiveDrag_SAM2SuperpixelMask")
    del mask_node["inputs"]["sam2_model"]  # no SAM2: the core falls back to colour and warns
    del prompt[node_of(prompt, "AdaptiveDrag_SAM2Loader")[0]]
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", errors(entry)
    shown = notes(entry, mask_id)
    assert any(note.startswith("warning: auto mask without SAM2") for note in shown), shown
    assert any(note.startswith("mask covers ") and "colour only" in note for note in shown)
    (overlay,) = entry["outputs"][mask_id]["images"]  # the overlay, on the node
    assert overlay["type"] == "temp"


def test_drag_points_without_pairs_stops_with_a_clear_message_after_saving_its_image(server):
    prompt = quick(FREEDRAG)
    points_id, points_node = node_of(prompt, "AdaptiveDrag_DragPoints")
    points_node["inputs"]["points_json"] = ""
    before = set((server.base / "temp").rglob("*.png"))
    entry = server.run(prompt)
    (error,) = messages(entry, "execution_error")
    assert error["node_id"] == points_id
    assert error["exception_message"].startswith("no drag pairs yet: place handle -> target pairs on the canvas")
    assert "the Drag Points canvas now shows this 64x64 image" in error["exception_message"]
    assert len(set((server.base / "temp").rglob("*.png")) - before) == 1  # the image sent to the canvas


def test_a_workflow_saved_before_the_working_copy_still_runs(server):
    """The 0.1 graphs: VAE Encode, VAE Decode, the sampler without a VAE, the seed with its control value."""
    prompt = quick(SAVED_BEFORE)
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", errors(entry)
    save_id, _ = node_of(prompt, "SaveImage")
    assert saved_image_size(server, entry, save_id) == (SIZE, SIZE)


# ---------------------------------------------------------------------------- the bridge: honest about models
def insert_model_node(prompt: dict, class_type: str, inputs: dict) -> str:
    """Put a model-patching node between Load Checkpoint's MODEL and every node that takes it."""
    load_id, _ = node_of(prompt, "CheckpointLoaderSimple")
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if value == [load_id, 0]:
                node["inputs"][name] = ["patch", 0]
    prompt["patch"] = {"class_type": class_type, "inputs": {"model": [load_id, 0], **inputs}}
    return "patch"


@pytest.mark.parametrize("sampling, zsnr, expected", [
    ("v_prediction", False, "the model's prediction type is V_PREDICTION, not epsilon"),
    ("lcm", False, "the model's prediction type is LCM, not epsilon"),
    ("eps", True, "the model's noise schedule is not SD1.5's"),
], ids=["v-prediction", "lcm", "zsnr"])
def test_a_model_that_is_not_sd15_epsilon_is_refused_on_the_first_node_that_uses_it(server, sampling, zsnr, expected):
    prompt = quick(FREEDRAG)
    insert_model_node(prompt, "ModelSamplingDiscrete", {"sampling": sampling, "zsnr": zsnr})
    entry = server.run(prompt)
    (error,) = messages(entry, "execution_error")
    assert error["node_type"] == "AdaptiveDrag_IdentityLoRA"
    assert error["exception_message"].startswith(expected)


def test_patches_the_nodes_do_not_apply_are_named_on_each_node(server):
    prompt = quick(FREEDRAG)
    insert_model_node(prompt, "FreeU", {"b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2})
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", errors(entry)
    for class_type in ("AdaptiveDrag_IdentityLoRA", "AdaptiveDrag_DDIMInversion", "AdaptiveDrag_SemanticDrag",
                       "AdaptiveDrag_CLossSampler"):
        node_id, _ = node_of(prompt, class_type)
        assert ("warning: the AdaptiveDrag nodes apply weight patches (LoraLoader) only; ignored here: "
                "output_block_patch FreeU.patch.output_block_patch") in notes(entry, node_id), class_type


# ------------------------------------------------------------------------------------------------ templates
def test_the_templates_are_listed_with_thumbnails(server):
    listed = server.get("/workflow_templates")
    assert sorted(listed[PACK_DIR_NAME]) == sorted(WORKFLOW)
    for name in WORKFLOW:
        url = f"{server.url}/api/workflow_templates/{PACK_DIR_NAME}/{urllib.parse.quote(name)}.jpg"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and response.read(3) == b"\xff\xd8\xff"


# ----------------------------------------------------------------------- the identity LoRA across restarts
def test_the_identity_lora_is_kept_across_a_restart(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui_restart")
    write_inputs(base)
    prompt = quick(FREEDRAG)
    _, lora_node = node_of(prompt, "AdaptiveDrag_IdentityLoRA")
    lora_node["inputs"]["keep_on_disk"] = True
    lora_id, _ = node_of(prompt, "AdaptiveDrag_IdentityLoRA")
    shown = []
    for _ in range(2):  # a fresh server each time: nothing in ComfyUI's cache
        with running_comfyui(base, timeout=600) as url:
            entry = Server(url, base).run(prompt)
        assert entry["status"]["status_str"] == "success", errors(entry)
        shown.append(notes(entry, lora_id))
    (kept,) = (base / "user" / "adaptivedrag" / "lora_cache").glob("lora-*.safetensors")
    assert shown == [[f"identity LoRA trained: 2 steps, rank 2, kept on disk as {kept.name}"],
                     [f"identity LoRA from the disk cache ({kept.name}): not retrained"]]
