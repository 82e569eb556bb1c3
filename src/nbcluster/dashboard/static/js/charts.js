// Hand-drawn SVG charts: a GPU bar per host and a line chart of GPUs over time. No library:
// a few dozen lines, nothing to vendor or update.

const SVG = "http://www.w3.org/2000/svg";

function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (parent) parent.appendChild(node);
  return node;
}

// A horizontal bar of a host's GPUs: committed, pending, idle (HTML, with a text label).
export function gpuBar(committed, pending, total) {
  const bar = document.createElement("span");
  bar.className = "gpubar";
  bar.setAttribute("role", "img");
  const idle = Math.max(total - committed - pending, 0);
  bar.setAttribute(
    "aria-label", `${committed} committed, ${pending} pending, ${idle} idle of ${total} GPUs`);
  for (const [cls, n] of [["committed", committed], ["pending", pending], ["idle", idle]]) {
    const part = document.createElement("span");
    part.className = cls;
    part.style.width = total ? `${(100 * n) / total}%` : "0";
    bar.appendChild(part);
  }
  return bar;
}

// Lines of samples [{t, committed, pending, capacity}] over the last `span` seconds.
export function lineChart(container, samples, span = 600) {
  const width = 600, height = 180, left = 30, bottom = 20, top = 8;
  const svg = el("svg", {
    viewBox: `0 0 ${width} ${height}`, role: "img", preserveAspectRatio: "none",
  });
  const last = samples.length ? samples[samples.length - 1] : null;
  const title = el("title", {}, svg);
  title.textContent = last
    ? `GPUs over the last ${Math.round(span / 60)} minutes: now ${last.committed} committed, ` +
      `${last.pending} pending of ${last.capacity}`
    : "GPUs over time: no samples yet";
  const now = last ? last.t : Date.now() / 1000;
  const max = Math.max(1, ...samples.map((s) => Math.max(s.capacity, s.committed, s.pending)));
  const x = (t) => left + ((t - (now - span)) / span) * (width - left - 4);
  const y = (v) => top + (1 - v / max) * (height - top - bottom);
  for (const v of [0, max / 2, max]) {
    el("line", { x1: left, x2: width, y1: y(v), y2: y(v), stroke: "#e5e7eb" }, svg);
    const label = el("text", { x: 2, y: y(v) + 4 }, svg);
    label.textContent = Number.isInteger(v) ? v : v.toFixed(1);
  }
  const axis = el("text", { x: left, y: height - 4 }, svg);
  axis.textContent = `-${Math.round(span / 60)} min`;
  const nowLabel = el("text", { x: width - 28, y: height - 4 }, svg);
  nowLabel.textContent = "now";
  const series = [
    ["capacity", "#6b7280", "4 3"], ["committed", "#c2410c", ""], ["pending", "#ca8a04", ""],
  ];
  for (const [key, color, dash] of series) {
    const points = samples.filter((s) => s.t >= now - span).map((s) => `${x(s.t)},${y(s[key])}`);
    if (points.length) {
      el("polyline", {
        points: points.join(" "), fill: "none", stroke: color, "stroke-width": 2,
        "stroke-dasharray": dash, "data-series": key,
      }, svg);
    }
  }
  container.replaceChildren(svg);
}
