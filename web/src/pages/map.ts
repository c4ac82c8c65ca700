/**
 * `#/r/RUN/map?color=class|correct&mis=1&tool=box|lasso`: the dataset map. Every sample is
 * a dot placed by its features at one layer (t-SNE, UMAP or PCA, made by `lurker map RUN`),
 * drawn on a canvas so 50,000 dots stay smooth: d3-zoom pans and zooms by redrawing, a
 * quadtree finds the dot under the pointer and the candidates of a box or lasso selection.
 * The canvas takes keyboard focus: arrow keys move to the nearest dot in that direction,
 * Enter opens it, + and - zoom; a live region names the dot for screen readers.
 */
import { quadtree, type Quadtree } from "d3-quadtree";
import { select } from "d3-selection";
import { zoom, zoomIdentity, type ZoomTransform } from "d3-zoom";
import { ApiError, p } from "../api";
import type { PageContext } from "../context";
import { append, fill, h, notice, pct } from "../dom";
import { imageState, noImage } from "../images";
import { classLabel } from "../classes";

export interface MapDoc {
  layer: string | null;
  /** what the layer is where its name does not say (an op label picking a ViT's class
   * token); null else */
  layer_said?: string | null;
  method: string;
  engine: string | null;
  seconds: number | null;
  count: number;
  classes: string[];
  /** [xmin, xmax, ymin, ymax] */
  extent: number[];
  ids: number[];
  x: number[];
  y: number[];
  label: number[];
  pred: number[];
  /** The model's number of outputs, when the run's graph tells. */
  outputs?: number | null;
  /** Whether predictions are the dataset's classes (one output per class). */
  comparable?: boolean;
  conf: (number | null)[];
}

const TABLEAU = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
const RIGHT = "#9aa5b1";
const WRONG = "#d62728";
const UNKNOWN = "#c9d1d9";
/** The stage's background (style.css), painted under the squares of a large map. */
const BACKGROUND = "#fbfcfd";
/** Above this many points, dots are squares written into a pixel buffer. */
const SQUARES = 5000;
/** Opacity of the points outside a selection. */
const FADED = 0.15;
/** Point groups by colour, drawn at one opacity. */
type Layer = [[string, number[]][], number];
/** The canvas' height: the window's height below the toolbar, within these bounds. */
const MIN_HEIGHT = 360;
const MAX_HEIGHT = 760;
const SELECTION_SHOWN = 120;
const SVG = "http://www.w3.org/2000/svg";

type Tool = "pan" | "box" | "lasso";

/** Whether (px, py) is inside the polygon (xs, ys) by the even-odd rule (a ray to +x
 * crosses its edges an odd number of times): self-crossing lassos select what they wrap once. */
export function insidePolygon(px: number, py: number, xs: Float64Array, ys: Float64Array): boolean {
  let inside = false;
  for (let i = 0, j = xs.length - 1; i < xs.length; j = i++) {
    if (ys[i] > py !== ys[j] > py && px < ((xs[j] - xs[i]) * (py - ys[i])) / (ys[j] - ys[i]) + xs[i]) inside = !inside;
  }
  return inside;
}

/** Colour of class `c`: Tableau 10, then evenly spread hues. */
export function classColour(c: number, n: number): string {
  if (c < 0) return UNKNOWN;
  if (n <= TABLEAU.length) return TABLEAU[c % TABLEAU.length];
  return `hsl(${(c * 137.508) % 360} 62% 48%)`;
}

