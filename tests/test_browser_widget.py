"""The Drag Points canvas widget in a real browser against a real ComfyUI server.

Skipped unless ``COMFYUI_PATH`` names a ComfyUI checkout (CI does not run it). Needs Python playwright and a
Chromium binary (``CHROMIUM_PATH``, default ``/usr/bin/chromium``); ``playwright install`` is never used.

The server runs with ``COMFYUI_PYTHON`` (default: this interpreter), ``--cpu``, on a free loopback port, with a
temporary ``--base-directory`` whose ``custom_nodes`` holds only this pack (a link to the repository, or to
``ADAPTIVEDRAG_PACK_DIR`` when set) and whose ``input`` holds the test images.

Set ``ADAPTIVEDRAG_SCREENSHOT=path.png`` to also save a picture of the node with pairs placed
(the README's docs/images/drag_points_widget.png).
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

from comfyui_harness import COMFYUI_PATH, link_pack, running_comfyui  # noqa: E402

if not COMFYUI_PATH:
    pytest.skip("COMFYUI_PATH is not set: no ComfyUI to test the widget against", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

from PIL import Image, ImageDraw  # noqa: E402  (only needed once the test runs)

REPO = Path(__file__).resolve().parents[1]
NODE_ID = "AdaptiveDrag_DragPoints"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
IMAGE_NAME = "adaptivedrag_widget_test.png"
IMAGE_SIZE = (192, 128)  # not square, so the letterbox has bars
OTHER_IMAGE_NAME = "adaptivedrag_widget_other.png"
OTHER_SIZE = (100, 150)
SERVER_START_TIMEOUT = 300
PACK_WORDS = ("adaptivedrag", "drag_points", "points_model", "dragpoints")
# Frontend settings that keep first-run dialogs out of the way.
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Workflow.ShowMissingNodesWarning": False,
}


def draw_test_image(size) -> Image.Image:
    """A small landscape (sky, sun, hills) so points and the letterbox are easy to see."""
    width, height = size
    image = Image.new("RGB", size)
    pixels = image.load()
    for y in range(height):
        for x in range(width):
            pixels[x, y] = (70 + y * 80 // height, 130 + y * 60 // height, 230 - x * 30 // width)
    draw = ImageDraw.Draw(image)
    draw.ellipse([width * 0.62, height * 0.12, width * 0.78, height * 0.36], fill=(255, 214, 90))
    draw.polygon([(0, height * 0.7), (width * 0.3, height * 0.45), (width * 0.6, height * 0.72),
                  (width, height * 0.55), (width, height), (0, height)], fill=(60, 140, 70))
    return image


def fetch_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def comfy_url(tmp_path_factory):
    """A ComfyUI server with only this pack, serving until the module's tests are done."""
    base = tmp_path_factory.mktemp("comfy_base")
    for sub in ("custom_nodes", "input", "output", "temp", "user/default"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link_pack(base)
    draw_test_image(IMAGE_SIZE).save(base / "input" / IMAGE_NAME)
    draw_test_image(OTHER_SIZE).save(base / "input" / OTHER_IMAGE_NAME)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS))

    with running_comfyui(base, ready_path=f"/object_info/{NODE_ID}", timeout=SERVER_START_TIMEOUT) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


class PageErrors:
    """Uncaught page errors and console errors seen by a page."""

    def __init__(self, page):
        self.messages: list[str] = []
        page.on("pageerror", lambda error: self.messages.append(f"pageerror: {error}\n{error.stack or ''}"))
        page.on("console", lambda msg: msg.type == "error" and self.messages.append(
            f"console: {msg.text} @ {msg.location.get('url', '')}"))

    def about_pack(self) -> list[str]:
        return [m for m in self.messages if any(word in m.lower() for word in PACK_WORDS)]


# JavaScript run in the page. `comfyApp()` is the frontend's app object.
JS_PRELUDE = "const comfyApp = () => window.comfyAPI.app.app;"

