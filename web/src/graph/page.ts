/**
 * The graph page (`#/r/RUN/graph?focus=LABEL`): the traced graph nested by module, laid
 * out one group at a time in a Web Worker, drawn as SVG with pan and zoom. Groups open
 * and close on click; search finds ops by label, type or module path; hovering shows an
 * op's shapes, params, FLOPs and source line; a probed op links to its layer page.
 */
import { select } from "d3-selection";
import { zoom, zoomIdentity, zoomTransform, type ZoomBehavior } from "d3-zoom";

import { p, type RunSummary } from "../api";
import type { PageContext } from "../context";
import "./graph.css";
import type { GroupLayout, WorkerIn, WorkerOut } from "./layout.worker";
import LayoutWorker from "./layout.worker?worker";
import {
  frameTitle,
  type GraphView,
  groupKey,
  groupLines,
  IN,
  type ItemKey,
  nodeKey,
  nodeLines,
  OUT,
  shapeText,
  Structure,
  type ViewNode,
} from "./model";

export async function renderGraphPage(root: HTMLElement, ctx: PageContext): Promise<void> {
  const page = el("div", "graph-page");
  root.append(page);
  const status = el("div", "graph-status");
  status.textContent = "Loading the graph\u2026";
  page.append(status);
  let doc: GraphView;
  try {
    doc = await ctx.api.json<GraphView>(p("runs", ctx.run, "graph"));
  } catch (e) {
    status.classList.add("error");
    status.textContent = `Cannot show the graph: ${(e as Error).message}`;
    page.dataset.error = "1";
    return;
  }
  if (ctx.signal.aborted) return;
  if (!doc.nodes.some((n) => n.L)) await linkLayers(doc, ctx);
  new GraphPage(page, status, doc, ctx).start();
}

/** Marks each probed op with its layer (`L`) from the run's manifest, when the document
 * came without them: the manifest's layers name the op label they probe. */
async function linkLayers(doc: GraphView, ctx: PageContext): Promise<void> {
  let summary: RunSummary;
  try {
    summary = await ctx.api.json<RunSummary>(p("runs", ctx.run));
  } catch {
    return; // the graph still draws; only the links to layer pages are missing
  }
  const byLabel = new Map(doc.nodes.map((n) => [n.l, n]));
  for (const layer of summary.layers ?? []) {
    if (!layer.op) continue;
    const n = byLabel.get(layer.op) ?? byLabel.get(layer.op.replace(/:\d+$/, ""));
    if (n && !n.L) n.L = layer.name;
  }
}

function el<K extends keyof HTMLElementTagNameMap>(tag: K, cls?: string): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  return e;
}

const esc = (s: string) =>
  s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]!);
const fmt = (n: number) => n.toLocaleString("en-US");

/** The graph's FLOPs, "at least 96 FLOPs, 1 op of unknown FLOPs" where ops whose FLOPs
 * lurker cannot count are left out of the sum: a lower bound never passes for the total. */
function flopsText(d: GraphView): string {
  const k = d.flops_unknown ?? 0;
  return k ? `at least ${fmt(d.flops)} FLOPs, ${fmt(k)} op${k === 1 ? "" : "s"} of unknown FLOPs` : `${fmt(d.flops)} FLOPs`;
}
const f1 = (x: number) => Math.round(x * 10) / 10;
/** The red pill on a marked node or box, its right end at (right, top) less a little. */
const nfBadge = (right: number, top: number, text: string) => {
  const w = 8 + 5.5 * text.length;
  return (
    `<g class="nf-badge"><rect x="${f1(right - w)}" y="${f1(top - 7)}" width="${f1(w)}" height="13" rx="6"/>` +
    `<text x="${f1(right - w / 2)}" y="${f1(top + 3)}" text-anchor="middle">${text}</text></g>`
  );
};
/** "train" at a node's bottom-left corner: it ran as in training (a batch_norm or dropout
 * called with training=True), which an eval model's op never does. */
const trainBadge = (left: number, bottom: number) =>
  `<g class="train-badge"><rect x="${f1(left)}" y="${f1(bottom - 6)}" width="34" height="13" rx="6"/>` +
  `<text x="${f1(left + 17)}" y="${f1(bottom + 4)}" text-anchor="middle">train</text></g>`;

/** An op's call arguments (the document's one line) as HTML, `training=True` in bold. */
export function argsHtml(args: string | undefined): string {
  return esc(args ?? "").replace(/\btraining=True\b/g, '<b class="train">training=True</b>');
}

/** A module's tooltip row: how many probed layers inside it made NaN or +inf. */
const nfTip = (n: number) =>
  n ? `<b class="nf">${n} probed ${n === 1 ? "layer" : "layers"} inside made NaN or +inf</b>` : "";

/** An SVG path through points joined by straight segments, each corner rounded with radius
 * up to ``r`` (less where a segment is short); repeated points are dropped. */
function roundedPath(pts: [number, number][], r: number): string {
  const p = pts.filter((q, i) => i === 0 || q[0] !== pts[i - 1][0] || q[1] !== pts[i - 1][1]);
  let d = `M${f1(p[0][0])},${f1(p[0][1])}`;
  for (let i = 1; i < p.length - 1; i++) {
    const [ax, ay] = p[i - 1];
    const [bx, by] = p[i];
    const [cx, cy] = p[i + 1];
    const l1 = Math.hypot(bx - ax, by - ay);
    const l2 = Math.hypot(cx - bx, cy - by);
    const k = Math.min(r, l1 / 2, l2 / 2);
    const sx = bx - ((bx - ax) / l1) * k;
    const sy = by - ((by - ay) / l1) * k;
    const ex = bx + ((cx - bx) / l2) * k;
    const ey = by + ((cy - by) / l2) * k;
    d += ` L${f1(sx)},${f1(sy)} Q${f1(bx)},${f1(by)} ${f1(ex)},${f1(ey)}`;
  }
  const last = p[p.length - 1];
  return d + ` L${f1(last[0])},${f1(last[1])}`;
}
const TIMES = "\u00d7";

/** Whether the segment (x0, y0)-(x1, y1) passes through box `b` ([x0, y0, x1, y1]) shrunk
 * by 2 px (touching its border is not passing under it): Liang-Barsky clipping. */
function crosses(x0: number, y0: number, x1: number, y1: number, b: [number, number, number, number]): boolean {
  const dx = x1 - x0;
  const dy = y1 - y0;
  let t0 = 0;
  let t1 = 1;
  const sides: [number, number][] = [
    [-dx, x0 - (b[0] + 2)],
    [dx, b[2] - 2 - x0],
    [-dy, y0 - (b[1] + 2)],
    [dy, b[3] - 2 - y0],
  ];
  for (const [p, q] of sides) {
    if (p === 0) {
      if (q <= 0) return false; // parallel to this side and outside it
      continue;
    }
    const t = q / p;
    if (p < 0) t0 = Math.max(t0, t);
    else t1 = Math.min(t1, t);
    if (t0 >= t1) return false;
  }
  return true;
}

/** A forward edge's points (flat `x, y, ...`) with each straight step that passes under a
 * node (`blocked`) replaced by a right-angled one that does not. Dagre ends a route where
 * the line to its first bend leaves the source's box, often its side, and that line (and
 * the one from the last bend into the target) cuts through a node beside it in the same
 * rank, as in Faster R-CNN's box decoding; the step instead leaves the source's bottom,
 * goes down to the bend's row (the gap between ranks) and across, and enters the target's
 * top from the row above it. A step with no clear alternative is kept. */
function unblock(
  flat: number[],
  ra: [number, number, number, number],
  rb: [number, number, number, number],
  blocked: (x0: number, y0: number, x1: number, y1: number) => boolean,
): number[] {
  const pts: [number, number][] = [];
  for (let i = 0; i + 1 < flat.length; i += 2) pts.push([flat[i], flat[i + 1]]);
  const clearPath = (p: [number, number][]) => p.every((q, i) => i === 0 || !blocked(p[i - 1][0], p[i - 1][1], q[0], q[1]));
  const within = (x: number, r: [number, number, number, number]) => Math.min(Math.max(x, r[0] - r[2] / 2 + 6), r[0] + r[2] / 2 - 6);
  const out: [number, number][] = [pts[0]];
  for (let i = 1; i < pts.length; i++) {
    const s = out[out.length - 1];
    const e = pts[i];
    if (!blocked(s[0], s[1], e[0], e[1])) {
      out.push(e);
      continue;
    }
    const first = out.length === 1;
    const last = i === pts.length - 1;
    const from: [number, number] = first ? [within(e[0], ra), ra[1] + ra[3] / 2] : s;
    const to: [number, number] = last ? [within(from[0], rb), rb[1] - rb[3] / 2] : e;
    const tries: [number, number][][] = [];
    if (first && last) {
      const y = (from[1] + to[1]) / 2;
      tries.push([from, [from[0], y], [to[0], y], to]);
    } else if (last) tries.push([from, [to[0], from[1]], to], [from, [from[0], to[1]], to]);
    else tries.push([from, [from[0], to[1]], to], [from, [to[0], from[1]], to]);
    const ok = tries.find(clearPath);
    if (!ok) {
      out.push(e);
      continue;
    }
    if (first) out[0] = ok[0];
    for (const q of ok.slice(1)) if (q[0] !== out[out.length - 1][0] || q[1] !== out[out.length - 1][1]) out.push(q);
  }
  return out.flatMap(([x, y]) => [f1(x), f1(y)]);
}

