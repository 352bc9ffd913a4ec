"""Every node's execute path with the tiny model and no ComfyUI installed.

The pack is imported the way ComfyUI imports a custom node folder (as a package from its ``__init__.py``), and
every node runs under ``torch.inference_mode()``, as ComfyUI runs nodes.
"""

import importlib.util
import inspect
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptivedrag_core.errors import InputError
from adaptivedrag_core.images import resize_labels
from adaptivedrag_core.models import encode_prompt, tiny_sd_components
from adaptivedrag_core.points import DragPoints

PACK_DIR = Path(__file__).resolve().parents[1]
SIZE = 64


def load_pack(name: str = "adaptivedrag_pack"):
    """Import the pack folder as a package, as ComfyUI's custom node loader does, and its nodes."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PACK_DIR / "__init__.py",
                                                  submodule_search_locations=[str(PACK_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    importlib.import_module(f"{name}.nodes")
    return module


pack = load_pack()
nodes = sys.modules["adaptivedrag_pack.nodes"]
from adaptivedrag_pack.nodes import (bridge, closs_sampler, ddim_inversion, drag_points,  # noqa: E402
                                     identity_lora, sam2_mask, semantic_drag, working_copy)
from adaptivedrag_pack.nodes.spec import ShowAndStop, Unavailable  # noqa: E402


def run(spec, **inputs):
    """Run a node as ComfyUI does: inside inference mode."""
    with torch.inference_mode():
        return spec.run(**inputs)


def points_json(pairs, width=SIZE, height=SIZE):
    return json.dumps({"version": 1, "width": width, "height": height,
                       "pairs": [{"handle": list(h), "target": list(t)} for h, t in pairs]})


@pytest.fixture(scope="module")
def tiny():
    return tiny_sd_components(seed=0)


@pytest.fixture(scope="module")
def graph_inputs(tiny):
    """IMAGE, its unscaled LATENT (what VAE Encode gives) and a CONDITIONING, made without ComfyUI."""
    generator = torch.Generator().manual_seed(0)
    # Made in inference mode, as Load Image, VAE Encode and CLIP Text Encode make them inside ComfyUI.
    with torch.inference_mode():
        image = torch.rand(1, SIZE, SIZE, 3, generator=generator)
        samples = tiny.vae.encode(image.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean
        positive = [[encode_prompt(tiny, "a photo"), {"pooled_output": None}]]
    points = DragPoints.from_json(points_json([((20, 30), (30, 30))]))
    return {"image": image, "latent": {"samples": samples}, "positive": positive, "points": points}


@pytest.fixture(scope="module")
def inverted(tiny, graph_inputs):
    lora = run(identity_lora.SPEC, model=tiny, latent=graph_inputs["latent"], positive=graph_inputs["positive"],
               steps=2, rank=2, batch_size=1, seed=0).outputs[0]
    return run(ddim_inversion.SPEC, model=tiny, latent=graph_inputs["latent"], positive=graph_inputs["positive"],
               lora=lora, steps=10, strength=0.3).outputs[0]


# ------------------------------------------------------------------------------------------- the pack itself
def test_pack_imports_without_comfyui_and_exports_the_v3_entry_point():
    assert "comfy_api" not in sys.modules
    assert callable(pack.comfy_entrypoint)
    assert pack.WEB_DIRECTORY == "./web"
    # With NODE_CLASS_MAPPINGS present ComfyUI would load the pack as V1 and ignore the entry point.
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS")


def test_node_ids_are_prefixed_unique_and_every_input_has_a_tooltip():
    ids = [spec.node_id for spec in nodes.NODE_SPECS]
    assert len(set(ids)) == len(ids) == 8
    for spec in nodes.NODE_SPECS:
        assert spec.node_id.startswith("AdaptiveDrag_")
        assert all(item.tooltip.strip() for item in spec.inputs), spec.node_id
        assert all(item.tooltip.strip() for item in spec.outputs), spec.node_id
        for widget in spec.widgets:
            if widget.kind == "COMBO" and not callable(widget.options):
                assert widget.default in widget.choices()
            if widget.kind in ("INT", "FLOAT"):
                assert widget.min <= widget.default <= widget.max


# ------------------------------------------------------------------------------------------------ Drag Points
def test_drag_points_returns_points_sized_like_the_image_and_the_image_for_the_canvas(graph_inputs):
    image = graph_inputs["image"]
    result = run(drag_points.SPEC, image=image, points_json=points_json([((1, 2), (10, 20))]), rescale=False)
    (points,) = result.outputs
    assert (points.width, points.height) == (SIZE, SIZE)
    assert points.handles == ((1.0, 2.0),) and points.targets == ((10.0, 20.0),)
    assert torch.equal(result.ui_images[drag_points.IMAGE_UI_KEY], image[:1])


def test_drag_points_on_another_image_size_is_an_error_unless_rescaled(graph_inputs):
    text = points_json([((100, 100), (300, 200))], width=640, height=480)
    with pytest.raises(InputError, match="image is 64x64 but points were placed on 640x480"):
        run(drag_points.SPEC, image=graph_inputs["image"], points_json=text, rescale=False)
    (points,) = run(drag_points.SPEC, image=graph_inputs["image"], points_json=text, rescale=True).outputs
    assert (points.width, points.height) == (SIZE, SIZE)
    assert points.handles[0] == pytest.approx(((100.5) * SIZE / 640 - 0.5, (100.5) * SIZE / 480 - 0.5))


@pytest.mark.parametrize("text, message", [("", "no drag pairs yet: place handle -> target pairs on the canvas"),
                                           ("{", "not valid JSON"),
                                           (points_json([]), "no drag pairs yet: place handle -> target pairs")])
def test_drag_points_names_what_is_wrong_and_still_sends_its_image_to_the_canvas(graph_inputs, text, message):
    with pytest.raises(ShowAndStop, match=message) as stopped:
        run(drag_points.SPEC, image=graph_inputs["image"], points_json=text)
    assert "canvas now shows this 64x64 image" in str(stopped.value)
    assert torch.equal(stopped.value.ui_images[drag_points.IMAGE_UI_KEY], graph_inputs["image"][:1])


# ------------------------------------------------------------------------------------------------- SAM2 nodes
def test_sam2_loader_names_the_missing_file():
    with pytest.raises(InputError, match="sam2.1_hiera_tiny.pt.*models/sam2"):
        run(sam2_mask.LOADER_SPEC, model_name="sam2.1_hiera_tiny.pt", model_size="auto")


def test_superpixel_mask_without_sam2_falls_back_and_returns_mask_superpixels_overlay(graph_inputs):
    with pytest.warns(UserWarning):
        mask, regions, overlay = run(sam2_mask.MASK_SPEC, image=graph_inputs["image"],
                                     drag_points=graph_inputs["points"]).outputs
    assert mask.shape == (1, SIZE, SIZE) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask[0, 30, 20] == 1  # the handle's superpixel may change
    assert regions.shape == (SIZE, SIZE) and len(np.unique(regions)) > 1
    assert overlay.shape == (1, SIZE, SIZE, 3) and 0 <= overlay.min() and overlay.max() <= 1


def test_superpixel_mask_puts_sam2_on_comfyuis_device_only_while_it_runs(graph_inputs, monkeypatch):
    from contextlib import contextmanager

    from adaptivedrag_core.sam2_loader import random_sam2

    encoder = random_sam2("tiny")
    placements = []

    @contextmanager
    def recording_sam2_on(model, device):
        placements.append((model, device))
        yield model

    monkeypatch.setattr(sam2_mask, "sam2_on", recording_sam2_on)
    monkeypatch.setattr(sam2_mask, "torch_device", lambda: torch.device("cpu"))
    run(sam2_mask.MASK_SPEC, image=graph_inputs["image"], drag_points=graph_inputs["points"], sam2_model=encoder)
    assert placements == [(encoder, torch.device("cpu"))]


# --------------------------------------------------------------------------------- LoRA, inversion, drag, sample
@pytest.mark.filterwarnings("ignore:auto mask without SAM2")
def test_identity_lora_inversion_drag_and_sampling_chain_leaves_inputs_unchanged(tiny, graph_inputs):
    inputs = {key: graph_inputs[key] for key in ("image", "latent", "positive")}
    before = {"latent": inputs["latent"]["samples"].clone(), "positive": inputs["positive"][0][0].clone(),
              "weights": {k: v.clone() for k, v in tiny.unet.state_dict().items()}}

    (lora,) = run(identity_lora.SPEC, model=tiny, latent=inputs["latent"], positive=inputs["positive"], steps=2,
                  rank=2, lr=1e-3, batch_size=1, seed=0).outputs
    assert lora and all(value.device.type == "cpu" for value in lora.values())
    (inverted,) = run(ddim_inversion.SPEC, model=tiny, latent=inputs["latent"], positive=inputs["positive"],
                      lora=lora, steps=10, strength=0.3).outputs
    (plain,) = run(ddim_inversion.SPEC, model=tiny, latent=inputs["latent"], positive=inputs["positive"],
                   steps=10, strength=0.3).outputs
    assert inverted.inverted_latent.shape == inputs["latent"]["samples"].shape
    assert not torch.allclose(inverted.inverted_latent, plain.inverted_latent)  # the LoRA takes part
    mask, regions, _ = run(sam2_mask.MASK_SPEC, image=inputs["image"], drag_points=graph_inputs["points"]).outputs
    (dragged,) = run(semantic_drag.SPEC, inverted=inverted, drag_points=graph_inputs["points"], method="adaptive",
                     mask=mask, superpixels=regions, steps=2, max_steps=3).outputs
    assert dragged.steps >= 1
    assert not torch.equal(dragged.latent, inverted.inverted_latent)
    latent, image = run(closs_sampler.SPEC, dragged=dragged, closs=True, closs_weight=1.0,
                        closs_kind="contrastive").outputs
    assert isinstance(image, Unavailable) and "vae input" in image.message  # no VAE connected: no image

    samples = latent["samples"]
    assert samples.shape == inputs["latent"]["samples"].shape and torch.isfinite(samples).all()
    # Unscaled again (ComfyUI's convention): the core works on latent x 0.18215.
    scaled_input = inputs["latent"]["samples"] * tiny.latent_scale
    assert (samples - inputs["latent"]["samples"]).abs().mean() < (samples - scaled_input).abs().mean()
    assert torch.equal(inputs["latent"]["samples"], before["latent"])
    assert torch.equal(inputs["positive"][0][0], before["positive"])
    assert all(torch.equal(v, before["weights"][k]) for k, v in tiny.unet.state_dict().items())


@pytest.mark.parametrize("method", ["freedrag", "dragdiffusion"])
def test_other_methods_run_with_a_user_mask_and_sample_without_closs(graph_inputs, inverted, method):
    user_mask = torch.zeros(1, SIZE, SIZE)
    user_mask[:, 16:48, 8:56] = 1
    (dragged,) = run(semantic_drag.SPEC, inverted=inverted, drag_points=graph_inputs["points"], method=method,
                     mask=user_mask, steps=2, max_steps=2).outputs
    assert dragged.steps >= 1
    latent, _ = run(closs_sampler.SPEC, dragged=dragged, closs=False).outputs
    assert latent["samples"].shape == graph_inputs["latent"]["samples"].shape


def test_closs_sampler_defaults_to_the_cores_closs_form():
    from adaptivedrag_core.pipeline import EditSettings

    assert closs_sampler.SPEC.input("closs_kind").default == EditSettings().closs_kind
    assert inspect.signature(closs_sampler.sample).parameters["closs_kind"].default == EditSettings().closs_kind


@pytest.mark.parametrize("painted", [True, False])
def test_closs_sampler_keeps_closs_inside_the_drag_mask(graph_inputs, inverted, monkeypatch, painted):
    """The drag's mask reaches CLoss on the latent grid (CLoss changes nothing outside it); no mask, none."""
    user_mask = torch.zeros(1, SIZE, SIZE)
    user_mask[:, 16:48, 8:56] = 1
    (dragged,) = run(semantic_drag.SPEC, inverted=inverted, drag_points=graph_inputs["points"], method="dragdiffusion",
                     mask=user_mask if painted else None, steps=1).outputs
    seen = {}
    original = closs_sampler.sample_dragged

    def spy(*args, mask=None, **kwargs):
        seen["mask"] = mask
        return original(*args, mask=mask, **kwargs)

    monkeypatch.setattr(closs_sampler, "sample_dragged", spy)
    run(closs_sampler.SPEC, dragged=dragged, closs=True)
    if not painted:
        assert seen["mask"] is None
        return
    latent_h, latent_w = inverted.clean_latent.shape[-2:]
    expected = resize_labels(user_mask[0].numpy() > 0.5, latent_w, latent_h)
    assert seen["mask"].dtype == torch.bool and np.array_equal(seen["mask"].numpy(), expected)
    assert 0 < expected.mean() < 1


