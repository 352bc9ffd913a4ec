// Pure logic of the Drag Points widget: the point set, its JSON form, the canvas <-> image mapping
// (letterbox and canvas zoom), hit testing and undo. No DOM here, so `node --test` can check all of it.
//
// The JSON form is the one adaptivedrag_core/points.py parses:
//   {"version": 1, "width": W, "height": H, "pairs": [{"handle": [x, y], "target": [x, y]}, ...]}
// Coordinates are image pixels, (x, y), x to the right, y down; a pixel's index names its centre.

export const JSON_VERSION = 1;

/** Bounds that keep a hostile workflow from making the widget do unbounded work. */
export const LIMITS = Object.freeze({
  maxTextLength: 100_000,
  maxPairs: 256,
  maxSide: 65_536,
  maxUndo: 100,
  maxDepth: 6, // the valid form nests 4 deep: object > pairs > pair > [x, y]
});

// Keys that could reach an object's prototype if a later change ever merged parsed data into an object.
const FORBIDDEN_KEYS = new Set(["__proto__", "constructor", "prototype"]);

/** A point set that cannot be used; the message names the problem (like PointsError in points.py). */
export class PointsError extends Error {
  constructor(message) {
    super(message);
    this.name = "PointsError";
  }
}

// ------------------------------------------------------------------------------------------ JSON

/**
 * Parse the text stored in the node's `points_json` widget.
 *
 * Args:
 *   text: the widget value; any type may arrive from a workflow file.
 * Returns:
 *   `{points, error}`: `points` is a validated point set `{width, height, pairs}` or null when the text is
 *   empty or invalid; `error` is null or a message naming what is wrong. Never throws.
 */
export function parsePointsJson(text) {
  if (typeof text !== "string") {
    return { points: null, error: `drag points must be JSON text, got ${describeType(text)}` };
  }
  if (text.trim() === "") return { points: null, error: null };
  if (text.length > LIMITS.maxTextLength) {
    return { points: null, error: `drag points JSON is too long (${text.length} characters)` };
  }
  if (nestingDepth(text) > LIMITS.maxDepth) {
    return { points: null, error: "drag points JSON is nested too deeply" };
  }
  try {
    return { points: validatePoints(JSON.parse(text, rejectForbiddenKeys)), error: null };
  } catch (err) {
    const message = err instanceof PointsError ? err.message : `drag points are not valid JSON: ${err.message}`;
    return { points: null, error: message };
  }
}

// Deepest bracket nesting outside strings; checked before parsing so the parse itself stays shallow.
function nestingDepth(text) {
  let depth = 0;
  let deepest = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (c === "\\") i++;
      else if (c === '"') inString = false;
    } else if (c === '"') {
      inString = true;
    } else if (c === "[" || c === "{") {
      deepest = Math.max(deepest, ++depth);
    } else if (c === "]" || c === "}") {
      depth--;
    }
  }
  return deepest;
}

function rejectForbiddenKeys(key, value) {
  if (FORBIDDEN_KEYS.has(key)) throw new PointsError(`drag points JSON may not contain the key "${key}"`);
  return value;
}

/**
 * Check parsed JSON data and return a fresh point set built only from the validated fields.
 *
 * Args:
 *   data: the value JSON.parse returned.
 * Returns:
 *   `{width, height, pairs: [{handle: [x, y], target: [x, y]}]}` (frozen).
 * Throws:
 *   PointsError naming the problem. An empty `pairs` list is valid here: it is the widget's empty state
 *   (the Python node reports "no drag pairs" when run with it).
 */
export function validatePoints(data) {
  if (!isPlainObject(data)) {
    throw new PointsError("drag points JSON must be an object with version, width, height and pairs");
  }
  if (data.version !== JSON_VERSION) {
    throw new PointsError(`unsupported drag points version ${shortRepr(data.version)} (expected ${JSON_VERSION})`);
  }
  const { width, height, pairs } = data;
  if (!isImageSide(width) || !isImageSide(height)) {
    throw new PointsError("drag points JSON needs integer width and height of the image they were placed on");
  }
  if (!Array.isArray(pairs)) throw new PointsError("drag points JSON needs a list of pairs");
  if (pairs.length > LIMITS.maxPairs) {
    throw new PointsError(`too many drag pairs: ${pairs.length} (at most ${LIMITS.maxPairs})`);
  }
  const checked = pairs.map((pair, index) => {
    const where = `pair ${index + 1}`;
    if (!isPlainObject(pair)) throw new PointsError(`${where} must be an object with handle and target`);
    const handle = checkPoint(pair.handle, `${where} handle`, width, height);
    const target = checkPoint(pair.target, `${where} target`, width, height);
    if (samePoint(handle, target)) {
      throw new PointsError(`${where}: handle and target are the same point (${handle[0]}, ${handle[1]})`);
    }
    return makePair(handle, target);
  });
  return makePointSet(width, height, checked);
}

