/**
 * A signal (a sample of a 1-D model: channels by time, an EEG's 8 x 256 or a waveform's
 * 1 x 4000) drawn as lines, one lane per channel on one shared value scale (so channels'
 * amplitudes compare), with a unit's receptive-field span at its peak shaded: what a run
 * of signals shows in place of an image.
 */
import { axisBottom } from "d3-axis";
import { scaleLinear } from "d3-scale";
import { create, select } from "d3-selection";
import type { Api, SignalDoc, SignalTile } from "./api";

/** The channels' colours, in turn. */
const COLOURS = ["#1f5fa8", "#c2410c", "#15803d", "#7e22ce", "#a16207", "#be123c", "#0e7490", "#4d7c0f"];

export interface SignalPlotOptions {
  width?: number;
  height?: number;
  /** the half-open span `[t0, t1)` of samples to shade (a peak's receptive field) */
  span?: number[] | null;
  /** draw the time axis (samples) under the lanes */
  axis?: boolean;
  /** what the plot is, for screen readers and its title */
  label?: string;
  /** an attribution along time drawn as colour bands: one row per channel (a band under
   * each lane), or one row (one band under all lanes); null values are left blank */
  bands?: (number | null)[][] | null;
  /** the bands' values have a sign (red positive, blue negative) or not (hot only) */
  signed?: boolean;
  /** each channel's name (EEG electrodes): a lane label with `axis`, each line's tooltip */
  names?: string[] | null;
  /** the sampling rate in Hz: the time axis is in seconds (samples / rate); null: samples */
  rate?: number | null;
  /** what the untimed axis counts (its `data-unit`): `samples`, or an op's `steps` */
  axisUnit?: string;
  /** a note at the untimed axis's right end (an op's "step = 4 samples (31 ms)") */
  axisNote?: string | null;
  /** write the lane labels and the seconds axis's unit in the plot (off where a small
   * plot's caption says them: in a 40-pixel lane they would cover the line) */
  inlineText?: boolean;
}

/** Decimals that tell one sample's time from the next at `rate` Hz (3 at 128 Hz). */
function timeDecimals(rate: number): number {
  return Math.min(6, Math.max(0, Math.ceil(Math.log10(rate) - 1e-9)));
}

/** The times of samples `first` and `last` at `rate` Hz: `1.227–1.344 s`. */
export function secondsText(first: number, last: number, rate: number): string {
  const d = timeDecimals(rate);
  return `${(first / rate).toFixed(d)}–${(last / rate).toFixed(d)} s`;
}

/** A duration of `samples` samples at `rate` Hz: `125 ms`, `7.8 ms`, `1.5 s`. */
export function durationText(samples: number, rate: number): string {
  const s = samples / rate;
  if (s >= 1) return `${Number(s.toPrecision(3))} s`;
  const ms = s * 1000;
  return `${ms >= 10 ? Math.round(ms) : Number(ms.toPrecision(2))} ms`;
}

/** Channel `ch`'s name, or "channel ch" where the dataset named none. */
export function channelName(names: string[] | null | undefined, ch: number): string {
  return names?.[ch] ?? `channel ${ch}`;
}

/** A box that shows sample `id`'s signal document once fetched (`api` asks for each URL
 * once per page life: a sample on several cards is one request), drawn by `draw`, or
 * `missing(why)` where it cannot be had. */
export function fetchedSignal(api: Api, run: string, id: number, columns: number | undefined, draw: (doc: SignalDoc) => Element, missing: (why: string) => HTMLElement): HTMLElement {
  const box = document.createElement("div");
  box.className = "signal-fetched";
  box.textContent = "loading…";
  api.signalDoc(run, id, columns).then(
    (doc) => box.replaceChildren(draw(doc)),
    (err: Error) => box.replaceChildren(missing(err.message)),
  );
  return box;
}

/** A signal document drawn: every value as {@link signalPlot}, or its columns (min..max
 * per column) as {@link signalTilePlot}; its channel names label the lines. */