def test_resampling_a_new_drag_reuses_the_reference_recording(graph_inputs, inverted, monkeypatch):
    (first,) = run(semantic_drag.SPEC, inverted=inverted, drag_points=graph_inputs["points"], method="dragdiffusion",
                   steps=1, max_steps=1).outputs
    run(closs_sampler.SPEC, dragged=first, closs=False)
    assert (10, 0) in inverted.references

    def must_not_record(*args, **kwargs):
        raise AssertionError("the reference branch was recorded again for the same inversion")

    monkeypatch.setattr(closs_sampler, "record_reference", must_not_record)
    other = DragPoints.from_json(points_json([((40, 20), (44, 28))]))
    (second,) = run(semantic_drag.SPEC, inverted=inverted, drag_points=other, method="dragdiffusion",
                    steps=1, max_steps=1).outputs
    latent, _ = run(closs_sampler.SPEC, dragged=second, closs=True).outputs
    assert torch.isfinite(latent["samples"]).all()


def test_a_re_drag_reuses_the_drag_s_starting_features(graph_inputs, inverted):
    """Kept with the inversion: the second drag runs no UNet pass for its start, and drags bitwise as the first
    (tolerance zero), whose start was computed."""
    inverted.drag_starts.clear()
    options = dict(drag_points=graph_inputs["points"], method="dragdiffusion", steps=2, max_steps=2)
    (first,) = run(semantic_drag.SPEC, inverted=inverted, **options).outputs
    assert list(inverted.drag_starts) == [(2, False)]
    calls = []
    hook = inverted.model.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        (second,) = run(semantic_drag.SPEC, inverted=inverted, **options).outputs
    finally:
        hook.remove()
    assert len(calls) == second.steps + 1  # one per step and one for the last tracking; none for the start
    assert torch.equal(second.latent, first.latent) and second.steps == first.steps