function checkPoint(value, where, width, height) {
  if (!Array.isArray(value) || value.length !== 2 || !value.every((v) => typeof v === "number")) {
    throw new PointsError(`${where} must be [x, y] numbers, got ${shortRepr(value)}`);
  }
  const [x, y] = value;
  if (!Number.isFinite(x) || !Number.isFinite(y)) {
    throw new PointsError(`${where} (${x}, ${y}) is not a finite number`);
  }
  if (x < 0 || x > width - 1 || y < 0 || y > height - 1) {
    throw new PointsError(`${where} (${x}, ${y}) is outside the ${width}x${height} image`);
  }
  return Object.freeze([x, y]);
}

/**
 * The JSON text for a point set, in the form points.py parses. Empty text when there is no point set.
 *
 * Args:
 *   points: `{width, height, pairs}` or null.
 */
export function serializePoints(points) {
  if (!points) return "";
  return JSON.stringify({
    version: JSON_VERSION,
    width: points.width,
    height: points.height,
    pairs: points.pairs.map((pair) => ({ handle: [...pair.handle], target: [...pair.target] })),
  });
}

function makePointSet(width, height, pairs) {
  return Object.freeze({ width, height, pairs: Object.freeze([...pairs]) });
}

function makePair(handle, target) {
  return Object.freeze({ handle: Object.freeze([...handle]), target: Object.freeze([...target]) });
}

