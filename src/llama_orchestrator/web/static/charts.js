// Small line charts (SVG, no library) for the instance table: the last HISTORY samples (one a second) of a value.

export const HISTORY = 30;
const SVG = "http://www.w3.org/2000/svg";

export function sparkline(width = 44, height = 16) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("aria-hidden", "true");
  svg.classList.add("spark");
  const line = document.createElementNS(SVG, "polyline");
  svg.append(line);
  return svg;
}

// Draws `values` (null: no sample) into an svg made by sparkline(); the scale starts at 0.
export function draw(svg, values, floor = 1) {
  const [, , width, height] = svg.getAttribute("viewBox").split(" ").map(Number);
  const max = Math.max(floor, ...values.map((v) => v ?? 0));
  const step = width / (HISTORY - 1);
  const offset = HISTORY - values.length;
  const points = values
    .map((v, i) => (v == null ? null : `${((offset + i) * step).toFixed(1)},${(height - 1 - ((height - 2) * v) / max).toFixed(1)}`))
    .filter(Boolean);
  svg.firstChild.setAttribute("points", points.join(" "));
}

export function push(list, value) {
  list.push(value);
  if (list.length > HISTORY) list.shift();
}
