// Tests of the Drag Points widget's pure logic. Run with `node --test web/tests/`.
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  LIMITS,
  PointsEditorModel,
  boxToClient,
  boxToImage,
  clientToBox,
  hitTest,
  imageToBox,
  letterbox,
  parsePointsJson,
  rescalePoint,
  serializePoints,
  validatePoints,
} from "../points_model.js";

const pointsJson = (width, height, pairs) => JSON.stringify({ version: 1, width, height, pairs });

// ------------------------------------------------------------------------------------- mapping

test("letterbox fits any aspect ratio inside the box and centres it", () => {
  for (const [boxW, boxH, imgW, imgH] of [
    [400, 300, 512, 512],
    [400, 300, 1024, 256],
    [200, 600, 640, 480],
    [300, 300, 7, 3000],
  ]) {
    const margin = 10;
    const layout = letterbox(boxW, boxH, imgW, imgH, margin);
    assert.ok(Math.abs(layout.width / layout.height - imgW / imgH) < 1e-9, "aspect ratio kept");
    assert.ok(layout.width <= boxW - 2 * margin + 1e-9 && layout.height <= boxH - 2 * margin + 1e-9);
    const touchesWidth = Math.abs(layout.width - (boxW - 2 * margin)) < 1e-9;
    const touchesHeight = Math.abs(layout.height - (boxH - 2 * margin)) < 1e-9;
    assert.ok(touchesWidth || touchesHeight, "image is as large as fits");
    assert.ok(Math.abs(layout.offsetX * 2 + layout.width - boxW) < 1e-9, "centred horizontally");
    assert.ok(Math.abs(layout.offsetY * 2 + layout.height - boxH) < 1e-9, "centred vertically");
  }
});

test("letterbox of a box too small to draw in is null", () => {
  assert.equal(letterbox(10, 10, 100, 100, 5), null);
  assert.equal(letterbox(100, 100, 0, 100), null);
});

test("image pixels round-trip through box coordinates at several box sizes and zooms", () => {
  const imgW = 640;
  const imgH = 480;
  for (const [boxW, boxH] of [[300, 300], [512, 200], [1000, 900]]) {
    const layout = letterbox(boxW, boxH, imgW, imgH, 8);
    for (const zoom of [0.35, 1, 2.5]) {
      const rect = { left: 120, top: 45, width: boxW * zoom, height: boxH * zoom };
      for (const pixel of [[0, 0], [639, 479], [320, 17], [5, 400]]) {
        const box = imageToBox(pixel, layout);
        // The pointer on screen: the zoomed element's rect, offset by the rect's corner.
        const clientX = rect.left + box.x * zoom;
        const clientY = rect.top + box.y * zoom;
        const back = clientToBox(clientX, clientY, rect, boxW, boxH);
        assert.deepEqual(boxToImage(back.x, back.y, layout, imgW, imgH), pixel, `box ${boxW}x${boxH} zoom ${zoom}`);
        const screen = boxToClient(box.x, box.y, rect, boxW, boxH);
        assert.ok(Math.abs(screen.x - clientX) < 1e-9 && Math.abs(screen.y - clientY) < 1e-9);
      }
    }
  }
});

test("a click on the letterbox bars maps to no pixel, a drag there clamps to the border", () => {
  const layout = letterbox(400, 200, 100, 100, 0); // image drawn 200x200, bars 100 px wide left and right
  assert.equal(boxToImage(50, 100, layout, 100, 100), null);
  assert.equal(boxToImage(350, 100, layout, 100, 100), null);
  assert.deepEqual(boxToImage(50, 100, layout, 100, 100, true), [0, 50]);
  assert.deepEqual(boxToImage(390, -20, layout, 100, 100, true), [99, 0]);
  assert.deepEqual(boxToImage(100, 0, layout, 100, 100), [0, 0]);
});

test("rescalePoint aligns pixel centres like points.py and stays inside the image", () => {
  assert.deepEqual(rescalePoint([0, 0], 100, 100, 200, 200), [0.5, 0.5]);
  assert.deepEqual(rescalePoint([99, 49], 100, 50, 100, 50), [99, 49]);
  const [x, y] = rescalePoint([99, 99], 100, 100, 10, 10);
  assert.ok(x <= 9 && y <= 9);
});

