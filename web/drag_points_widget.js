// The point-picker canvas of the "Drag Points (AdaptiveDrag)" node: drawing and events only.
// All state and arithmetic live in points_model.js; this file turns pointer and key events into model calls,
// draws the model, and stores its JSON in the node's hidden `points_json` STRING widget, so saved workflows
// (widgets_values) and API prompts carry the points.
import { app } from "../../scripts/app.js";
import { chain } from "./chain.js";
import { api } from "../../scripts/api.js";

import {
  PointsEditorModel,
  boxToClient,
  boxToImage,
  clientToBox,
  hitTest,
  imageToBox,
  letterbox,
} from "./points_model.js";

const NODE_ID = "AdaptiveDrag_DragPoints";
const JSON_WIDGET = "points_json";
const RESCALE_WIDGET = "rescale";
const IMAGE_INPUT = "image";
const UI_IMAGE_KEY = "adaptivedrag_image";
const VIEW_TYPES = new Set(["input", "output", "temp"]);

const STYLE = {
  background: "#1b1b1b",
  handle: "#e53935",
  target: "#1e88e5",
  arrow: "#ffffff",
  outline: "#000000",
  selected: "#ffd600",
  text: "#dddddd",
  error: "#ff6b6b",
  warning: "#ffb74d",
};
const POINT_RADIUS = 5; // CSS pixels, independent of image size and zoom
const HIT_RADIUS = 9;
const MARGIN = 8;
const MIN_CANVAS_HEIGHT = 160;
const DEFAULT_NODE_SIZE = [360, 440];

app.registerExtension({
  name: "AdaptiveDrag.DragPoints",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_ID) return;
    chain(nodeType.prototype, "onNodeCreated", function () {
      this.adaptiveDragWidget = new DragPointsWidget(this);
    });
    chain(nodeType.prototype, "onConfigure", function () {
      this.adaptiveDragWidget?.loadFromWidget();
    });
    chain(nodeType.prototype, "onExecuted", function (output) {
      this.adaptiveDragWidget?.showExecutedImage(output);
    });
    chain(nodeType.prototype, "onRemoved", function () {
      this.adaptiveDragWidget?.destroy();
    });
  },
});