/** The boxes ([x0, y0, x1, y1]) in a uniform grid, so that a query visits only the boxes
 * near it: routing each edge past every drawn item was edges x items box tests per draw
 * (Keypoint R-CNN opened to 600 items: a third of a second per click or Enter). */
class BoxGrid {
  private static readonly MAX_SPAN = 4096;
  private cells = new Map<number, number[]>();
  private always: number[] = [];
  private seen: Uint32Array;
  private stamp = 0;
  constructor(
    private boxes: [number, number, number, number][],
    private size = 96,
  ) {
    this.seen = new Uint32Array(boxes.length);
    boxes.forEach((b, i) => {
      // a box not finite, or spanning more cells than a query may, is tried on every query
      const span = (this.cell(b[2]) - this.cell(b[0]) + 1) * (this.cell(b[3]) - this.cell(b[1]) + 1);
      if (!b.every(Number.isFinite) || !(span <= BoxGrid.MAX_SPAN)) {
        this.always.push(i);
        return;
      }
      for (let cx = this.cell(b[0]); cx <= this.cell(b[2]); cx++)
        for (let cy = this.cell(b[1]); cy <= this.cell(b[3]); cy++) {
          const key = cx * 131072 + cy;
          const list = this.cells.get(key);
          if (list) list.push(i);
          else this.cells.set(key, [i]);
        }
    });
  }

  private cell(v: number): number {
    return Math.floor(v / this.size) + 65536;
  }

  /** Whether `hit` holds for some box (by index) that may meet [x0, y0, x1, y1]; each box
   * is tried at most once, and only those in the grid cells the query's box covers. */
  some(x0: number, y0: number, x1: number, y1: number, hit: (i: number) => boolean): boolean {
    const [ax, bx] = x0 <= x1 ? [x0, x1] : [x1, x0];
    const [ay, by] = y0 <= y1 ? [y0, y1] : [y1, y0];
    const c0 = this.cell(ax);
    const c1 = this.cell(bx);
    const r0 = this.cell(ay);
    const r1 = this.cell(by);
    if (!((c1 - c0 + 1) * (r1 - r0 + 1) <= this.boxes.length)) return this.boxes.some((_, i) => hit(i));
    const stamp = ++this.stamp;
    for (const i of this.always) {
      this.seen[i] = stamp;
      if (hit(i)) return true;
    }
    for (let cx = c0; cx <= c1; cx++)
      for (let cy = r0; cy <= r1; cy++) {
        const list = this.cells.get(cx * 131072 + cy);
        if (!list) continue;
        for (const i of list) {
          if (this.seen[i] === stamp) continue;
          this.seen[i] = stamp;
          if (hit(i)) return true;
        }
      }
    return false;
  }
}

type Target = { k: number } | { g: number };

/** An SVG element of the drawing and its bounding box [x0, y0, x1, y1] in graph space. */
type Piece = [string, number, number, number, number];

/** Above this many drawn items, only those near the visible area are put in the DOM (the
 * rest as the view pans and zooms there): a row of 4,000 boxes is 28,000 SVG elements,
 * and the browser's style and layout of them, not the layout's, took a second per draw. */
const CULL_AT = 1500;

/** The zoom's range. Zooming out stops at MIN_ZOOM or, for a graph too big to show whole
 * at it (Keypoint R-CNN with every group open), at the scale that shows it whole: Fit and
 * the wheel both reach the whole graph, never a part of it at a floor. */
const MIN_ZOOM = 0.02;
const MAX_ZOOM = 4;

/** The bounding box of an SVG path's `x,y` points (control points included). */
function pathBox(d: string): [number, number, number, number] {
  let x0 = Infinity;
  let y0 = Infinity;
  let x1 = -Infinity;
  let y1 = -Infinity;
  for (const m of d.matchAll(/(-?[\d.]+),(-?[\d.]+)/g)) {
    const x = +m[1];
    const y = +m[2];
    if (x < x0) x0 = x;
    if (x > x1) x1 = x;
    if (y < y0) y0 = y;
    if (y > y1) y1 = y;
  }
  return [x0, y0, x1, y1];
}

class GraphPage {
  private st: Structure;
  private expanded: Set<number>;
  private layouts: Record<number, GroupLayout> = {};
  /** absolute centre and size of every drawn item */
  private rects = new Map<ItemKey, [number, number, number, number]>();
  private more!: HTMLButtonElement;
  private worker: Worker;
  private reqId = 0;
  private pending = new Map<number, (l: Record<number, GroupLayout>) => void>();
  private svg!: SVGSVGElement;
  private viewport!: SVGGElement;
  private zoomer!: ZoomBehavior<SVGSVGElement, unknown>;
  private tip!: HTMLDivElement;
  private hitsEl!: HTMLSpanElement;
  /** "see LABEL live": the live view of the op last clicked, searched or focused. */
  private liveLink!: HTMLAnchorElement;
  /** The selected op's call (its arguments), under the bar: what a tooltip shows only
   * while hovered, kept for the op last clicked, searched or focused. */
  private callLine!: HTMLDivElement;
  private matches: Target[] = [];
  private matchAt = -1;
  private current: ItemKey | null = null;
  private draws = 0;
  /** the drawing: edges (under) and items, each with its box; only those meeting
   * `painted` (graph space) are in the DOM when there are more than CULL_AT items */
  private pieces: { edges: Piece[]; items: Piece[]; n: number } = { edges: [], items: [], n: 0 };
  private painted: [number, number, number, number] | null = null;
  /** the drawing's box in graph space [x0, y0, x1, y1] (see draw) */
  private extent: [number, number, number, number] = [0, 0, 100, 100];
  private repaint = 0;
  private byLabel = new Map<string, number>();
  /** per module group: how many of the nodes inside it (its drawn chain) are marked NaN or
   * +inf, so a closed box that hides them can say so */
  private nfIn = new Map<number, number>();
  /** The keyboard's item (roving focus: the SVG is one tab stop, the arrow keys move this
   * through the drawn modules and probed layers in execution order, so a 5,000-node graph
   * puts no tabindex on thousands of elements), and that order, made once per draw. */
  private kb: ItemKey | null = null;
  private kbOrder: ItemKey[] | null = null;
  private kbSay!: HTMLSpanElement;
  /** The keyboard is in use in the graph (a click or drag there hides the ring). */
  private kbOn = false;

  constructor(
    private page: HTMLElement,
    private status: HTMLElement,
    private doc: GraphView,
    private ctx: PageContext,
  ) {
    this.st = new Structure(doc);
    this.expanded = this.st.defaultExpanded();
    doc.nodes.forEach((n, k) => this.byLabel.set(n.l, k));
    // a probed layer's name finds its op too (an Explain result names its layer so)
    doc.nodes.forEach((n, k) => {
      if (n.L && !this.byLabel.has(n.L)) this.byLabel.set(n.L, k);
    });
    doc.nodes.forEach((n, k) => {
      if (n.nf !== undefined) for (const g of this.st.chains[k]) this.nfIn.set(g, (this.nfIn.get(g) ?? 0) + 1);
    });
    this.worker = new LayoutWorker();
    this.worker.onmessage = (ev: MessageEvent<WorkerOut>) => this.onWorker(ev.data);
    this.worker.onerror = (ev) => this.fail(`the layout worker failed: ${ev.message || "unknown error"}`);
    ctx.signal.addEventListener("abort", () => this.worker.terminate());
  }

  start(): void {
    this.build();
    this.worker.postMessage({ type: "init", doc: this.doc } satisfies WorkerIn);
    const focus = this.ctx.params.get("focus");
    const target = focus ? this.findLabel(focus) : null;
    if (focus && target === null) this.say(`No op '${focus}' in this graph.`, true);
    if (target !== null) for (const g of this.st.opening(target)) this.expanded.add(g);
    this.relayout().then(() => {
      if (target !== null) this.reveal({ k: target }, false);
      else this.fitInitial();
      this.page.dataset.ready = "1";
    });
  }