export function signalDocPlot(doc: SignalDoc, opts: SignalPlotOptions = {}): SVGSVGElement {
  const names = opts.names ?? doc.channel_names ?? null;
  if (doc.values) return signalPlot(doc.values, { ...opts, names });
  const tile: SignalTile = { length: doc.length, channels: doc.channels, starts: doc.starts ?? [], lo: doc.lo ?? [], hi: doc.hi ?? [] };
  return signalTilePlot(tile, { ...opts, names });
}

/** A band's height in pixels. */
const BAND = 10;

/**
 * One lane per channel, values on one scale for all lanes, the sample index on x. Where a
 * channel has more samples than twice the plot's pixels, each pixel column draws the
 * minimum-to-maximum of its samples (every extreme stays visible, none is averaged away).
 * A value that is not finite (null) breaks the line: it is not drawn as a number.
 */
export function signalPlot(values: (number | null)[][], { width = 320, height = 120, span = null, axis = false, label = "signal", bands = null, signed = true, names = null, rate = null, axisUnit = "samples", axisNote = null, inlineText = true }: SignalPlotOptions = {}): SVGSVGElement {
  const shared = bands !== null && bands.length === 1 && values.length > 1; // one band for all lanes
  const timed = rate !== null && rate > 0 && Number.isFinite(rate);
  // the axis's unit ("time (s), 128 Hz") gets a row of its own under the tick labels,
  // the plot that much taller (drawn over the plot, the last lane and the bands ran
  // through it)
  const noted = axis && inlineText && (timed || !!axisNote);
  const bottom = (axis ? 22 : 2) + (shared ? BAND + 4 : 0);
  const channels = values.length;
  const length = Math.max(0, ...values.map((c) => c.length));
  const svg = create("svg")
    .attr("class", "chart signal-plot")
    .attr("viewBox", `0 0 ${width} ${height + (noted ? 12 : 0)}`)
    .attr("width", width)
    .attr("height", height + (noted ? 12 : 0))
    .attr("role", "img")
    .attr("aria-label", label)
    .attr("data-channels", channels)
    .attr("data-samples", length);
  svg.append("title").text(label);
  const x = scaleLinear().domain([0, Math.max(1, length)]).range([4, width - 4]);
  if (span && span.length === 2 && span[1] > span[0]) {
    svg
      .append("rect")
      .attr("class", "signal-span")
      .attr("x", x(span[0]))
      .attr("width", Math.max(1, x(span[1]) - x(span[0])))
      .attr("y", 0)
      .attr("height", height - bottom)
      .attr("data-span", `${span[0]} ${span[1]}`)
      .append("title")
      .text(`the peak's receptive field: samples ${span[0]}–${span[1] - 1}${timed ? ` (${secondsText(span[0], span[1] - 1, rate)})` : ""}`);
  }
  let lo = Infinity;
  let hi = -Infinity;
  for (const c of values) for (const v of c) if (v !== null) ((lo = Math.min(lo, v)), (hi = Math.max(hi, v)));
  if (!(lo <= hi) && bands === null) {
    svg.append("text").attr("x", width / 2).attr("y", height / 2).attr("text-anchor", "middle").text("no finite values");
    return svg.node()!;
  }
  if (!(lo <= hi)) ((lo = -1), (hi = 1));
  if (lo === hi) ((lo -= 1), (hi += 1));
  const lane = (height - bottom) / Math.max(1, channels);
  const own = bands !== null && !shared; // a band under each lane
  let big = 0;
  for (const row of bands ?? []) for (const v of row) if (v !== null) big = Math.max(big, Math.abs(v));
  const band = (row: (number | null)[], top: number, ch: number | null): void => {
    const g = svg.append("g").attr("class", "signal-band").attr("data-channel", ch === null ? "all" : ch);
    g.append("title").text(ch === null ? "all channels" : channelName(names, ch));
    const cell = (width - 8) / Math.max(1, row.length);
    row.forEach((v, i) => {
      if (v === null || big === 0) return;
      const a = Math.abs(v) / big;
      const colour = !signed ? `rgba(220,80,0,${a.toFixed(3)})` : v >= 0 ? `rgba(200,30,30,${a.toFixed(3)})` : `rgba(30,80,200,${a.toFixed(3)})`;
      g.append("rect").attr("x", (4 + i * cell).toFixed(2)).attr("width", (cell + 0.3).toFixed(2)).attr("y", top).attr("height", BAND).attr("fill", colour);
    });
    g.append("rect").attr("x", 4).attr("width", width - 8).attr("y", top).attr("height", BAND).attr("fill", "none").attr("stroke", "#ccc").attr("stroke-width", 0.5);
  };
  values.forEach((c, ch) => {
    const below = own ? BAND + 2 : 0;
    const y = scaleLinear().domain([lo, hi]).range([(ch + 1) * lane - 2 - below, ch * lane + 2]);
    if (own && bands![ch]) band(bands![ch], (ch + 1) * lane - BAND - 1, ch);
    svg
      .append("path")
      .attr("class", "signal-line")
      .attr("data-channel", ch)
      .attr("fill", "none")
      .attr("stroke", COLOURS[ch % COLOURS.length])
      .attr("stroke-width", 1)
      .attr("d", linePath(c, x, y, width))
      .append("title")
      .text(channelName(names, ch));
    if (axis && inlineText && names?.[ch] !== undefined) {
      svg.append("text").attr("class", "signal-lane-label").attr("data-channel", ch).attr("x", 6).attr("y", ch * lane + 12).attr("font-size", 11).attr("fill", COLOURS[ch % COLOURS.length]).text(names[ch]);
    }
  });
  if (shared) band(bands![0], height - bottom + 2, null);
  if (axis && timed) {
    // the same positions in seconds: ticks at round times, each sample i at i / rate
    const t = scaleLinear().domain([0, Math.max(1, length) / rate]).range(x.range());
    const g = svg.append("g").attr("class", "signal-axis").attr("data-unit", "s").attr("transform", `translate(0,${height - 22})`);
    g.call(axisBottom(t).ticks(Math.max(2, Math.floor(width / 90))).tickSizeOuter(0));
    keepEndLabels(g.node()!, t);
    if (inlineText) g.append("text").attr("class", "signal-axis-unit").attr("x", width - 4).attr("y", 31).attr("text-anchor", "end").attr("fill", "#555").attr("font-size", 10).text(`time (s), ${Number(rate.toPrecision(6))} Hz`);
  } else if (axis) {
    const g = svg
      .append("g")
      .attr("class", "signal-axis")
      .attr("data-unit", axisUnit)
      .attr("transform", `translate(0,${height - 22})`)
      .call(axisBottom(x).ticks(Math.max(2, Math.floor(width / 90))).tickSizeOuter(0));
    keepEndLabels(g.node()!, x);
    if (axisNote && inlineText) g.append("text").attr("class", "signal-axis-unit").attr("x", width - 4).attr("y", 31).attr("text-anchor", "end").attr("fill", "#555").attr("font-size", 10).text(axisNote);
  }
  return svg.node()!;
}

