/** D3 charts: an activation histogram and a horizontal bar chart, both with labelled axes. */
import { max as d3max } from "d3-array";
import { axisBottom, axisLeft } from "d3-axis";
import { scaleBand, scaleLinear, scaleSymlog } from "d3-scale";
import { create } from "d3-selection";
import type { Histogram } from "./api";
import type { Places } from "./images";

const M = { top: 10, right: 14, bottom: 40, left: 56 };

/**
 * A chart drawn at the width its box has, up to `width`: `make(w)` draws it `w` px wide,
 * and a narrower box (a phone's card) gets it redrawn at its own width, with fewer ticks,
 * rather than the wide drawing shrunk, which took its axis text down to 7 px. Never
 * narrower than `least` px: below that the box scrolls sideways. Redrawn when the box's
 * width changes (a phone turned).
 */
export function fitted(make: (width: number) => SVGSVGElement, width: number, least = 240): HTMLElement {
  const box = document.createElement("div");
  box.className = "chart-fit";
  let drawn = width;
  box.append(make(width));
  new ResizeObserver(() => {
    if (!box.isConnected) return;
    const w = Math.max(least, Math.min(width, Math.floor(box.clientWidth)));
    if (!box.clientWidth || w === drawn) return;
    drawn = w;
    box.replaceChildren(make(w));
  }).observe(box);
  return box;
}

/** How many ticks an axis `span` px long has room for (one per 70 px, 2 to `most`). */
function tickCount(span: number, most: number): number {
  return Math.max(2, Math.min(most, Math.floor(span / 70)));
}

/** Counts per bin over the activation axis; y on a symlog scale since the mass sits near 0.
 * `yLabel` says what a count is (samples, or sample-and-unit values of a layer). */
export function histogramChart(
  hist: Histogram,
  {
    width = 420,
    height = 200,
    xLabel = "activation",
    yLabel = "count",
    mark,
  }: { width?: number; height?: number; xLabel?: string; yLabel?: string; mark?: number | null } = {},
): SVGSVGElement {
  const edges = hist.edges.map((e) => e ?? 0);
  const counts = hist.counts.map((c) => c ?? 0);
  const svg = create("svg")
    .attr("class", "chart histogram")
    .attr("viewBox", `0 0 ${width} ${height}`)
    .attr("width", width)
    .attr("height", height)
    .attr("role", "img")
    .attr("aria-label", "activation histogram");
  if (edges.length < 2 || counts.length === 0) {
    svg.append("text").attr("x", width / 2).attr("y", height / 2).attr("text-anchor", "middle").text("no histogram");
    return svg.node()!;
  }
  // the bins that hold data: the edges are shared by all units of a layer (and span its
  // whole range), so a unit's data may fill a sliver of them
  const held = dataBins(counts);
  if (held === null) {
    svg.append("text").attr("x", width / 2).attr("y", height / 2).attr("text-anchor", "middle").text("no finite values");
    return svg.node()!;
  }
  const domain = histogramDomain(edges, held, mark);
  svg.attr("data-domain", domain.join(" "));
  const x = scaleLinear().domain(domain).range([M.left, width - M.right]);
  // the y axis ends at a round number at or above the tallest bar, which its top tick names
  const yTicks = symlogTicks(d3max(counts) ?? 1);
  const y = scaleSymlog()
    .domain([0, yTicks[yTicks.length - 1]])
    .range([height - M.bottom, M.top]);
  const bins = counts.map((c, i) => ({ c, i })).slice(held[0], held[1] + 1);
  svg
    .append("g")
    .attr("class", "bars")
    .selectAll("rect")
    .data(bins)
    .join("rect")
    .attr("x", ({ i }) => x(edges[i]))
    .attr("width", ({ i }) => Math.max(0.5, x(edges[i + 1]) - x(edges[i]) - 0.3))
    .attr("y", ({ c }) => y(c))
    .attr("height", ({ c }) => y(0) - y(c))
    .attr("data-count", ({ c }) => c)
    .append("title")
    .text(({ c, i }) => `[${edges[i].toPrecision(3)}, ${edges[i + 1].toPrecision(3)}): ${c}`);
  if (mark !== null && mark !== undefined && Number.isFinite(mark)) {
    svg
      .append("line")
      .attr("class", "mark")
      .attr("x1", x(mark))
      .attr("x2", x(mark))
      .attr("y1", M.top)
      .attr("y2", height - M.bottom);
  }
  svg
    .append("g")
    .attr("transform", `translate(0,${height - M.bottom})`)
    .call(axisBottom(x).ticks(tickCount(width - M.left - M.right, 6)).tickFormat((d) => tick(Number(d))));
  svg
    .append("g")
    .attr("class", "y-axis")
    .attr("transform", `translate(${M.left},0)`)
    .call(axisLeft(y).tickValues(roomyTicks(yTicks, y)).tickFormat((d) => compact(Number(d))));
  axisLabels(svg.node()!, width, height, xLabel, `${yLabel} (symlog)`);
  return svg.node()!;
}