  // ------------------------------------------------------------------ worker
  private onWorker(m: WorkerOut): void {
    if (m.type === "progress" && m.id === this.reqId && m.total > 1)
      this.say(`Laying out ${m.done} of ${m.total} groups\u2026`);
    else if (m.type === "layout") {
      this.page.dataset.layoutMs = String(Math.round(m.ms));
      this.pending.get(m.id)?.(m.groups);
      this.pending.delete(m.id);
    } else if (m.type === "error") this.fail(`layout failed: ${m.message}`);
  }

  /** Lays out the open groups (in the worker) and draws them; resolves when drawn. Only
   * the latest request is drawn, so quick clicks never draw a stale layout. */
  private relayout(): Promise<void> {
    const id = ++this.reqId;
    const open = [...this.expanded];
    const slow = setTimeout(() => this.say("Laying out\u2026"), 150);
    return new Promise<void>((resolve) => {
      this.pending.set(id, (groups) => {
        clearTimeout(slow);
        if (id !== this.reqId || this.ctx.signal.aborted) return resolve();
        this.layouts = groups;
        this.draw();
        this.say("");
        resolve();
      });
      this.worker.postMessage({ type: "layout", id, expanded: open } satisfies WorkerIn);
    });
  }

  private say(text: string, error = false): void {
    if (error || !this.status.classList.contains("error")) {
      this.status.textContent = text;
      this.status.classList.toggle("error", error);
    }
  }

  private fail(text: string): void {
    this.say(`Cannot lay out the graph: ${text}`, true);
    this.page.dataset.error = "1";
  }

  // ------------------------------------------------------------------ DOM
  private build(): void {
    const d = this.doc;
    const bar = el("div", "graph-bar");
    const h1 = el("h1");
    h1.textContent = `Graph of ${d.model}`;
    const facts = el("span", "facts");
    facts.textContent =
      `${fmt(d.ops)} ops \u00b7 ${fmt(d.params)} params \u00b7 ${flopsText(d)}` +
      (d.complete ? "" : ` \u00b7 partial: failed at ${d.failed}`);
    const search = el("input");
    search.type = "search";
    search.placeholder = "Search op, type or module path";
    search.setAttribute("aria-label", "Search the graph");
    this.hitsEl = el("span", "hits");
    const fit = el("button");
    fit.textContent = "Fit";
    fit.title = "Show the whole graph";
    fit.onclick = () => this.fit();
    const reset = el("button");
    reset.textContent = "Collapse";
    reset.title = "Back to the model's top-level modules";
    reset.onclick = () => {
      this.expanded = this.st.defaultExpanded();
      this.relayout().then(() => this.fitInitial());
    };
    this.liveLink = el("a", "live-link");
    this.liveLink.hidden = true;
    // the search box, its buttons and its match count wrap as one group: at 800 px they
    // go under the title together (the buttons alone wrapped, behind the empty count)
    const tools = el("div", "graph-tools");
    tools.append(search, fit, reset, this.hitsEl);
    bar.append(h1, facts, tools, this.liveLink);
    let timer = 0;
    search.addEventListener("input", () => {
      clearTimeout(timer);
      timer = window.setTimeout(() => this.search(search.value), 120);
    });
    search.addEventListener("keydown", (ev) => {
      if (ev.key !== "Enter") return;
      ev.preventDefault();
      clearTimeout(timer);
      if (search.value.trim() && !this.matches.length) this.search(search.value);
      this.next(ev.shiftKey ? -1 : 1);
    });

    const legend = el("div", "graph-legend");
    legend.innerHTML = this.legendKinds()
      .map(([c, t]) => `<span data-kind="${c}"><i class="${c}"></i>${t}</span>`)
      .join("");

    const canvas = el("div", "graph-canvas");
    this.svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    this.svg.setAttribute("class", "graph");
    this.svg.innerHTML =
      `<defs>${marker("gv-arrow", "#595959")}${marker("gv-arrow-b", "#7d26cd")}${marker("gv-arrow-k", "#3a5fcd")}</defs>` +
      `<g class="viewport"></g>`;
    this.viewport = this.svg.querySelector("g.viewport")!;
    this.tip = el("div", "graph-tip");
    this.tip.hidden = true;
    // the first view's cue that the graph goes on below it (a long chain such as the
    // digits CNN: its classifier was off screen, said only by a percentage above)
    this.more = el("button", "graph-more") as HTMLButtonElement;
    this.more.type = "button";
    this.more.hidden = true;
    this.more.onclick = () => this.fit();
    canvas.append(this.svg, this.tip, this.more);
    // before d3-zoom reads its floor for this wheel turn (the view may have been resized)
    canvas.addEventListener("wheel", () => this.zoomFloor(), { capture: true, passive: true });
    this.page.insertBefore(bar, this.status);
    this.callLine = el("div", "graph-call");
    this.callLine.hidden = true;
    this.page.insertBefore(this.callLine, this.status);
    const nan = this.nonfiniteLine();
    if (nan) this.page.insertBefore(nan, this.status);
    this.page.append(legend, canvas);

    this.zoomer = zoom<SVGSVGElement, unknown>()
      .scaleExtent([MIN_ZOOM, MAX_ZOOM])
      .on("zoom", (ev) => {
        this.viewport.setAttribute("transform", ev.transform.toString());
        // the bottom reached (dragged or scrolled there): the cue has said its piece
        if (!this.more.hidden && ev.transform.applyY(this.extent[3]) <= (this.svg.clientHeight || 600)) this.more.hidden = true;
        this.tip.hidden = true; // what it described has moved from under the pointer
        this.paintIfMoved();
      });
    select(this.svg).call(this.zoomer).on("dblclick.zoom", null);

    this.svg.addEventListener("click", (ev) => this.onClick(ev));
    this.svg.setAttribute("tabindex", "0");
    this.svg.setAttribute("role", "application");
    this.svg.setAttribute(
      "aria-label",
      `Graph of ${d.model}: arrow keys go through its modules and probed layers in execution order, Enter opens or closes a module or opens a probed layer's units`,
    );
    this.kbSay = el("span", "visually-hidden");
    this.kbSay.setAttribute("aria-live", "polite");
    canvas.append(this.kbSay);
    this.svg.addEventListener("keydown", (ev) => this.onKey(ev));
    this.svg.addEventListener("pointerdown", () => {
      this.kbOn = false;
      this.kbMark();
    });
    this.svg.addEventListener("focus", () => {
      if (!this.svg.matches(":focus-visible")) return; // focused by a click: no ring, no pan
      this.kbOn = true;
      if (this.kb === null || !this.rects.has(this.kb)) this.kb = this.kbList()[0] ?? null;
      this.kbShow(true);
    });
    this.svg.addEventListener("blur", () => {
      this.kbMark();
      this.tip.hidden = true;
    });
    this.svg.addEventListener("mouseover", (ev) => this.onHover(ev));
    this.svg.addEventListener("mousemove", (ev) => this.moveTip(ev));
    this.svg.addEventListener("mouseleave", () => (this.tip.hidden = true));
  }

  /** "NaN or +inf first appears at LAYER (n samples); N layers affected", its layer a link
   * that opens and centres that node; null when no probed layer made NaN or +inf. */
  private nonfiniteLine(): HTMLElement | null {
    const d = this.doc;
    const k = d.first_nonfinite;
    if (k === undefined || !d.nodes[k]) return null;
    const n = d.nodes[k];
    const count = d.nodes.filter((m) => m.nf !== undefined).length;
    const line = el("div", "graph-nonfinite");
    const a = el("a");
    a.textContent = n.L ?? n.l;
    a.href = `${this.ctx.href("graph")}?focus=${encodeURIComponent(n.l)}`;
    a.title = `show ${n.l} in the graph`;
    a.onclick = (ev) => {
      ev.preventDefault();
      const q = new URLSearchParams(this.ctx.params);
      q.set("focus", n.l);
      this.ctx.replaceParams(q);
      void this.reveal({ k }, true);
    };
    const samples = n.nf ? ` (on at least ${fmt(n.nf)} ${n.nf === 1 ? "sample" : "samples"})` : "";
    line.append(
      "Among the probed layers, NaN or +inf first appears at ",
      a,
      `${samples}; ${count} probed ${count === 1 ? "layer" : "layers"} affected (outlined in red).`,
    );
    return line;
  }

