"""The pack's graphs in a real browser against a real ComfyUI server that runs them.

Skipped unless ``COMFYUI_PATH`` names a ComfyUI checkout; needs Python playwright and Chromium, as
``test_browser_widget.py``. The server has the random-weight SD1.5-width checkpoint and SAM2 of
``test_comfyui_server.py``. Every graph is queued from the page, as a person would (``app.queuePrompt``).

Set ``ADAPTIVEDRAG_SCREENSHOTS=folder`` to save pictures of the nodes for the README, and
``ADAPTIVEDRAG_TEMPLATE_THUMBNAILS=folder`` to save the templates' thumbnails (``<title>.jpg``).
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

from comfyui_harness import COMFYUI_PATH, running_comfyui  # noqa: E402

if not COMFYUI_PATH:
    pytest.skip("COMFYUI_PATH is not set: no ComfyUI to test the graphs against", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

from PIL import Image  # noqa: E402

from test_browser_widget import (CHROMIUM, CHROMIUM_ARGS, JS_IMAGE_LOADED, JS_NODE, JS_PRELUDE,  # noqa: E402
                                 JS_WIDGET_STATE, SETTINGS, PageErrors, click_pixel, draw_test_image, save_screenshot,
                                 wait_frames)
from test_comfyui_server import CHECKPOINT, SAM2_CHECKPOINT, write_inputs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "example_workflows"
FREEDRAG = TEMPLATES / "FreeDrag.json"
ADAPTIVE = TEMPLATES / "AdaptiveDrag - auto mask and CLoss.json"
SAVED_BEFORE = REPO / "tests" / "data" / "saved_0.1_adaptivedrag_automask_closs.json"
PICTURE = "landscape.png"
PICTURE_SIZE = (128, 96)
RUN_TIMEOUT = 1800  # a safety net: a loaded 2-core machine can take minutes per graph
SCREENSHOTS = os.environ.get("ADAPTIVEDRAG_SCREENSHOTS")
THUMBNAILS = os.environ.get("ADAPTIVEDRAG_TEMPLATE_THUMBNAILS")


@pytest.fixture(scope="module")
def comfy_url(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_graph")
    write_inputs(base)
    draw_test_image(PICTURE_SIZE).save(base / "input" / PICTURE)
    (base / "user" / "default").mkdir(parents=True, exist_ok=True)
    # No minimap over the graph in the pictures.
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps({**SETTINGS,
                                                                              "Comfy.Minimap.Visible": False}))
    with running_comfyui(base, timeout=300) as url:
        yield url


@pytest.fixture(scope="module")
def page(comfy_url):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1500, "height": 950}, device_scale_factor=1)
        page.errors = PageErrors(page)
        page.goto(comfy_url)
        page.wait_for_function("() => window.comfyAPI?.app?.app?.graph && window.LiteGraph", timeout=120_000)
        try:  # let the startup workflow load before replacing it, or it would replace ours
            page.wait_for_function("() => window.comfyAPI.app.app.graph.nodes.length > 0", timeout=15_000)
        except sync_api.TimeoutError:
            pass
        yield page
        assert page.errors.about_pack() == [], "\n".join(page.errors.messages)
        browser.close()


# ------------------------------------------------------------------------------------------ page helpers
JS_LOAD = JS_PRELUDE + """
async (workflow) => {
  const app = comfyApp();
  await app.loadGraphData(workflow);
  return Object.fromEntries(app.graph.nodes.map((n) => [n.type, n.id]));
}
"""

JS_SET_WIDGETS = JS_NODE + """
([id, values]) => {
  for (const [name, value] of Object.entries(values)) {
    const widget = node(id).widgets.find((w) => w.name === name);
    if (!widget) throw new Error(`no widget ${name}`);
    widget.value = value;
    widget.callback?.(value);
  }
}
"""

JS_WIDGETS = JS_NODE + """
(id) => Object.fromEntries(node(id).widgets.filter((w) => w.serialize !== false && w.name !== "upload")
  .map((w) => [w.name, w.value]))