function isPlainObject(value) {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function isImageSide(value) {
  return Number.isInteger(value) && value > 0 && value <= LIMITS.maxSide;
}

function describeType(value) {
  if (value === null) return "null";
  return Array.isArray(value) ? "an array" : typeof value;
}

function shortRepr(value) {
  let text;
  try {
    text = JSON.stringify(value);
  } catch {
    text = undefined;
  }
  text = text === undefined ? String(value) : text;
  return text.length > 40 ? `${text.slice(0, 40)}...` : text;
}

function samePoint(a, b) {
  return a[0] === b[0] && a[1] === b[1];
}

// ------------------------------------------------------------------------------------- mapping

/**
 * Where an image of `imageWidth` x `imageHeight` is drawn inside a box, keeping its aspect ratio.
 *
 * Args:
 *   boxWidth, boxHeight: size of the drawing area in CSS pixels (unzoomed).
 *   imageWidth, imageHeight: image size in pixels.
 *   margin: space kept free on every side, so points on the border stay clickable.
 * Returns:
 *   `{scale, offsetX, offsetY, width, height}` (box pixels per image pixel, top-left corner of the image,
 *   drawn size), or null when nothing can be drawn.
 */
export function letterbox(boxWidth, boxHeight, imageWidth, imageHeight, margin = 0) {
  const freeWidth = boxWidth - 2 * margin;
  const freeHeight = boxHeight - 2 * margin;
  if (!(freeWidth > 0 && freeHeight > 0 && imageWidth > 0 && imageHeight > 0)) return null;
  const scale = Math.min(freeWidth / imageWidth, freeHeight / imageHeight);
  const width = imageWidth * scale;
  const height = imageHeight * scale;
  return { scale, offsetX: (boxWidth - width) / 2, offsetY: (boxHeight - height) / 2, width, height };
}

/**
 * A pointer position in box (CSS, unzoomed) pixels. The canvas zoom scales the element on screen, which
 * its bounding rectangle shows, so dividing by the rectangle's size undoes any zoom.
 *
 * Args:
 *   clientX, clientY: the event's client coordinates.
 *   rect: the element's `getBoundingClientRect()` (`left`, `top`, `width`, `height`).
 *   boxWidth, boxHeight: the element's own (unzoomed) size.
 */
export function clientToBox(clientX, clientY, rect, boxWidth, boxHeight) {
  return {
    x: ((clientX - rect.left) * boxWidth) / rect.width,
    y: ((clientY - rect.top) * boxHeight) / rect.height,
  };
}

/** Inverse of `clientToBox`: where a box position is on screen. */
export function boxToClient(x, y, rect, boxWidth, boxHeight) {
  return {
    x: rect.left + (x * rect.width) / boxWidth,
    y: rect.top + (y * rect.height) / boxHeight,
  };
}

/**
 * The image pixel under a box position.
 *
 * Args:
 *   x, y: box position (see `clientToBox`).
 *   layout: from `letterbox`, for an image of `imageWidth` x `imageHeight`.
 *   clamp: when true, positions outside the image snap to its nearest pixel (used while dragging);
 *     when false they return null (a click on the letterbox bars places nothing).
 * Returns:
 *   `[x, y]` integer pixel indices or null.
 */
export function boxToImage(x, y, layout, imageWidth, imageHeight, clamp = false) {
  const u = (x - layout.offsetX) / layout.scale;
  const v = (y - layout.offsetY) / layout.scale;
  const inside = u >= 0 && u < imageWidth && v >= 0 && v < imageHeight;
  if (!inside && !clamp) return null;
  return [clampIndex(Math.floor(u), imageWidth), clampIndex(Math.floor(v), imageHeight)];
}

/** The box position of an image pixel's centre; inverse of `boxToImage` for integer pixels. */
export function imageToBox(point, layout) {
  return {
    x: layout.offsetX + (point[0] + 0.5) * layout.scale,
    y: layout.offsetY + (point[1] + 0.5) * layout.scale,
  };
}

/**
 * A point placed on an image of one size, on an image of another size. Pixel centres are aligned,
 * the same formula as `_map_point` in points.py, so the widget and the node's rescale agree.
 */
export function rescalePoint(point, srcWidth, srcHeight, dstWidth, dstHeight) {
  const x = ((point[0] + 0.5) * dstWidth) / srcWidth - 0.5;
  const y = ((point[1] + 0.5) * dstHeight) / srcHeight - 0.5;
  return [Math.min(Math.max(x, 0), dstWidth - 1), Math.min(Math.max(y, 0), dstHeight - 1)];
}

function clampIndex(value, size) {
  return Math.min(Math.max(value, 0), size - 1);
}

// --------------------------------------------------------------------------------- hit testing

/**
 * The point nearest to a box position, within `radius` box pixels.
 *
 * Args:
 *   x, y: box position.
 *   pairs: pairs in image pixels of the drawn image.
 *   pending: a handle still waiting for its target, or null.
 *   layout: from `letterbox`.
 *   radius: hit radius in box pixels.
 * Returns:
 *   `{pair, role}` with `role` "handle" or "target", `{pending: true}`, or null. Later points win ties,
 *   since they are drawn on top.
 */
export function hitTest(x, y, pairs, pending, layout, radius) {
  let best = null;
  let bestDistance = radius * radius;
  const consider = (point, ref) => {
    const p = imageToBox(point, layout);
    const distance = (p.x - x) ** 2 + (p.y - y) ** 2;
    if (distance <= bestDistance) {
      best = ref;
      bestDistance = distance;
    }
  };
  pairs.forEach((pair, index) => {
    consider(pair.handle, { pair: index, role: "handle" });
    consider(pair.target, { pair: index, role: "target" });
  });
  if (pending) consider(pending, { pending: true });
  return best;
}

// ------------------------------------------------------------------------------------ the editor

/**
 * The widget's state: a point set in image pixels, a handle waiting for its target, the selected pair
 * and an undo stack. Positions passed in are pixels of the image on display (`setImageSize`).
 *
 * When the stored points were placed on an image of another size, they are shown rescaled and
 * `sizeMismatch` says so; the first edit moves the whole set onto the displayed image. A pair whose handle
 * and target land on the same pixel there is dropped alone, and `notice` says which (until the next edit).
 */
export class PointsEditorModel {
  constructor() {
    this.width = null; // size of the image the points belong to
    this.height = null;
    this.pairs = [];
    this.pending = null;
    this.selected = -1;
    this.imageWidth = null; // size of the image on display
    this.imageHeight = null;
    this.error = null;
    this.notice = null;
    this.undoStack = [];
    this.dragStart = null;
  }

  /**
   * Replace the state with the point set stored in `text`. Invalid text gives an empty set and `error`.
   * Clears the undo history. Returns the error message or null.
   */
  load(text) {
    const { points, error } = parsePointsJson(text);
    this.error = error;
    this.notice = null;
    this.width = points ? points.width : this.imageWidth;
    this.height = points ? points.height : this.imageHeight;
    this.pairs = points ? [...points.pairs] : [];
    this.pending = null;
    this.selected = -1;
    this.undoStack = [];
    this.dragStart = null;
    return error;
  }

  /** The JSON text to store, or "" while there is neither a pair nor a known image size. */
  toJson() {
    if (this.width === null || this.height === null) return "";
    return serializePoints(makePointSet(this.width, this.height, this.pairs));
  }

  /** Tell the model the size of the image on display. An empty set simply takes that size. */
  setImageSize(width, height) {
    if (!isImageSide(width) || !isImageSide(height)) return;
    this.imageWidth = width;
    this.imageHeight = height;
    if (this.pairs.length === 0 && this.pending === null) {
      this.width = width;
      this.height = height;
    }
  }

  /** No image is on display (none connected, or it failed to load): nothing can be placed. */
  forgetImageSize() {
    this.imageWidth = null;
    this.imageHeight = null;
  }

  get pairCount() {
    return this.pairs.length;
  }

  /** True when the stored points were placed on an image of another size than the one on display. */
  get sizeMismatch() {
    return (
      this.imageWidth !== null &&
      this.width !== null &&
      (this.width !== this.imageWidth || this.height !== this.imageHeight)
    );
  }

  /** Pairs and pending handle in pixels of the image on display (rescaled when the sizes differ). */
  displayPoints() {
    if (!this.sizeMismatch) return { pairs: this.pairs, pending: this.pending };
    const toDisplay = (p) => rescalePoint(p, this.width, this.height, this.imageWidth, this.imageHeight);
    return {
      pairs: this.pairs.map((pair) => makePair(toDisplay(pair.handle), toDisplay(pair.target))),
      pending: this.pending && toDisplay(this.pending),
    };
  }

  /**
   * A click on an empty spot at image pixel `point`: places a handle, or the target of the pending handle.
   * Returns false when nothing changed (no image, pair limit, target on its own handle).
   */
  click(point) {
    if (!this.canEdit()) return false;
    if (this.pending === null && this.pairs.length >= LIMITS.maxPairs) return false;
    const pending = this.displayPoints().pending;
    if (pending && samePoint(pending, point)) return false;
    this.remember();
    this.adoptDisplayedSize();
    if (this.pending === null) {
      this.pending = Object.freeze([...point]);
    } else {
      this.pairs = [...this.pairs, makePair(this.pending, point)];
      this.pending = null;
      this.selected = this.pairs.length - 1;
    }
    return true;
  }

  /**
   * Start dragging the point `ref` (from `hitTest`); the whole drag is one undo step.
   * Returns the reference to pass to `dragTo`: `ref` itself, or its pair's new index once the set has moved
   * onto the displayed image and dropped pairs before it. False when nothing can be dragged (no image, an
   * unknown point, or a pair whose points fall together on the displayed image).
   */
  beginDrag(ref) {
    if (!this.canEdit() || !this.isValidRef(ref)) return false;
    let moved = ref;
    if (!ref.pending) {
      const dropped = this.collidingPairs();
      if (dropped.has(ref.pair)) return false;
      moved = { ...ref, pair: ref.pair - [...dropped].filter((index) => index < ref.pair).length };
    }
    this.dragStart = this.snapshot();
    this.notice = null;
    this.adoptDisplayedSize();
    if (!moved.pending) this.selected = moved.pair;
    return moved;
  }

  /** Move the dragged point to image pixel `point`. A point may not land on its partner. */
  dragTo(ref, point) {
    if (this.dragStart === null || !this.isValidRef(ref)) return false;
    const moved = Object.freeze([...point]);
    if (ref.pending) {
      this.pending = moved;
      return true;
    }
    const pair = this.pairs[ref.pair];
    const partner = ref.role === "handle" ? pair.target : pair.handle;
    if (samePoint(partner, moved)) return false;
    const updated = ref.role === "handle" ? makePair(moved, pair.target) : makePair(pair.handle, moved);
    this.pairs = this.pairs.map((p, i) => (i === ref.pair ? updated : p));
    return true;
  }

  /** Finish a drag; records an undo step only if something moved. */
  endDrag() {
    if (this.dragStart === null) return false;
    const start = this.dragStart;
    this.dragStart = null;
    const changed = JSON.stringify(start) !== JSON.stringify(this.snapshot());
    if (changed) this.pushUndo(start);
    return changed;
  }

  /** Remove pair `index`, or the pending handle when `ref.pending`. */
  remove(ref) {
    if (!this.isValidRef(ref)) return false;
    this.remember();
    if (ref.pending) {
      this.pending = null;
    } else {
      this.pairs = this.pairs.filter((_, i) => i !== ref.pair);
      this.selected = -1;
    }
    return true;
  }

  /** Remove the selected pair, or else the pending handle (the Delete key). */
  removeSelected() {
    if (this.selected >= 0) return this.remove({ pair: this.selected, role: "handle" });
    if (this.pending !== null) return this.remove({ pending: true });
    return false;
  }

  /** Remove every pair and the pending handle. */
  clear() {
    if (this.pairs.length === 0 && this.pending === null) return false;
    this.remember();
    this.pairs = [];
    this.pending = null;
    this.selected = -1;
    if (this.imageWidth !== null) {
      this.width = this.imageWidth;
      this.height = this.imageHeight;
    }
    return true;
  }

  /** Undo the last action. Returns false when there is nothing to undo. */
  undo() {
    const previous = this.undoStack.pop();
    if (!previous) return false;
    this.restore(previous);
    this.notice = null;
    return true;
  }

  get canUndo() {
    return this.undoStack.length > 0;
  }

  // ---------------------------------------------------------------------------- internals
  canEdit() {
    return this.imageWidth !== null && this.imageHeight !== null;
  }

  isValidRef(ref) {
    if (!ref) return false;
    if (ref.pending) return this.pending !== null;
    return Number.isInteger(ref.pair) && ref.pair >= 0 && ref.pair < this.pairs.length;
  }

  // Editing on a displayed image of another size moves the set onto that image, so what is stored
  // matches what the user sees. A pair that would become handle == target there (points.py rejects the
  // whole set for one such pair) is dropped, and only that pair.
  adoptDisplayedSize() {
    if (!this.sizeMismatch) return;
    const { pairs, pending } = this.displayPoints();
    const dropped = this.collidingPairs();
    this.pairs = pairs.filter((_, index) => !dropped.has(index));
    if (dropped.size > 0) {
      const numbers = [...dropped].map((index) => index + 1).join(", ");
      const several = dropped.size > 1;
      this.notice =
        `pair${several ? "s" : ""} ${numbers} ${several ? "were" : "was"} removed: handle and target fall on ` +
        `the same pixel of this ${this.imageWidth}x${this.imageHeight} image`;
      this.selected = -1;
    }
    this.pending = pending && Object.freeze(pending);
    this.width = this.imageWidth;
    this.height = this.imageHeight;
  }

  // Indices of the pairs whose handle and target land on the same pixel of the displayed image.
  collidingPairs() {
    if (!this.sizeMismatch) return new Set();
    const colliding = this.displayPoints().pairs.map((pair, index) => (samePoint(pair.handle, pair.target) ? index : -1));
    return new Set(colliding.filter((index) => index >= 0));
  }

  snapshot() {
    return { width: this.width, height: this.height, pairs: this.pairs, pending: this.pending, selected: this.selected };
  }

  restore(state) {
    this.width = state.width;
    this.height = state.height;
    this.pairs = state.pairs;
    this.pending = state.pending;
    this.selected = Math.min(state.selected, state.pairs.length - 1);
  }

  // Every edit starts here; an edit replaces whatever malformed text was loaded, so its error goes,
  // and the notice of an earlier edit with it.
  remember() {
    this.pushUndo(this.snapshot());
    this.error = null;
    this.notice = null;
  }

  pushUndo(state) {
    this.undoStack.push(state);
    if (this.undoStack.length > LIMITS.maxUndo) this.undoStack.shift();
  }
}