test("hitTest finds the nearest point within the radius and nothing outside it", () => {
  const layout = letterbox(200, 200, 100, 100, 0); // 2 box px per image px
  const pairs = [{ handle: [10, 10], target: [50, 50] }];
  const handleBox = imageToBox([10, 10], layout);
  assert.deepEqual(hitTest(handleBox.x + 3, handleBox.y, pairs, null, layout, 6), { pair: 0, role: "handle" });
  const targetBox = imageToBox([50, 50], layout);
  assert.deepEqual(hitTest(targetBox.x, targetBox.y - 5, pairs, null, layout, 6), { pair: 0, role: "target" });
  assert.equal(hitTest(handleBox.x + 7, handleBox.y, pairs, null, layout, 6), null);
  const pendingBox = imageToBox([80, 20], layout);
  assert.deepEqual(hitTest(pendingBox.x, pendingBox.y, pairs, [80, 20], layout, 6), { pending: true });
});

// ------------------------------------------------------------------------------ editing + undo

function modelOn(width, height) {
  const model = new PointsEditorModel();
  model.load("");
  model.setImageSize(width, height);
  return model;
}

test("clicks alternate handle and target; only complete pairs are serialised", () => {
  const model = modelOn(64, 48);
  assert.ok(model.click([5, 6]));
  assert.deepEqual(model.pending, [5, 6]);
  assert.equal(model.pairCount, 0);
  assert.deepEqual(JSON.parse(model.toJson()).pairs, []);
  assert.ok(model.click([20, 30]));
  assert.equal(model.pending, null);
  assert.ok(model.click([1, 2]));
  const saved = JSON.parse(model.toJson());
  assert.deepEqual(saved, { version: 1, width: 64, height: 48, pairs: [{ handle: [5, 6], target: [20, 30] }] });
  assert.equal(model.pairCount, 1);
});

test("a target on its own handle is refused", () => {
  const model = modelOn(64, 48);
  model.click([5, 6]);
  assert.equal(model.click([5, 6]), false);
  assert.deepEqual(model.pending, [5, 6]);
});

test("nothing can be placed before the image size is known", () => {
  const model = new PointsEditorModel();
  model.load("");
  assert.equal(model.click([1, 1]), false);
  assert.equal(model.toJson(), "");
});

test("dragging moves one point, never onto its partner, and undoes as one step", () => {
  const model = modelOn(64, 48);
  model.click([5, 6]);
  model.click([20, 30]);
  const ref = { pair: 0, role: "target" };
  assert.ok(model.beginDrag(ref));
  assert.ok(model.dragTo(ref, [21, 30]));
  assert.ok(model.dragTo(ref, [40, 41]));
  assert.equal(model.dragTo(ref, [5, 6]), false, "target may not sit on its handle");
  assert.ok(model.endDrag());
  assert.deepEqual(model.pairs[0], { handle: [5, 6], target: [40, 41] });
  assert.ok(model.undo());
  assert.deepEqual(model.pairs[0], { handle: [5, 6], target: [20, 30] });
});

test("a drag that ends where it started leaves no undo step", () => {
  const model = modelOn(64, 48);
  model.click([5, 6]);
  model.click([20, 30]);
  const depth = model.undoStack.length;
  model.beginDrag({ pair: 0, role: "handle" });
  assert.equal(model.endDrag(), false);
  assert.equal(model.undoStack.length, depth);
});

test("remove, Delete, clear and undo restore earlier states", () => {
  const model = modelOn(100, 100);
  for (const p of [[1, 1], [2, 2], [10, 10], [20, 20], [30, 30], [40, 40]]) model.click(p);
  assert.equal(model.pairCount, 3);
  assert.ok(model.remove({ pair: 1, role: "target" }));
  assert.deepEqual(model.pairs.map((p) => p.handle), [[1, 1], [30, 30]]);
  assert.ok(model.undo());
  assert.deepEqual(model.pairs.map((p) => p.handle), [[1, 1], [10, 10], [30, 30]]);

  model.selected = 0;
  assert.ok(model.removeSelected());
  assert.deepEqual(model.pairs.map((p) => p.handle), [[10, 10], [30, 30]]);

  assert.ok(model.clear());
  assert.equal(model.pairCount, 0);
  assert.equal(model.clear(), false, "clearing an empty set is no action");
  assert.ok(model.undo());
  assert.equal(model.pairCount, 2);
  assert.ok(model.undo());
  assert.equal(model.pairCount, 3);
});