"""

JS_SHOWN_WIDGETS = JS_NODE + "(id) => node(id).widgets.filter((w) => !w.hidden).map((w) => w.name)"

JS_NOTES = JS_NODE + """
(id) => {
  const widget = node(id).widgets?.find((w) => w.name === "adaptivedrag_notes");
  return widget ? [...widget.element.children].map((row) => row.textContent) : null;
}
"""

JS_QUEUE = JS_PRELUDE + "async () => { await comfyApp().queuePrompt(0, 1); }"

JS_REPLACE_WITH_FRESH = JS_NODE + """
(id) => {
  // A newly added node in place of the given one, wired the same way (as a person adding it from the menu).
  const app = comfyApp();
  const graph = app.graph;
  const old = node(id);
  const fresh = LiteGraph.createNode(old.type);
  graph.add(fresh);
  fresh.pos = [...old.pos];
  const link = (linkId) => graph.links.get?.(linkId) ?? graph.links[linkId];
  old.inputs.forEach((input, slot) => {
    if (input.link == null) return;
    const origin = link(input.link);
    const target = fresh.inputs.findIndex((i) => i.name === input.name);
    graph.getNodeById(origin.origin_id).connect(origin.origin_slot, fresh, target);
  });
  old.outputs.forEach((output, slot) => {
    for (const linkId of [...(output.links ?? [])]) {
      const target = link(linkId);
      fresh.connect(slot, graph.getNodeById(target.target_id), target.target_slot);
    }
  });
  graph.remove(old);
  return {id: fresh.id, widgets: fresh.widgets.map((w) => w.name)};
}
"""

JS_INSERT_IMAGE_SCALE = JS_PRELUDE + """
([width, height]) => {
  // Load Image -> ImageScale -> (Drag Points, Encode Working Copy): the points are placed on the scaled image.
  const app = comfyApp();
  const find = (type) => app.graph.nodes.find((n) => n.type === type);
  const load = find("LoadImage");
  const scale = LiteGraph.createNode("ImageScale");
  app.graph.add(scale);
  scale.pos = [load.pos[0] + 20, load.pos[1] + 380];
  for (const [name, value] of Object.entries({upscale_method: "bilinear", width, height, crop: "disabled"}))
    scale.widgets.find((w) => w.name === name).value = value;
  load.connect(0, scale, 0);
  for (const type of ["AdaptiveDrag_DragPoints", "AdaptiveDrag_EncodeWorkingCopy"]) {
    const target = find(type);
    scale.connect(0, target, target.inputs.findIndex((i) => i.name === "image"));
  }
  return scale.id;
}
"""

JS_FOCUS = JS_NODE + """
([id, width, height]) => {
  // Put the node at the top left of the canvas at scale 1, with room for it.
  const app = comfyApp();
  if (width) node(id).setSize([width, height]);
  app.canvas.ds.scale = 1;
  app.canvas.ds.offset = [-node(id).pos[0] + 60, -node(id).pos[1] + 80];
  app.canvas.setDirty(true, true);
}
"""

JS_FIT_GRAPH = JS_PRELUDE + """
() => {
  // Show the whole graph below the workflow tabs; returns its rectangle on the page.
  const app = comfyApp();
  const nodes = app.graph.nodes;
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  const left = Math.min(...nodes.map((n) => n.pos[0])) - 10;
  const top = Math.min(...nodes.map((n) => n.pos[1] - title)) - 10;
  const right = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + 10;
  const bottom = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 10;
  const rect = app.canvas.canvas.getBoundingClientRect();
  const tabs = 60;
  const scale = Math.min(rect.width / (right - left), (rect.height - tabs) / (bottom - top));
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [-left, -top + tabs / scale];
  app.canvas.setDirty(true, true);
  return {x: rect.left, y: rect.top + tabs, width: (right - left) * scale, height: (bottom - top) * scale};
}
"""


def history_ids(url: str) -> set:
    with urllib.request.urlopen(url + "/history", timeout=30) as response:
        return set(json.load(response))


def queue_and_wait(page, url: str) -> dict:
    """Queue the page's graph as the Queue button does; the history entry of that run."""
    known = history_ids(url)
    page.evaluate(JS_QUEUE)
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/history", timeout=30) as response:
            history = json.load(response)
        done = [entry for key, entry in history.items() if key not in known
                and entry["status"].get("completed") is not None]
        if done:
            wait_frames(page, 5)
            return done[0]
        time.sleep(0.5)
    raise TimeoutError("the queued graph did not finish")


def messages(entry: dict, event: str) -> list:
    return [data for name, data in entry["status"]["messages"] if name == event]


def prepared(workflow: Path, points: str = "") -> dict:
    """A template with this server's files, small settings and the given points JSON."""
    graph = json.loads(workflow.read_text())
    values = {
        "CheckpointLoaderSimple": [CHECKPOINT],
        "LoadImage": [PICTURE, "image"],
    }
    for node in graph["nodes"]:
        if node["type"] in values:
            node["widgets_values"] = values[node["type"]]
        if node["type"] == "AdaptiveDrag_SAM2Loader":
            node["widgets_values"][0] = SAM2_CHECKPOINT
        if node["type"] == "AdaptiveDrag_DragPoints":
            node["widgets_values"][0] = points
    return graph