def test_semantic_drag_rejects_points_of_another_image(inverted):
    points = DragPoints.from_json(points_json([((100, 100), (200, 100))], width=512, height=512))
    with pytest.raises(InputError, match="image is 64x64 .* but points were placed on 512x512"):
        run(semantic_drag.SPEC, inverted=inverted, drag_points=points)


def test_semantic_drag_maps_a_mask_of_another_size_onto_the_image(graph_inputs, inverted, monkeypatch):
    seen = {}
    monkeypatch.setattr(semantic_drag, "drag_on_features", recording_drag(seen))
    small = torch.zeros(1, 32, 32)
    small[:, 8:24, 4:28] = 1
    result = run(semantic_drag.SPEC, inverted=inverted, drag_points=graph_inputs["points"], method="dragdiffusion",
                 mask=small, steps=1)
    assert seen["mask"].shape == (SIZE, SIZE)
    assert np.array_equal(seen["mask"], np.kron(small[0].numpy(), np.ones((2, 2))) > 0.5)
    assert "mask: 32x32 mapped onto the 64x64 image" in result.notes


@pytest.mark.parametrize("image_size, expected", [
    ((64, 64), "mask: empty (nothing may change), so no mask is used"),
    ((96, 72), "mask: Load Image's empty placeholder (the picture has no alpha channel)"),
])
def test_an_empty_mask_means_no_mask_and_the_node_says_so(image_size, expected):
    """Load Image gives a 64x64 zero MASK for a picture without alpha, whatever the picture's size."""
    fitted = bridge.user_mask(torch.zeros(1, 64, 64), *image_size)
    assert fitted.array is None and fitted.note.startswith(expected)