class DragPointsWidget {
  constructor(node) {
    this.node = node;
    this.model = new PointsEditorModel();
    this.jsonWidget = node.widgets?.find((w) => w.name === JSON_WIDGET);
    this.image = null; // a loaded HTMLImageElement, or null
    this.imageUrl = null;
    this.upstreamUrl = null; // URL of the upstream Load Image file when the last run happened
    this.executedUrl = null;
    this.dragRef = null;
    this.lastWritten = null;
    this.renderedKey = null;

    this.watchJsonWidget();
    this.buildDom();
    this.showJsonText(false);
    this.domWidget = node.addDOMWidget("drag_points_canvas", "adaptivedrag_canvas", this.root, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => MIN_CANVAS_HEIGHT,
      onDraw: () => this.onFrame(),
    });
    this.domWidget.serialize = false;
    if (node.size[0] < DEFAULT_NODE_SIZE[0] || node.size[1] < DEFAULT_NODE_SIZE[1]) {
      node.setSize([Math.max(node.size[0], DEFAULT_NODE_SIZE[0]), Math.max(node.size[1], DEFAULT_NODE_SIZE[1])]);
    }
    this.resizeObserver = new ResizeObserver(() => this.render());
    this.resizeObserver.observe(this.canvas);
    this.loadFromWidget();
  }

  // ------------------------------------------------------------------------------ setup
  // Anything that sets the JSON widget's value (workflow load, graph undo, typing, scripts) reloads the points.
  watchJsonWidget() {
    if (!this.jsonWidget) return;
    const widget = this.jsonWidget;
    const originalCallback = widget.callback;
    widget.callback = (value, ...rest) => {
      originalCallback?.call(widget, value, ...rest);
      if (value !== this.lastWritten) this.loadFromWidget();
    };
  }

  // The JSON text is hidden behind the canvas; the JSON button shows it for pasting or copying points.
  showJsonText(visible) {
    const widget = this.jsonWidget;
    if (!widget) return;
    widget.hidden = !visible; // hidden widgets are neither drawn nor given a DOM element
    if (visible) delete widget.computeSize;
    else widget.computeSize = () => [0, -4]; // and take no height in the node layout
    this.jsonButton?.setAttribute("aria-pressed", String(visible));
    this.node.setDirtyCanvas?.(true, true);
  }

  buildDom() {
    this.root = document.createElement("div");
    Object.assign(this.root.style, {
      display: "flex",
      flexDirection: "column",
      gap: "4px",
      boxSizing: "border-box",
      overflow: "hidden",
    });

    this.canvas = document.createElement("canvas");
    this.canvas.tabIndex = 0; // focusable, so Delete reaches it
    this.canvas.className = "adaptivedrag-points-canvas";
    Object.assign(this.canvas.style, {
      flex: "1 1 auto",
      minHeight: "0",
      width: "100%",
      outline: "none",
      borderRadius: "4px",
      cursor: "crosshair",
    });
    this.ctx = this.canvas.getContext("2d");

    const bar = document.createElement("div");
    Object.assign(bar.style, { display: "flex", alignItems: "center", gap: "6px", font: "12px sans-serif" });
    this.undoButton = makeButton("Undo", "Undo the last change to the points", () => this.apply(() => this.model.undo()));
    this.clearButton = makeButton("Clear", "Remove every pair", () => this.apply(() => this.model.clear()));
    this.jsonButton = makeButton("JSON", "Show or hide the points as JSON text", () =>
      this.showJsonText(this.jsonWidget?.hidden === true),
    );
    this.status = document.createElement("span");
    Object.assign(this.status.style, {
      color: STYLE.text,
      overflow: "hidden",
      textOverflow: "ellipsis",
      whiteSpace: "nowrap",
      flex: "1 1 auto",
    });
    bar.append(this.undoButton, this.clearButton, this.jsonButton, this.status);
    this.root.append(this.canvas, bar);

    this.canvas.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    this.canvas.addEventListener("pointermove", (e) => this.onPointerMove(e));
    this.canvas.addEventListener("pointerup", (e) => this.onPointerUp(e));
    this.canvas.addEventListener("pointercancel", (e) => this.onPointerUp(e));
    this.canvas.addEventListener("contextmenu", (e) => {
      e.preventDefault();
      e.stopPropagation();
    });
    this.canvas.addEventListener("keydown", (e) => this.onKeyDown(e));
    // The wheel zooms the graph, as it does everywhere else on the canvas.
    this.canvas.addEventListener("wheel", (e) => {
      e.preventDefault();
      app.canvas?.processMouseWheel?.(e);
    });
  }

  destroy() {
    this.resizeObserver?.disconnect();
  }

  // ------------------------------------------------------------------------------ state <-> widget
  loadFromWidget() {
    this.model.load(this.jsonWidget ? this.jsonWidget.value : "");
    if (this.image) this.model.setImageSize(this.image.naturalWidth, this.image.naturalHeight);
    this.render();
  }

  writeToWidget() {
    if (!this.jsonWidget || this.model.error) return; // leave malformed text as it is until the user edits
    const text = this.model.toJson();
    if (text === this.jsonWidget.value) return;
    this.lastWritten = text;
    this.jsonWidget.value = text;
    this.node.setDirtyCanvas?.(true, true);
  }

  // Run a model action; store and redraw when it changed something.
  apply(action) {
    if (action()) {
      this.writeToWidget();
      this.render();
    }
  }

  // ------------------------------------------------------------------------------ images
  // Called every time litegraph draws the node: cheap checks for a new upstream image or a new zoom.
  // A failure here is logged once and never propagates into the graph's draw loop.
  onFrame() {
    try {
      const upstream = this.upstreamImageUrl();
      const wanted = this.executedUrl && upstream === this.upstreamUrl ? this.executedUrl : upstream;
      if (wanted !== this.imageUrl) this.loadImage(wanted);
      const key = this.renderKey();
      if (key !== this.renderedKey) this.render();
    } catch (err) {
      if (!this.frameFailed) console.error("AdaptiveDrag points widget:", err);
      this.frameFailed = true;
    }
  }

  // The file of the Load Image node feeding the `image` input, as a /view URL; null when there is none.
  upstreamImageUrl() {
    const slot = this.node.inputs?.findIndex((input) => input.name === IMAGE_INPUT) ?? -1;
    if (slot < 0) return null;
    let source = null;
    try {
      source = this.node.getInputNode?.(slot) ?? null;
    } catch {
      return null;
    }
    const fileWidget = source?.widgets?.find((w) => w.name === "image");
    if (!fileWidget || typeof fileWidget.value !== "string" || fileWidget.value === "") return null;
    return viewUrl(parseAnnotatedName(fileWidget.value));
  }

  showExecutedImage(output) {
    const entry = Array.isArray(output?.[UI_IMAGE_KEY]) ? output[UI_IMAGE_KEY][0] : null;
    const file = checkedFileRef(entry);
    if (!file) return;
    this.executedUrl = viewUrl(file) + `&rand=${Date.now()}`;
    this.upstreamUrl = this.upstreamImageUrl();
    this.loadImage(this.executedUrl);
  }

  loadImage(url) {
    this.imageUrl = url;
    if (!url) {
      this.showNoImage();
      return;
    }
    const image = new Image();
    image.onload = () => {
      if (this.imageUrl !== url) return; // a newer image was asked for meanwhile
      this.image = image;
      this.model.setImageSize(image.naturalWidth, image.naturalHeight);
      this.render();
    };
    image.onerror = () => {
      if (this.imageUrl === url) this.showNoImage();
    };
    image.src = url;
  }

  showNoImage() {
    this.image = null;
    this.model.forgetImageSize();
    this.render();
  }

  // ------------------------------------------------------------------------------ geometry
  boxSize() {
    return { width: this.canvas.clientWidth, height: this.canvas.clientHeight };
  }

  // Size of the image the drawing maps onto: the shown image, or the stored size before it loads.
  imageSize() {
    if (this.model.imageWidth !== null) return [this.model.imageWidth, this.model.imageHeight];
    if (this.model.width !== null) return [this.model.width, this.model.height];
    return null;
  }

  layout() {
    const size = this.imageSize();
    const box = this.boxSize();
    return size ? letterbox(box.width, box.height, size[0], size[1], MARGIN) : null;
  }

  eventToBox(event) {
    const box = this.boxSize();
    return clientToBox(event.clientX, event.clientY, this.canvas.getBoundingClientRect(), box.width, box.height);
  }

  /** Client (page) coordinates of image pixel (x, y) as currently drawn; used by the browser test. */
  imagePixelToClient(x, y) {
    const layout = this.layout();
    if (!layout) return null;
    const box = this.boxSize();
    const p = imageToBox([x, y], layout);
    return boxToClient(p.x, p.y, this.canvas.getBoundingClientRect(), box.width, box.height);
  }

  // ------------------------------------------------------------------------------ events
  onPointerDown(event) {
    if (event.button === 1) {
      app.canvas?.processMouseDown?.(event); // middle button pans the graph
      return;
    }
    event.stopPropagation();
    this.canvas.focus();
    const layout = this.layout();
    if (!layout) return;
    const { x, y } = this.eventToBox(event);
    const { pairs, pending } = this.model.displayPoints();
    const ref = hitTest(x, y, pairs, pending, layout, HIT_RADIUS);
    if (event.button === 2) {
      if (ref) this.apply(() => this.model.remove(ref));
      return;
    }
    if (event.button !== 0) return;
    event.preventDefault();
    if (ref) {
      const dragRef = this.model.beginDrag(ref);
      if (dragRef) {
        this.dragRef = dragRef;
        this.canvas.setPointerCapture?.(event.pointerId);
        this.render();
      }
      return;
    }
    const [width, height] = this.imageSize();
    const pixel = boxToImage(x, y, layout, width, height);
    if (pixel) this.apply(() => this.model.click(pixel));
  }

  onPointerMove(event) {
    if ((event.buttons & 4) === 4) {
      app.canvas?.processMouseMove?.(event);
      return;
    }
    const layout = this.layout();
    if (!layout) return;
    const { x, y } = this.eventToBox(event);
    if (this.dragRef) {
      const [width, height] = this.imageSize();
      if (this.model.dragTo(this.dragRef, boxToImage(x, y, layout, width, height, true))) this.render();
      return;
    }
    const { pairs, pending } = this.model.displayPoints();
    const hover = hitTest(x, y, pairs, pending, layout, HIT_RADIUS);
    this.canvas.style.cursor = hover ? "grab" : "crosshair";
  }

  onPointerUp(event) {
    if (event.button === 1) {
      app.canvas?.processMouseUp?.(event);
      return;
    }
    if (!this.dragRef) return;
    this.dragRef = null;
    this.canvas.releasePointerCapture?.(event.pointerId);
    if (this.model.endDrag()) this.writeToWidget();
    this.render();
  }

  onKeyDown(event) {
    if (event.key !== "Delete" && event.key !== "Backspace") return;
    // Stop here, or the graph would delete the selected node.
    event.preventDefault();
    event.stopPropagation();
    this.apply(() => this.model.removeSelected());
  }

  // ------------------------------------------------------------------------------ drawing
  // Everything outside the model that changes the picture: element size, screen density, zoom, rescale.
  renderKey() {
    const box = this.boxSize();
    const rescale = this.node.widgets?.find((w) => w.name === RESCALE_WIDGET)?.value;
    return `${box.width}x${box.height}@${window.devicePixelRatio}x${app.canvas?.ds?.scale ?? 1}:${rescale}`;
  }

  render() {
    this.renderedKey = this.renderKey();
    this.updateStatus();
    const box = this.boxSize();
    if (box.width <= 0 || box.height <= 0) return;
    // Back the canvas at screen resolution (device pixels times graph zoom) so it stays sharp.
    const density = (window.devicePixelRatio || 1) * Math.max(1, app.canvas?.ds?.scale ?? 1);
    const pixelWidth = Math.round(box.width * density);
    const pixelHeight = Math.round(box.height * density);
    if (this.canvas.width !== pixelWidth || this.canvas.height !== pixelHeight) {
      this.canvas.width = pixelWidth;
      this.canvas.height = pixelHeight;
    }
    const ctx = this.ctx;
    ctx.setTransform(pixelWidth / box.width, 0, 0, pixelHeight / box.height, 0, 0);
    ctx.fillStyle = STYLE.background;
    ctx.fillRect(0, 0, box.width, box.height);

    const layout = this.layout();
    if (layout && this.image) {
      ctx.imageSmoothingEnabled = layout.scale < 1;
      ctx.drawImage(this.image, layout.offsetX, layout.offsetY, layout.width, layout.height);
    } else if (layout) {
      ctx.strokeStyle = "#444";
      ctx.strokeRect(layout.offsetX, layout.offsetY, layout.width, layout.height);
    }
    this.drawMessage(ctx, box);
    if (layout) this.drawPoints(ctx, layout); // last, so a message never hides a point
  }

  drawPoints(ctx, layout) {
    const { pairs, pending } = this.model.displayPoints();
    pairs.forEach((pair, index) => {
      const handle = imageToBox(pair.handle, layout);
      const target = imageToBox(pair.target, layout);
      drawArrow(ctx, handle, target);
      const selected = index === this.model.selected;
      drawDot(ctx, handle, STYLE.handle, selected);
      drawDot(ctx, target, STYLE.target, selected);
      drawLabel(ctx, String(index + 1), handle);
    });
    if (pending) {
      const p = imageToBox(pending, layout);
      drawDot(ctx, p, STYLE.handle, true);
      drawLabel(ctx, String(pairs.length + 1), p);
    }
  }

  drawMessage(ctx, box) {
    const message = this.message();
    if (!message) return;
    ctx.font = "12px sans-serif";
    ctx.textBaseline = "top";
    const lines = wrapText(ctx, message.text, box.width - 16);
    ctx.fillStyle = "rgba(0, 0, 0, 0.7)";
    ctx.fillRect(0, 0, box.width, lines.length * 15 + 8);
    ctx.fillStyle = message.color;
    lines.forEach((line, i) => ctx.fillText(line, 8, 4 + i * 15));
  }

  // What the overlay says: an error first, then a size warning, then what to do when nothing is shown.
  message() {
    const m = this.model;
    if (m.error) return { text: `Points ignored: ${m.error}`, color: STYLE.error };
    if (m.notice) return { text: `Note: ${m.notice}`, color: STYLE.warning };
    if (m.sizeMismatch) {
      const rescale = this.node.widgets?.find((w) => w.name === RESCALE_WIDGET)?.value === true;
      const outcome = rescale ? "they are rescaled when run" : "the run fails unless rescale is on";
      return {
        text:
          `Points were placed on a ${m.width}x${m.height} image, this one is ${m.imageWidth}x${m.imageHeight}: ` +
          `${outcome}. Editing moves them onto this image.`,
        color: STYLE.warning,
      };
    }
    if (!this.image) {
      return {
        text:
          "No image yet. A Load Image picture shows here at once; for any other image, queue once: Drag Points " +
          "then shows the image it receives. Then click to place points.",
        color: STYLE.text,
      };
    }
    return null;
  }

  updateStatus() {
    const count = this.model.pairCount;
    let hint = "";
    if (this.model.pending) hint = " · click the target";
    else if (count === 0 && this.image) hint = " · click the image to place a handle";
    this.status.textContent = `${count} pair${count === 1 ? "" : "s"}${hint}`;
    this.status.title = "Click: handle, then target · drag: move · right click or Delete: remove pair";
    this.undoButton.disabled = !this.model.canUndo;
    this.clearButton.disabled = count === 0 && !this.model.pending;
  }
}

