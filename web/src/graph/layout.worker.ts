/**
 * Lays the graph out off the main thread, one module group at a time (in the manner of
 * Model Explorer): a group's direct nodes plus its child groups, each child a single box
 * (collapsed) or sized by its own layout (expanded). Each group's layout is cached under
 * its expanded subtree, so expanding a group lays out that group and its ancestors only.
 */
import dagre from "@dagrejs/dagre";

import {
  boxSize,
  frameTitle,
  type GraphView,
  IN,
  type ItemKey,
  nodeSize,
  OUT,
  PAD,
  Structure,
  textWidth,
} from "./model";

/** A laid-out group: its frame size, its items' centres and sizes, its edges' points
 * (all relative to the frame's top-left corner). Edges from and to outside the group run
 * from its `IN` port (above every item) and to its `OUT` port (below every item). */
export interface GroupLayout {
  w: number;
  h: number;
  pos: Record<ItemKey, [number, number, number, number]>;
  /** `t`: a tap off its source's trunk (an edge implied by others in a dense group); `c`:
   * a route clear of every item by construction (a wrapped layout's), drawn as it is */
  edges: { a: ItemKey; b: ItemKey; pts: number[]; t?: 1; c?: 1 }[];
}

export type WorkerIn =
  | { type: "init"; doc: GraphView }
  | { type: "layout"; id: number; expanded: number[] };

export type WorkerOut =
  | { type: "ready" }
  | { type: "progress"; id: number; done: number; total: number }
  | { type: "layout"; id: number; groups: Record<number, GroupLayout>; ms: number; computed: number }
  | { type: "error"; id: number; message: string };

let st: Structure | null = null;
let edges = new Map<number, [ItemKey, ItemKey][]>();
const cache = new Map<string, GroupLayout>();

const post = (m: WorkerOut) => (self as unknown as Worker).postMessage(m);

self.onmessage = (ev: MessageEvent<WorkerIn>) => {
  const m = ev.data;
  if (m.type === "init") {
    st = new Structure(m.doc);
    edges = st.groupEdges();
    cache.clear();
    post({ type: "ready" });
    return;
  }
  if (!st) return post({ type: "error", id: m.id, message: "layout worker got no graph" });
  const t0 = performance.now();
  try {
    const exp = new Set(m.expanded);
    exp.add(0);
    const run = new Run(st, exp, m.id);
    run.group(0);
    post({ type: "layout", id: m.id, groups: run.out, ms: performance.now() - t0, computed: run.computed });
  } catch (e) {
    post({ type: "error", id: m.id, message: String((e as Error)?.message ?? e) });
  }
};

/** One layout request: lays out every open group, deepest first, reusing the cache. */
class Run {
  out: Record<number, GroupLayout> = {};
  computed = 0;
  private done = 0;
  private total: number;
  private last = performance.now();

  constructor(
    private st: Structure,
    private exp: Set<number>,
    private id: number,
  ) {
    this.total = [...exp].length;
  }

  /** Lays out group g (its open children first); returns its cache key. */
  group(g: number): string {
    const st = this.st;
    const childKeys: string[] = [];
    for (const it of st.items[g]) {
      if (it[0] !== "g") continue;
      const c = Number(it.slice(1));
      if (this.exp.has(c)) childKeys.push(this.group(c));
    }
    const key = `${g}(${childKeys.join(",")})`;
    let lay = cache.get(key);
    if (!lay) {
      lay = this.layoutGroup(g);
      cache.set(key, lay);
      this.computed++;
    }
    this.out[g] = lay;
    this.done++;
    const now = performance.now();
    if (now - this.last > 60) {
      this.last = now;
      post({ type: "progress", id: this.id, done: this.done, total: this.total });
    }
    return key;
  }

  /** Width and height of an item of group g's layout. */
  private size(it: ItemKey): [number, number] {
    const doc = this.st.doc;
    if (it[0] === "n") return nodeSize(doc.nodes[Number(it.slice(1))]);
    const c = Number(it.slice(1));
    const sub = this.exp.has(c) ? this.out[c] : undefined;
    return sub ? [sub.w, sub.h] : boxSize(doc.groups[c], this.st.name(c));
  }

