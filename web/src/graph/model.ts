/**
 * The graph view document (`GET /api/runs/RUN/graph`, see docs/explorer.md "Graph view
 * document") and the structure both the page and the layout worker derive from it: which
 * items a module group shows, and which item a node falls into for a set of expanded groups.
 */

export interface ViewGroup {
  p: string; // module path ('' for the model)
  c: string; // class name
  u?: number; // parent group
  ch?: number[];
  n?: number; // nodes directly in it
  N?: number; // nodes in its subtree
  x?: number; // calls, when more than one
  s?: 1; // its calls are drawn apart (a module reused without a loop)
  P?: number; // parameters
}

export interface ViewNode {
  i: number;
  l: string;
  t: string;
  k?: string;
  m?: number;
  s?: number[][];
  d?: string;
  P?: number;
  f?: number;
  src?: [number, number];
  p?: number;
  v?: string;
  L?: string;
  nf?: number; // its probed layer made NaN or +inf: on at least this many samples
  A?: string; // the call's arguments, one line: `conv2d_1, weight=..., training=False`
  T?: 1; // ran as in training (a batch_norm or dropout with training=True)
}

/** `[src, dst, count?, branchLabel?]` node positions. */
export type ViewEdge = [number, number, number?, string?];

export interface GraphView {
  version: string;
  model: string;
  complete: boolean;
  failed: string | null;
  ops: number;
  params: number;
  flops: number;
  /** ops of unknown FLOPs that ``flops`` leaves out (then a lower bound) */
  flops_unknown?: number;
  dtype: string;
  files: string[];
  groups: ViewGroup[];
  nodes: ViewNode[];
  edges: ViewEdge[];
  first_nonfinite?: number; // the first node with `nf`, in execution order
}

/** An item drawn inside a group: `n12` (node 12) or `g5` (group 5, a box or a frame). */
export type ItemKey = string;

export const nodeKey = (i: number): ItemKey => "n" + i;
export const groupKey = (g: number): ItemKey => "g" + g;
/** A group's ports in its own layout: where the edges from outside it enter (at its top)
 * and where those to outside leave (at its bottom). An edge that crosses group frames is
 * drawn through them: each group it passes lays out its part, so it routes around nodes. */
export const IN: ItemKey = "in";
export const OUT: ItemKey = "out";

/** Groups expanded by default: the model and its direct submodules (depth <= 1). */
export const DEFAULT_DEPTH = 1;

export class Structure {
  readonly doc: GraphView;
  /** per group: its depth (the model 0, its direct submodules 1, ...) */
  readonly depth: number[];
  /** a group with at most one node is drawn as that node (a leaf layer is its op), a group
   * drawn apart (`s`) as its nodes and subgroups */
  readonly transparent: boolean[];
  /** per node: the chain of groups drawn around it (as boxes or frames), root first:
   * its groups' chain less those drawn as their nodes ({@link Structure.transparent}) */
  readonly chains: number[][];
  /** per group: its direct items (nodes, including those of transparent subgroups, and
   * drawn child groups), in order of first node */
  readonly items: ItemKey[][];
  /** per item: position of its first node (execution order), to tell back edges */
  readonly first = new Map<ItemKey, number>();
  /** per item: the group it is drawn in */
  readonly owner = new Map<ItemKey, number>();

  constructor(doc: GraphView) {
    this.doc = doc;
    this.depth = doc.groups.map((_, g) => this.chainOfGroup(g).length - 1);
    // a group of one node, or one whose calls are drawn apart (`s`: a module reused without
    // a loop, or a container whose blocks run between ops outside it), is drawn as its nodes
    // (and subgroups): one box would join distinct calls into a false cycle
    this.transparent = doc.groups.map((gr, g) => g !== 0 && ((gr.N ?? 0) <= 1 || gr.s === 1));
    // a group drawn as its nodes is left out of the chains: its subgroups (a container's
    // blocks, each run between ops outside it) are items of the group around it
    this.chains = doc.nodes.map((n) => this.drawnChain(n.m ?? 0));
    this.items = doc.groups.map(() => []);
    const seen = new Set<ItemKey>();
    doc.nodes.forEach((_, k) => {
      const chain = this.chains[k];
      // the group in which it is a direct item, and the item it is there
      let owner = 0;
      const item = nodeKey(k);
      for (let j = 1; j < chain.length; j++) {
        const g = chain[j];
        // in the frame of chain[j-1], node k falls into group g
        const key = groupKey(g);
        if (!seen.has(key)) {
          seen.add(key);
          this.items[chain[j - 1]].push(key);
          this.first.set(key, k);
        }
        owner = g;
      }
      this.items[owner].push(item);
      this.first.set(item, k);
    });
    this.items.forEach((its, g) => its.forEach((it) => this.owner.set(it, g)));
  }

