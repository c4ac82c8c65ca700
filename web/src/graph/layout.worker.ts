/**
 * Lays the graph out off the main thread, one module group at a time (in the manner of
 * Model Explorer): a group's direct nodes plus its child groups, each child a single box
 * (collapsed) or sized by its own layout (expanded). Each group's layout is cached under
 * its expanded subtree, so expanding a group lays out that group and its ancestors only.
 */
import dagre from "@dagrejs/dagre";

import {
  boxSize,
  groupLines,
  type GraphView,
  type ItemKey,
  nodeSize,
  PAD,
  Structure,
  textWidth,
} from "./model";

/** A laid-out group: its frame size, its items' centres and sizes, its edges' points
 * (all relative to the frame's top-left corner). */
export interface GroupLayout {
  w: number;
  h: number;
  pos: Record<ItemKey, [number, number, number, number]>;
  edges: { a: ItemKey; b: ItemKey; pts: number[] }[];
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
      lay = this.layout(g);
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

  private layout(g: number): GroupLayout {
    const st = this.st;
    const doc = st.doc;
    const gg = new dagre.graphlib.Graph();
    gg.setGraph({ rankdir: "TB", nodesep: 16, ranksep: 24, edgesep: 8, marginx: 0, marginy: 0 });
    gg.setDefaultEdgeLabel(() => ({}));
    for (const it of st.items[g]) {
      let w: number;
      let h: number;
      if (it[0] === "n") [w, h] = nodeSize(doc.nodes[Number(it.slice(1))]);
      else {
        const c = Number(it.slice(1));
        const sub = this.exp.has(c) ? this.out[c] : undefined;
        [w, h] = sub ? [sub.w, sub.h] : boxSize(doc.groups[c]);
      }
      gg.setNode(it, { width: w, height: h });
    }
    for (const [a, b] of edges.get(g) ?? []) gg.setEdge(a, b);
    dagre.layout(gg);
    const graph = gg.graph();
    const cw = st.items[g].length ? (graph.width ?? 0) : 0;
    const ch = st.items[g].length ? (graph.height ?? 0) : 0;
    const title = g === 0 ? 0 : textWidth(groupLines(doc.groups[g])[0], 11) + 2 * PAD.x;
    const w = Math.ceil(Math.max(cw + 2 * PAD.x, title, 60));
    const h = Math.ceil(ch + PAD.top + PAD.bottom);
    const dx = (w - cw) / 2;
    const dy = PAD.top;
    const pos: GroupLayout["pos"] = {};
    for (const it of st.items[g]) {
      const n = gg.node(it);
      pos[it] = [n.x + dx, n.y + dy, n.width, n.height];
    }
    const out: GroupLayout["edges"] = [];
    for (const e of gg.edges()) {
      const pts: number[] = [];
      for (const p of gg.edge(e).points ?? []) pts.push(round(p.x + dx), round(p.y + dy));
      out.push({ a: e.v, b: e.w, pts });
    }
    return { w, h, pos, edges: out };
  }
}

const round = (x: number) => Math.round(x * 10) / 10;