  /** Group g's layout: linear for a very big group, dagre by its unimplied edges with
   * trunks for a dense one (see {@link DENSE_EDGES}), else dagre by all its edges. */
  private layoutGroup(g: number): GroupLayout {
    if (this.st.items[g].length > BIG_GROUP) return this.layered(g);
    const own = edges.get(g) ?? [];
    const n = this.st.items[g].length;
    if (own.length >= DENSE_EDGES && own.length > DENSE_RATIO * n) {
      const lay = this.layout(g, implied(own));
      if (lay) return lay;
    }
    return this.layout(g, null)!;
  }

  /** Group g laid out by dagre; with `skip` (edges implied by others, see {@link implied}),
   * dagre places the items by the other edges only and each skipped edge is drawn as a tap
   * off its source's trunk (see {@link trunks}); null when a trunk's taps would cross an item. */
  private layout(g: number, skip: Set<string> | null): GroupLayout | null {
    const st = this.st;
    const gg = new dagre.graphlib.Graph();
    gg.setGraph({ rankdir: "TB", nodesep: 16, ranksep: 24, edgesep: 8, marginx: 0, marginy: 0 });
    gg.setDefaultEdgeLabel(() => ({}));
    for (const it of st.items[g]) {
      const [w, h] = this.size(it);
      gg.setNode(it, { width: w, height: h });
    }
    const all = edges.get(g) ?? [];
    const own = skip ? all.filter(([a, b]) => !skip.has(a + ">" + b)) : all;
    for (const [a, b] of own) gg.setEdge(a, b);
    this.ports(gg, g, own);
    dagre.layout(gg);
    // the content's box: its items and its edges' bends (dagre leaves a long edge's bends,
    // its dummy nodes, out of the graph's width, so they can lie left of every item)
    let [x0, y0, x1, y1] = [0, 0, 0, 0];
    if (st.items[g].length) {
      [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
      for (const it of st.items[g]) {
        const n = gg.node(it);
        x0 = Math.min(x0, n.x - n.width / 2);
        x1 = Math.max(x1, n.x + n.width / 2);
        y0 = Math.min(y0, n.y - n.height / 2);
        y1 = Math.max(y1, n.y + n.height / 2);
      }
      for (const [a, b] of own)
        for (const p of gg.edge(a, b).points ?? []) {
          x0 = Math.min(x0, p.x - 4);
          x1 = Math.max(x1, p.x + 4);
          y0 = Math.min(y0, p.y);
          y1 = Math.max(y1, p.y);
        }
    }
    let taps: GroupLayout["edges"] = [];
    if (skip) {
      const box = (it: ItemKey): [number, number, number, number] => {
        const n = gg.node(it);
        return [n.x, n.y, n.width, n.height];
      };
      const got = trunks(all.filter(([a, b]) => skip.has(a + ">" + b)), st.items[g].map(box), box, x1);
      if (!got) return null;
      taps = got;
      for (const e of taps) for (let i = 0; i < e.pts.length; i += 2) x1 = Math.max(x1, e.pts[i] + 4);
    }
    const [w, h, fx, fy] = this.frame(g, x1 - x0, y1 - y0);
    const dx = fx - x0;
    const dy = fy - y0;
    const pos: GroupLayout["pos"] = {};
    for (const it of st.items[g]) {
      const n = gg.node(it);
      pos[it] = [n.x + dx, n.y + dy, n.width, n.height];
    }
    const out: GroupLayout["edges"] = [];
    for (const [a, b] of own) {
      const pts: number[] = [];
      for (const p of gg.edge(a, b).points ?? []) pts.push(round(p.x + dx), round(p.y + dy));
      out.push({ a, b, pts });
    }
    for (const e of taps) out.push({ a: e.a, b: e.b, pts: e.pts.map((v, i) => round(v + (i % 2 ? dy : dx))), t: 1 });
    return { w, h, pos, edges: out };
  }

  /** Adds group g's ports when edges cross its frame: `IN` ranked above every item (with
   * undrawn edges to the items nothing inside feeds), so that an edge entering the group
   * comes down beside the items it passes, not through them; `OUT` below every item. */
  private ports(gg: InstanceType<typeof dagre.graphlib.Graph>, g: number, own: [ItemKey, ItemKey][]): void {
    const usesIn = own.some(([a]) => a === IN);
    const usesOut = own.some(([, b]) => b === OUT);
    if (!usesIn && !usesOut) return;
    const fed = new Set<ItemKey>();
    const feeds = new Set<ItemKey>();
    for (const [a, b] of own) {
      fed.add(b);
      feeds.add(a);
    }
    if (usesIn) {
      gg.setNode(IN, { width: 0, height: 0 });
      for (const it of this.st.items[g]) if (!fed.has(it)) gg.setEdge(IN, it);
    }
    if (usesOut) {
      gg.setNode(OUT, { width: 0, height: 0 });
      for (const it of this.st.items[g]) if (!feeds.has(it)) gg.setEdge(it, OUT);
    }
  }

  /** Frame size of group g around content of cw x ch, and the content's offset in it. */
  private frame(g: number, cw: number, ch: number): [number, number, number, number] {
    const title = g === 0 ? 0 : textWidth(frameTitle(this.st.doc.groups[g], this.st.name(g)), 11) + 2 * PAD.x;
    const w = Math.ceil(Math.max(cw + 2 * PAD.x, title, 60));
    const h = Math.ceil(ch + PAD.top + PAD.bottom);
    return [w, h, (w - cw) / 2, PAD.top];
  }

  /** A linear-time layered layout for very large groups: each item's rank is its longest
   * path from the group's sources (items are in execution order, so forward edges go from
   * earlier to later items), items of a rank side by side in execution order. A rank wider
   * than {@link WRAP_W} wraps, as text does, into rows read left to right, top to bottom:
   * a loop over a ModuleList of 4,000 blocks (every block reads the loop's rolled `add`, so
   * all are one rank) is a column of rows a screen wide to scroll down, not one row
   * 400,000 px wide. An edge into, out of or over a wrapped rank (a skip connection around
   * the loop) gets a route (flagged `c`: clear of every item by construction), down into
   * the gap above its target's row, or along the gutter left of every row to it; other
   * edges have none (the page draws a curve, which over a wrapped rank would cross its
   * items). */
  private layered(g: number): GroupLayout {
    const items = this.st.items[g];
    const at = new Map(items.map((it, i) => [it, i]));
    const incoming: number[][] = items.map(() => []);
    const own = edges.get(g) ?? [];
    for (const [a, b] of own) {
      const ia = at.get(a);
      const ib = at.get(b);
      if (ia !== undefined && ib !== undefined && ia < ib) incoming[ib].push(ia);
    }
    const rank = new Array<number>(items.length).fill(0);
    for (let i = 0; i < items.length; i++) for (const j of incoming[i]) rank[i] = Math.max(rank[i], rank[j] + 1);
    const sizes = items.map((it) => this.size(it));
    const ranks: number[][] = [];
    items.forEach((_, i) => (ranks[rank[i]] ??= []).push(i));
    const gapX = 16;
    const gapY = 24;
    const width = (r: number[]) => r.reduce((s, i) => s + sizes[i][0], 0) + gapX * Math.max(0, r.length - 1);
    // each rank's rows: the rank itself, or wrapped at WRAP_W (at least one item a row)
    const rows: { items: number[]; wrapped: boolean }[] = [];
    for (const r of ranks) {
      if (!r) continue;
      if (width(r) <= WRAP_W) {
        rows.push({ items: r, wrapped: false });
        continue;
      }
      let cur: number[] = [];
      let w = 0;
      for (const i of r) {
        const add = (cur.length ? gapX : 0) + sizes[i][0];
        if (cur.length && w + add > WRAP_W) {
          rows.push({ items: cur, wrapped: true });
          cur = [];
          w = 0;
        }
        w += (cur.length ? gapX : 0) + sizes[i][0];
        cur.push(i);
      }
      rows.push({ items: cur, wrapped: true });
    }
    const anyWrapped = rows.some((r) => r.wrapped);
    const gutter = anyWrapped ? GUTTER : 0;
    const rowW = rows.map((r) => width(r.items));
    const cw = Math.max(0, ...rowW) + gutter;
    const pos: GroupLayout["pos"] = {};
    const rowOf = new Array<number>(items.length);
    const tops: number[] = [];
    const bottoms: number[] = [];
    let y = 0;
    const [w, h0, dx, dy] = this.frame(g, cw, 0);
    rows.forEach((r, k) => {
      const rh = Math.max(...r.items.map((i) => sizes[i][1]));
      // a wrapped rank's rows start at the left, as lines of text; other rows are centred
      let x = r.wrapped ? gutter : gutter + (cw - gutter - rowW[k]) / 2;
      for (const i of r.items) {
        const [iw, ih] = sizes[i];
        pos[items[i]] = [round(x + iw / 2 + dx), round(y + rh / 2 + dy), iw, ih];
        rowOf[i] = k;
        x += iw + gapX;
      }
      tops.push(y + dy);
      bottoms.push(y + rh + dy);
      y += rh + gapY;
    });
    const out: GroupLayout["edges"] = [];
    if (anyWrapped) {
      const lane = dx + gutter / 2;
      // wrappedUpTo[k]: how many of rows 0..k-1 are wrapped (any in ra..rb: a difference)
      const wrappedUpTo = [0];
      for (const r of rows) wrappedUpTo.push(wrappedUpTo[wrappedUpTo.length - 1] + (r.wrapped ? 1 : 0));
      for (const [a, b] of own) {
        const ia = at.get(a);
        const ib = at.get(b);
        if (ia === undefined || ib === undefined || ia >= ib) continue;
        const ra = rowOf[ia];
        const rb = rowOf[ib];
        if (rb <= ra || wrappedUpTo[rb + 1] === wrappedUpTo[ra]) continue;
        const [ax, ay, , ah] = pos[a];
        const [bx, by, , bh] = pos[b];
        const gb = round(tops[rb] - 10); // the gap above b's row
        const pts =
          rb === ra + 1
            ? [ax, round(ay + ah / 2), ax, gb, bx, gb, bx, round(by - bh / 2)]
            : [ax, round(ay + ah / 2), ax, round(bottoms[ra] + 8), lane, round(bottoms[ra] + 8), lane, gb, bx, gb, bx, round(by - bh / 2)];
        out.push({ a, b, pts, c: 1 });
      }
    }
    return { w, h: Math.ceil(h0 + Math.max(0, y - gapY)), pos, edges: out };
  }
}

/** The widest a rank of {@link Run.layered} is drawn before it wraps into rows: about a
 * screen at the first view's scale, so the first rows are read without panning sideways. */
const WRAP_W = 1200;
/** The lane left of the rows of a wrapped layout, down which edges reach rows further down. */
const GUTTER = 16;

/** Groups with more items than this are laid out by {@link Run.layered}: dagre's crossing
 * minimisation grows faster than linearly (a 1,000-op chain takes half a second, 3,000 ops
 * minutes), so a flat Sequential of thousands of layers would never draw. */
const BIG_GROUP = 400;

/** A group with at least this many edges, and more than DENSE_RATIO per item, is dense
 * (DenseNet's blocks: every layer reads every earlier layer's output, 300 edges between 25
 * items): dagre lays it out by the edges no other path implies, in a fraction of the time,
 * and the implied edges are drawn as trunks with taps. */
const DENSE_EDGES = 40;
const DENSE_RATIO = 2.5;

/** The edges (`a>b` keys) of `own` implied by the others: b is also reached from a through
 * another item (the complement of the transitive reduction). The edges are forward only
 * (back edges are left out of a layout), so one sweep in reverse topological order finds
 * what each item reaches: O(items x edges), small for a group dagre can lay out. */
export function implied(own: [ItemKey, ItemKey][]): Set<string> {
  const out = new Map<ItemKey, ItemKey[]>();
  const keys = new Set<ItemKey>();
  for (const [a, b] of own) {
    (out.get(a) ?? out.set(a, []).get(a)!).push(b);
    keys.add(a);
    keys.add(b);
  }
  // a topological order of this (acyclic: back edges are left out) graph
  const order: ItemKey[] = [];
  const state = new Map<ItemKey, number>();
  const visit = (k: ItemKey) => {
    const stack: [ItemKey, number][] = [[k, 0]];
    state.set(k, 1);
    while (stack.length) {
      const top = stack[stack.length - 1];
      const next = (out.get(top[0]) ?? [])[top[1]++];
      if (next === undefined) {
        stack.pop();
        order.push(top[0]);
      } else if (!state.has(next)) {
        state.set(next, 1);
        stack.push([next, 0]);
      }
    }
  };
  for (const k of keys) if (!state.has(k)) visit(k);
  // order is reversed topological: an item's successors come before it
  const reach = new Map<ItemKey, Set<ItemKey>>();
  const skip = new Set<string>();
  for (const a of order) {
    const succ = out.get(a) ?? [];
    const far = new Set<ItemKey>(); // reached through another item
    for (const c of succ) for (const r of reach.get(c) ?? []) far.add(r);
    const mine = new Set<ItemKey>(far);
    for (const b of succ) {
      if (far.has(b)) skip.add(a + ">" + b);
      mine.add(b);
    }
    reach.set(a, mine);
  }
  return skip;
}

/** Routes for the implied edges of a dense group: each source's edges share one trunk, a
 * vertical lane right of every item (later sources nearer), from which a tap runs into
 * each target's right side (the upper half; a trunk leaves its source's lower half), as a
 * bus. Null when a tap or a trunk's start would pass through an item. */
function trunks(
  skipped: [ItemKey, ItemKey][],
  items: [number, number, number, number][],
  box: (it: ItemKey) => [number, number, number, number],
  right: number,
): { a: ItemKey; b: ItemKey; pts: number[] }[] | null {
  const sources = [...new Set(skipped.map(([a]) => a))];
  const y = (it: ItemKey, up: boolean) => {
    const [, cy, , h] = box(it);
    return it === IN || it === OUT ? cy : cy + (up ? -h / 4 : h / 4);
  };
  // later sources (lower on the page) take the nearer lanes
  sources.sort((p, q) => y(q, false) - y(p, false));
  const lane = new Map(sources.map((a, i) => [a, right + 14 + 7 * i]));
  const blocked = (x0: number, x1: number, yy: number, a: ItemKey, b: ItemKey) =>
    items.some(([cx, cy, w, h]) => {
      const mine = [a, b].some((k) => {
        const r = box(k);
        return r[0] === cx && r[1] === cy;
      });
      return !mine && cx + w / 2 > x0 && cx - w / 2 < x1 && cy - h / 2 < yy && cy + h / 2 > yy;
    });
  const out: { a: ItemKey; b: ItemKey; pts: number[] }[] = [];
  for (const [a, b] of skipped) {
    const [ax, , aw] = box(a);
    const [bx, , bw] = box(b);
    const x = lane.get(a)!;
    const ya = y(a, false);
    const yb = y(b, true);
    const xa = ax + aw / 2;
    const xb = bx + bw / 2;
    if (yb <= ya || blocked(xa, x, ya, a, b) || blocked(xb, x, yb, a, b)) return null;
    out.push({ a, b, pts: [xa, ya, x, ya, x, yb, xb, yb] });
  }
  return out;
}

const round = (x: number) => Math.round(x * 10) / 10;