  /** The legend's entries: only the kinds of node, module and edge this graph has. */
  private legendKinds(): [string, string][] {
    const d = this.doc;
    const kinds = new Set(d.nodes.map((n) => (n.k ?? "op") + (n.P ? "+P" : "")));
    const has = (k: string) => kinds.has(k) || kinds.has(k + "+P");
    const all: [string, string, boolean][] = [
      ["l-in", "input", has("input")],
      ["l-out", "output", has("output")],
      ["l-param", "op with parameters", kinds.has("op+P") || kinds.has("generated+P")],
      ["l-op", "op", kinds.has("op")],
      ["l-gen", "generated tensor", has("generated")],
      ["l-const", "constant", has("constant")],
      ["l-readout", "readout", has("readout")],
      ["l-failed", "failed op", has("failed")],
      ["l-nan", "made NaN or +inf (probed layer)", d.first_nonfinite !== undefined],
      ["l-train", "ran as in training (training=True)", d.nodes.some((n) => n.T)],
      // the blue underlined labels: ops a probed layer reads, each a link to its units
      ["l-probed", "probed layer (click to see its units)", d.nodes.some((n) => n.L)],
      ["l-mod", "module (click to open)", d.groups.some((gr, g) => g && !this.st.transparent[g] && (gr.N ?? 0) > 0)],
      ["l-branch", "branch taken", d.edges.some((e) => e[3] !== undefined)],
      ["l-back", "loop (back edge)", d.edges.some((e) => e[0] >= e[1])],
    ];
    return all.filter(([, , on]) => on).map(([c, t]) => [c, t]);
  }

  // ------------------------------------------------------------------ drawing
  private draw(): void {
    this.tip.hidden = true; // the item it described is redrawn (or gone)
    const items: Piece[] = [];
    const edges: Piece[] = [];
    this.rects.clear();
    this.kbOrder = null;
    const hits = this.hitKeys();
    this.drawGroup(0, 0, 0, items, hits);
    this.drawEdges(edges);
    let n = 0;
    for (const [key] of this.rects) if (key[0] === "n" || !this.expanded.has(Number(key.slice(1)))) n++;
    this.pieces = { edges, items, n };
    // what Fit shows: every piece, a back edge's lane right of the layout's frame included
    const ext: [number, number, number, number] = [Infinity, Infinity, -Infinity, -Infinity];
    for (const ps of [items, edges])
      for (const q of ps) {
        if (q[1] < ext[0]) ext[0] = q[1];
        if (q[2] < ext[1]) ext[1] = q[2];
        if (q[3] > ext[2]) ext[2] = q[3];
        if (q[4] > ext[3]) ext[3] = q[4];
      }
    this.extent = ext[0] <= ext[2] ? ext : [0, 0, 100, 100];
    this.zoomFloor();
    this.paint();
    this.draws++;
    this.page.dataset.draws = String(this.draws);
  }

  /** The graph-space box the view shows, [x0, y0, x1, y1]. */
  private visibleBox(): [number, number, number, number] {
    const t = zoomTransform(this.svg);
    const W = this.svg.clientWidth || 800;
    const H = this.svg.clientHeight || 600;
    return [-t.x / t.k, -t.y / t.k, (W - t.x) / t.k, (H - t.y) / t.k];
  }

  /** Puts the drawing in the DOM: all of it, or past CULL_AT items, the pieces that meet
   * the visible area with a margin of half a view on every side (`data-drawn`: the nodes
   * and boxes in the DOM, `data-items`: all drawn). */
  private paint(): void {
    const { edges, items, n } = this.pieces;
    let keep = (_: Piece) => true;
    this.painted = null;
    if (n > CULL_AT) {
      const [x0, y0, x1, y1] = this.visibleBox();
      const mx = (x1 - x0) / 2;
      const my = (y1 - y0) / 2;
      const w: [number, number, number, number] = [x0 - mx, y0 - my, x1 + mx, y1 + my];
      this.painted = w;
      keep = (p) => p[1] <= w[2] && p[3] >= w[0] && p[2] <= w[3] && p[4] >= w[1];
    }
    const html = (ps: Piece[]) => ps.filter(keep).map((p) => p[0]).join("");
    this.viewport.innerHTML = `<g class="edges">${html(edges)}</g>${html(items)}`;
    this.page.dataset.items = String(n);
    this.page.dataset.drawn = String(this.viewport.querySelectorAll(".nd,.box").length);
    this.kbMark();
  }

  /** After a pan or zoom, paints again (once a frame) when the view has left what is in
   * the DOM, or zoomed in so far that it holds far more than is seen. */
  private paintIfMoved(): void {
    const w = this.painted;
    if (!w || this.repaint) return;
    const [x0, y0, x1, y1] = this.visibleBox();
    const inside = x0 >= w[0] && y0 >= w[1] && x1 <= w[2] && y1 <= w[3];
    if (inside && (x1 - x0) * 4 > w[2] - w[0]) return;
    this.repaint = requestAnimationFrame(() => {
      this.repaint = 0;
      if (!this.ctx.signal.aborted) this.paint();
    });
  }

  private drawGroup(g: number, ox: number, oy: number, out: Piece[], hits: Map<ItemKey, string>): void {
    const lay = this.layouts[g];
    if (!lay) return;
    const st = this.st;
    for (const it of st.items[g]) {
      const pos = lay.pos[it];
      if (!pos) continue;
      const [x, y, w, h] = pos;
      const cx = ox + x;
      const cy = oy + y;
      this.rects.set(it, [cx, cy, w, h]);
      const extra = (hits.get(it) ?? "") + (it === this.current ? " current" : "");
      const box: [number, number, number, number] = [cx - w / 2, cy - h / 2, cx + w / 2 + 3, cy + h / 2 + 3];
      if (it[0] === "n") {
        out.push([this.nodeSvg(Number(it.slice(1)), cx, cy, w, h, extra), ...box]);
        continue;
      }
      const c = Number(it.slice(1));
      const gr = this.doc.groups[c];
      const x0 = f1(cx - w / 2);
      const y0 = f1(cy - h / 2);
      if (this.expanded.has(c) && this.layouts[c]) {
        const title = frameTitle(gr, st.name(c));
        out.push([
          `<g class="frame${extra}" data-k="${it}"><rect class="sh" x="${x0}" y="${y0}" width="${w}" height="${h}" rx="6"/>` +
            `<g class="title" data-k="${it}"><rect x="${x0}" y="${y0}" width="${w}" height="18" fill="transparent"/>` +
            `<text x="${f1(x0 + 8)}" y="${f1(y0 + 13)}">${esc(title)}</text></g></g>`,
          ...box,
        ]);
        this.drawGroup(c, x0, y0, out, hits);
      } else {
        const [a, b] = groupLines(gr, st.name(c));
        // a closed box hides its marked nodes: it carries their mark and count instead
        const nfs = this.nfIn.get(c) ?? 0;
        const first = this.doc.first_nonfinite;
        const nf = nfs ? (first !== undefined && st.chains[first]?.includes(c) ? " nonfinite nf-first" : " nonfinite") : "";
        out.push([
          `<g class="box${nf}${extra}" data-k="${it}"><rect class="sh3" x="${f1(x0 + 3)}" y="${f1(y0 + 3)}" width="${w}" height="${h}" rx="3"/>` +
            `<rect class="sh" x="${x0}" y="${y0}" width="${w}" height="${h}" rx="3"/>` +
            (nfs ? `<rect class="nf-ring" x="${f1(x0 - 4)}" y="${f1(y0 - 4)}" width="${w + 11}" height="${h + 11}" rx="6"/>` : "") +
            `<text class="l1" x="${f1(cx)}" y="${f1(cy - 3)}" text-anchor="middle">${esc(a)}</text>` +
            `<text class="l2" x="${f1(cx)}" y="${f1(cy + 11)}" text-anchor="middle">${esc("+ " + b)}</text>` +
            (nfs ? nfBadge(cx + w / 2, cy - h / 2, `${nfs} NaN`) : "") +
            `</g>`,
          ...box,
        ]);
      }
    }
  }