// ------------------------------------------------------------------------------------ helpers
function makeButton(label, title, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = label;
  button.title = title;
  Object.assign(button.style, { font: "12px sans-serif", padding: "1px 8px", cursor: "pointer" });
  button.addEventListener("pointerdown", (e) => e.stopPropagation());
  button.addEventListener("click", (e) => {
    e.stopPropagation();
    onClick();
  });
  return button;
}

// Split ComfyUI's "sub/name.png [input]" annotation into the parts /view takes.
function parseAnnotatedName(value) {
  let name = value;
  let type = "input";
  const match = /^(.*) \[(input|output|temp)\]$/.exec(value);
  if (match) {
    name = match[1];
    type = match[2];
  }
  const slash = name.lastIndexOf("/");
  return {
    filename: slash >= 0 ? name.slice(slash + 1) : name,
    subfolder: slash >= 0 ? name.slice(0, slash) : "",
    type,
  };
}

// A {filename, subfolder, type} entry from the node's UI output, or null when it is not one.
function checkedFileRef(entry) {
  if (!entry || typeof entry !== "object") return null;
  const { filename, subfolder = "", type = "temp" } = entry;
  if (typeof filename !== "string" || filename === "" || typeof subfolder !== "string") return null;
  if (!VIEW_TYPES.has(type)) return null;
  return { filename, subfolder, type };
}