/** An axis's first and last tick labels kept inside the plot: one at the very edge
 * (0.0, 2.0 s) would be cut in half, centred on it. */
function keepEndLabels(g: SVGGElement, scale: { (v: number): number; range(): number[] }): void {
  const ticks = select(g).selectAll<SVGGElement, number>(".tick");
  const [lo, hi] = [Math.min(...scale.range()), Math.max(...scale.range())];
  ticks.each(function (v) {
    const at = scale(v);
    const text = select(this).select("text");
    if (at - lo < 12) text.attr("text-anchor", "start");
    else if (hi - at < 12) text.attr("text-anchor", "end");
  });
}

/** The path of one channel: every sample, or per pixel column its min and max. */
function linePath(c: (number | null)[], x: (v: number) => number, y: (v: number) => number, width: number): string {
  const parts: string[] = [];
  let pen = false;
  const move = (px: number, py: number): void => {
    parts.push(`${pen ? "L" : "M"}${px.toFixed(1)},${py.toFixed(1)}`);
    pen = true;
  };
  if (c.length <= 2 * width) {
    c.forEach((v, i) => (v === null ? (pen = false) : move(x(i + 0.5), y(v))));
    return parts.join("");
  }
  const per = c.length / width;
  for (let col = 0; col < width; col++) {
    const a = Math.floor(col * per);
    const b = Math.min(c.length, Math.floor((col + 1) * per));
    let mn = Infinity;
    let mx = -Infinity;
    let broken = false;
    for (let i = a; i < b; i++) {
      const v = c[i];
      if (v === null) broken = true;
      else ((mn = Math.min(mn, v)), (mx = Math.max(mx, v)));
    }
    if (broken || !(mn <= mx)) {
      pen = false;
      if (!(mn <= mx)) continue;
    }
    move(x((a + b) / 2), y(mn));
    move(x((a + b) / 2), y(mx));
  }
  return parts.join("");
}