  private nodeSvg(k: number, cx: number, cy: number, w: number, h: number, extra: string): string {
    const n = this.doc.nodes[k];
    const kind = n.k ?? (n.P ? "param" : "op");
    const nf = n.nf !== undefined ? (k === this.doc.first_nonfinite ? " nonfinite nf-first" : " nonfinite") : "";
    const cls = `nd n-${kind}${n.k === "generated" && n.P ? " n-param" : ""}${n.L ? " probed" : ""}${n.T ? " training" : ""}${nf}${extra}`;
    const x0 = f1(cx - w / 2);
    const y0 = f1(cy - h / 2);
    let shape: string;
    if (n.k === "readout")
      shape = `<polygon class="sh" points="${f1(cx)},${y0} ${f1(cx + w / 2)},${f1(cy)} ${f1(cx)},${f1(cy + h / 2)} ${f1(cx - w / 2)},${f1(cy)}"/>`;
    else {
      const rx = n.k === "input" || n.k === "output" ? h / 2 : 3;
      shape = `<rect class="sh" x="${x0}" y="${y0}" width="${w}" height="${h}" rx="${rx}"/>`;
    }
    // a red ring just outside the shape, shown when another highlight (current, search hit,
    // keyboard) takes the shape's outline, so the NaN mark and that highlight both show
    if (nf) {
      const r = n.k === "input" || n.k === "output" ? h / 2 + 4 : 6;
      shape += `<rect class="nf-ring" x="${f1(cx - w / 2 - 4)}" y="${f1(cy - h / 2 - 4)}" width="${w + 8}" height="${h + 8}" rx="${f1(r)}"/>`;
    }
    const [a, b] = nodeLines(n);
    return (
      `<g class="${cls}" data-k="n${k}">${shape}` +
      `<text class="l1" x="${f1(cx)}" y="${f1(b ? cy - 3 : cy + 4)}" text-anchor="middle">${esc(a)}</text>` +
      (b ? `<text class="l2" x="${f1(cx)}" y="${f1(cy + 11)}" text-anchor="middle">${esc(b)}</text>` : "") +
      (nf ? nfBadge(cx + w / 2, cy - h / 2, "NaN") : "") +
      (n.T ? trainBadge(cx - w / 2 - 4, cy + h / 2) : "") +
      `</g>`
    );
  }

  /** Edges between what is drawn: each graph edge goes from the item its source is drawn
   * as to the item its target is drawn as; edges inside one closed box vanish. A forward
   * edge follows dagre's routes through every group it crosses (out of the groups around
   * its source by their `OUT` ports, across their common group, into the groups around
   * its target by their `IN` ports), so it passes beside the nodes between its ends, never
   * under them; a back edge (a loop's value fed to its next pass) goes up a lane to the
   * right of every node beside its span, a self-loop on the side with room; the rest (big
   * groups laid out without dagre) are curves. */
  private drawEdges(out: Piece[]): void {
    const st = this.st;
    // what an edge must not pass under: nodes and closed boxes (not open frames)
    const solid: [number, number, number, number][] = [];
    const solidKeys: ItemKey[] = [];
    for (const [key, r] of this.rects)
      if (key[0] === "n" || !this.expanded.has(Number(key.slice(1)))) {
        solid.push([r[0] - r[2] / 2, r[1] - r[3] / 2, r[0] + r[2] / 2, r[1] + r[3] / 2]);
        solidKeys.push(key);
      }
    const grid = new BoxGrid(solid);
    /** Whether the box [x0, x1] x [y0, y1] overlaps no solid item. */
    const clear = (x0: number, y0: number, x1: number, y1: number) =>
      !grid.some(x0, y0, x1, y1, (i) => {
        const b = solid[i];
        return b[0] < x1 && b[2] > x0 && b[1] < y1 && b[3] > y0;
      });
    const lanes: [number, number, number][] = []; // back edges' lanes: x, top, bottom
    const rowAt = new Map<string, number>(); // a back edge's end: the row it leaves by
    const routed = new Map<string, number[]>();
    const origin = new Map<number, [number, number]>([[0, [0, 0]]]);
    for (const [key, r] of this.rects)
      if (key[0] === "g" && this.expanded.has(Number(key.slice(1))))
        origin.set(Number(key.slice(1)), [r[0] - r[2] / 2, r[1] - r[3] / 2]);
    const joints = new Set<string>(); // where a tap leaves its trunk: a dot, as on a bus
    const taps = new Set<string>(); // routes that are taps off a trunk
    const clean = new Set<string>(); // routes clear of every item (a wrapped layout's)
    for (const [gs, lay] of Object.entries(this.layouts)) {
      const o = origin.get(Number(gs));
      if (!o) continue;
      for (const e of lay.edges) {
        const pts: number[] = [];
        for (let i = 0; i < e.pts.length; i += 2) pts.push(e.pts[i] + o[0], e.pts[i + 1] + o[1]);
        routed.set(e.a + ">" + e.b, pts);
        if (e.c) clean.add(e.a + ">" + e.b);
        if (!e.t) continue;
        taps.add(e.a + ">" + e.b);
        // a tap into an open frame enters it from above (see route), its dot goes there
        if (!(e.b[0] === "g" && this.expanded.has(Number(e.b.slice(1))))) joints.add(`${f1(pts[4])},${f1(pts[5])}`);
      }
    }
    const merged = new Map<string, { a: ItemKey; b: ItemKey; n: number; label?: string; rolled: boolean }>();
    for (const [s, d, n = 1, label] of this.doc.edges) {
      const a = st.visible(s, this.expanded);
      const b = st.visible(d, this.expanded);
      if (a === b && !(s === d && a[0] === "n")) continue;
      const key = `${a}>${b}>${label ?? ""}`;
      const m = merged.get(key);
      const rolled = !!(this.doc.nodes[s].p || this.doc.nodes[d].p);
      if (m) {
        m.n += n;
        m.rolled ||= rolled;
      } else merged.set(key, { a, b, n, label, rolled });
    }
    const isBack = (a: ItemKey, b: ItemKey) => (st.first.get(a) ?? 0) >= (st.first.get(b) ?? 0);
    // The back edges into one item share one lane (a trunk up into it), placed once over
    // the span of them all: a rolled op fed by thousands of modules drawn apart (an add
    // in a loop over a ModuleList) gets one lane, not thousands side by side, each placed
    // against all the others (cubic: a frozen tab for tens of seconds).
    const spans = new Map<ItemKey, [number, number, number]>(); // target: top, bottom, x
    for (const { a, b } of merged.values()) {
      const ra = this.rects.get(a);
      const rb = this.rects.get(b);
      if (!ra || !rb || a === b || !isBack(a, b)) continue;
      const lo = Math.min(ra[1] - ra[3] / 2, rb[1] - rb[3] / 2);
      const hi = Math.max(ra[1] + ra[3] / 2, rb[1] + rb[3] / 2);
      const x = Math.max(ra[0] + ra[2] / 2, rb[0] + rb[2] / 2);
      const s = spans.get(b);
      if (s) spans.set(b, [Math.min(s[0], lo), Math.max(s[1], hi), Math.max(s[2], x)]);
      else spans.set(b, [lo, hi, x]);
    }
    // each target's lane: right of every node beside its span, clear of other lanes
    const laneOf = new Map<ItemKey, [number, number]>(); // target: x, how far it was shifted
    for (const [b, [lo, hi, x]] of spans) {
      let lane = x;
      for (const q of solid) if (q[1] < hi && q[3] > lo) lane = Math.max(lane, q[2]);
      lane += 18;
      let shifted = 0; // a lane of its own beside another target's
      while (lanes.some(([lx, t, bt]) => Math.abs(lx - lane) < 9 && t < hi && bt > lo)) {
        lane += 10;
        shifted++;
      }
      lanes.push([lane, lo, hi]);
      laneOf.set(b, [lane, shifted]);
    }
    for (const { a, b, n, label, rolled } of merged.values()) {
      const ra = this.rects.get(a);
      const rb = this.rects.get(b);
      if (!ra || !rb) continue;
      const back = isBack(a, b);
      const cls = `e${label !== undefined ? " branch" : ""}${back ? " back" : ""}`;
      let d: string;
      let mid: [number, number];
      const routedPts = !back && a !== b ? this.route(a, b, ra, rb, routed, taps, joints) : null;
      // a clear route between items of one group is drawn as it is: checking each of the
      // 4,000 routes of a wrapped layout against 4,000 items is 80 million box tests
      const asIs = routedPts && clean.has(a + ">" + b) && this.st.segments(a, b).length === 1;
      const pts =
        routedPts &&
        (asIs
          ? routedPts
          : unblock(routedPts, ra, rb, (x0, y0, x1, y1) =>
              grid.some(x0, y0, x1, y1, (i) => solidKeys[i] !== a && solidKeys[i] !== b && crosses(x0, y0, x1, y1, solid[i])),
            ));
      if (pts) {
        d = "M" + pts.slice(0, 2).join(",");
        for (let i = 2; i < pts.length; i += 2) d += " L" + pts[i] + "," + pts[i + 1];
        const j = Math.floor(pts.length / 4) * 2;
        mid = [pts[j], pts[j + 1]];
      } else if (a === b) {
        // a rolled op feeding its own next pass: a loop on the side with room (as wide as
        // the gap to the next node allows), the right unless only the left has room
        const y1 = ra[1];
        const gap = (sign: number) => {
          const edge = ra[0] + (sign * ra[2]) / 2;
          let room = 42;
          for (const b of solid) {
            if (b[1] >= y1 + 26 || b[3] <= y1 - 26) continue;
            const dist = sign > 0 ? b[0] - edge : edge - b[2];
            if (dist >= 0) room = Math.min(room, dist - 8);
          }
          return room;
        };
        const right = gap(1);
        const sign = right >= 24 || right >= gap(-1) ? 1 : -1;
        const w = Math.max(14, Math.min(42, sign > 0 ? right : gap(-1)));
        const x1 = ra[0] + (sign * ra[2]) / 2;
        d = `M${f1(x1)},${f1(y1 - 6)} C${f1(x1 + sign * w)},${f1(y1 - 26)} ${f1(x1 + sign * w)},${f1(y1 + 26)} ${f1(x1 + sign * 2)},${f1(y1 + 6)}`;
        mid = sign > 0 ? [x1 + w * 0.72, y1 + 3] : [x1 - w * 0.72 - 16, y1 + 3];
      } else if (back) {
        // up a lane to the right of every node beside the edge's span: out of the
        // source's right edge, up (or down), into the target's right edge, with rounded
        // corners; an end whose row has a node to its right leaves (enters) through the
        // gap below (above) its row instead
        const x1 = ra[0] + ra[2] / 2;
        const y1 = ra[1];
        const x2 = rb[0] + rb[2] / 2;
        const y2 = rb[1];
        const [lane, shifted] = laneOf.get(b)!;
        const up = y2 < y1;
        // the row an end leaves from: its centre if clear to the lane, else the gap beside it
        // (once per end and lane: the 3,999 back edges into one add ask it of the add each)
        const row = (key: ItemKey, r: [number, number, number, number], x: number, away: number) => {
          const memo = `${key} ${lane} ${away}`;
          let y = rowAt.get(memo);
          if (y === undefined) {
            y = clear(x + 1, r[1] - 2, lane, r[1] + 2) ? r[1] : r[1] + away * (r[3] / 2 + 7);
            rowAt.set(memo, y);
          }
          return y;
        };
        const ya = row(a, ra, x1, up ? 1 : -1);
        const yb = row(b, rb, x2, up ? -1 : 1);
        const pts: [number, number][] = [];
        if (ya !== y1) pts.push([ra[0] + ra[2] / 2 - 6, y1 + (ya > y1 ? ra[3] / 2 : -ra[3] / 2)]);
        else pts.push([x1, y1]);
        pts.push([ya === y1 ? x1 : pts[0][0], ya], [lane, ya], [lane, yb], [yb === y2 ? x2 : rb[0] + rb[2] / 2 - 6, yb]);
        if (yb !== y2) pts.push([rb[0] + rb[2] / 2 - 6, y2 + (yb > y2 ? rb[3] / 2 : -rb[3] / 2)]);
        d = roundedPath(pts, 8);
        mid = [lane + 1, (ya + yb) / 2 + 12 * shifted];
      } else {
        const x1 = ra[0];
        const y1 = ra[1] + ra[3] / 2;
        const x2 = rb[0];
        const y2 = rb[1] - rb[3] / 2;
        const dy = Math.max(20, (y2 - y1) / 2);
        d = `M${f1(x1)},${f1(y1)} C${f1(x1)},${f1(y1 + dy)} ${f1(x2)},${f1(y2 - dy)} ${f1(x2)},${f1(y2)}`;
        mid = [(x1 + x2) / 2, (y1 + y2) / 2];
      }
      out.push([`<path class="${cls}" data-a="${a}" data-b="${b}" d="${d}"/>`, ...pathBox(d)]);
      const text = [label ?? "", n > 1 && rolled ? `${TIMES}${n}` : ""].filter(Boolean).join(" ");
      const [tx, ty] = [f1(mid[0] + 4), f1(mid[1])];
      if (text)
        out.push([
          `<text class="el${label !== undefined ? " branch" : ""}${back ? " back" : ""}" x="${tx}" y="${ty}">${esc(text)}</text>`,
          tx,
          ty - 12,
          tx + 8 * text.length,
          ty + 4,
        ]);
    }
    for (const j of joints) {
      const [x, y] = j.split(",");
      out.push([`<circle class="joint" cx="${x}" cy="${y}" r="2"/>`, +x - 2, +y - 2, +x + 2, +y + 2]);
    }
  }