JS_SETUP_GRAPH = JS_PRELUDE + """
async ([workflow, nodeId, imageName]) => {
  const app = comfyApp();
  if (workflow) await app.loadGraphData(workflow);
  let node = app.graph.nodes.find((n) => n.type === nodeId);
  if (!node) {
    app.graph.clear();
    node = LiteGraph.createNode(nodeId);
    app.graph.add(node);
  }
  const slot = node.inputs.findIndex((input) => input.name === "image");
  let loader = node.getInputNode(slot);
  if (!loader || !loader.widgets?.some((w) => w.name === "image")) {
    loader = LiteGraph.createNode("LoadImage");
    app.graph.add(loader);
    loader.connect(0, node, slot);
  }
  loader.widgets.find((w) => w.name === "image").value = imageName;
  // Park the node away from every other node, so no other widget covers it on screen.
  loader.pos = [20000, 20000];
  node.pos = [30000, 30000];
  node.setSize([520, 560]);
  app.canvas.ds.scale = 1;
  app.canvas.ds.offset = [-30000 + 40, -30000 + 120];
  app.canvas.bringToFront?.(node);
  app.canvas.setDirty(true, true);
  return [node.id, app.graph.nodes.length];
}
"""

JS_NODE = JS_PRELUDE + "const node = (id) => comfyApp().graph.getNodeById(id);"

JS_IMAGE_LOADED = JS_NODE + """
([id, width, height]) => {
  comfyApp().canvas.setDirty(true, true);
  const img = node(id)?.adaptiveDragWidget?.image;
  return !!img && img.naturalWidth === width && img.naturalHeight === height;
}
"""

JS_PIXEL_TO_CLIENT = JS_NODE + "([id, x, y]) => node(id).adaptiveDragWidget.imagePixelToClient(x, y)"

JS_SET_ZOOM = JS_NODE + """
([id, scale]) => {
  // Zoom, keeping the node's top-left corner where it was on screen.
  const canvas = comfyApp().canvas;
  canvas.ds.scale = scale;
  canvas.ds.offset = [40 / scale - node(id).pos[0], 120 / scale - node(id).pos[1]];
  canvas.setDirty(true, true);
}
"""

JS_STORED_POINTS = JS_NODE + """
async (id) => {
  const app = comfyApp();
  const index = node(id).widgets.findIndex((w) => w.name === "points_json");
  const saved = app.graph.serialize().nodes.find((n) => n.id === id);
  const prompt = await app.graphToPrompt();
  return {
    widget: node(id).widgets[index].value,
    workflow: saved.widgets_values[index],
    prompt: prompt.output[String(id)].inputs.points_json,
  };
}
"""

JS_WIDGET_STATE = JS_NODE + """
(id) => {
  const w = node(id).adaptiveDragWidget;
  return {pairs: w.model.pairCount, error: w.model.error, status: w.status.textContent,
          mismatch: w.model.sizeMismatch};
}
"""

JS_LOAD_WITH_POINTS = JS_NODE + """
async ([id, value]) => {
  // Save the workflow, put `value` where the points are stored, and load it back.
  const app = comfyApp();
  const index = node(id).widgets.findIndex((w) => w.name === "points_json");
  const workflow = app.graph.serialize();
  workflow.nodes.find((n) => n.id === id).widgets_values[index] = value;
  await app.loadGraphData(workflow);
}
"""


def wait_frames(page, count: int = 3) -> None:
    """Let the graph canvas draw a few frames (the widget follows zoom and size changes while drawing)."""
    page.evaluate(JS_PRELUDE + """(count) => new Promise((resolve) => {
        const step = (n) => { comfyApp().canvas.setDirty(true, true);
                              n ? requestAnimationFrame(() => step(n - 1)) : resolve(); };
        step(count); })""", count)


def client_point(page, node_id, x, y):
    point = page.evaluate(JS_PIXEL_TO_CLIENT, [node_id, x, y])
    assert point is not None, "the widget has no layout: image not shown"
    return point["x"], point["y"]


def click_pixel(page, node_id, x, y, button="left"):
    page.mouse.click(*client_point(page, node_id, x, y), button=button)


def drag_pixel(page, node_id, start, end):
    page.mouse.move(*client_point(page, node_id, *start))
    page.mouse.down()
    page.mouse.move(*client_point(page, node_id, *end), steps=6)
    page.mouse.up()


def stored_points(page, node_id) -> dict:
    """The points as the widget, the saved workflow and the API prompt carry them (all must agree)."""
    stored = page.evaluate(JS_STORED_POINTS, node_id)
    assert stored["widget"] == stored["workflow"] == stored["prompt"], stored
    return json.loads(stored["prompt"])