def test_superpixels_of_another_size_are_mapped_and_a_stretch_is_named():
    labels = np.arange(12).reshape(3, 4)
    fitted = bridge.fit_map(labels, "superpixels", 8, 6)
    assert fitted.array.shape == (6, 8) and set(np.unique(fitted.array)) == set(range(12))
    assert fitted.note == "superpixels: 4x3 mapped onto the 8x6 image"
    assert "stretched" in bridge.fit_map(labels, "superpixels", 8, 8).note
    assert bridge.fit_map(labels, "superpixels", 4, 3).note is None


def recording_drag(seen: dict):
    """A stand-in for ``drag_on_features`` that records the mask and regions it is given and drags nothing."""

    def drag(unet, text_embeddings, schedule, latent, handles, targets, grid_size, method, mask, regions,
             **options):
        seen.update(mask=mask, regions=regions, grid_size=grid_size, handles=handles)
        return types.SimpleNamespace(latent=latent, handles=list(handles), steps=1)

    return drag


# ----------------------------------------------------------------------- working copy: any size in and out
WIDE = (96, 72)  # not square, and not a multiple of the 64-pixel working size


@pytest.fixture(scope="module")
def wide_graph(tiny):
    """A 96x72 IMAGE, its working-copy LATENT at work_size 64 (64x48), a CONDITIONING and points on the input."""
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        image = torch.rand(1, WIDE[1], WIDE[0], 3, generator=generator)
        positive = [[encode_prompt(tiny, ""), {"pooled_output": None}]]
    result = run(working_copy.SPEC, image=image, vae=tiny, work_size=64)
    points = DragPoints.from_json(points_json([((30, 40), (50, 30))], *WIDE))
    return {"image": image, "latent": result.outputs[0], "positive": positive, "points": points,
            "notes": result.notes}