/**
 * A tile's small plot of a signal the server has cut into columns (a layer's or the
 * samples page's tile: `SignalTile`), each column drawn from its least to its greatest
 * value and joined to the next, one lane per channel on one scale, `span` shaded. A null
 * column (a value that is not finite) breaks the line.
 */
export function signalTilePlot(tile: SignalTile, { width = 96, height = 64, span = null, label = "signal", names = null }: SignalPlotOptions = {}): SVGSVGElement {
  const channels = tile.lo.length;
  const svg = create("svg")
    .attr("class", "signal-plot signal-tile-plot")
    .attr("viewBox", `0 0 ${width} ${height}`)
    .attr("width", width)
    .attr("height", height)
    .attr("role", "img")
    .attr("aria-label", label)
    .attr("data-channels", tile.channels)
    .attr("data-samples", tile.length);
  svg.append("title").text(label);
  const x = scaleLinear().domain([0, Math.max(1, tile.length)]).range([1, width - 1]);
  if (span && span.length === 2 && span[1] > span[0]) {
    svg.append("rect").attr("class", "signal-span").attr("x", x(span[0])).attr("width", Math.max(1, x(span[1]) - x(span[0]))).attr("y", 0).attr("height", height).attr("data-span", `${span[0]} ${span[1]}`);
  }
  let lo = Infinity;
  let hi = -Infinity;
  for (const c of [...tile.lo, ...tile.hi]) for (const v of c) if (v !== null) ((lo = Math.min(lo, v)), (hi = Math.max(hi, v)));
  if (!(lo <= hi)) {
    svg.append("text").attr("x", width / 2).attr("y", height / 2).attr("text-anchor", "middle").attr("font-size", 10).text("no finite values");
    return svg.node()!;
  }
  if (lo === hi) ((lo -= 1), (hi += 1));
  const lane = height / Math.max(1, channels);
  for (let ch = 0; ch < channels; ch++) {
    const y = scaleLinear().domain([lo, hi]).range([(ch + 1) * lane - 1, ch * lane + 1]);
    const parts: string[] = [];
    let pen = false;
    tile.starts.forEach((a, i) => {
      const b = tile.starts[i + 1] ?? tile.length;
      const mn = tile.lo[ch][i];
      const mx = tile.hi[ch][i];
      if (mn === null || mx === null) return void (pen = false);
      const px = x((a + b) / 2).toFixed(1);
      parts.push(`${pen ? "L" : "M"}${px},${y(mn).toFixed(1)}L${px},${y(mx).toFixed(1)}`);
      pen = true;
    });
    svg.append("path").attr("class", "signal-line").attr("data-channel", ch).attr("fill", "none").attr("stroke", COLOURS[ch % COLOURS.length]).attr("stroke-width", 1).attr("d", parts.join("")).append("title").text(channelName(names, ch));
  }
  return svg.node()!;
}
