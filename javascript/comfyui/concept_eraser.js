// Concept Eraser: what ComfyUI's node schema cannot express by itself.
//  - Erase Concept declares every method's parameters (named <method>_<param>); only the chosen
//    method's are shown, under their own names.
//  - Widget values of the pack's nodes are saved by name, so workflows keep their settings when a
//    method gains or loses a parameter.
//  - Text that a node returns in its UI message (report, saved path, layout) is shown in the node.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const PACK_NODES = new Set([
  "ConceptEraserLoadCheckpoint",
  "ConceptEraserApplyPatch",
  "ConceptEraserErase",
  "ConceptEraserPreview",
  "ConceptEraserSave",
  "ConceptEraserReport",
]);
const ERASE = "ConceptEraserErase";
const TEXT_WIDGET = "concept_eraser_text";
const MAX_TEXT_ROWS = 16;

// The method each parameter input belongs to ("" = every method) and its label, from the node definition.
function parameterOwners(nodeData) {
  const owners = {};
  const labels = {};
  const methods = (nodeData.input?.required?.method?.[0] ?? []).slice().sort((a, b) => b.length - a.length);
  for (const [name, spec] of Object.entries(nodeData.input?.optional ?? {})) {
    const options = spec?.[1] ?? {};
    let owner = options.concept_eraser_method;
    if (owner === undefined) owner = methods.find((m) => name.startsWith(`${m}_`)) ?? "";
    owners[name] = owner;
    labels[name] = options.concept_eraser_label ?? (owner ? name.slice(owner.length + 1) : name);
  }
  return { owners, labels };
}

const ZERO_HEIGHT = () => [0, -4]; // LiteGraph adds 4 px between widgets: a hidden widget takes none

function setHidden(node, widget, hidden) {
  if (hidden === (widget.conceptEraserHidden === true)) return;
  widget.conceptEraserHidden = hidden;
  // Frontends with LGraphNode.isWidgetVisible skip hidden widgets when drawing and sizing the node, but
  // still stack them when arranging: a zero height keeps the shown ones together. Older frontends draw
  // every widget, so there the widget also gets a type nothing draws.
  const legacy = typeof node.isWidgetVisible !== "function";
  if (hidden) {
    widget.conceptEraserSaved = { computeSize: Object.getOwnPropertyDescriptor(widget, "computeSize"), type: widget.type };
    widget.hidden = true;
    widget.computeSize = ZERO_HEIGHT;
    if (legacy) widget.type = "concept-eraser-hidden";
  } else {
    const saved = widget.conceptEraserSaved ?? {};
    widget.hidden = false;
    delete widget.computeSize;
    if (saved.computeSize) Object.defineProperty(widget, "computeSize", saved.computeSize);
    if (legacy && saved.type) widget.type = saved.type;
    delete widget.conceptEraserSaved;
  }
}

function setupMethodParameters(node, owners, labels) {
  const method = node.widgets?.find((w) => w.name === "method");
  if (!method) return;
  for (const widget of node.widgets) {
    if (labels[widget.name]) widget.label = labels[widget.name];
  }
  // size: keep at least this size (a saved node's); without it the node shrinks to fit what is shown
  node.conceptEraserUpdate = (size) => {
    for (const widget of node.widgets ?? []) {
      const owner = owners[widget.name];
      if (owner) setHidden(node, widget, owner !== method.value);
    }
    const fit = () => {
      const needed = node.computeSize();
      const [width, height] = size ?? [node.size[0], 0];
      node.setSize([Math.max(width, needed[0]), Math.max(height, needed[1])]);
      node.setDirtyCanvas?.(true, true);
    };
    fit();
    setTimeout(fit, 0); // the frontend may size a node it is still setting up after this hook
  };
  const callback = method.callback;
  method.callback = function () {
    const result = callback?.apply(this, arguments);
    node.conceptEraserUpdate();
    return result;
  };
  node.conceptEraserUpdate();
}

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === TEXT_WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, TEXT_WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false;
    const element = widget.inputEl ?? widget.element;
    if (element) {
      element.readOnly = true;
      element.style.opacity = 0.85;
    }
  }
  widget.value = text;
  // tall enough for the whole text (up to MAX_TEXT_ROWS rows, then it scrolls), not a share of the free space
  const perRow = Math.max(20, Math.floor((node.size[0] - 30) / 7));
  const rows = text.split("\n").reduce((n, line) => n + Math.max(1, Math.ceil(line.length / perRow)), 0);
  const height = 15 * Math.min(rows, MAX_TEXT_ROWS) + 12;
  widget.computeLayoutSize = () => ({ minHeight: height, maxHeight: height, minWidth: 0 });
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "ConceptEraser.Nodes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!PACK_NODES.has(nodeData.name)) return;

    const onSerialize = nodeType.prototype.onSerialize;
    nodeType.prototype.onSerialize = function (data) {
      onSerialize?.apply(this, arguments);
      if (!this.widgets) return;
      const values = {};
      for (const widget of this.widgets) {
        if (widget.serialize !== false && widget.name) values[widget.name] = widget.value;
      }
      data.widgets_values = values;
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const result = onConfigure?.apply(this, arguments);
      const values = info?.widgets_values;
      if (values && !Array.isArray(values) && this.widgets) {
        for (const widget of this.widgets) {
          if (Object.prototype.hasOwnProperty.call(values, widget.name)) widget.value = values[widget.name];
        }
      }
      this.conceptEraserUpdate?.(info?.size);
      return result;
    };

    if (nodeData.name === ERASE) {
      const { owners, labels } = parameterOwners(nodeData);
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = onNodeCreated?.apply(this, arguments);
        setupMethodParameters(this, owners, labels);
        return result;
      };
    }

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text?.length) showText(this, message.text.join("\n"));
    };
  },
});