SMALL = {
    "AdaptiveDrag_EncodeWorkingCopy": {"work_size": 64},
    "AdaptiveDrag_IdentityLoRA": {"steps": 2, "rank": 2, "batch_size": 1, "keep_on_disk": False},
    "AdaptiveDrag_DDIMInversion": {"steps": 10, "strength": 0.3},
    "AdaptiveDrag_SemanticDrag": {"steps": 2, "max_steps": 3},
}


def load_small(page, workflow: dict) -> dict:
    ids = page.evaluate(JS_LOAD, workflow)
    for node_type, values in SMALL.items():
        if node_type in ids:
            page.evaluate(JS_SET_WIDGETS, [ids[node_type], values])
    return ids


def points_text(pairs, size) -> str:
    return json.dumps({"version": 1, "width": size[0], "height": size[1],
                       "pairs": [{"handle": list(h), "target": list(t)} for h, t in pairs]})


# ------------------------------------------------------------------------------------------------- tests
def test_a_fresh_identity_lora_node_queued_twice_trains_and_inverts_once(page, comfy_url):
    ids = load_small(page, prepared(FREEDRAG, points_text([((30, 40), (50, 30))], PICTURE_SIZE)))
    fresh = page.evaluate(JS_REPLACE_WITH_FRESH, ids["AdaptiveDrag_IdentityLoRA"])
    assert "control_after_generate" not in fresh["widgets"]
    page.evaluate(JS_SET_WIDGETS, [fresh["id"], SMALL["AdaptiveDrag_IdentityLoRA"]])
    first = queue_and_wait(page, comfy_url)
    assert first["status"]["status_str"] == "success", messages(first, "execution_error")
    seed = page.evaluate(JS_WIDGETS, fresh["id"])["seed"]
    second = queue_and_wait(page, comfy_url)
    assert second["status"]["status_str"] == "success", messages(second, "execution_error")
    (cached,) = messages(second, "execution_cached")
    assert {str(fresh["id"]), str(ids["AdaptiveDrag_DDIMInversion"])} <= set(cached["nodes"])
    assert page.evaluate(JS_WIDGETS, fresh["id"])["seed"] == seed == 0


def test_any_upstream_image_gets_points_by_clicking_and_runs(page, comfy_url):
    scaled = (80, 60)
    ids = load_small(page, prepared(FREEDRAG))
    page.evaluate(JS_INSERT_IMAGE_SCALE, list(scaled))
    points_id = ids["AdaptiveDrag_DragPoints"]
    page.evaluate(JS_FOCUS, [points_id, 420, 460])
    wait_frames(page)

    stopped = queue_and_wait(page, comfy_url)  # no pairs yet: Drag Points shows the scaled image and stops
    (error,) = messages(stopped, "execution_error")
    assert error["node_id"] == str(points_id) and "no drag pairs yet" in error["exception_message"]
    page.keyboard.press("Escape")  # the error dialog
    page.wait_for_function(JS_IMAGE_LOADED, arg=[points_id, *scaled], timeout=30_000)
    wait_frames(page, 10)  # laid out for the image that arrived

    click_pixel(page, points_id, 20, 30)
    assert "click the target" in page.evaluate(JS_WIDGET_STATE, points_id)["status"]
    click_pixel(page, points_id, 40, 20)
    stored = json.loads(page.evaluate(JS_WIDGETS, points_id)["points_json"])
    assert (stored["width"], stored["height"]) == scaled and len(stored["pairs"]) == 1

    done = queue_and_wait(page, comfy_url)
    assert done["status"]["status_str"] == "success", messages(done, "execution_error")
    sampler_id = ids["AdaptiveDrag_CLossSampler"]
    shown = page.evaluate(JS_NOTES, sampler_id)
    assert shown and shown[0].startswith("final handles (target in brackets): 1 (")
    assert "result 80x60 (worked at 64x48)" in shown
    (saved,) = done["outputs"][str(ids["SaveImage"])]["images"]
    assert saved["filename"].endswith(".png")
    if SCREENSHOTS:
        page.evaluate(JS_FOCUS, [sampler_id, 440, 560])
        wait_frames(page, 10)
        save_screenshot(page, sampler_id, Path(SCREENSHOTS) / "closs_sampler_preview.png")


def test_the_auto_mask_node_shows_its_overlay_and_notes(page, comfy_url):
    ids = load_small(page, prepared(ADAPTIVE, points_text([((40, 60), (70, 45))], PICTURE_SIZE)))
    done = queue_and_wait(page, comfy_url)
    assert done["status"]["status_str"] == "success", messages(done, "execution_error")
    mask_id = ids["AdaptiveDrag_SAM2SuperpixelMask"]
    shown = page.evaluate(JS_NOTES, mask_id)
    assert shown and shown[0].startswith("mask covers ") and "SAM2" in shown[0]
    if SCREENSHOTS:
        page.evaluate(JS_FOCUS, [mask_id, 340, 420])
        wait_frames(page, 10)
        save_screenshot(page, mask_id, Path(SCREENSHOTS) / "sam2_mask_overlay.png")