test("undo of a handle placement removes the pending handle; the Delete key removes it too", () => {
  const model = modelOn(100, 100);
  model.click([3, 4]);
  assert.ok(model.undo());
  assert.equal(model.pending, null);
  assert.equal(model.undo(), false);
  model.click([3, 4]);
  assert.ok(model.removeSelected());
  assert.equal(model.pending, null);
});

test("the undo history is bounded", () => {
  const model = modelOn(1000, 1000);
  for (let i = 0; i < LIMITS.maxUndo + 20; i++) model.click([i, i === 0 ? 1 : 0]);
  assert.equal(model.undoStack.length, LIMITS.maxUndo);
});

test("the pair count is capped", () => {
  const model = modelOn(1000, 1000);
  for (let i = 0; i < LIMITS.maxPairs; i++) {
    model.click([i, 0]);
    model.click([i, 1]);
  }
  assert.equal(model.pairCount, LIMITS.maxPairs);
  assert.equal(model.click([999, 999]), false);
});

test("points from an image of another size are shown rescaled and adopt the new size on the first edit", () => {
  const model = new PointsEditorModel();
  model.load(pointsJson(100, 50, [{ handle: [9, 9], target: [49, 19] }]));
  model.setImageSize(200, 100);
  assert.ok(model.sizeMismatch);
  const shown = model.displayPoints().pairs[0];
  assert.deepEqual(shown.handle, rescalePoint([9, 9], 100, 50, 200, 100));
  assert.deepEqual(JSON.parse(model.toJson()).width, 100, "nothing changes until the user edits");

  model.click([150, 80]);
  model.click([160, 90]);
  assert.equal(model.sizeMismatch, false);
  const saved = JSON.parse(model.toJson());
  assert.equal(saved.width, 200);
  assert.equal(saved.height, 100);
  assert.deepEqual(saved.pairs[0].handle, rescalePoint([9, 9], 100, 50, 200, 100));
  assert.deepEqual(saved.pairs[1], { handle: [150, 80], target: [160, 90] });
  assert.equal(validatePoints(saved).pairs.length, 2);

  model.undo();
  model.undo();
  assert.equal(JSON.parse(model.toJson()).width, 100, "undo returns to the original size");
});

// --------------------------------------------------------------------------------------- JSON

test("JSON round trip keeps image-pixel coordinates and size", () => {
  const text = pointsJson(512, 384, [
    { handle: [10, 20], target: [30.5, 40.25] },
    { handle: [511, 383], target: [0, 0] },
  ]);
  const { points, error } = parsePointsJson(text);
  assert.equal(error, null);
  assert.equal(serializePoints(points), text);

  const model = new PointsEditorModel();
  model.load(text);
  assert.equal(model.toJson(), text);
  assert.equal(model.pairCount, 2);
});

test("empty text is an empty point set without error; an empty pair list is valid", () => {
  assert.deepEqual(parsePointsJson(""), { points: null, error: null });
  assert.deepEqual(parsePointsJson("  \n"), { points: null, error: null });
  const { points, error } = parsePointsJson(pointsJson(8, 8, []));
  assert.equal(error, null);
  assert.equal(points.pairs.length, 0);
});

test("parsed points are fresh frozen objects without unknown keys", () => {
  const { points } = parsePointsJson(
    JSON.stringify({ version: 1, width: 4, height: 4, extra: "x", pairs: [{ handle: [0, 0], target: [1, 1], note: 1 }] }),
  );
  assert.deepEqual(Object.keys(points).sort(), ["height", "pairs", "width"]);
  assert.deepEqual(Object.keys(points.pairs[0]).sort(), ["handle", "target"]);
  assert.ok(Object.isFrozen(points.pairs[0].handle));
});