export async function renderMap(root: HTMLElement, ctx: PageContext): Promise<void> {
  document.title = `map · ${ctx.run} · lurker`;
  let doc: MapDoc;
  try {
    doc = await ctx.api.json<MapDoc>(p("runs", ctx.run, "map"));
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      append(root, h("h1", null, "Map"), notice(err.message));
      return;
    }
    throw err;
  }
  const images = await imageState(ctx);
  // a static export holds the pages and images of the top-k samples only
  // (a page for each; an image only where it could be made: not with --no-images)
  const listed = ctx.api.isStatic ? (await ctx.api.exportedSamples(ctx.run)).samples : null;
  const paged = listed ? new Set(listed.map((s) => s.id)) : null;
  const pictured = listed ? new Set(listed.filter((s) => s.image).map((s) => s.id)) : null;
  const has = (id: number) => paged === null || paged.has(id);
  const pic = (id: number) => images.ok && (pictured === null || pictured.has(id));
  const noPic = (id: number) => noImage(!has(id) ? "not exported" : pictured ? "image not exported" : "no image");
  const n = doc.count;
  // a model whose outputs are not the dataset's classes (a 1000-class head over three
  // folders) predicts outputs, not labels: nothing to call right or wrong
  const comparable = doc.comparable !== false;
  const labelled = comparable && doc.label.some((l) => l >= 0) && doc.pred.some((q) => q >= 0);
  const wrong = new Uint8Array(n);
  let nWrong = 0;
  for (let i = 0; i < n; i++) {
    if (labelled && doc.label[i] >= 0 && doc.pred[i] >= 0 && doc.label[i] !== doc.pred[i]) {
      wrong[i] = 1;
      nWrong++;
    }
  }
  const state = {
    color: ctx.params.get("color") === "correct" && labelled ? "correct" : "class",
    mis: ctx.params.get("mis") === "1" && labelled,
    tool: (["box", "lasso"].includes(ctx.params.get("tool") ?? "") ? ctx.params.get("tool") : "pan") as Tool,
  };

  // -- layout ------------------------------------------------------------------------------
  const legend = h("div", { class: "map-legend" });
  const colorSeg = h(
    "span",
    { class: "seg", role: "group", "aria-label": "colour by" },
    h("button", { type: "button", "data-color": "class" }, "class"),
    h("button", { type: "button", "data-color": "correct", disabled: !labelled }, "correct / wrong"),
  );
  const misBox = h("input", { type: "checkbox", id: "map-mis", disabled: !labelled }) as HTMLInputElement;
  const toolSeg = h(
    "span",
    { class: "seg", role: "group", "aria-label": "drag to" },
    h("button", { type: "button", "data-tool": "pan", title: "drag pans the map" }, "pan"),
    h("button", { type: "button", "data-tool": "box", title: "drag selects the dots in a rectangle" }, "box select"),
    h("button", { type: "button", "data-tool": "lasso", title: "drag draws a free-form outline; the dots inside are selected" }, "lasso select"),
  );
  const hint = h("span", { class: "muted small" });
  const reset = h("button", { type: "button" }, "reset view");
  const canvas = h("canvas", {
    class: "map-canvas",
    tabindex: 0,
    role: "application",
    "aria-roledescription": "scatter map",
    "aria-label": `map of ${n} samples: arrow keys move to the nearest sample in that direction, Enter opens it, + and − zoom`,
  }) as HTMLCanvasElement;
  // what the keyboard's dot is, said to screen readers (the canvas itself has no text)
  const live = h("div", { class: "visually-hidden map-live", role: "status", "aria-live": "polite" });
  const tip = h("div", { class: "map-tip", hidden: true });
  const band = h("div", { class: "map-band", hidden: true });
  const lasso = document.createElementNS(SVG, "svg");
  lasso.setAttribute("class", "map-lasso");
  lasso.setAttribute("aria-hidden", "true");
  const lassoPath = document.createElementNS(SVG, "path");
  lasso.append(lassoPath);
  const selection = h("div", { class: "map-selection" });
  // the selection's samples are listed below the map, often below the fold: say so on it
  const pickedBadge = h("button", { type: "button", class: "map-picked", hidden: true, title: "show the selected samples" });
  pickedBadge.addEventListener("click", () => selection.scrollIntoView({ behavior: "smooth", block: "start" }));
  const stage = h("div", { class: "map-stage" }, canvas, band, lasso, tip, pickedBadge, live);
  append(
    root,
    h(
      "h1",
      null,
      "Map",
      h("span", { class: "sub" }, ` ${n.toLocaleString()} samples by their features at ${doc.layer ?? "?"}${doc.layer_said ? `, ${doc.layer_said}` : ""} · ${doc.method}${doc.engine ? ` (${doc.engine})` : ""}`),
    ),
    images.notice,
    comparable
      ? null
      : notice(
          `The model has ${doc.outputs != null ? doc.outputs.toLocaleString() : "other"} outputs and the dataset ${doc.classes.length.toLocaleString()} classes: ` +
            "its predictions are not the dataset's labels, so no sample is called correct or misclassified. Colour by class shows the labels.",
        ),
    h(
      "div",
      { class: "toolbar" },
      // each label stays on the line of its buttons when the toolbar wraps
      h("span", { class: "tool-group" }, h("span", { class: "muted" }, "colour by"), colorSeg),
      h("label", { for: "map-mis" }, misBox, ` misclassified only (${nWrong.toLocaleString()})`),
      h("span", { class: "tool-group" }, h("span", { class: "muted" }, "drag to"), toolSeg),
      reset,
      hint,
    ),
    legend,
    stage,
    selection,
  );

  syncControls(); // the toolbar's and legend's final height, before the canvas is sized
  renderLegend();

  // -- geometry: data -> base screen coordinates (y up), then the zoom transform ----------
  const dpr = window.devicePixelRatio || 1;
  const width = Math.max(320, stage.clientWidth || 1000);
  const top = stage.getBoundingClientRect().top + window.scrollY;
  const HEIGHT = Math.round(Math.min(MAX_HEIGHT, Math.max(MIN_HEIGHT, window.innerHeight - top - 20)));
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(HEIGHT * dpr);
  canvas.style.width = `${width}px`;
  canvas.style.height = `${HEIGHT}px`;
  const [x0, x1, y0, y1] = doc.extent;
  const pad = 16;
  const scale = Math.min((width - 2 * pad) / Math.max(x1 - x0, 1e-9), (HEIGHT - 2 * pad) / Math.max(y1 - y0, 1e-9));
  const tx = width / 2 - ((x0 + x1) / 2) * scale;
  const ty = HEIGHT / 2 + ((y0 + y1) / 2) * scale;
  // base position of a point before zooming: screen = (tx + x * scale, ty - y * scale)
  canvas.dataset.scale = String(scale);
  canvas.dataset.tx = String(tx);
  canvas.dataset.ty = String(ty);
  const bx = new Float32Array(n);
  const by = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    bx[i] = tx + doc.x[i] * scale;
    by[i] = ty - doc.y[i] * scale;
  }
  let transform: ZoomTransform = zoomIdentity;
  let hovered = -1;
  /** The dot the keyboard is on (-1: none yet); its ring shows while the map has focus
   * from the keyboard (a mouse user gets the hover ring only). */
  let focused = -1;
  let keyboard = false;
  let selected: number[] = [];
  let tree: Quadtree<number> = quadtree<number>();
  const ctx2d = canvas.getContext("2d")!;

  const colourOf = (i: number): string =>
    state.color === "correct" ? (doc.pred[i] < 0 || doc.label[i] < 0 ? UNKNOWN : wrong[i] ? WRONG : RIGHT) : classColour(doc.label[i], doc.classes.length);

  /** The points shown, grouped by colour (one fillStyle per group), wrong ones last. */
  let groups: [string, number[]][] = [];
  function regroup(): void {
    const by = new Map<string, number[]>();
    const shown: number[] = [];
    for (let i = 0; i < n; i++) {
      if (state.mis && !wrong[i]) continue;
      shown.push(i);
      const c = colourOf(i);
      let g = by.get(c);
      if (!g) by.set(c, (g = []));
      g.push(i);
    }
    groups = [...by.entries()].sort((a, b) => (a[0] === WRONG ? 1 : b[0] === WRONG ? -1 : 0));
    tree = quadtree<number>()
      .x((i) => bx[i])
      .y((i) => by_(i))
      .addAll(shown);
    canvas.dataset.shown = String(shown.length);
    if (focused >= 0 && state.mis && !wrong[focused]) setFocused(-1); // no longer drawn
  }
  const by_ = (i: number) => by[i];

  function radius(): number {
    const base = n > 20000 ? 1.6 : n > 5000 ? 2.2 : 3;
    return Math.min(7, base * Math.sqrt(transform.k));
  }

  /** `colour` as [r, g, b] 0-255, as the canvas parses it (hex or hsl). */
  const rgbCache = new Map<string, number[]>();
  function rgb(colour: string): number[] {
    let v = rgbCache.get(colour);
    if (!v) {
      ctx2d.fillStyle = colour; // read back as #rrggbb
      const hex = String(ctx2d.fillStyle);
      v = [1, 3, 5].map((j) => parseInt(hex.slice(j, j + 2), 16));
      rgbCache.set(colour, v);
    }
    return v;
  }
  let pixels: ImageData | null = null;
  /** Many points as pixel-aligned squares blended straight into an opaque pixel buffer:
   * several times faster than one fillRect per point, which dominates a frame at 50,000. */
  function drawSquares(r: number, layers: Layer[]): void {
    const W = canvas.width;
    const H = canvas.height;
    pixels ??= ctx2d.createImageData(W, H);
    const buf = new Uint32Array(pixels.data.buffer); // little-endian: 0xAABBGGRR
    const [br, bgg, bb] = rgb(BACKGROUND);
    buf.fill(0xff000000 | (bb << 16) | (bgg << 8) | br);
    const { k, x: zx, y: zy } = transform;
    const size = Math.max(1, Math.round(2 * r * dpr));
    const half = size / 2;
    for (const [layer, alpha] of layers) {
      const keep = 1 - alpha;
      for (const [colour, idx] of layer) {
        const [cr, cg, cb] = rgb(colour).map((c) => c * alpha);
        for (const i of idx) {
          const x0 = Math.round((bx[i] * k + zx) * dpr - half);
          const y0 = Math.round((by[i] * k + zy) * dpr - half);
          if (x0 >= W || y0 >= H || x0 + size <= 0 || y0 + size <= 0) continue;
          const xa = Math.max(0, x0);
          const xb = Math.min(W, x0 + size);
          for (let y = Math.max(0, y0), ye = Math.min(H, y0 + size); y < ye; y++) {
            for (let o = y * W + xa, e = y * W + xb; o < e; o++) {
              const d = buf[o];
              buf[o] = 0xff000000 | ((cb + ((d >> 16) & 255) * keep) << 16) | ((cg + ((d >> 8) & 255) * keep) << 8) | (cr + (d & 255) * keep);
            }
          }
        }
      }
    }
    ctx2d.putImageData(pixels, 0, 0);
  }

  /** The selected points by colour, cached until the selection or the grouping changes. */
  let picked: { from: number[]; of: [string, number[]][]; groups: [string, number[]][] } | null = null;
  function selectedGroups(): [string, number[]][] {
    if (picked?.from !== selected || picked.of !== groups) {
      const inside = new Uint8Array(n);
      for (const i of selected) inside[i] = 1;
      const mine = groups.map(([c, idx]) => [c, idx.filter((i) => inside[i])] as [string, number[]]);
      picked = { from: selected, of: groups, groups: mine.filter(([, idx]) => idx.length) };
    }
    return picked.groups;
  }

  let queued = false;
  function draw(): void {
    queued = false;
    const r = radius();
    const { k, x: zx, y: zy } = transform;
    const alpha = n > 20000 ? 0.75 : 0.9;
    // with a selection, the rest fades and the selected points are drawn again on top in
    // their own colours (rings around hundreds of dense points would merge into a blot)
    const layers: Layer[] = selected.length ? [[groups, FADED], [selectedGroups(), alpha]] : [[groups, alpha]];
    ctx2d.setTransform(dpr, 0, 0, dpr, 0, 0);
    if (n > SQUARES) drawSquares(r, layers);
    else {
      // discs read better than squares, and a few thousand draw fast enough
      ctx2d.clearRect(0, 0, width, HEIGHT);
      for (const [layer, a] of layers) {
        ctx2d.globalAlpha = a;
        for (const [colour, idx] of layer) {
          ctx2d.fillStyle = colour;
          ctx2d.beginPath();
          for (const i of idx) {
            const sx = bx[i] * k + zx;
            const sy = by[i] * k + zy;
            if (sx < -r || sy < -r || sx > width + r || sy > HEIGHT + r) continue;
            ctx2d.moveTo(sx + r, sy);
            ctx2d.arc(sx, sy, r, 0, 2 * Math.PI);
          }
          ctx2d.fill();
        }
      }
      ctx2d.globalAlpha = 1;
    }
    if (hovered >= 0) {
      ctx2d.strokeStyle = "#0969da";
      ctx2d.lineWidth = 2;
      ctx2d.beginPath();
      ctx2d.arc(bx[hovered] * k + zx, by[hovered] * k + zy, r + 3, 0, 2 * Math.PI);
      ctx2d.stroke();
    }
    if (focused >= 0 && keyboard && document.activeElement === canvas) {
      // black outside white: seen on every class colour and on the background
      for (const [colour, lw, off] of [["#111", 4, 5], ["#fff", 1.5, 5]] as [string, number, number][]) {
        ctx2d.strokeStyle = colour;
        ctx2d.lineWidth = lw;
        ctx2d.beginPath();
        ctx2d.arc(bx[focused] * k + zx, by[focused] * k + zy, r + off, 0, 2 * Math.PI);
        ctx2d.stroke();
      }
    }
  }
  function redraw(): void {
    if (!queued) {
      queued = true;
      requestAnimationFrame(draw);
    }
  }

  /** One legend entry: `name (count)`, or with *misclassified only* `name (shown of count)`,
   * dimmed when none of it is drawn. */
  function legendItem(colour: string, name: string, count: number, shown: number, title: string | null = null): HTMLElement {
    const text = state.mis ? ` ${name} (${shown.toLocaleString()} of ${count.toLocaleString()})` : ` ${name} (${count.toLocaleString()})`;
    return h("span", { title, class: state.mis && !shown ? "none" : null, "data-shown": shown }, h("i", { class: "dot", style: `background:${colour}` }), text);
  }

  function renderLegend(): void {
    if (state.color === "correct") {
      // an unlabelled sample (STL-10's unlabelled split: -1) is neither right nor wrong
      let right = 0;
      for (let i = 0; i < n; i++) if (doc.label[i] >= 0 && doc.pred[i] >= 0 && !wrong[i]) right++;
      const unknown = n - right - nWrong;
      fill(
        legend,
        legendItem(RIGHT, "correct", right, state.mis ? 0 : right),
        legendItem(WRONG, "misclassified", nWrong, nWrong),
        unknown ? legendItem(UNKNOWN, "no label or prediction", unknown, state.mis ? 0 : unknown) : null,
      );
      return;
    }
    const counts = new Map<number, number>();
    const drawn = new Map<number, number>();
    for (let i = 0; i < n; i++) {
      const l = doc.label[i];
      counts.set(l, (counts.get(l) ?? 0) + 1);
      if (!state.mis || wrong[i]) drawn.set(l, (drawn.get(l) ?? 0) + 1);
    }
    const shown = doc.classes.slice(0, 40).map((name, c) => legendItem(classColour(c, doc.classes.length), name, counts.get(c) ?? 0, drawn.get(c) ?? 0, name));
    fill(
      legend,
      shown,
      doc.classes.length > 40 ? h("span", { class: "muted" }, `… ${doc.classes.length - 40} more classes`) : null,
      counts.get(-1) ? legendItem(UNKNOWN, "unlabelled", counts.get(-1) ?? 0, drawn.get(-1) ?? 0) : null,
    );
  }

  function syncControls(): void {
    for (const b of colorSeg.querySelectorAll("button")) b.classList.toggle("on", b.dataset.color === state.color);
    for (const b of toolSeg.querySelectorAll("button")) {
      b.classList.toggle("on", b.dataset.tool === state.tool);
      b.setAttribute("aria-pressed", String(b.dataset.tool === state.tool));
    }
    hint.textContent =
      (state.tool === "pan"
        ? "scroll to zoom, drag to pan, shift-drag to select a box, click a dot to open its sample, Esc clears the selection"
        : `drag to ${state.tool === "box" ? "select a box" : "draw a lasso around dots"}, shift-drag to pan, scroll to zoom, click a dot to open its sample, Esc clears the selection`) +
      "; on the focused map, arrow keys move between dots and Enter opens one";
    canvas.style.cursor = state.tool === "pan" ? "grab" : "crosshair";
    misBox.checked = state.mis;
    const q = new URLSearchParams(ctx.params);
    if (state.color === "correct") q.set("color", "correct");
    else q.delete("color");
    if (state.mis) q.set("mis", "1");
    else q.delete("mis");
    if (state.tool !== "pan") q.set("tool", state.tool);
    else q.delete("tool");
    ctx.replaceParams(q);
  }

  function update(): void {
    syncControls();
    regroup();
    renderLegend();
    hideTip();
    redraw();
  }

  // -- hover and click ---------------------------------------------------------------------
  const className = (c: number) => (c < 0 ? "–" : classLabel(doc.classes[c], c));
  // a prediction is named by the dataset's class only when outputs are its classes
  const predName = (c: number) => (comparable ? className(c) : `output ${c}`);
  function pick(ev: MouseEvent): number {
    const rect = canvas.getBoundingClientRect();
    const [mx, my] = transform.invert([ev.clientX - rect.left, ev.clientY - rect.top]);
    const found = tree.find(mx, my, (radius() + 4) / transform.k);
    return found === undefined ? -1 : found;
  }
  function hideTip(): void {
    tip.hidden = true;
    if (hovered >= 0) {
      hovered = -1;
      redraw();
    }
  }
  /** A dot in words: what the tip shows, for the live region. */
  function describe(i: number): string {
    const id = doc.ids[i];
    const conf = doc.conf[i];
    const pred = doc.pred[i] >= 0 ? `, predicted ${predName(doc.pred[i])}${conf !== null ? ` (${pct(conf)})` : ""}${wrong[i] ? ", misclassified" : ""}` : "";
    return `sample #${id}: label ${className(doc.label[i])}${pred}${has(id) ? "" : " (not in this export: no page)"}`;
  }
  function showTip(i: number, ev: { clientX: number; clientY: number }): void {
    const rect = stage.getBoundingClientRect();
    if (hovered !== i) {
      hovered = i;
      const id = doc.ids[i];
      const right = doc.label[i] >= 0 && doc.pred[i] >= 0 && !wrong[i];
      fill(
        tip,
        pic(id)
          ? h("img", { class: "pixelated", src: ctx.api.pngUrl(p("runs", ctx.run, "samples", id, "image.png")), width: 96, height: 96, alt: `sample ${id}`, onerror: (e: Event) => (e.target as HTMLElement).replaceWith(noImage()) })
          : noPic(id),
        h(
          "div",
          null,
          h("b", null, `#${id}`),
          h("div", null, "label ", h("b", null, className(doc.label[i]))),
          doc.pred[i] >= 0
            ? h("div", { class: wrong[i] ? "error-text" : right ? "" : "muted" }, "predicted ", h("b", null, predName(doc.pred[i])), doc.conf[i] !== null ? ` (${pct(doc.conf[i] as number)})` : "")
            : h("div", { class: "muted" }, "no prediction"),
        ),
      );
      tip.dataset.sample = String(id);
      redraw();
    }
    tip.hidden = false;
    // the stage clips what passes its edges: beside the dot, but left of it or above it
    // where the tip (its measured size) would pass the right or bottom edge
    const x = ev.clientX - rect.left;
    const y = ev.clientY - rect.top;
    const w = tip.offsetWidth;
    const ht = tip.offsetHeight;
    const left = x + 14 + w <= rect.width ? x + 14 : x - 14 - w;
    const top = y + 14 + ht <= rect.height ? y + 14 : y - 14 - ht;
    tip.style.left = `${Math.max(0, Math.min(left, rect.width - w))}px`;
    tip.style.top = `${Math.max(0, Math.min(top, rect.height - ht))}px`;
  }
  canvas.addEventListener("mousemove", (ev) => {
    if (dragging) return;
    const i = pick(ev);
    if (i >= 0) showTip(i, ev);
    else hideTip();
    // a dot opens its sample's page where there is one (a static export holds the top-k's)
    canvas.style.cursor = i >= 0 && has(doc.ids[i]) ? "pointer" : state.tool === "pan" ? "grab" : "crosshair";
  });
  canvas.addEventListener("mouseleave", () => {
    hideTip();
    if (keyboard && focused >= 0 && document.activeElement === canvas) tipAt(focused);
  });
  let downAt: [number, number] | null = null;
  canvas.addEventListener("mousedown", (ev) => {
    downAt = [ev.clientX, ev.clientY];
    keyboard = false; // a pointer user: no keyboard ring
    redraw();
  });

  // -- keyboard --------------------------------------------------------------------------------
  /** The tip beside dot `i`, where it is drawn now. */
  function tipAt(i: number): void {
    const rect = canvas.getBoundingClientRect();
    showTip(i, { clientX: rect.left + bx[i] * transform.k + transform.x, clientY: rect.top + by[i] * transform.k + transform.y });
  }
  function setFocused(i: number): void {
    focused = i;
    if (i < 0) {
      delete canvas.dataset.focused;
      live.textContent = "";
      return;
    }
    canvas.dataset.focused = String(doc.ids[i]);
    live.textContent = describe(i);
  }
  /** Move the keyboard to dot `i`: panned into view when outside it, named, ringed. */
  function focusDot(i: number): void {
    setFocused(i);
    const sx = bx[i] * transform.k + transform.x;
    const sy = by[i] * transform.k + transform.y;
    const margin = 24;
    if (sx < margin || sx > width - margin || sy < margin || sy > HEIGHT - margin) sel.call(zoomer.translateTo, bx[i], by[i]);
    tipAt(i);
    redraw();
  }
  /** The drawn dot nearest the view's centre: where the keyboard starts. */
  function nearestToCentre(): number {
    const [cx, cy] = transform.invert([width / 2, HEIGHT / 2]);
    return tree.find(cx, cy) ?? -1;
  }
  /** The drawn dot nearest to dot `from` in direction (ux, uy) (y down): the nearest within
   * 45° of it, else the nearest anywhere on that side; -1 when there is none. */
  function step(from: number, ux: number, uy: number): number {
    let best = -1;
    let bestD = Infinity;
    let side = -1;
    let sideD = Infinity;
    for (const [, idx] of groups) {
      for (const j of idx) {
        const dx = bx[j] - bx[from];
        const dy = by[j] - by[from];
        const along = dx * ux + dy * uy;
        if (j === from || along <= 0) continue;
        const d = dx * dx + dy * dy;
        if (Math.abs(dx * uy - dy * ux) <= along) {
          if (d < bestD || (d === bestD && j < best)) [best, bestD] = [j, d];
        } else if (d < sideD || (d === sideD && j < side)) [side, sideD] = [j, d];
      }
    }
    return best >= 0 ? best : side;
  }
  const ARROWS: Record<string, [number, number, string]> = {
    ArrowRight: [1, 0, "right"],
    ArrowLeft: [-1, 0, "left"],
    ArrowUp: [0, -1, "up"],
    ArrowDown: [0, 1, "down"],
  };
  canvas.addEventListener("focus", () => {
    keyboard = canvas.matches(":focus-visible");
    if (!keyboard) return;
    if (focused < 0) setFocused(nearestToCentre());
    if (focused >= 0) focusDot(focused);
  });
  canvas.addEventListener("blur", () => {
    hideTip();
    redraw();
  });
  canvas.addEventListener("keydown", (ev) => {
    if (ev.altKey || ev.ctrlKey || ev.metaKey) return;
    const arrow = ARROWS[ev.key];
    if (arrow) {
      ev.preventDefault(); // the page does not scroll
      keyboard = true;
      const next = focused < 0 ? nearestToCentre() : step(focused, arrow[0], arrow[1]);
      if (next >= 0) focusDot(next);
      else live.textContent = focused >= 0 ? `no sample further ${arrow[2]} of #${doc.ids[focused]}` : "no sample is drawn";
    } else if ((ev.key === "Enter" || ev.key === " ") && focused >= 0) {
      ev.preventDefault();
      if (has(doc.ids[focused])) ctx.navigate(ctx.href("sample", doc.ids[focused]));
      else live.textContent = `sample #${doc.ids[focused]} is not in this export: it has no page`;
    } else if (ev.key === "+" || ev.key === "=" || ev.key === "-") {
      ev.preventDefault();
      const at: [number, number] = focused >= 0 ? [bx[focused] * transform.k + transform.x, by[focused] * transform.k + transform.y] : [width / 2, HEIGHT / 2];
      sel.call(zoomer.scaleBy, ev.key === "-" ? 1 / 1.5 : 1.5, at);
      if (focused >= 0) tipAt(focused);
    }
  });
  let selectedByDrag = false;
  canvas.addEventListener("click", (ev) => {
    if (selectedByDrag) return void (selectedByDrag = false);
    // a drag (pan or box) that ends on a dot is not a click on it
    if (downAt && Math.hypot(ev.clientX - downAt[0], ev.clientY - downAt[1]) > 4) return;
    const i = pick(ev);
    if (i >= 0 && has(doc.ids[i])) ctx.navigate(ctx.href("sample", doc.ids[i]));
  });

  // -- box and lasso select ------------------------------------------------------------------
  // Dragging selects with the chosen tool; shift swaps pan and select (shift-drag selects a
  // box when the tool is pan, and pans when it is box or lasso).
  const selects = (ev: MouseEvent): boolean => (state.tool !== "pan") !== ev.shiftKey;
  let dragging = false;
  let shape: "box" | "lasso" = "box";
  let pts: [number, number][] = []; // the gesture's points, canvas pixels
  const local = (ev: MouseEvent): [number, number] => {
    const rect = canvas.getBoundingClientRect();
    return [ev.clientX - rect.left, ev.clientY - rect.top];
  };
  function endGesture(): void {
    dragging = false;
    band.hidden = true;
    lasso.classList.remove("on");
    lassoPath.setAttribute("d", "");
  }
  canvas.addEventListener("pointerdown", (ev) => {
    if (ev.button || !selects(ev)) return;
    dragging = true;
    shape = state.tool === "lasso" ? "lasso" : "box";
    pts = [local(ev)];
    canvas.setPointerCapture(ev.pointerId);
    hideTip();
  });
  canvas.addEventListener("pointermove", (ev) => {
    if (!dragging) return;
    if (shape === "box") {
      const [ax, ay] = pts[0];
      const [bxp, byp] = local(ev);
      pts[1] = [bxp, byp];
      Object.assign(band.style, { left: `${Math.min(ax, bxp)}px`, top: `${Math.min(ay, byp)}px`, width: `${Math.abs(bxp - ax)}px`, height: `${Math.abs(byp - ay)}px` });
      band.hidden = false;
      return;
    }
    // every position the pointer passed through, not only the one per frame
    for (const e of ev.getCoalescedEvents?.() ?? [ev]) {
      const q = local(e);
      const last = pts[pts.length - 1];
      if (Math.abs(q[0] - last[0]) + Math.abs(q[1] - last[1]) >= 1) pts.push(q);
    }
    lassoPath.setAttribute("d", `M${pts.map(([x, y]) => `${x},${y}`).join("L")}Z`);
    lasso.classList.add("on");
  });
  canvas.addEventListener("pointercancel", endGesture);
  canvas.addEventListener("pointerup", (ev) => {
    if (!dragging) return;
    const end = local(ev);
    const [sx, sy] = pts[0];
    const moved = Math.hypot(end[0] - sx, end[1] - sy) > 4 || pts.some(([x, y]) => Math.hypot(x - sx, y - sy) > 4);
    endGesture();
    if (!moved) return; // a click, not a selection: the click handler opens the dot
    selectedByDrag = true; // a lasso may end where it began: its click opens nothing
    const last = pts[pts.length - 1];
    if (shape === "lasso" && (end[0] !== last[0] || end[1] !== last[1])) pts.push(end);
    if (shape === "box") pts = [pts[0], end];
    if (shape === "lasso" && pts.length < 3) return;
    applySelection(shape === "box" ? boxCorners(pts[0], pts[1]) : pts);
  });
  const boxCorners = ([ax, ay]: [number, number], [cx, cy]: [number, number]): [number, number][] => [
    [ax, ay],
    [cx, ay],
    [cx, cy],
    [ax, cy],
  ];

  /** Select the shown dots inside the polygon `screen` (canvas pixels): the quadtree gives the
   * dots in its bounding box, the even-odd test in data coordinates keeps those inside. */
  function applySelection(screen: [number, number][]): void {
    const m = screen.length;
    const xs = new Float64Array(m);
    const ys = new Float64Array(m);
    let [lx, hx, ly, hy] = [Infinity, -Infinity, Infinity, -Infinity];
    for (let j = 0; j < m; j++) {
      const [ux, uy] = transform.invert(screen[j]); // base coordinates, as the quadtree's
      lx = Math.min(lx, ux);
      hx = Math.max(hx, ux);
      ly = Math.min(ly, uy);
      hy = Math.max(hy, uy);
      xs[j] = (ux - tx) / scale;
      ys[j] = (ty - uy) / scale;
    }
    const found: number[] = [];
    tree.visit((node, qx0, qy0, qx1, qy1) => {
      if (!node.length) {
        let leaf: typeof node | undefined = node;
        while (leaf && !leaf.length) {
          const i = (leaf as { data: number }).data;
          if (bx[i] >= lx && bx[i] <= hx && by[i] >= ly && by[i] <= hy && insidePolygon(doc.x[i], doc.y[i], xs, ys)) found.push(i);
          leaf = (leaf as { next?: typeof node }).next;
        }
      }
      return qx0 > hx || qy0 > hy || qx1 < lx || qy1 < ly;
    });
    selected = found.sort((a, b) => doc.ids[a] - doc.ids[b]);
    renderSelection();
    redraw();
  }
  function clearSelection(): void {
    selected = [];
    renderSelection();
    redraw();
  }
  const onKey = (ev: KeyboardEvent) => {
    if (ev.key !== "Escape" || ev.target instanceof HTMLInputElement) return;
    if (dragging) endGesture();
    else if (selected.length) clearSelection();
  };
  document.addEventListener("keydown", onKey);
  ctx.signal.addEventListener("abort", () => document.removeEventListener("keydown", onKey));

  function renderSelection(): void {
    pickedBadge.hidden = !selected.length;
    if (!selected.length) {
      fill(selection);
      return;
    }
    const nw = selected.filter((i) => wrong[i]).length;
    const misNote = labelled ? ` (${nw} misclassified)` : "";
    pickedBadge.textContent = `${selected.length.toLocaleString()} selected${misNote}: show ↓`;
    fill(
      selection,
      h("h2", null, `Selected: ${selected.length.toLocaleString()} samples`, h("span", { class: "sub" }, misNote), " ", h("button", { type: "button", onclick: clearSelection }, "clear")),
      h(
        "div",
        { class: "sample-grid" },
        selected.slice(0, SELECTION_SHOWN).map((i) =>
          h(
            "a",
            { class: "sample-card", href: has(doc.ids[i]) ? ctx.href("sample", doc.ids[i]) : null, "data-sample": doc.ids[i] },
            pic(doc.ids[i])
              ? h("img", { src: ctx.api.pngUrl(p("runs", ctx.run, "samples", doc.ids[i], "image.png")), loading: "lazy", alt: `sample ${doc.ids[i]}`, width: 80, height: 80, onerror: (e: Event) => (e.target as HTMLElement).replaceWith(noImage()) })
              : noPic(doc.ids[i]),
            h("span", null, `#${doc.ids[i]}`),
            h("small", { class: wrong[i] ? "error-text" : "" }, doc.pred[i] >= 0 ? `${className(doc.label[i])} → ${predName(doc.pred[i])}` : className(doc.label[i])),
          ),
        ),
      ),
      selected.length > SELECTION_SHOWN ? h("p", { class: "muted" }, `… and ${selected.length - SELECTION_SHOWN} more (select a smaller area)`) : null,
    );
  }

  // -- zoom ------------------------------------------------------------------------------------
  const zoomer = zoom<HTMLCanvasElement, unknown>()
    .scaleExtent([0.5, 400])
    .filter((ev: Event) => ev.type === "wheel" || (!(ev as MouseEvent).button && !selects(ev as MouseEvent)))
    .on("zoom", (ev: { transform: ZoomTransform }) => {
      transform = ev.transform;
      hideTip();
      redraw();
    });
  const sel = select(canvas);
  sel.call(zoomer);
  reset.addEventListener("click", () => sel.call(zoomer.transform, zoomIdentity));
  for (const b of colorSeg.querySelectorAll("button"))
    b.addEventListener("click", () => {
      state.color = b.dataset.color === "correct" ? "correct" : "class";
      update();
    });
  for (const b of toolSeg.querySelectorAll("button"))
    b.addEventListener("click", () => {
      state.tool = (b.dataset.tool ?? "pan") as Tool;
      syncControls();
    });
  misBox.addEventListener("change", () => {
    state.mis = misBox.checked;
    selected = [];
    renderSelection();
    update();
  });
  update();
  draw();
}
