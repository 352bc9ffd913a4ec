"""Every node's execute path with the tiny model and no ComfyUI installed.

The pack is imported the way ComfyUI imports a custom node folder (as a package from its ``__init__.py``), and
every node runs under ``torch.inference_mode()``, as ComfyUI runs nodes.
"""

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptivedrag_core.errors import InputError
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
                                     identity_lora, sam2_mask, semantic_drag)


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
    assert len(set(ids)) == len(ids) == 7
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


@pytest.mark.parametrize("text, message", [("", "no drag points"), ("{", "not valid JSON"),
                                           (points_json([]), "no drag pairs")])
def test_drag_points_names_what_is_wrong(graph_inputs, text, message):
    with pytest.raises(InputError, match=message):
        run(drag_points.SPEC, image=graph_inputs["image"], points_json=text)


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
    (latent,) = run(closs_sampler.SPEC, dragged=dragged, closs=True, closs_weight=1.0,
                    closs_kind="contrastive").outputs

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
    (latent,) = run(closs_sampler.SPEC, dragged=dragged, closs=False).outputs
    assert latent["samples"].shape == graph_inputs["latent"]["samples"].shape


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
    (latent,) = run(closs_sampler.SPEC, dragged=second, closs=True).outputs
    assert torch.isfinite(latent["samples"]).all()


def test_semantic_drag_rejects_points_of_another_image(inverted):
    points = DragPoints.from_json(points_json([((100, 100), (200, 100))], width=512, height=512))
    with pytest.raises(InputError, match="image is 64x64 .* but points were placed on 512x512"):
        run(semantic_drag.SPEC, inverted=inverted, drag_points=points)


def test_semantic_drag_rejects_a_mask_of_another_size(graph_inputs, inverted):
    with pytest.raises(InputError, match="mask is 32x32 but the image is 64x64"):
        run(semantic_drag.SPEC, inverted=inverted, drag_points=graph_inputs["points"], mask=torch.ones(1, 32, 32))


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

    monkeypatch.setattr(module, "core_model", must_not_load)
    # The model and tensor inputs are left out: the settings are checked before any of them is used.
    sockets = {"identity_lora": ("model", "latent", "positive"), "ddim_inversion": ("model", "latent", "positive"),
               "semantic_drag": ("inverted", "drag_points"), "closs_sampler": ("dragged",)}[node]
    with pytest.raises(InputError, match=message):
        run(module.SPEC, **dict.fromkeys(sockets), **inputs)