const rejected = {
  "not JSON": "{version: 1",
  "a JSON number": "42",
  "a JSON array": "[1, 2]",
  "null": "null",
  "wrong version": pointsJson(4, 4, []).replace('"version":1', '"version":2'),
  "version as string": pointsJson(4, 4, []).replace('"version":1', '"version":"1"'),
  "float width": JSON.stringify({ version: 1, width: 4.5, height: 4, pairs: [] }),
  "zero height": JSON.stringify({ version: 1, width: 4, height: 0, pairs: [] }),
  "string width": JSON.stringify({ version: 1, width: "4", height: 4, pairs: [] }),
  "boolean width": JSON.stringify({ version: 1, width: true, height: 4, pairs: [] }),
  "huge width": JSON.stringify({ version: 1, width: LIMITS.maxSide + 1, height: 4, pairs: [] }),
  "pairs not a list": JSON.stringify({ version: 1, width: 4, height: 4, pairs: {} }),
  "pair not an object": pointsJson(4, 4, [[0, 0, 1, 1]]),
  "missing target": pointsJson(4, 4, [{ handle: [0, 0] }]),
  "three coordinates": pointsJson(4, 4, [{ handle: [0, 0, 0], target: [1, 1] }]),
  "string coordinate": pointsJson(4, 4, [{ handle: ["0", 0], target: [1, 1] }]),
  "boolean coordinate": pointsJson(4, 4, [{ handle: [true, 0], target: [1, 1] }]),
  "null coordinate": pointsJson(4, 4, [{ handle: [null, 0], target: [1, 1] }]),
  "Infinity from overflow": '{"version":1,"width":4,"height":4,"pairs":[{"handle":[1e400,0],"target":[1,1]}]}',
  "NaN literal": '{"version":1,"width":4,"height":4,"pairs":[{"handle":[NaN,0],"target":[1,1]}]}',
  "negative coordinate": pointsJson(4, 4, [{ handle: [-1, 0], target: [1, 1] }]),
  "coordinate past the last pixel": pointsJson(4, 4, [{ handle: [3.5, 0], target: [1, 1] }]),
  "handle equals target": pointsJson(4, 4, [{ handle: [1, 1], target: [1, 1] }]),
  "too many pairs": pointsJson(
    4,
    4,
    Array.from({ length: LIMITS.maxPairs + 1 }, () => ({ handle: [0, 0], target: [1, 1] })),
  ),
  "too long": pointsJson(4, 4, []) + " ".repeat(LIMITS.maxTextLength),
  "__proto__ key": '{"version":1,"width":4,"height":4,"pairs":[],"__proto__":{"polluted":true}}',
  "nested __proto__ key": '{"version":1,"width":4,"height":4,"pairs":[{"handle":[0,0],"target":[1,1],"__proto__":{"x":1}}]}',
  "constructor key": '{"version":1,"width":4,"height":4,"pairs":[],"constructor":{"prototype":{"polluted":true}}}',
  "deep nesting": '{"version":1,"width":4,"height":4,"pairs":[],"x":' + "[".repeat(5000) + "]".repeat(5000) + "}",
};

for (const [name, text] of Object.entries(rejected)) {
  test(`rejects malformed or hostile JSON: ${name}`, () => {
    const { points, error } = parsePointsJson(text);
    assert.equal(points, null);
    assert.equal(typeof error, "string");
    assert.ok(error.length > 0 && error.length < 300, "a short message");
    assert.equal({}.polluted, undefined, "Object.prototype untouched");
  });
}

test("rejects values that are not text", () => {
  for (const value of [null, undefined, 5, { version: 1 }, ["x"], true]) {
    const { points, error } = parsePointsJson(value);
    assert.equal(points, null);
    assert.match(error, /must be JSON text/);
  }
});

test("a malformed stored value loads as an empty set with an error, and the first edit clears it", () => {
  const model = new PointsEditorModel();
  model.setImageSize(32, 32);
  model.load('{"version":1,"width":32,"height":32,"pairs":[{"handle":[1,1],"target":[99,1]}]}');
  assert.match(model.error, /outside the 32x32 image/);
  assert.equal(model.pairCount, 0);
  assert.equal(JSON.parse(model.toJson()).pairs.length, 0);
  model.click([1, 1]);
  assert.equal(model.error, null);
});