/** The first and last bin with a count above 0 (null: none). */
export function dataBins(counts: number[]): [number, number] | null {
  let first = -1;
  let last = -1;
  counts.forEach((c, i) => {
    if (c > 0) {
      if (first < 0) first = i;
      last = i;
    }
  });
  return first < 0 ? null : [first, last];
}

/**
 * A histogram's x range: from the first to the last bin that holds data (not the layer's
 * shared edges, whose range may be far wider), widened to take the marked value, plus a
 * margin of 5% of that span on each side.
 */
export function histogramDomain(edges: number[], [first, last]: [number, number], mark?: number | null): [number, number] {
  let lo = edges[first];
  let hi = edges[last + 1];
  if (mark !== null && mark !== undefined && Number.isFinite(mark)) {
    lo = Math.min(lo, mark);
    hi = Math.max(hi, mark);
  }
  const pad = 0.05 * (hi - lo || Math.abs(lo) || 1);
  return [lo - pad, hi + pad];
}

/**
 * Values per sample of a layer's unit: the product of its position axes (1: a layer with
 * no positions, as a Linear's `(N, units)`, whose unit has one activation per sample).
 * From the stored layout (axes counting the batch); runs without one are `(N, C, ...)`.
 */
export function positionCount(layer: { shape: number[]; layout?: Record<string, unknown> | null }): number {
  const layout = layer.layout;
  const positions = layout?.["positions"];
  const batch = layout?.["batch"];
  if (Array.isArray(positions) && typeof batch === "number") {
    const full = [...layer.shape];
    full.splice(batch, 0, 1);
    return positions.reduce((n: number, a: number) => n * (full[a] ?? 1), 1);
  }
  return layer.shape.slice(1).reduce((n, d) => n * d, 1);
}

/** What one value of an activation histogram is: a sample's spatial mean (on a layer of
 * tokens, its mean over the tokens: a ViT's class token is one of them, not a place in
 * the image; on a signal's layer, over its time steps), or (a layer with one value per
 * unit and sample) its activation. */
export function sampleValueLabel(places: Places): string {
  return places.kind === "vector" ? "activation of a sample" : places.kind === "spatial" ? "spatial mean activation of a sample" : `mean activation over a sample's ${places.many}`;
}