def test_encode_working_copy_encodes_the_image_at_the_working_size(wide_graph):
    latent = wide_graph["latent"]
    assert latent["samples"].shape == (1, 4, 6, 8)  # 64x48 pixels
    copy = working_copy.working_copy_of(latent)
    assert copy.size == (64, 48) and copy.original_size == WIDE
    assert torch.equal(copy.original, wide_graph["image"][:1])
    assert wide_graph["notes"] == ["working copy 64x48 of the 96x72 input"]


def test_a_wide_image_runs_at_the_working_size_and_comes_back_at_its_own_size(tiny, wide_graph, monkeypatch):
    seen = {}
    drag = semantic_drag.drag_on_features

    def recording(*args, **kwargs):
        seen["grid_size"], seen["handles"] = args[6], args[4]
        return drag(*args, **kwargs)

    monkeypatch.setattr(semantic_drag, "drag_on_features", recording)
    (inverted,) = run(ddim_inversion.SPEC, model=tiny, latent=wide_graph["latent"], positive=wide_graph["positive"],
                      steps=10, strength=0.3).outputs
    assert inverted.image_size == WIDE and inverted.working_size == (64, 48)
    placeholder = torch.zeros(1, 64, 64)  # Load Image's MASK for a picture without alpha
    drag_result = run(semantic_drag.SPEC, inverted=inverted, drag_points=wide_graph["points"],
                      method="dragdiffusion", mask=placeholder, steps=2)
    assert seen["grid_size"] == (32, 24)  # half the working copy, not half the input
    assert seen["handles"][0] == pytest.approx(((30 + 0.5) * 32 / 96 - 0.5, (40 + 0.5) * 24 / 72 - 0.5))
    assert any("Load Image's empty placeholder" in note for note in drag_result.notes)
    (dragged,) = drag_result.outputs
    latent, image = run(closs_sampler.SPEC, dragged=dragged, closs=False, vae=tiny).outputs
    result = run(closs_sampler.SPEC, dragged=dragged, closs=False, vae=tiny)
    assert latent["samples"].shape == (1, 4, 6, 8)
    assert image.shape == (1, WIDE[1], WIDE[0], 3) and 0 <= image.min() and image.max() <= 1
    preview = result.ui_images[closs_sampler.PREVIEW_UI_KEY]
    factor = bridge.display_factor(WIDE[0])  # a small input is enlarged for the node
    assert factor > 1 and preview.shape[1] == factor * WIDE[1] and preview.shape[2] > 2 * factor * WIDE[0]
    assert any(note.startswith("final handles (target in brackets): 1 (") for note in result.notes)
    assert "result 96x72 (worked at 64x48)" in result.notes