@pytest.mark.parametrize("method", ["adaptive", "freedrag", "dragdiffusion"])
def test_semantic_drag_shows_only_the_chosen_methods_settings(page, comfy_url, method):
    from test_nodes import semantic_drag

    ids = page.evaluate(JS_LOAD, prepared(FREEDRAG))
    drag_id = ids["AdaptiveDrag_SemanticDrag"]
    page.evaluate(JS_SET_WIDGETS, [drag_id, {"method": method}])
    assert page.evaluate(JS_SHOWN_WIDGETS, drag_id) == ["method"] + [
        spec.name for spec in semantic_drag.SPEC.widgets if spec.name in semantic_drag.METHOD_WIDGETS[method]]
    assert page.evaluate(JS_WIDGETS, drag_id)["freedrag_l"] == 1.0  # hidden, still saved and sent
    if SCREENSHOTS and method == "freedrag":
        page.evaluate(JS_FOCUS, [drag_id, 0, 0])
        wait_frames(page, 5)
        save_screenshot(page, drag_id, Path(SCREENSHOTS) / "semantic_drag_freedrag.png")


def test_a_workflow_saved_before_loads_with_its_values_and_runs(page, comfy_url):
    saved = json.loads(SAVED_BEFORE.read_text())
    ids = page.evaluate(JS_LOAD, saved)
    old = {node["type"]: node["widgets_values"] for node in saved["nodes"]}
    lora = page.evaluate(JS_WIDGETS, ids["AdaptiveDrag_IdentityLoRA"])
    assert lora == {"steps": 80, "rank": 16, "lr": 0.0005, "batch_size": 4, "seed": 0,
                    "gradient_checkpointing": "auto", "keep_on_disk": True}
    drag = page.evaluate(JS_WIDGETS, ids["AdaptiveDrag_SemanticDrag"])
    assert list(drag.values()) == old["AdaptiveDrag_SemanticDrag"]
    assert "freedrag_l" not in page.evaluate(JS_SHOWN_WIDGETS, ids["AdaptiveDrag_SemanticDrag"])

    # Queued with this server's files and small settings, the old graph (VAE Encode, VAE Decode) still runs.
    page.evaluate(JS_SET_WIDGETS, [ids["CheckpointLoaderSimple"], {"ckpt_name": CHECKPOINT}])
    page.evaluate(JS_SET_WIDGETS, [ids["LoadImage"], {"image": PICTURE}])
    page.evaluate(JS_SET_WIDGETS, [ids["AdaptiveDrag_SAM2Loader"], {"model_name": SAM2_CHECKPOINT}])
    page.evaluate(JS_SET_WIDGETS, [ids["AdaptiveDrag_DragPoints"],
                                   {"points_json": points_text([((40, 60), (70, 45))], PICTURE_SIZE)}])
    for node_type, values in SMALL.items():
        if node_type in ids:
            page.evaluate(JS_SET_WIDGETS, [ids[node_type], values])
    done = queue_and_wait(page, comfy_url)
    assert done["status"]["status_str"] == "success", messages(done, "execution_error")


@pytest.mark.skipif(not THUMBNAILS, reason="set ADAPTIVEDRAG_TEMPLATE_THUMBNAILS to write the thumbnails")
@pytest.mark.parametrize("template", sorted(TEMPLATES.glob("*.json")), ids=lambda path: path.stem)
def test_write_template_thumbnail(page, comfy_url, template):
    graph = prepared(template, points_text([((40, 60), (70, 45)), ((100, 30), (90, 50))], PICTURE_SIZE))
    ids = page.evaluate(JS_LOAD, graph)
    page.wait_for_function(JS_IMAGE_LOADED, arg=[ids["AdaptiveDrag_DragPoints"], *PICTURE_SIZE], timeout=30_000)
    box = page.evaluate(JS_FIT_GRAPH)
    wait_frames(page, 10)
    png = Path(THUMBNAILS) / f"{template.stem}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(png), clip=box)
    with Image.open(png) as shot:
        shot.convert("RGB").save(png.with_suffix(".jpg"), quality=85)
        if SCREENSHOTS and template == ADAPTIVE:  # the README's picture of the graph
            shot.save(Path(SCREENSHOTS) / "comfyui_adaptivedrag_graph.png")
    png.unlink()