  /** The group chain from the model down to group g, inclusive. */
  chainOfGroup(g: number): number[] {
    const out: number[] = [];
    for (let c: number | undefined = g; c !== undefined; c = c === 0 ? undefined : this.doc.groups[c].u ?? 0) {
      out.push(c);
      if (out.length > 10_000) break; // a malformed tree: never loop forever
    }
    return out.reverse();
  }

  /** The chain of group g less the groups drawn as their nodes: the frames around it. */
  drawnChain(g: number): number[] {
    return this.chainOfGroup(g).filter((c) => !this.transparent[c]);
  }

  /** Group g's name on its box and frame: its path below the group drawn around it (the
   * last part of its path, or more where a container around it is drawn apart: `outs.0`). */
  name(g: number): string {
    const chain = this.drawnChain(g);
    const around = chain.length > 1 ? this.doc.groups[chain[chain.length - 2]].p : "";
    const p = this.doc.groups[g].p;
    return around && p.startsWith(around + ".") ? p.slice(around.length + 1) : p;
  }

  /** The item node `k` falls into inside group `g` (g must be on its chain), or null. */
  itemIn(k: number, g: number): ItemKey | null {
    const chain = this.chains[k];
    const at = chain.indexOf(g);
    if (at < 0) return null;
    const below = chain[at + 1];
    return below === undefined ? nodeKey(k) : groupKey(below);
  }

  /** The deepest group containing both nodes (their edge is laid out there). */
  commonGroup(a: number, b: number): number {
    const ca = this.chains[a];
    const cb = this.chains[b];
    let g = 0;
    for (let j = 0; j < Math.min(ca.length, cb.length) && ca[j] === cb[j]; j++) g = ca[j];
    return g;
  }

  /** What node `k` is drawn as for a set of expanded groups: itself, or the collapsed box
   * of the outermost closed group around it. */
  visible(k: number, expanded: Set<number>): ItemKey {
    const chain = this.chains[k];
    for (let j = 1; j < chain.length; j++) if (!expanded.has(chain[j])) return groupKey(chain[j]);
    return nodeKey(k);
  }

  /** The groups to open so that node `k` is drawn itself. */
  opening(k: number): number[] {
    return this.chains[k].filter((g) => g !== 0);
  }

  /** The default expanded set: groups at depth <= DEFAULT_DEPTH that are drawn as groups. */
  defaultExpanded(): Set<number> {
    const out = new Set<number>([0]);
    this.doc.groups.forEach((_, g) => {
      if (g && this.depth[g] <= DEFAULT_DEPTH && !this.transparent[g] && (this.doc.groups[g].N ?? 0) > 0)
        out.add(g);
    });
    return out;
  }

  /** Edges of each group's layout, between its items: back edges (to an earlier item) and
   * edges inside one item left out. An edge between items of different groups is laid out
   * in each group it crosses: in their deepest common group between the items it falls
   * into there, in each group around its source from the item holding the source to the
   * group's {@link OUT} port, in each group around its target from the {@link IN} port to
   * the item holding the target (see {@link Structure.segments}). */
  groupEdges(): Map<number, [ItemKey, ItemKey][]> {
    const by = new Map<number, Map<string, [ItemKey, ItemKey]>>();
    const add = (g: number, a: ItemKey, b: ItemKey) => {
      let m = by.get(g);
      if (!m) by.set(g, (m = new Map()));
      m.set(a + ">" + b, [a, b]);
    };
    for (const e of this.doc.edges) {
      const [s, d] = e;
      if (s === d) continue;
      const g = this.commonGroup(s, d);
      const a = this.itemIn(s, g);
      const b = this.itemIn(d, g);
      if (a === null || b === null || a === b) continue;
      if ((this.first.get(a) ?? 0) >= (this.first.get(b) ?? 0)) continue; // back edge
      add(g, a, b);
      for (let c = a; c[0] === "g"; ) {
        const sub = Number(c.slice(1));
        c = this.itemIn(s, sub)!;
        add(sub, c, OUT);
      }
      for (let c = b; c[0] === "g"; ) {
        const sub = Number(c.slice(1));
        c = this.itemIn(d, sub)!;
        add(sub, IN, c);
      }
    }
    const out = new Map<number, [ItemKey, ItemKey][]>();
    for (const [g, m] of by) out.set(g, [...m.values()]);
    return out;
  }