/** Horizontal bars, label on the left, value at the bar's end. */
export function barChart(
  rows: { label: string; value: number }[],
  { width = 420, xLabel = "mean activation" }: { width?: number; xLabel?: string } = {},
): SVGSVGElement {
  // (at most a third of a narrow chart: the bars keep room)
  const left = Math.min(160, Math.floor(width / 3), 12 + 7 * Math.max(4, ...rows.map((r) => Math.min(r.label.length, 22))));
  const band = 20;
  const height = M.top + rows.length * band + M.bottom;
  const svg = create("svg")
    .attr("class", "chart bars-h")
    .attr("viewBox", `0 0 ${width} ${height}`)
    .attr("width", width)
    .attr("height", height)
    .attr("role", "img")
    .attr("aria-label", xLabel);
  const lo = Math.min(0, ...rows.map((r) => r.value));
  const hi = Math.max(0, ...rows.map((r) => r.value));
  const x = scaleLinear()
    .domain(lo === hi ? [0, 1] : [lo, hi])
    .nice()
    .range([left, width - M.right - 40]);
  const y = scaleBand<number>()
    .domain(rows.map((_, i) => i))
    .range([M.top, height - M.bottom])
    .padding(0.2);
  const g = svg.append("g").selectAll("g").data(rows).join("g");
  g.append("rect")
    .attr("x", (r) => Math.min(x(0), x(r.value)))
    .attr("width", (r) => Math.abs(x(r.value) - x(0)))
    .attr("y", (_, i) => y(i)!)
    .attr("height", y.bandwidth());
  g.append("text")
    .attr("class", "label")
    .attr("x", left - 6)
    .attr("y", (_, i) => y(i)! + y.bandwidth() / 2)
    .attr("dy", "0.35em")
    .attr("text-anchor", "end")
    .text((r) => (r.label.length > 22 ? r.label.slice(0, 21) + "…" : r.label))
    .append("title")
    .text((r) => r.label);
  g.append("text")
    .attr("class", "value")
    .attr("x", (r) => Math.max(x(0), x(r.value)) + 4)
    .attr("y", (_, i) => y(i)! + y.bandwidth() / 2)
    .attr("dy", "0.35em")
    .text((r) => r.value.toPrecision(3));
  svg
    .append("g")
    .attr("transform", `translate(0,${height - M.bottom})`)
    .call(axisBottom(x).ticks(tickCount(width - M.right - 40 - left, 5)).tickFormat((d) => tick(Number(d))));
  axisLabels(svg.node()!, width, height, xLabel, null, left);
  return svg.node()!;
}

function axisLabels(svg: SVGSVGElement, width: number, height: number, xl: string, yl: string | null, left = M.left): void {
  const s = create("svg:g").attr("class", "axis-label");
  s.append("text")
    .attr("x", (left + width - M.right) / 2)
    .attr("y", height - 6)
    .attr("text-anchor", "middle")
    .text(xl);
  if (yl) {
    s.append("text")
      .attr("transform", `translate(12,${(M.top + height - M.bottom) / 2}) rotate(-90)`)
      .attr("text-anchor", "middle")
      .text(yl);
  }
  svg.append(s.node()!);
}

/**
 * Ticks of a symlog count axis: 0, the powers of ten below `top` (from 10 on an axis of
 * 2k or more), and last the smallest
 * 1-2-5 number at or above it (the axis's end, so the tallest bar is under a named tick;
 * ticks that stopped at 10 below bars of 40 left their height unreadable). With fewer
 * than 5 ticks, the 2s and 5s between are added.
 */
function symlogTicks(top: number): number[] {
  const t = Math.max(1, Math.ceil(top));
  let end = 1;
  for (let d = 1; ; d *= 10) {
    const v = [d, 2 * d, 5 * d].find((c) => c >= t);
    if (v !== undefined) {
      end = v;
      break;
    }
  }
  // 1 sits close above 0 on a tall symlog axis (10 px at 10k): left out from 2k on
  const ticks = [0];
  for (let d = end >= 2000 ? 10 : 1; d < end; d *= 10) ticks.push(d);
  if (ticks.length < 4) for (let d = 1; d < end; d *= 10) ticks.push(2 * d, 5 * d);
  return [...new Set([...ticks.filter((v) => v < end), end])].sort((a, b) => a - b);
}

/** Tick labels' least distance apart, centre to centre (a 10 px label is 11 px high). */
const TICK_GAP = 15;

/**
 * The ticks whose labels have room: from the axis's end (always kept: it names the top)
 * down, a tick closer than {@link TICK_GAP} to the last one kept is left out (on a symlog
 * axis 1k sits 13 px under 2k, their labels touching); 0 is kept, in place of a tick
 * too close above it.
 */
function roomyTicks(ticks: number[], y: (v: number) => number): number[] {
  const kept: number[] = [];
  for (const t of [...ticks].sort((a, b) => b - a)) {
    const last = kept[kept.length - 1];
    if (last === undefined || Math.abs(y(t) - y(last)) >= TICK_GAP) kept.push(t);
    else if (t === 0 && kept.length > 1) kept[kept.length - 1] = 0;
  }
  return kept.reverse();
}

function compact(v: number): string {
  if (v >= 1e6) return v / 1e6 + "M";
  if (v >= 1e3) return v / 1e3 + "k";
  return String(v);
}

/** Axis tick text: plain decimals (never "1e+1"), 3 significant digits at most. */
function tick(v: number): string {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(1);
  return String(Number(v.toPrecision(3)));
}
