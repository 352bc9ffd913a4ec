// What every AdaptiveDrag node shows in the page beyond ComfyUI's own widgets:
// - the notes of its last run (facts and warnings the server sends under `adaptivedrag_notes`), on the node;
// - Semantic Drag: only the settings of the chosen method;
// - Identity LoRA Finetune: workflows saved when its seed had a "control after generate" value load unchanged.
import { app } from "../../scripts/app.js";
import { chain } from "./chain.js";

const NODE_PREFIX = "AdaptiveDrag_";
const NOTES_KEY = "adaptivedrag_notes";
const NOTES_WIDGET = "adaptivedrag_notes";
const MAX_NOTES = 12;
const MAX_NOTE_LENGTH = 600;

// The widgets each method uses (a copy of METHOD_WIDGETS in nodes/semantic_drag.py; a test keeps them equal).
const METHOD_WIDGETS = {
  "adaptive": ["steps", "max_steps", "lr", "motion_radius", "tracking_radius", "mask_weight", "superpixel_radii", "feature_scale"],
  "freedrag": ["max_steps", "lr", "freedrag_l", "freedrag_d", "freedrag_window_radius", "freedrag_gamma", "feature_scale"],
  "dragdiffusion": ["steps", "lr", "motion_radius", "tracking_radius", "mask_weight", "feature_scale"]
};
const SEMANTIC_DRAG = "AdaptiveDrag_SemanticDrag";
const IDENTITY_LORA = "AdaptiveDrag_IdentityLoRA";
const SEED_CONTROL_VALUES = new Set(["fixed", "increment", "decrement", "randomize"]);

app.registerExtension({
  name: "AdaptiveDrag.Nodes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith(NODE_PREFIX)) return;
    chain(nodeType.prototype, "onExecuted", function (output) {
      showNotes(this, output?.[NOTES_KEY]);
    });
    if (nodeData.name === SEMANTIC_DRAG) {
      chain(nodeType.prototype, "onNodeCreated", function () {
        const method = findWidget(this, "method");
        if (method) {
          const original = method.callback;
          method.callback = (...args) => {
            const result = original?.apply(method, args);
            showMethodWidgets(this);
            return result;
          };
        }
        showMethodWidgets(this);
      });
      chain(nodeType.prototype, "onConfigure", function () {
        showMethodWidgets(this);
      });
    }
    if (nodeData.name === IDENTITY_LORA) {
      chain(nodeType.prototype, "onConfigure", function (info) {
        migrateSeedControl(this, info);
      });
    }
  },
});


function findWidget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

// ------------------------------------------------------------------------------------------- notes
// The notes are plain text from the server; they are set as textContent, never as HTML.
function showNotes(node, notes) {
  if (!Array.isArray(notes)) return;
  const lines = notes.filter((n) => typeof n === "string").slice(0, MAX_NOTES).map((n) => n.slice(0, MAX_NOTE_LENGTH));
  let widget = findWidget(node, NOTES_WIDGET);
  if (!widget) {
    const element = document.createElement("div");
    element.className = "adaptivedrag-notes";
    Object.assign(element.style, {
      font: "11px sans-serif",
      color: "#cfcfcf",
      background: "rgba(0, 0, 0, 0.25)",
      borderRadius: "4px",
      padding: "3px 6px",
      overflowY: "auto",
      whiteSpace: "pre-wrap",
      wordBreak: "break-word",
      boxSizing: "border-box",
    });
    widget = node.addDOMWidget(NOTES_WIDGET, "adaptivedrag_notes", element, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => 24,
      getMaxHeight: () => 140,
    });
    widget.serialize = false;
  }
  const element = widget.element;
  element.replaceChildren(
    ...lines.map((line) => {
      const row = document.createElement("div");
      row.textContent = line;
      if (line.startsWith("warning:")) row.style.color = "#ffb74d";
      return row;
    }),
  );
  const wanted = node.computeSize?.();
  if (wanted && wanted[1] > node.size[1]) node.setSize([node.size[0], wanted[1]]);
  node.setDirtyCanvas?.(true, true);
}

// ------------------------------------------------------------------------------ Semantic Drag settings
function showMethodWidgets(node) {
  const method = findWidget(node, "method")?.value;
  const shown = new Set(METHOD_WIDGETS[method] ?? Object.values(METHOD_WIDGETS).flat());
  const all = new Set(Object.values(METHOD_WIDGETS).flat());
  for (const widget of node.widgets ?? []) {
    if (!all.has(widget.name)) continue;
    const hide = !shown.has(widget.name);
    if (hide === (widget.hidden === true)) continue;
    widget.hidden = hide; // hidden widgets are not drawn; their values are still saved and sent
    if (hide) widget.computeSize = () => [0, -4];
    else delete widget.computeSize;
  }
  const wanted = node.computeSize?.();
  if (wanted) node.setSize([node.size[0], wanted[1]]);
  node.setDirtyCanvas?.(true, true);
}

// ------------------------------------------------------------------------------- Identity LoRA seed
// Its seed once had ComfyUI's "control after generate" widget, saved as a value after the seed. The widget is
// gone (a randomised seed retrains the LoRA on every run), so such a workflow's later values sit one place
// early: put each back where it belongs.
function migrateSeedControl(node, info) {
  const values = info?.widgets_values;
  const names = ["steps", "rank", "lr", "batch_size", "seed"];
  if (!Array.isArray(values) || !SEED_CONTROL_VALUES.has(values[names.length])) return;
  const oldNames = [...names, null, "gradient_checkpointing"];
  oldNames.forEach((name, index) => {
    const widget = name && findWidget(node, name);
    if (widget && index < values.length) widget.value = values[index];
  });
  const checkpointing = findWidget(node, "gradient_checkpointing");
  if (checkpointing && values.length <= oldNames.indexOf("gradient_checkpointing")) checkpointing.value = "auto";
  const keep = findWidget(node, "keep_on_disk");
  if (keep) keep.value = true;
}