  /** The points of the forward edge from drawn item a to b: the routes of its parts in
   * each group it crosses (see {@link Structure.segments}), joined; null when no part has
   * a route. A part without one (a group too big for dagre) is a straight step. Where it
   * enters an open group, it comes to the frame's top straight above the group's `IN` port
   * (not to where dagre's route, aimed at the frame's centre, meets its side) and goes down
   * to it; where it leaves one, down from the `OUT` port to the frame's bottom. */
  private route(
    a: ItemKey,
    b: ItemKey,
    ra: [number, number, number, number],
    rb: [number, number, number, number],
    routed: Map<string, number[]>,
    taps: Set<string>,
    joints: Set<string>,
  ): number[] | null {
    const segs = this.st.segments(a, b);
    const parts = segs.map(([, from, to]) => {
      const r = routed.get(from + ">" + to);
      return r && r.length >= 4 ? r.slice() : null;
    });
    if (!parts.some(Boolean)) return null;
    for (let i = 0; i + 1 < segs.length; i++) {
      const p = parts[i];
      const q = parts[i + 1];
      if (!p || !q) continue;
      if (segs[i + 1][1] === IN) {
        const f = this.rects.get(segs[i][2]); // the frame entered
        if (f && taps.has(segs[i][1] + ">" + segs[i][2])) {
          // a tap ([.., lane, y, x, y] into the frame's side) enters from above instead:
          // off its trunk in the gap above the frame, across, down to the entry port
          const lane = p[p.length - 4];
          const y = f1(f[1] - f[3] / 2 - 8);
          p.splice(p.length - 4, 4, lane, y, q[0], y, q[0], f1(f[1] - f[3] / 2));
          joints.add(`${f1(lane)},${y}`);
        } else if (f) p.splice(p.length - 2, 2, q[0], f1(f[1] - f[3] / 2));
      } else if (segs[i][2] === OUT) {
        const f = this.rects.get(segs[i + 1][1]); // the frame left
        if (f && taps.has(segs[i + 1][1] + ">" + segs[i + 1][2])) {
          // a trunk ([x, y, lane, y, ..] off the frame's side) leaves from its bottom
          // instead: down from the exit port into the gap below, across to the lane
          const y = f1(f[1] + f[3] / 2 + 8);
          q.splice(0, 4, p[p.length - 2], f1(f[1] + f[3] / 2), p[p.length - 2], y, q[2], y);
        } else if (f) q.splice(0, 2, p[p.length - 2], f1(f[1] + f[3] / 2));
      }
    }
    const pts: number[] = [];
    if (!parts[0]) pts.push(f1(ra[0]), f1(ra[1] + ra[3] / 2));
    for (const part of parts) if (part) pts.push(...part);
    if (!parts[parts.length - 1]) pts.push(f1(rb[0]), f1(rb[1] - rb[3] / 2));
    return pts;
  }

  // ------------------------------------------------------------------ view
  /** The scale at which the whole drawing fits the view with 20 px to spare on each side
   * (at most 2: a small graph is not blown up). */
  private fitScale(): number {
    const [x0, y0, x1, y1] = this.extent;
    const W = this.svg.clientWidth || 800;
    const H = this.svg.clientHeight || 600;
    return Math.min(2, Math.max(1, W - 40) / Math.max(1, x1 - x0), Math.max(1, H - 40) / Math.max(1, y1 - y0));
  }

  /** Lets the zoom out as far as the whole drawing needs (see MIN_ZOOM), for the view's
   * size now: the status line above it and the window change it. */
  private zoomFloor(): void {
    this.zoomer.scaleExtent([Math.min(MIN_ZOOM, this.fitScale()), MAX_ZOOM]);
  }

