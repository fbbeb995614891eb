// SafeRoPE frontend extension: token risk on LRS Visualize (coloured words, hover for the value) and the pack's
// metadata on Load SafeRoPE Pack. Everything is optional decoration: if this file fails to load, the nodes work.
import { app } from "../../scripts/app.js";

const WORDS_NODE = "LRSVisualize";
const INFO_NODES = new Set(["LoadSafeRoPEPack", "BuildSubspaces", "TrainRiskRotations", "SaveSafeRoPEPack"]);

function riskColour(v) {
  const x = Math.min(Math.max(Number(v) || 0, 0), 1);
  return `rgb(255, ${Math.round(255 * (1 - 0.6 * x))}, ${Math.round(255 * (1 - x))})`;
}

function panel(node, name, kind) {
  // One DOM widget per node, created on first use: a scroll box (class saferope-panel and `kind`) holding the
  // content element, which is returned.
  if (node.__saferopePanel) return node.__saferopePanel;
  const box = document.createElement("div");
  box.className = `saferope-panel ${kind}`;
  box.style.cssText = "font: 12px sans-serif; color: #111; background: #f4f4f4; padding: 4px 6px; " +
    "border-radius: 4px; overflow: auto; box-sizing: border-box; line-height: 1.8;";
  const content = box.appendChild(document.createElement("div"));
  const widget = node.addDOMWidget(name, "saferope", box, { serialize: false });
  // The content's own height (scrolls beyond 180 px) and the widget's margin on both sides (10 px each in frontend
  // 1.35), which the element does not get.
  widget.computeSize = (width) => [width, Math.min(content.offsetHeight + 8, 180) + 2 * (widget.margin ?? 6) + 2];
  // Text wraps at its final width only once the frontend has laid the panel out, which can be frames after it was
  // filled (frontend 1.4x): grow the node whenever the content's size changes.
  new ResizeObserver(() => fit(node)).observe(content);
  node.__saferopePanel = content;
  return content;
}

function fit(node) {
  // Grow the node so the panel's whole content is visible (up to the panel's own max height).
  requestAnimationFrame(() => {
    const wanted = node.computeSize();
    node.setSize([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1])]);
    node.setDirtyCanvas?.(true, true);
  });
}

function showWords(node, words) {
  const el = panel(node, "saferope_words", "saferope-words");
  el.replaceChildren();
  for (const { word, risk } of words) {
    const span = document.createElement("span");
    span.className = "saferope-word";
    span.textContent = word;
    span.title = `LRS ${Number(risk).toFixed(3)}`;
    span.dataset.risk = String(risk);
    span.style.cssText = `background: ${riskColour(risk)}; padding: 1px 3px; margin: 1px; border-radius: 3px;`;
    el.append(span, " ");
  }
  fit(node);
}

function showInfo(node, lines) {
  const el = panel(node, "saferope_info", "saferope-info");
  el.textContent = lines.join("\n");
  el.style.whiteSpace = "pre-wrap";
  fit(node);
}

app.registerExtension({
  name: "SafeRoPE.Visuals",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== WORDS_NODE && !INFO_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      try {
        if (nodeData.name === WORDS_NODE && message?.saferope_words) showWords(this, message.saferope_words);
        else if (message?.text) showInfo(this, message.text);
      } catch (err) {
        console.warn("SafeRoPE: could not draw the node panel", err);
      }
    };
  },
});
window.__saferopeExtensionLoaded = true;