function viewUrl({ filename, subfolder, type }) {
  const query = new URLSearchParams({ filename, type, subfolder });
  return api.apiURL(`/view?${query.toString()}`);
}

function drawDot(ctx, p, color, highlighted) {
  ctx.beginPath();
  ctx.arc(p.x, p.y, POINT_RADIUS, 0, Math.PI * 2);
  ctx.fillStyle = color;
  ctx.fill();
  ctx.lineWidth = 1.5;
  ctx.strokeStyle = highlighted ? STYLE.selected : STYLE.outline;
  ctx.stroke();
}

function drawArrow(ctx, from, to) {
  const dx = to.x - from.x;
  const dy = to.y - from.y;
  const length = Math.hypot(dx, dy);
  if (length < 1) return;
  const ux = dx / length;
  const uy = dy / length;
  const head = Math.min(10, length / 2);
  const tip = { x: to.x - ux * POINT_RADIUS, y: to.y - uy * POINT_RADIUS };
  for (const [color, width] of [[STYLE.outline, 4], [STYLE.arrow, 2]]) {
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    ctx.beginPath();
    ctx.moveTo(from.x + ux * POINT_RADIUS, from.y + uy * POINT_RADIUS);
    ctx.lineTo(tip.x, tip.y);
    ctx.moveTo(tip.x - ux * head - uy * head * 0.5, tip.y - uy * head + ux * head * 0.5);
    ctx.lineTo(tip.x, tip.y);
    ctx.lineTo(tip.x - ux * head + uy * head * 0.5, tip.y - uy * head - ux * head * 0.5);
    ctx.stroke();
  }
}

function drawLabel(ctx, text, p) {
  ctx.font = "bold 12px sans-serif";
  ctx.textBaseline = "bottom";
  ctx.lineWidth = 3;
  ctx.strokeStyle = STYLE.outline;
  ctx.strokeText(text, p.x + POINT_RADIUS + 1, p.y - POINT_RADIUS);
  ctx.fillStyle = STYLE.text;
  ctx.fillText(text, p.x + POINT_RADIUS + 1, p.y - POINT_RADIUS);
}

function wrapText(ctx, text, width) {
  const lines = [];
  let line = "";
  for (const word of text.split(" ")) {
    const candidate = line ? `${line} ${word}` : word;
    if (line && ctx.measureText(candidate).width > width) {
      lines.push(line);
      line = word;
    } else {
      line = candidate;
    }
  }
  if (line) lines.push(line);
  return lines.slice(0, 4);
}