  /** Shows the whole drawing, however small that makes it: centred across, from the top. */
  private fit(): void {
    this.say("");
    this.more.hidden = true;
    this.zoomFloor();
    const [x0, y0, x1] = this.extent;
    const W = this.svg.clientWidth || 800;
    const k = this.fitScale();
    select(this.svg).call(this.zoomer.transform, zoomIdentity.translate((W - (x1 - x0) * k) / 2 - x0 * k, 20 - y0 * k).scale(k));
  }

  /** The whole graph when it is readable that small, else its top at a readable scale. */
  private fitInitial(): void {
    const whole = this.fitScale() >= 0.85;
    this.page.dataset.firstView = whole ? "whole" : "top";
    if (whole) return this.fit();
    const [x0, y0, x1] = this.extent;
    const w = x1 - x0;
    const W = this.svg.clientWidth || 800;
    const H = this.svg.clientHeight || 600;
    const k = Math.min(1, Math.max(0.85, (W - 40) / w));
    // wider than the view even so: around its first item (where the graph starts), not
    // its middle, kept from leaving blank space beside the drawing
    const first = this.doc.nodes.length ? this.rects.get(this.st.visible(0, this.expanded)) : undefined;
    const x =
      w * k <= W - 40
        ? (W - w * k) / 2 - x0 * k
        : Math.max(W - 20 - x1 * k, Math.min(20 - x0 * k, W / 2 - (first?.[0] ?? (x0 + x1) / 2) * k));
    select(this.svg).call(this.zoomer.transform, zoomIdentity.translate(x, 16 - y0 * k).scale(k));
    // a part of the graph is off screen: say what (the boxes drawn below the view, in
    // words a first-time reader follows), how to reach it, and what Fit does
    const ty = 16 - y0 * k;
    let drawn = 0;
    let below = 0;
    for (const [key, r] of this.rects) {
      if (key[0] !== "n" && this.expanded.has(Number(key.slice(1)))) continue; // a frame, not a box
      drawn++;
      if (ty + (r[1] - r[3] / 2) * k > H) below++;
    }
    const rest = below ? `${fmt(below)} of its ${fmt(drawn)} boxes ${below === 1 ? "is" : "are"} below` : "the rest is beside it";
    this.say(`The graph is too long to show whole at a readable size, so this is its top: ${rest}. Drag or scroll to see ${below === 1 ? "it" : "them"}, or press Fit to see the whole graph at once, smaller.`);
    // (a button that zooms out: no arrow, which would read as a scroll)
    this.more.textContent = below ? `Fit: show all ${fmt(drawn)} boxes (${fmt(below)} below)` : "Fit: show the whole graph";
    this.more.hidden = false;
  }

  private centre(key: ItemKey): void {
    const r = this.rects.get(key);
    if (!r) return;
    const W = this.svg.clientWidth || 800;
    const H = this.svg.clientHeight || 600;
    const k = 1;
    select(this.svg).call(this.zoomer.transform, zoomIdentity.translate(W / 2 - r[0] * k, H / 2 - r[1] * k).scale(k));
  }

  // ------------------------------------------------------------------ keyboard
  /** What the keyboard reaches, in execution order: every drawn module (a closed box, or
   * an open frame, whose title Enter closes) and every probed layer's op (a link to its
   * units); a module comes before the items inside it. */
  private kbList(): ItemKey[] {
    if (this.kbOrder) return this.kbOrder;
    const keys: [ItemKey, number, number][] = [];
    for (const key of this.rects.keys()) {
      const i = Number(key.slice(1));
      if (key[0] === "g") {
        if (i !== 0) keys.push([key, this.st.first.get(key) ?? 0, this.st.depth[i] ?? 0]);
      } else if (this.doc.nodes[i].L) keys.push([key, i, Infinity]);
    }
    keys.sort((a, b) => a[1] - b[1] || a[2] - b[2]);
    return (this.kbOrder = keys.map((k) => k[0]));
  }

  private onKey(ev: KeyboardEvent): void {
    if (ev.altKey || ev.ctrlKey || ev.metaKey) return;
    const list = this.kbList();
    if (!list.length) return;
    let at = this.kb === null ? -1 : list.indexOf(this.kb);
    if (ev.key === "ArrowDown" || ev.key === "ArrowRight") at = Math.min(list.length - 1, at + 1);
    else if (ev.key === "ArrowUp" || ev.key === "ArrowLeft") at = Math.max(0, at - 1);
    else if (ev.key === "Home") at = 0;
    else if (ev.key === "End") at = list.length - 1;
    else if (ev.key === "Enter" || ev.key === " ") {
      ev.preventDefault();
      if (at >= 0 && this.kbOn) return this.kbActivate(list[at]);
      this.kb = list[Math.max(0, at)]; // first show where the keyboard is
      this.kbOn = true;
      this.kbShow(true);
      return;
    } else return;
    ev.preventDefault();
    this.kb = list[Math.max(0, at)];
    this.kbOn = true;
    this.kbShow(true);
  }

  /** Enter: what a click does; a group stays the keyboard's item once opened or closed. */
  private kbActivate(key: ItemKey): void {
    const i = Number(key.slice(1));
    if (key[0] === "n") return void this.ctx.navigate(this.ctx.href("layer", this.doc.nodes[i].L!));
    const done = this.expanded.has(i) ? this.collapseNow(i) : this.expand(i);
    done.then(() => this.kbShow(true));
  }

  /** Marks the keyboard's item (while the graph has focus) and, with `scroll`, pans the
   * view to it when it is not wholly in view; says what it is for a screen reader. */
  private kbShow(scroll: boolean): void {
    const key = this.kb;
    if (key === null) return;
    const r = this.rects.get(key);
    if (scroll && r) {
      const [x0, y0, x1, y1] = this.visibleBox();
      const inside = r[0] - r[2] / 2 >= x0 && r[0] + r[2] / 2 <= x1 && r[1] - r[3] / 2 >= y0 && r[1] + Math.min(r[3], 40) / 2 <= y1;
      if (!inside) {
        const k = Math.max(0.85, zoomTransform(this.svg).k);
        const W = this.svg.clientWidth || 800;
        const H = this.svg.clientHeight || 600;
        // an open frame: its title in view, near the top; else the item centred
        const y = key[0] === "g" && this.expanded.has(Number(key.slice(1))) ? 40 - (r[1] - r[3] / 2) * k : H / 2 - r[1] * k;
        select(this.svg).call(this.zoomer.transform, zoomIdentity.translate(W / 2 - r[0] * k, y).scale(k));
      }
    }
    this.kbMark();
    const text = this.tipHtml(key).replace(/<br>/g, " \u00b7 ").replace(/<[^>]+>/g, "");
    this.kbSay.textContent = text;
    this.page.dataset.kb = key;
  }

  /** Puts the focus ring on the keyboard's item, if it is painted and the graph has focus. */
  private kbMark(): void {
    for (const old of this.viewport.querySelectorAll(".kb")) old.classList.remove("kb");
    if (this.kb === null || !this.kbOn || document.activeElement !== this.svg) return;
    this.viewport.querySelector(`[data-k="${this.kb}"]`)?.classList.add("kb");
  }

  // ------------------------------------------------------------------ interaction
  private keyAt(ev: Event): { key: ItemKey; title: boolean } | null {
    const t = (ev.target as Element | null)?.closest?.("[data-k]");
    if (!t) return null;
    return { key: t.getAttribute("data-k")!, title: t.classList.contains("title") };
  }

  private onClick(ev: MouseEvent): void {
    const hit = this.keyAt(ev);
    if (!hit) return;
    const { key, title } = hit;
    if (key[0] === "g") {
      const g = Number(key.slice(1));
      if (this.expanded.has(g)) {
        if (!title) return; // clicks inside an open group's frame do nothing
        this.collapse(g);
      } else this.expand(g);
      return;
    }
    const n = this.doc.nodes[Number(key.slice(1))];
    if (n.L) this.ctx.navigate(this.ctx.href("layer", n.L));
    else {
      this.current = key;
      this.showLive(Number(key.slice(1)));
      const q = new URLSearchParams(this.ctx.params);
      q.set("focus", n.l);
      this.ctx.replaceParams(q);
      this.draw();
    }
  }

  /** Opens group g; the time from click to drawn is kept in data-expand-ms. */
  expand(g: number): Promise<void> {
    const t0 = performance.now();
    this.expanded.add(g);
    return this.relayout().then(() => {
      this.page.dataset.expandMs = String(Math.round(performance.now() - t0));
    });
  }

  private collapse(g: number): void {
    this.collapseNow(g);
  }

  private collapseNow(g: number): Promise<void> {
    this.expanded.delete(g);
    // closing a group closes what was open inside it, so reopening starts tidy
    for (const c of [...this.expanded]) if (this.st.chainOfGroup(c).includes(g)) this.expanded.delete(c);
    return this.relayout();
  }