  /** The parts of the drawn edge from item `a` to item `b` (each drawn in some group), as
   * `[group, from, to]` in order: out of each group around `a` to its {@link OUT} port, the
   * step in the deepest group holding both, then from the {@link IN} port of each group
   * around `b` down to `b`. One part when both are items of the same group. */
  segments(a: ItemKey, b: ItemKey): [number, ItemKey, ItemKey][] {
    const ca = this.drawnChain(this.owner.get(a) ?? 0);
    const cb = this.drawnChain(this.owner.get(b) ?? 0);
    let j = 0;
    while (j + 1 < ca.length && j + 1 < cb.length && ca[j + 1] === cb[j + 1]) j++;
    const out: [number, ItemKey, ItemKey][] = [];
    const at = (chain: number[], i: number, item: ItemKey) => (i + 1 < chain.length ? groupKey(chain[i + 1]) : item);
    for (let i = ca.length - 1; i > j; i--) out.push([ca[i], at(ca, i, a), OUT]);
    out.push([ca[j], at(ca, j, a), at(cb, j, b)]);
    for (let i = j + 1; i < cb.length; i++) out.push([cb[i], IN, at(cb, i, b)]);
    return out;
  }
}

const TIMES = "\u00d7";

export function shapeText(s: number[]): string {
  return s.length ? s.join(TIMES) : "scalar";
}

/** The two lines a node shows: its label, then its first output shape (or readout value). */
export function nodeLines(n: ViewNode): [string, string] {
  let second = n.v !== undefined ? `${n.t} \u2192 ${n.v}` : n.s && n.s.length ? shapeText(n.s[0]) : "";
  if (n.k === "input" || n.k === "output") second = (n.t !== n.l ? n.t + " " : "") + second;
  const head = n.p ? `${n.l} ${TIMES}${n.p}` : n.l;
  return [head, second];
}

/** The lines of a collapsed group's box: its name (by default the last part of its path;
 * see {@link Structure.name}) and class, then its op count. */
export function groupLines(gr: ViewGroup, name = gr.p.slice(gr.p.lastIndexOf(".") + 1) || gr.p): [string, string] {
  const n = gr.N ?? 0;
  const count = `${n} op${n === 1 ? "" : "s"}` + (gr.x ? ` ${TIMES}${gr.x}` : "");
  return [`${name} (${gr.c})`, count];
}

/** Rough text width (Helvetica-like, 11 px): the worker has no DOM to measure with. */
export function textWidth(s: string, px = 11): number {
  return s.length * px * 0.58;
}

export const NODE_H = 34;
export const PAD = { x: 12, top: 24, bottom: 12 };

export function nodeSize(n: ViewNode): [number, number] {
  const [a, b] = nodeLines(n);
  const w = Math.max(textWidth(a, 11), textWidth(b, 10)) + 20;
  const round = n.k === "input" || n.k === "output" ? 18 : 0;
  if (n.k === "readout") return [Math.ceil(w * 1.5), NODE_H + 12]; // a diamond: text in its middle
  return [Math.max(60, Math.ceil(w + round)), NODE_H];
}

/** An open group's title, as its frame shows it (and is sized for). */
export function frameTitle(gr: ViewGroup, name: string): string {
  return `\u2212 ${name} (${gr.c})${gr.x ? ` ${TIMES}${gr.x}` : ""}`;
}

export function boxSize(gr: ViewGroup, name?: string): [number, number] {
  const [a, b] = groupLines(gr, name);
  return [Math.max(80, Math.ceil(Math.max(textWidth(a, 11), textWidth(b, 10)) + 24)), NODE_H + 4];
}