def test_points_for_the_working_copy_instead_of_the_input_are_refused(tiny, wide_graph):
    (inverted,) = run(ddim_inversion.SPEC, model=tiny, latent=wide_graph["latent"], positive=wide_graph["positive"],
                      steps=4, strength=0.5).outputs
    on_copy = DragPoints.from_json(points_json([((10, 10), (20, 20))], 64, 48))
    with pytest.raises(InputError, match="image is 96x72 .* placed on 64x48; connect the same image to Drag "
                                         "Points and Encode Working Copy"):
        run(semantic_drag.SPEC, inverted=inverted, drag_points=on_copy)


def test_the_reference_memo_keeps_the_last_two_recordings(graph_inputs, inverted):
    (dragged,) = run(semantic_drag.SPEC, inverted=inverted, drag_points=graph_inputs["points"],
                     method="dragdiffusion", steps=1).outputs
    for layer in (0, 1, 2, 1):
        run(closs_sampler.SPEC, dragged=dragged, closs=False, reference_start_layer=layer)
    assert list(inverted.references) == [(2, 0), (1, 0)]


def test_the_js_copy_of_each_methods_widgets_matches_the_node():
    script = (PACK_DIR / "web" / "adaptivedrag_nodes.js").read_text()
    table = script.split("const METHOD_WIDGETS = ")[1].split(";")[0]
    assert {method: tuple(names) for method, names in json.loads(table).items()} == semantic_drag.METHOD_WIDGETS
    widgets = {spec.name for spec in semantic_drag.SPEC.widgets} - {"method"}
    assert set().union(*semantic_drag.METHOD_WIDGETS.values()) == widgets


def test_conditioning_of_another_model_is_named(tiny, graph_inputs):
    wide = [[torch.zeros(1, 77, 768), {}]]
    with pytest.raises(InputError, match="conditioning has width 768 but the model expects 32"):
        run(ddim_inversion.SPEC, model=tiny, latent=graph_inputs["latent"], positive=wide, steps=4, strength=0.5)


# ----------------------------------------------------------------------------------------------------- bridge
SD15_COMFY_UNET_CONFIG = {
    "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "context_dim": 768,
    "num_heads": 8, "use_linear_in_transformer": False,
}


def test_comfy_sd15_config_maps_to_the_diffusers_sd15_unet_config():
    shipped = json.loads((PACK_DIR / "adaptivedrag_core/configs/sd15/unet/config.json").read_text())
    mapped = bridge.diffusers_unet_config(SD15_COMFY_UNET_CONFIG)
    for key, value in mapped.items():
        expected = shipped.get(key, False if key == "use_linear_projection" else None)
        assert list(value) == expected if isinstance(value, tuple) else value == expected, key


@pytest.mark.parametrize("change", [{"context_dim": 1024}, {"model_channels": 384}, {"in_channels": 8}])
def test_non_sd1_checkpoints_are_refused(change):
    bridge.check_sd1(SD15_COMFY_UNET_CONFIG)
    with pytest.raises(InputError, match="checkpoint is not SD1.x"):
        bridge.check_sd1({**SD15_COMFY_UNET_CONFIG, **change})


# --------------------------------------------------------------------------------------- progress and cancel
class Cancelled(Exception):
    pass


def fake_comfy_utils(monkeypatch, updates, cancel_at=None):
    """A stand-in ``comfy.utils`` whose ProgressBar records updates and raises like ComfyUI's on Cancel."""

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None):
            updates.append((value, total))
            if cancel_at is not None and value >= cancel_at:
                raise Cancelled()

    comfy = types.ModuleType("comfy")
    comfy.utils = types.SimpleNamespace(ProgressBar=ProgressBar)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", comfy.utils)