def expected(pairs, size=IMAGE_SIZE) -> dict:
    return {"version": 1, "width": size[0], "height": size[1],
            "pairs": [{"handle": list(h), "target": list(t)} for h, t in pairs]}


def example_workflow():
    """The first example workflow (graph form) with a Drag Points node, AdaptiveDrag's first; None if none."""
    paths = sorted((REPO / "example_workflows").glob("*.json"),
                   key=lambda p: (not p.name.lower().startswith("adaptivedrag"), p.name))
    for path in paths:
        workflow = json.loads(path.read_text())
        if any(node.get("type") == NODE_ID for node in workflow.get("nodes", [])):
            return workflow
    return None


def test_drag_points_widget_in_browser(comfy_url, browser):
    # Two device pixels per CSS pixel: the mapping must hold on HiDPI screens (and the screenshot is sharp).
    page = browser.new_page(viewport={"width": 1400, "height": 900}, device_scale_factor=2)
    errors = PageErrors(page)
    page.goto(comfy_url)
    page.wait_for_function("() => window.comfyAPI?.app?.app?.graph && window.LiteGraph", timeout=120_000)
    try:  # let the startup workflow load before replacing it, or it would replace ours
        page.wait_for_function("() => window.comfyAPI.app.app.graph.nodes.length > 0", timeout=15_000)
    except sync_api.TimeoutError:
        pass  # a frontend whose startup workflow is empty

    workflow = example_workflow()
    node_id, node_count = page.evaluate(JS_SETUP_GRAPH, [workflow, NODE_ID, IMAGE_NAME])
    if workflow:
        assert node_count == len(workflow["nodes"]), "the example workflow did not load as it is"
    page.wait_for_function(JS_IMAGE_LOADED, arg=[node_id, *IMAGE_SIZE], timeout=30_000)
    wait_frames(page)
    if page.evaluate(JS_WIDGET_STATE, node_id)["pairs"]:  # the example workflow may come with points
        page.get_by_role("button", name="Clear", exact=True).click()
        assert stored_points(page, node_id) == expected([])

    # Two pairs: handle then target, twice.
    pairs = [((10, 12), (60, 40)), ((150, 100), (120, 30))]
    for handle, target in pairs:
        click_pixel(page, node_id, *handle)
        click_pixel(page, node_id, *target)
    assert stored_points(page, node_id) == expected(pairs)
    assert page.evaluate(JS_WIDGET_STATE, node_id)["status"].startswith("2 pairs")

    if os.environ.get("ADAPTIVEDRAG_SCREENSHOT"):
        save_screenshot(page, node_id, Path(os.environ["ADAPTIVEDRAG_SCREENSHOT"]))

    # Drag the first target while the graph is zoomed out: the stored pixel follows the image, not the screen.
    page.evaluate(JS_SET_ZOOM, [node_id, 0.7])
    wait_frames(page)
    drag_pixel(page, node_id, (60, 40), (80, 50))
    pairs[0] = ((10, 12), (80, 50))
    assert stored_points(page, node_id) == expected(pairs)

    # Resize the node: the points are drawn where they belong, so a drag still picks up the right one.
    page.evaluate(JS_NODE + "(id) => { node(id).setSize([700, 380]); comfyApp().canvas.setDirty(true, true); }",
                  node_id)
    wait_frames(page)
    drag_pixel(page, node_id, (150, 100), (151, 101))
    pairs[1] = ((151, 101), (120, 30))
    assert stored_points(page, node_id) == expected(pairs)

    # Right click removes a pair; the Undo button brings it back.
    click_pixel(page, node_id, 120, 30, button="right")
    assert stored_points(page, node_id) == expected(pairs[:1])
    undo_button = page.get_by_role("button", name="Undo", exact=True)
    undo_button.click()
    assert stored_points(page, node_id) == expected(pairs)

    # A click on a point selects its pair and Delete removes that pair, not the node; Clear empties the set.
    click_pixel(page, node_id, 10, 12)
    page.keyboard.press("Delete")
    assert page.evaluate(JS_NODE + "(id) => !!node(id)", node_id), "Delete removed the node"
    assert stored_points(page, node_id) == expected(pairs[1:])
    page.get_by_role("button", name="Clear", exact=True).click()
    assert stored_points(page, node_id) == expected([])
    undo_button.click()
    undo_button.click()
    assert stored_points(page, node_id) == expected(pairs)

    # Reload the workflow: the points come back unchanged and are drawn on the image.
    page.evaluate(JS_PRELUDE + "async () => { const app = comfyApp(); await app.loadGraphData(app.graph.serialize()); }")
    page.wait_for_function(JS_IMAGE_LOADED, arg=[node_id, *IMAGE_SIZE], timeout=30_000)
    wait_frames(page)
    assert stored_points(page, node_id) == expected(pairs)
    assert page.evaluate(JS_WIDGET_STATE, node_id)["pairs"] == 2

    # After a run the node shows the image it received; another size is flagged, not silently used.
    page.evaluate(JS_NODE + """([id, name]) => node(id).onExecuted(
        {adaptivedrag_image: [{filename: name, subfolder: "", type: "input"}]})""", [node_id, OTHER_IMAGE_NAME])
    page.wait_for_function(JS_IMAGE_LOADED, arg=[node_id, *OTHER_SIZE], timeout=30_000)
    assert page.evaluate(JS_WIDGET_STATE, node_id)["mismatch"] is True
    assert stored_points(page, node_id) == expected(pairs), "showing an image alone changes no point"

    # A stranger's workflow with hostile points loads with an error on the node and an empty point set,
    # no HTML is made from the data, and the canvas keeps working.
    too_many = expected([((0, 0), (1, 1))] * 5000)
    for value in ('<img src=x onerror="window.__adaptivedragPwned=1">',
                  '{"version":1,"width":5,"height":5,"pairs":[{"handle":[1e999,0],"target":[1,1]}]}',
                  '{"version":1,"width":5,"height":5,"pairs":[],"__proto__":{"polluted":1}}',
                  json.dumps(too_many), {"version": 1, "pairs": "not text"}):
        page.evaluate(JS_LOAD_WITH_POINTS, [node_id, value])
        wait_frames(page)
        state = page.evaluate(JS_WIDGET_STATE, node_id)
        assert state["pairs"] == 0 and state["error"], state
    assert page.evaluate("() => window.__adaptivedragPwned === undefined && ({}).polluted === undefined")
    page.wait_for_function(JS_IMAGE_LOADED, arg=[node_id, *IMAGE_SIZE], timeout=30_000)
    click_pixel(page, node_id, 30, 30)
    state = page.evaluate(JS_WIDGET_STATE, node_id)
    assert state["error"] is None and "click the target" in state["status"], state

    # The JSON button shows the text; points pasted there replace the set.
    page.get_by_role("button", name="JSON", exact=True).click()
    wait_frames(page)
    page.evaluate(JS_NODE + """(id) => {
        node(id).widgets.find((w) => w.name === "points_json").element.dataset.testid = "adaptivedrag-json"; }""",
                  node_id)
    pasted = expected([((1, 2), (3, 4))], OTHER_SIZE)
    page.get_by_test_id("adaptivedrag-json").fill(json.dumps(pasted))
    assert page.evaluate(JS_WIDGET_STATE, node_id)["pairs"] == 1
    assert page.evaluate(JS_WIDGET_STATE, node_id)["error"] is None
    assert stored_points(page, node_id) == pasted

    assert errors.about_pack() == [], "\n".join(errors.messages)
    page.close()


def save_screenshot(page, node_id, path: Path) -> None:
    """Save the node (title bar, widgets and canvas with the placed pairs) as a PNG."""
    box = page.evaluate(JS_NODE + """(id) => {
        const app = comfyApp(); const n = node(id); const ds = app.canvas.ds;
        const rect = app.canvas.canvas.getBoundingClientRect();
        const title = LiteGraph.NODE_TITLE_HEIGHT;
        return {x: rect.left + (n.pos[0] + ds.offset[0]) * ds.scale - 4,
                y: rect.top + (n.pos[1] - title + ds.offset[1]) * ds.scale - 4,
                width: n.size[0] * ds.scale + 8, height: (n.size[1] + title) * ds.scale + 8}; }""", node_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), clip=box)