  private onHover(ev: MouseEvent): void {
    const hit = this.keyAt(ev);
    if (!hit || (hit.key[0] === "g" && this.expanded.has(Number(hit.key.slice(1))) && !hit.title)) {
      this.tip.hidden = true;
      return;
    }
    this.tip.innerHTML = this.tipHtml(hit.key);
    this.tip.hidden = false;
    this.moveTip(ev);
  }

  private moveTip(ev: MouseEvent): void {
    if (this.tip.hidden) return;
    const box = this.svg.getBoundingClientRect();
    let x = ev.clientX - box.left + 14;
    let y = ev.clientY - box.top + 14;
    if (x + this.tip.offsetWidth > box.width) x = Math.max(0, ev.clientX - box.left - this.tip.offsetWidth - 10);
    if (y + this.tip.offsetHeight > box.height) y = Math.max(0, ev.clientY - box.top - this.tip.offsetHeight - 10);
    this.tip.style.left = x + "px";
    this.tip.style.top = y + "px";
  }

  private tipHtml(key: ItemKey): string {
    const d = this.doc;
    if (key[0] === "g") {
      const gr = d.groups[Number(key.slice(1))];
      const rows = [
        `<b>${esc(gr.p || d.model)}</b> <span class="k">(${esc(gr.c)})</span>`,
        `${fmt(gr.N ?? 0)} ops${gr.x ? ` \u00b7 called ${gr.x} times` : ""}`,
        gr.P ? `params: ${fmt(gr.P)}` : "",
        nfTip(this.nfIn.get(Number(key.slice(1))) ?? 0),
        this.expanded.has(Number(key.slice(1))) ? "click the title to close" : "click to open",
      ];
      return rows.filter(Boolean).join("<br>");
    }
    const n: ViewNode = d.nodes[Number(key.slice(1))];
    const mod = d.groups[n.m ?? 0].p;
    const rows = [
      `<b>${esc(n.l)}</b> <span class="k">${esc(n.t)} \u00b7 ${esc(n.k ?? "op")}</span>`,
      `module: ${esc(mod || "(model)")}${mod ? ` <span class="k">(${esc(d.groups[n.m ?? 0].c)})</span>` : ""}`,
    ];
    if (n.s?.length)
      rows.push(`shape: ${n.s.map((s) => esc(shapeText(s))).join(", ")} <span class="k">${esc(n.d ?? d.dtype)}</span>`);
    if (n.v !== undefined) rows.push(`value: ${esc(n.v)}`);
    if (n.A) rows.push(`<span class="call">call: ${esc(n.t)}(${argsHtml(n.A)})</span>`);
    if (n.T) rows.push(`<b class="train">ran as in training</b>: ${n.t === "batch_norm" ? "normalised by the batch's own statistics, not the running ones" : "dropped values at random"}; an eval model's op never does`);
    if (n.P) rows.push(`params: ${fmt(n.P)}`);
    if (n.f !== undefined) rows.push(`FLOPs: ${fmt(n.f)}${n.p ? " (all passes)" : ""}`);
    if (n.p) rows.push(`passes: ${n.p} <span class="k">(${esc(n.l)}:1 \u2026 ${esc(n.l)}:${n.p})</span>`);
    if (n.src) {
      const file = d.files[n.src[0]] ?? "?";
      rows.push(`source: <span title="${esc(file)}">${esc(file.split("/").pop() ?? file)}:${n.src[1]}</span>`);
    }
    if (n.L) rows.push(`probed layer <b>${esc(n.L)}</b>: click to open it`);
    if (n.nf !== undefined) rows.push(`<b class="nf">NaN or +inf</b> here, on at least ${fmt(n.nf)} samples`);
    return rows.join("<br>");
  }

  // ------------------------------------------------------------------ search
  private findLabel(label: string): number | null {
    const k = this.byLabel.get(label) ?? this.byLabel.get(label.replace(/:\d+$/, ""));
    return k ?? null;
  }

  private search(q: string): void {
    const s = q.trim().toLowerCase();
    this.matches = [];
    this.matchAt = -1;
    if (s) {
      const d = this.doc;
      const hit = (g: number) => d.groups[g].p.toLowerCase().includes(s) || d.groups[g].c.toLowerCase() === s;
      d.groups.forEach((gr, g) => {
        if (g && !this.st.transparent[g] && (gr.N ?? 0) > 0 && hit(g)) this.matches.push({ g });
      });
      d.nodes.forEach((n, k) => {
        const mod = d.groups[n.m ?? 0].p.toLowerCase();
        // a module drawn as its nodes (a layer of one op, a container drawn apart) is
        // found through them: the groups around the node below its innermost drawn one,
        // unless that one is found itself
        const chain = this.st.chainOfGroup(n.m ?? 0);
        const drawn = this.st.chains[k];
        const box = drawn[drawn.length - 1];
        const inModule = !hit(box) && chain.slice(chain.indexOf(box) + 1).some(hit);
        if (n.l.toLowerCase().includes(s) || n.t.toLowerCase() === s || (mod && mod === s) || inModule || n.L?.toLowerCase() === s)
          this.matches.push({ k });
      });
      // in drawing order: by first node
      const first = (t: Target) => ("k" in t ? t.k : (this.st.first.get(groupKey(t.g)) ?? 0) - 0.5);
      this.matches.sort((a, b) => first(a) - first(b));
    }
    this.hitsEl.textContent = s ? (this.matches.length ? `${this.matches.length} found` : "none found") : "";
    this.draw();
  }

  /** Keys of drawn items that match (`hit`) or hide a match inside (`hit-in`). */
  private hitKeys(): Map<ItemKey, string> {
    const out = new Map<ItemKey, string>();
    for (const t of this.matches) {
      const key = "k" in t ? this.st.visible(t.k, this.expanded) : this.visibleGroup(t.g);
      const own = "k" in t ? nodeKey(t.k) : groupKey(t.g);
      if (key === own) out.set(key, " hit");
      else if (!out.has(key)) out.set(key, " hit-in");
    }
    return out;
  }

  private visibleGroup(g: number): ItemKey {
    for (const c of this.st.drawnChain(g)) if (c !== 0 && c !== g && !this.expanded.has(c)) return groupKey(c);
    return groupKey(g);
  }

  private next(step: number): void {
    if (!this.matches.length) return;
    this.matchAt = (this.matchAt + step + this.matches.length) % this.matches.length;
    this.hitsEl.textContent = `${this.matchAt + 1} of ${this.matches.length}`;
    this.reveal(this.matches[this.matchAt], true);
  }

  /** Points the bar's live link at node k: its input and output maps on an image. */
  private showLive(k: number): void {
    const n = this.doc.nodes[k];
    this.showCall(n);
    // a static export runs no model: its live view only says so, so offer no link to it
    if (!n || n.k === "input" || n.k === "output" || this.ctx.api.isStatic) {
      this.liveLink.hidden = true;
      return;
    }
    this.liveLink.href = this.ctx.href("live") + "?op=" + encodeURIComponent(n.l);
    this.liveLink.textContent = `see ${n.l} live →`;
    this.liveLink.title = "its input and output feature maps (and kernels) on an image";
    this.liveLink.hidden = false;
  }

  /** The selected op's call under the bar (hidden for an op without one). */
  private showCall(n: ViewNode | undefined): void {
    if (!n?.A) {
      this.callLine.hidden = true;
      return;
    }
    this.callLine.innerHTML =
      `<b>${esc(n.l)}</b> <span class="k">${esc(n.t)}</span>(${argsHtml(n.A)})` +
      (n.T ? ` <b class="train">ran as in training</b>` : "");
    this.callLine.dataset.op = n.l;
    this.callLine.hidden = false;
  }

  /** Opens the groups around a node or group, then centres and marks it. */
  private async reveal(t: Target, relayout: boolean): Promise<void> {
    const opening = "k" in t ? this.st.opening(t.k) : this.st.drawnChain(t.g).filter((c) => c !== 0 && c !== t.g);
    const missing = opening.filter((g) => !this.expanded.has(g));
    for (const g of missing) this.expanded.add(g);
    this.current = "k" in t ? nodeKey(t.k) : groupKey(t.g);
    if ("k" in t) this.showLive(t.k);
    if (relayout && missing.length) await this.relayout();
    else this.draw();
    this.centre(this.current);
  }
}

function marker(id: string, color: string): string {
  return (
    `<marker id="${id}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">` +
    `<path d="M0,0 L10,5 L0,10 z" fill="${color}"/></marker>`
  );
}