def test_long_loops_drive_comfyui_progress_bar_and_stop_on_cancel(monkeypatch, tiny, graph_inputs):
    updates = []
    fake_comfy_utils(monkeypatch, updates)
    run(identity_lora.SPEC, model=tiny, latent=graph_inputs["latent"], positive=graph_inputs["positive"], steps=3,
        rank=2, batch_size=1)
    assert updates == [(1, 3), (2, 3), (3, 3)]

    updates.clear()
    fake_comfy_utils(monkeypatch, updates, cancel_at=2)
    with pytest.raises(Cancelled):
        run(ddim_inversion.SPEC, model=tiny, latent=graph_inputs["latent"], positive=graph_inputs["positive"],
            steps=10, strength=1.0)
    assert updates == [(1, 10), (2, 10)]


@pytest.mark.parametrize("choice, expected", [(None, False), ("auto", False), ("on", True), ("off", False)])
def test_identity_lora_node_passes_its_gradient_checkpointing_choice(monkeypatch, tiny, graph_inputs, choice,
                                                                    expected):
    """None is what a workflow saved before the input existed sends: it means auto (off on the CPU)."""
    seen = []
    train = identity_lora.train_identity_lora

    def recording(*args, **kwargs):
        seen.append(kwargs["gradient_checkpointing"])
        return train(*args, **kwargs)

    monkeypatch.setattr(identity_lora, "train_identity_lora", recording)
    run(identity_lora.SPEC, model=tiny, latent=graph_inputs["latent"], positive=graph_inputs["positive"], steps=1,
        rank=2, batch_size=1, gradient_checkpointing=choice)
    assert seen == [expected]


@pytest.mark.parametrize("node, inputs, message", [
    ("identity_lora", dict(lr=float("nan")), "lora_lr"),
    ("identity_lora", dict(batch_size=0), "lora_batch_size"),
    ("ddim_inversion", dict(strength=float("nan")), "strength"),
    ("ddim_inversion", dict(steps=5000), "num_steps"),
    ("semantic_drag", dict(lr=float("inf")), "lr"),
    ("semantic_drag", dict(mask_weight=float("inf")), "lam"),
    ("semantic_drag", dict(feature_scale=float("nan")), "feature_scale"),
    ("semantic_drag", dict(method="nope"), "unknown method"),
    ("closs_sampler", dict(closs_weight=float("nan")), "closs_weight"),
    ("closs_sampler", dict(closs_weight=-1.0), "closs_weight"),
])
def test_numeric_settings_are_checked_before_the_model_is_touched(monkeypatch, node, inputs, message):
    module = {"identity_lora": identity_lora, "ddim_inversion": ddim_inversion, "semantic_drag": semantic_drag,
              "closs_sampler": closs_sampler}[node]

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was bridged although a setting is bad")

    monkeypatch.setattr(module, "bridged_model", must_not_load)
    # The model and tensor inputs are left out: the settings are checked before any of them is used.
    sockets = {"identity_lora": ("model", "latent", "positive"), "ddim_inversion": ("model", "latent", "positive"),
               "semantic_drag": ("inverted", "drag_points"), "closs_sampler": ("dragged",)}[node]
    with pytest.raises(InputError, match=message):
        run(module.SPEC, **dict.fromkeys(sockets), **inputs)


# ------------------------------------------------------------------------------ identity LoRA kept on disk
def test_identity_lora_is_kept_on_disk_and_reused_without_training(monkeypatch, tmp_path, tiny, graph_inputs):
    monkeypatch.setattr(identity_lora, "cache_folder", lambda name: tmp_path / name)
    trained = []
    train = identity_lora.train_identity_lora
    monkeypatch.setattr(identity_lora, "train_identity_lora",
                        lambda *args, **kwargs: trained.append(kwargs["seed"]) or train(*args, **kwargs))
    inputs = dict(model=tiny, latent=graph_inputs["latent"], positive=graph_inputs["positive"], steps=1, rank=2,
                  batch_size=1)
    first = run(identity_lora.SPEC, **inputs, seed=0)
    again = run(identity_lora.SPEC, **inputs, seed=0)  # as after a restart: nothing in memory, the file on disk
    assert trained == [0]
    (saved,) = (tmp_path / identity_lora.LORA_CACHE).glob("lora-*.safetensors")
    assert first.notes == [f"identity LoRA trained: 1 steps, rank 2, kept on disk as {saved.name}"]
    assert again.notes == [f"identity LoRA from the disk cache ({saved.name}): not retrained"]
    assert all(torch.equal(again.outputs[0][key], value) for key, value in first.outputs[0].items())

    run(identity_lora.SPEC, **inputs, seed=1)  # another setting: another LoRA
    run(identity_lora.SPEC, **inputs, seed=2, keep_on_disk=False)
    assert trained == [0, 1, 2] and len(list((tmp_path / identity_lora.LORA_CACHE).iterdir())) == 2

    saved.write_bytes(b"not a safetensors file")  # unreadable: trained again and replaced
    run(identity_lora.SPEC, **inputs, seed=0)
    assert trained == [0, 1, 2, 0]