test("nesting is checked outside strings only", () => {
  const text = JSON.stringify({ version: 1, width: 4, height: 4, pairs: [], note: "[[[[[[[[[[\\\"[[[[" });
  assert.equal(parsePointsJson(text).error, null);
  const deep = JSON.stringify({ version: 1, width: 4, height: 4, pairs: [], x: [[[[[[1]]]]]] });
  assert.match(parsePointsJson(deep).error, /nested too deeply/);
});

test("reads the text points.py writes (DragPoints.to_json)", () => {
  const fromPython =
    '{"version": 1, "width": 512, "height": 384, "pairs": [{"handle": [3.0, 4.5], "target": [20.0, 30.0]}, ' +
    '{"handle": [0.0, 0.0], "target": [511.0, 383.0]}]}';
  const { points, error } = parsePointsJson(fromPython);
  assert.equal(error, null);
  assert.deepEqual(points.pairs[0], { handle: [3, 4.5], target: [20, 30] });
  assert.equal(JSON.parse(serializePoints(points)).pairs[1].target[0], 511);
});

test("without an image on display nothing can be placed, and stored points keep their size", () => {
  const model = new PointsEditorModel();
  model.load(pointsJson(50, 40, [{ handle: [1, 1], target: [2, 2] }]));
  model.setImageSize(80, 60);
  model.forgetImageSize();
  assert.equal(model.sizeMismatch, false);
  assert.equal(model.click([3, 3]), false);
  assert.equal(model.beginDrag({ pair: 0, role: "handle" }), false);
  assert.equal(JSON.parse(model.toJson()).width, 50);
});

test("editing on a smaller image drops only the pairs whose points fall together, and says so", () => {
  const model = new PointsEditorModel();
  model.load(
    pointsJson(640, 480, [
      { handle: [0, 0], target: [1, 0] }, // one pixel apart: both land on pixel (0, 0) of a 64x48 image
      { handle: [100, 100], target: [300, 200] },
    ]),
  );
  model.setImageSize(64, 48);
  assert.equal(model.click([30, 30]), true);
  assert.equal(model.pairCount, 1, "the colliding pair alone is dropped");
  assert.match(model.notice, /pair 1 was removed/);
  const stored = model.toJson();
  const { points, error } = parsePointsJson(stored);
  assert.equal(error, null, "what is stored loads again");
  assert.equal(points.pairs.length, 1);
  assert.deepEqual(points.pairs[0].handle, rescalePoint([100, 100], 640, 480, 64, 48));

  model.click([40, 30]);
  assert.equal(model.notice, null, "the message goes with the next edit");
  model.undo();
  model.undo();
  assert.equal(model.pairCount, 2, "undo brings the dropped pair back on its own image");
  assert.equal(JSON.parse(model.toJson()).width, 640);
});

test("the issue's repro keeps a loadable point set", () => {
  const model = new PointsEditorModel();
  model.load(pointsJson(640, 480, [{ handle: [0, 0], target: [1, 0] }]));
  model.setImageSize(64, 48);
  model.click([30, 30]);
  const reloaded = new PointsEditorModel();
  assert.equal(reloaded.load(model.toJson()), null);
  assert.equal(reloaded.width, 64);
});

test("dragging after the set moves onto a smaller image follows the dragged pair's new index", () => {
  const model = new PointsEditorModel();
  model.load(
    pointsJson(640, 480, [
      { handle: [0, 0], target: [1, 0] },
      { handle: [100, 100], target: [300, 200] },
    ]),
  );
  model.setImageSize(64, 48);
  assert.equal(model.beginDrag({ pair: 0, role: "handle" }), false, "a pair that falls together cannot be dragged");
  const ref = model.beginDrag({ pair: 1, role: "target" });
  assert.deepEqual(ref, { pair: 0, role: "target" });
  assert.equal(model.dragTo(ref, [50, 40]), true);
  model.endDrag();
  assert.deepEqual(JSON.parse(model.toJson()).pairs, [
    { handle: rescalePoint([100, 100], 640, 480, 64, 48), target: [50, 40] },
  ]);
  assert.match(model.notice, /pair 1 was removed/);
  model.undo();
  assert.equal(model.pairCount, 2);
});