def test_the_lora_cache_key_follows_the_model_weights(tiny, graph_inputs):
    core = bridge.CoreModel(tiny.unet, tiny.latent_scale)
    latent, embeddings = graph_inputs["latent"]["samples"], graph_inputs["positive"][0][0]
    key = identity_lora.cache_key(core, latent, embeddings, 80, 16)
    assert key == identity_lora.cache_key(core, latent.clone(), embeddings, 80, 16)
    assert key != identity_lora.cache_key(core, latent, embeddings, 80, 8)
    changed = tiny_sd_components(seed=0)
    with torch.no_grad():
        changed.unet.conv_in.weight.mul_(1.01)  # as a LoraLoader strength would
    assert key != identity_lora.cache_key(bridge.CoreModel(changed.unet), latent, embeddings, 80, 16)


def test_the_lora_cache_keeps_only_the_most_recently_used_files(tmp_path):
    for age in range(5):
        path = tmp_path / f"lora-{age}.safetensors"
        path.write_bytes(b"x")
        os.utime(path, (1000 - age, 1000 - age))
    identity_lora.forget_oldest(tmp_path, 2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lora-0.safetensors", "lora-1.safetensors"]


# ------------------------------------------------------------------------------------ bridge: what it passes on
def test_patches_the_core_cannot_apply_are_named():
    def output_block_patch(h, hsp, options):
        return h, hsp

    class IPAdapterAttention:
        def __call__(self, q, k, v, extra_options):
            return q

    model = types.SimpleNamespace(
        model_options={"transformer_options": {"patches": {"output_block_patch": [output_block_patch]},
                                               "patches_replace": {"attn2": {("input", 4): IPAdapterAttention()}}},
                       "sampler_cfg_function": print, "disable_cfg1_optimization": True},
        object_patches={"model_sampling": object(), "manual_cast_dtype": torch.float16, "diffusion_model": object()},
        weight_wrapper_patches={}, wrappers={"outer_sample": {}}, callbacks={}, hook_patches={})
    assert bridge.ignored_patches(model) == [
        "output_block_patch test_patches_the_core_cannot_apply_are_named.output_block_patch",
        "attn2 replacement test_patches_the_core_cannot_apply_are_named.IPAdapterAttention",
        "sampler_cfg_function print", "object patch diffusion_model"]


@pytest.mark.parametrize("manual_cast, stored, expected", [
    (None, torch.float16, torch.float16), (None, torch.float8_e4m3fn, torch.float16),
    (torch.float32, torch.float8_e4m3fn, torch.float32), (torch.bfloat16, torch.float16, torch.bfloat16)])
def test_low_precision_weights_compute_in_a_compute_dtype(manual_cast, stored, expected):
    assert bridge.compute_dtype(manual_cast, stored) == expected


def test_scaled_fp8_weights_are_refused():
    with pytest.raises(InputError, match="scaled fp8 weights"):
        bridge.check_plain_weights({"input_blocks.0.0.weight": torch.zeros(1), "input_blocks.0.0.scale_weight": 1})


def test_the_memory_asked_of_comfyui_follows_the_estimate_and_the_image_size():
    at_512 = bridge.stage_memory("lora", torch.zeros(1, 4, 64, 64))
    assert at_512 == int(bridge.STAGE_MEMORY_GIB_512["lora"] * 2**30)
    assert bridge.stage_memory("lora", torch.zeros(1, 4, 32, 32)) == at_512 // 4
    assert bridge.stage_memory("lora", torch.zeros(1, 4, 64, 64), torch.float32) == pytest.approx(2 * at_512)
