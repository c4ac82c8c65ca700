/**
 * The live view's attention card, for an attention op (`scaled_dot_product_attention`):
 * which key tokens a chosen query token attends to, per head and their mean, drawn over the
 * image on its patch grid where the tokens are a ViT's patches (a bar of weights per key
 * token where they are not), and the whole query x key matrix of one head (or the mean) as
 * a heat map; a click on a patch or a matrix row chooses the query. The query and head are
 * kept in the URL (`query`, `head`, `window`). The server computes the weights from the
 * op's own query and key on the image; on a softmax of attention written out by hand
 * (`q @ kᵀ`, softmax, `@ v`) they are that softmax's output, read, not recomputed, one
 * window at a time where windows are folded into the batch axis (Swin; a "sequence" where
 * the trace does not say what is folded there), headed "Cross-attention" where the keys come
 * from another model input. A window's tokens are drawn on the image where the server
 * places them (`patches.window`): the window outlined, the image outside it dimmed. Where
 * they cannot be had, the card says why.
 */
import { loadImage, p, type AttentionPatches, type LiveAttention } from "../api";
import type { PageContext } from "../context";
import { fill, fmt, h, notice } from "../dom";
import { visibleText } from "../images";

/** The heat colour of the largest weight (the smallest: clear over the image, white in the matrix). */
const HEAT = [200, 16, 60];
/** A query row with no weights (every key masked). */
const MASKED = "rgb(190, 190, 190)";
const BIG = 256;
const SMALL = 96;

/** An int from the URL, or null (absent or not a number). */
function toInt(v: string | null): number | null {
  if (v === null || !/^\d+$/.test(v)) return null;
  return Number(v);
}

/** `token 0 (class token)`, `token 5 (patch row 1, col 0)`, `token 3`, and on a typed
 * sequence `token 3 “e”` (its text, whitespace made visible). */
function tokenName(patches: AttentionPatches | null, words: Words, i: number, side: "query" | "key"): string {
  if (!patches) return words?.[i] != null ? `token ${i} “${visibleText(words[i]!)}”` : `token ${i}`;
  const cells = side === "query" ? patches.queries : patches.keys;
  const cell = cells[i];
  if (cell === undefined) return `token ${i}`;
  if (cell === null) {
    const alone = patches.keys.filter((c) => c === null).length === 1;
    return alone && i === 0 ? `token 0 (class token)` : `token ${i} (no patch)`;
  }
  return `token ${i} (patch row ${cell[0]}, col ${cell[1]})`;
}

function heat(t: number, alpha: number): string {
  return `rgba(${HEAT[0]}, ${HEAT[1]}, ${HEAT[2]}, ${(alpha * Math.max(0, Math.min(1, t))).toFixed(3)})`;
}

/** The smallest and largest weight among the keys that have a patch: the overlay's colour
 * runs from the one (clear) to the other (deep red), as its legend says. */
function patchRange(vals: (number | null)[], patches: AttentionPatches): [number, number] {
  let lo = Infinity;
  let hi = -Infinity;
  vals.forEach((v, t) => {
    if (v === null || !patches.boxes[t]) return;
    lo = Math.min(lo, v);
    hi = Math.max(hi, v);
  });
  return lo <= hi ? [lo, hi] : [0, 0];
}

/** Where `v` lies from `lo` to `hi` (0..1); a constant row lies halfway. */
function scaled(v: number, [lo, hi]: [number, number]): number {
  return hi > lo ? (v - lo) / (hi - lo) : 0.5;
}

/** The image with one query's weights on its patches: each key patch tinted by where its
 * weight lies between the smallest and largest patch weight; the query's own patch
 * outlined blue. */
function overlay(ctx: PageContext, image: string, patches: AttentionPatches, vals: (number | null)[], query: number | null, width: number, label: string): HTMLCanvasElement {
  const [ih, iw] = patches.image_size;
  const canvas = h("canvas", { class: "attn-overlay", width, height: Math.round((width * ih) / iw), role: "img", "aria-label": label });
  const span = patchRange(vals, patches);
  canvas.dataset.min = String(span[0]);
  canvas.dataset.max = String(span[1]);
  void loadImage(ctx.api.pngUrl(p("runs", ctx.run, "live", image, "input.png"))).then((img) => {
    const g = canvas.getContext("2d");
    if (!g) return;
    const sx = canvas.width / iw;
    const sy = canvas.height / ih;
    g.imageSmoothingEnabled = false;
    g.drawImage(img, 0, 0, canvas.width, canvas.height);
    if (patches.window) {
      // one window's attention: the image outside the window dimmed (its keys are all there is)
      g.fillStyle = "rgba(0, 0, 0, 0.6)";
      g.fillRect(0, 0, canvas.width, canvas.height);
      patches.boxes.forEach((b) => {
        if (b) g.drawImage(img, b[2], b[0], b[3] - b[2], b[1] - b[0], b[2] * sx, b[0] * sy, (b[3] - b[2]) * sx, (b[1] - b[0]) * sy);
      });
    }
    g.fillStyle = "rgba(0, 0, 0, 0.15)"; // the image a little darker, so the tint reads
    if (patches.window) patches.boxes.forEach((b) => b && g.fillRect(b[2] * sx, b[0] * sy, (b[3] - b[2]) * sx, (b[1] - b[0]) * sy));
    else g.fillRect(0, 0, canvas.width, canvas.height);
    patches.boxes.forEach((b, t) => {
      const v = vals[t];
      if (!b || v === null) return;
      g.fillStyle = heat(scaled(v, span), 0.8);
      g.fillRect(b[2] * sx, b[0] * sy, (b[3] - b[2]) * sx, (b[1] - b[0]) * sy);
    });
    if (patches.window) outline(g, patches, sx, sy);
    const own = query === null ? null : patches.queries[query];
    if (own) {
      const t = patches.keys.findIndex((c) => c !== null && c[0] === own[0] && c[1] === own[1]);
      const b = t >= 0 ? patches.boxes[t] : null;
      if (b) {
        g.strokeStyle = "#1f77b4";
        g.lineWidth = 2;
        g.strokeRect(b[2] * sx + 1, b[0] * sy + 1, (b[3] - b[2]) * sx - 2, (b[1] - b[0]) * sy - 2);
      }
    }
    canvas.dataset.ready = "1";
  });
  return canvas;
}

/** The outline of a window's patches: each patch edge with no patch of the window beside
 * it on the grid, so a window that wraps around the image's edges (a cyclic shift) is
 * outlined in each of its pieces. */
function outline(g: CanvasRenderingContext2D, patches: AttentionPatches, sx: number, sy: number): void {
  const inside = new Set(patches.keys.filter((c): c is number[] => c !== null).map((c) => `${c[0]},${c[1]}`));
  g.strokeStyle = "#ffd400";
  g.lineWidth = 2;
  g.beginPath();
  patches.boxes.forEach((b, t) => {
    const c = patches.keys[t];
    if (!b || !c) return;
    const [y0, y1, x0, x1] = [b[0] * sy, b[1] * sy, b[2] * sx, b[3] * sx];
    const edges: [number, number, number, number, number, number][] = [
      [-1, 0, x0, y0, x1, y0],
      [1, 0, x0, y1, x1, y1],
      [0, -1, x0, y0, x0, y1],
      [0, 1, x1, y0, x1, y1],
    ];
    for (const [dr, dc, ax, ay, bx, by] of edges) {
      if (inside.has(`${c[0] + dr},${c[1] + dc}`)) continue;
      // just inside the canvas, so an edge on the image's border shows whole
      const cl = (v: number, n: number) => Math.min(Math.max(v, 1), n - 1);
      g.moveTo(cl(ax, g.canvas.width), cl(ay, g.canvas.height));
      g.lineTo(cl(bx, g.canvas.width), cl(by, g.canvas.height));
    }
  });
  g.stroke();
}

/** The key token under a point of an overlay (null: none, or a token with no patch). */
function keyAt(canvas: HTMLCanvasElement, patches: AttentionPatches, ev: MouseEvent): number | null {
  const box = canvas.getBoundingClientRect();
  const y = ((ev.clientY - box.top) / box.height) * patches.image_size[0];
  const x = ((ev.clientX - box.left) / box.width) * patches.image_size[1];
  const t = patches.boxes.findIndex((b) => b !== null && y >= b[0] && y < b[1] && x >= b[2] && x < b[3]);
  return t >= 0 ? t : null;
}

/** A query of this op whose token is key token `t`'s patch (self-attention: the same index). */
function queryOf(patches: AttentionPatches, t: number): number | null {
  const cell = patches.keys[t];
  if (!cell) return null;
  const q = patches.queries.findIndex((c) => c !== null && c[0] === cell[0] && c[1] === cell[1]);
  return q >= 0 ? q : null;
}

/** Min and max of the finite values. */
function range(vals: (number | null)[]): [number, number] | null {
  const fin = vals.filter((v): v is number => v !== null && Number.isFinite(v));
  return fin.length ? [Math.min(...fin), Math.max(...fin)] : null;
}

/** The text of each token of a typed sequence (null: an id without a word), where the
 * attention's keys are those tokens. */
type Words = (string | null)[] | null;

/** `words`: the fed sequence's tokens' text (a text run's Live), used where the op's keys
 * and queries are exactly those tokens, to name them and to tint the text by weight. */
export function attentionCard(ctx: PageContext, image: string, op: string, fed: Words = null): HTMLElement {
  const card = h("section", { class: "card attention", id: "attention", "aria-label": "attention weights" }, h("h3", null, "Attention"), h("p", { class: "muted" }, "Computing the attention weights…"));
  const state = { query: toInt(ctx.params.get("query")), head: toInt(ctx.params.get("head")), window: toInt(ctx.params.get("window")), seq: 0 };
  const base = p("runs", ctx.run, "live", image, "ops", op, "attention");

  const load = async (focus: string | null = null) => {
    const seq = ++state.seq;
    const q = new URLSearchParams();
    if (state.query !== null) q.set("query", String(state.query));
    if (state.head !== null) q.set("head", String(state.head));
    if (state.window !== null) q.set("window", String(state.window));
    const qs = q.toString();
    let doc: LiveAttention;
    try {
      doc = await ctx.api.json<LiveAttention>(`${base}.json${qs ? "?" + qs : ""}`, { cache: false });
    } catch (err) {
      if (seq !== state.seq || ctx.signal.aborted) return;
      const msg = (err as Error).message;
      // a query or head the op does not have (a link from another op): its defaults instead
      if ((state.query !== null || state.head !== null || state.window !== null) && (/^no (query token|head|window) /.test(msg) || /no windows: omit window/.test(msg))) {
        state.query = state.head = state.window = null;
        void load(focus);
        return;
      }
      fill(card, h("h3", null, "Attention"), notice(`No attention weights to show: ${msg}`));
      card.dataset.reason = "1";
      return;
    }
    if (seq !== state.seq || ctx.signal.aborted) return;
    state.query = doc.query;
    const url = new URLSearchParams(ctx.params);
    url.set("query", String(doc.query));
    if (doc.head === null) url.delete("head");
    else url.set("head", String(doc.head));
    if (doc.window === null) url.delete("window");
    else url.set("window", String(doc.window));
    ctx.replaceParams(url);
    render(doc);
    if (focus) card.querySelector<HTMLElement>(`#${focus}`)?.focus();
  };
  const choose = (next: { query?: number; head?: number | null; window?: number }, focus: string | null = null) => {
    if (next.query !== undefined) state.query = next.query;
    if (next.head !== undefined) state.head = next.head;
    if (next.window !== undefined) state.window = next.window;
    void load(focus);
  };

  const render = (doc: LiveAttention) => {
    const patches = doc.patches;
    // names and text only where the op's tokens are the fed sequence's, one for one
    const words: Words = !patches && fed && fed.some((w) => w !== null) && fed.length === doc.keys && doc.queries === doc.keys && doc.windows <= 1 ? fed : null;
    const heads = Array.from({ length: doc.heads }, (_, i) => i);
    const headName = (hd: number | null) => (hd === null ? (doc.heads > 1 ? `mean of the ${doc.heads} heads` : "the one head") : `head ${hd}`);
    const rowOf = (hd: number | null) => (hd === null ? doc.mean : doc.rows[hd]);
    const vals = rowOf(doc.head);
    // `masked` lists a query masked in any head; under this head (or the mean) its row may hold weights
    const masked = vals.every((v) => v === null);
    const querySelect = h(
      "select",
      { id: "attn-query", "aria-label": "query token", onchange: (e: Event) => choose({ query: Number((e.target as HTMLSelectElement).value) }, "attn-query") },
      Array.from({ length: doc.queries }, (_, i) => h("option", { value: i, selected: i === doc.query }, tokenName(patches, words, i, "query"))),
    );
    const headSelect = h(
      "select",
      { id: "attn-head", "aria-label": "head", onchange: (e: Event) => {
        const v = (e.target as HTMLSelectElement).value;
        choose({ head: v === "mean" ? null : Number(v) }, "attn-head");
      } },
      doc.heads > 1 ? h("option", { value: "mean", selected: doc.head === null }, `mean of the ${doc.heads} heads`) : null,
      heads.map((i) => h("option", { value: i, selected: doc.head === i || (doc.heads === 1 && doc.head === null && i === 0) }, `head ${i}`)),
    );
    // a softmax of attention written out by hand: its output is the weights, read as computed
    const written = doc.scale === null;
    const what = written
      ? `Attention written out by hand (q·kᵀ, softmax, then the values): the weights are read from ${doc.op}'s output, not recomputed.`
      : [
          `softmax(q·kᵀ × ${fmt(doc.scale, 4)}${doc.mask ? " + mask" : ""}) over the key tokens, per head, from this op's own query and key on this input; no dropout (as in eval mode)`,
          doc.causal ? "; causal (is_causal): query i sees keys 0..i only" : "",
          doc.mask ? `; mask: ${doc.mask}` : "",
          ".",
        ].join("");
    const seqWord = doc.sequence ?? "window";
    const win = doc.window === null ? "" : ` · ${seqWord} ${doc.window} (of 0..${doc.windows - 1})`;
    const windowSelect =
      doc.windows > 1
        ? h(
            "select",
            { id: "attn-window", "aria-label": seqWord, onchange: (e: Event) => choose({ window: Number((e.target as HTMLSelectElement).value), query: 0 }, "attn-window") },
            Array.from({ length: doc.windows }, (_, i) => h("option", { value: i, selected: i === doc.window }, `${seqWord} ${i}`)),
          )
        : null;
    const r = range(vals);
    const fin = vals.filter((v) => v !== null).length;
    // the strongest keys of this query, under the chosen head (or the mean)
    const order = vals.map((_, t) => t).filter((t) => vals[t] !== null).sort((a, b) => vals[b]! - vals[a]! || a - b).slice(0, 5);
    const top = h(
      "ol",
      { class: "attn-top small" },
      order.map((t) => h("li", { "data-key": t }, `${tokenName(patches, words, t, "key")}: `, h("b", null, fmt(vals[t], 3)))),
    );
    const apart = patches ? vals.map((v, t) => [t, v] as const).filter(([t]) => patches.boxes[t] === null) : [];
    let picture: HTMLElement;
    if (masked) {
      picture = notice(`Every key of ${tokenName(patches, words, doc.query, "query")} is masked out: it has no weights (no softmax to take). Choose another query.`);
    } else if (patches) {
      const readout = h("p", { class: "small attn-readout", "aria-live": "polite" }, "hover over a patch for its weight; click one to make it the query");
      const big = overlay(ctx, image, patches, vals, doc.query, BIG, `weights of ${tokenName(patches, words, doc.query, "query")} on the image's patches, ${headName(doc.head)}`);
      big.id = "attn-overlay";
      big.title = "click a patch to make it the query";
      big.addEventListener("mousemove", (ev) => {
        const t = keyAt(big, patches, ev);
        readout.textContent = t === null ? "" : `${tokenName(patches, words, t, "key")}: ${fmt(vals[t], 4)}`;
      });
      big.addEventListener("click", (ev) => {
        const t = keyAt(big, patches, ev);
        const q = t === null ? null : queryOf(patches, t);
        if (q !== null) choose({ query: q });
      });
      const span = patchRange(vals, patches);
      picture = h(
        "figure",
        { class: "attn-big" },
        big,
        h(
          "figcaption",
          null,
          h("div", { class: "attn-legend", id: "attn-legend" }, h("span", null, fmt(span[0], 3)), h("span", { class: "attn-bar", "aria-hidden": "true" }), h("span", null, fmt(span[1], 3))),
          h("p", { class: "small" }, patches.window ? `Window ${doc.window}'s patches outlined yellow, the image outside it dimmed: its queries attend to its ${doc.keys} keys only. ` : "", `Each patch tinted from its smallest weight (${fmt(span[0], 4)}, clear) to its largest (${fmt(span[1], 4)}, deep red); the query's own patch outlined blue. Over all ${doc.keys} keys: `, h("span", { id: "attn-range" }, r ? `min ${fmt(r[0], 4)} · max ${fmt(r[1], 4)}` : "no finite weight"), fin < vals.length ? ` (${vals.length - fin} masked)` : "", "."),
          apart.length
            ? h("p", { class: "small attn-apart", id: "attn-apart" }, "Not on the image: ", apart.map(([t, v], i) => [i ? ", " : "", `${tokenName(patches, words, t, "key")} `, h("b", null, fmt(v, 4))]).flat())
            : null,
          readout,
        ),
      );
    } else {
      picture = h("div", { class: "attn-big" }, notice(doc.patches_note ?? "Its tokens do not map to patches of the image."), strip(vals, doc.keys, doc.causal ? doc.query : null), words ? tintedText(words, vals, doc.query, doc.causal) : null);
    }
    const matrix = doc.matrix ? matrixView(doc, patches, words, (q) => choose({ query: q })) : notice(doc.matrix_note ?? "No matrix.");
    const small = patches && !masked && doc.heads > 1
      ? h(
          "div",
          { class: "attn-heads", role: "group", "aria-label": "heads" },
          [null, ...heads].map((hd) => {
            const on = hd === doc.head;
            const row = rowOf(hd);
            return h(
              "button",
              { type: "button", class: "attn-head" + (on ? " on" : ""), "data-head": hd === null ? "mean" : hd, "aria-pressed": String(on), title: `show ${headName(hd)}`, onclick: () => choose({ head: hd }) },
              overlay(ctx, image, patches, row, doc.query, SMALL, `${headName(hd)} for this query`),
              h("span", null, hd === null ? "mean" : `head ${hd}`, h("small", null, ` ${fmt(patchRange(row, patches)[0], 2)}–${fmt(patchRange(row, patches)[1], 2)}`)),
            );
          }),
        )
      : null;
    fill(
      card,
      h("h3", null, written ? `${doc.cross ? "Cross-attention" : "Attention"} weights: output of ${doc.op} ` : "Attention ", h("span", { class: "muted" }, `${doc.heads} head${doc.heads === 1 ? "" : "s"} · ${doc.queries} query × ${doc.keys} key tokens${doc.windows > 1 ? ` · ${doc.windows} ${seqWord}s` : ""}`)),
      h("p", { class: "muted small attn-what" }, what),
      doc.notes.map((n) => h("p", { class: "notice info small attn-note" }, n)),
      h(
        "div",
        { class: "attn-controls" },
        windowSelect ? h("label", null, seqWord === "window" ? "Window " : "Sequence ", windowSelect) : null,
        h("label", null, "Query ", querySelect),
        h("label", null, "Head ", headSelect),
      ),
      h(
        "div",
        { class: "attn-row" },
        h("div", { class: "attn-col" }, h("h4", null, `${tokenName(patches, words, doc.query, "query")} attends to · ${headName(doc.head)}${win}`), picture, masked ? null : h("h4", null, "Strongest keys"), masked ? null : top),
        h("div", { class: "attn-col" }, h("h4", null, `Every query's weights · ${headName(doc.head)}${win}`), matrix),
      ),
      small ? h("h4", null, "Per head (each tinted from its own smallest to largest patch weight; click one to show it)") : null,
      small,
    );
    card.dataset.query = String(doc.query);
    card.dataset.head = doc.head === null ? "mean" : String(doc.head);
    card.dataset.window = doc.window === null ? "" : String(doc.window);
  };

  void load();
  return card;
}

/** One query's weights over the key tokens as a strip of cells (tokens that are not patches);
 * under is_causal, the keys after the query `after` grey (left out, not a small weight). */
function strip(vals: (number | null)[], n: number, after: number | null): HTMLElement {
  const r = range(vals) ?? [0, 0];
  const canvas = h("canvas", { class: "attn-strip", width: n, height: 1, role: "img", "aria-label": "weights by key token" });
  const g = canvas.getContext("2d");
  if (g) {
    vals.forEach((v, t) => {
      g.fillStyle = v === null || (after !== null && t > after) ? MASKED : matrixColour(scaled(v, r));
      g.fillRect(t, 0, 1, 1);
    });
  }
  return h("figure", { class: "attn-strip-fig" }, canvas, h("figcaption", { class: "small" }, `Key tokens 0..${n - 1}, left to right: white the smallest weight (${fmt(r[0], 4)}), red the largest (${fmt(r[1], 4)})${after !== null && after < n - 1 ? `; grey: the keys after the query, which is_causal leaves out` : ""}.`));
}

/** The typed sequence's text, each token tinted by the query's weight on it (white the
 * smallest, red the largest, as the strip; keys after a causal query grey), the query
 * outlined: which characters or words it reads, readable as text. */
function tintedText(words: (string | null)[], vals: (number | null)[], query: number, causal: boolean): HTMLElement {
  const r = range(vals) ?? [0, 0];
  return h(
    "p",
    { class: "token-strip attn-tokens", id: "attn-tokens", "aria-label": "the sequence, each token tinted by its weight" },
    words.map((w, t) => {
      const v = vals[t];
      const out = v === null || (causal && t > query);
      const tok = h("span", { class: t === query ? "tok tok-peak" : "tok", "data-pos": t, title: `token ${t}: ${out ? "left out" : fmt(v, 4)}` }, w === null ? `#${t}` : visibleText(w));
      tok.style.background = out ? MASKED : matrixColour(scaled(v, r));
      return tok;
    }),
  );
}

function matrixColour(t: number): string {
  const c = Math.max(0, Math.min(1, t));
  const mix = (x: number) => Math.round(255 + (x - 255) * c);
  return `rgb(${mix(HEAT[0])}, ${mix(HEAT[1])}, ${mix(HEAT[2])})`;
}

/** The queries x keys weights of the chosen head (or the mean) as a heat map, white the
 * smallest to red the largest; the chosen query's row outlined; hover for a weight, click a row to choose
 * its query. */
function matrixView(doc: LiveAttention, patches: AttentionPatches | null, words: Words, pick: (q: number) => void): HTMLElement {
  const m = doc.matrix!;
  const nullRows = m.filter((row) => row.every((v) => v === null)).length;
  const L = doc.queries;
  const S = doc.keys;
  const cell = Math.max(1, Math.floor(BIG / Math.max(L, S)));
  const canvas = h("canvas", { class: "attn-matrix", id: "attn-matrix", width: S, height: L, role: "img", "aria-label": "every query's weights on every key" });
  canvas.style.width = `${S * cell}px`;
  canvas.style.height = `${L * cell}px`;
  const g = canvas.getContext("2d");
  const span: [number, number] = [doc.matrix_min ?? 0, doc.matrix_max ?? 0];
  if (g) {
    for (let i = 0; i < L; i++)
      for (let j = 0; j < S; j++) {
        const v = m[i][j];
        // a key after the query, which is_causal leaves out: grey as a masked row, not white as a weight near the smallest
        g.fillStyle = v === null || (doc.causal && j > i) ? MASKED : matrixColour(scaled(v, span));
        g.fillRect(j, i, 1, 1);
      }
  }
  const mark = h("div", { class: "attn-row-mark", "aria-hidden": "true" });
  mark.style.top = `${doc.query * cell}px`;
  mark.style.height = `${cell}px`;
  mark.style.width = `${S * cell}px`;
  const readout = h("p", { class: "small attn-readout", "aria-live": "polite" }, "hover for a weight; click a row to make its token the query");
  const at = (ev: MouseEvent): [number, number] => {
    const box = canvas.getBoundingClientRect();
    const i = Math.max(0, Math.min(L - 1, Math.floor(((ev.clientY - box.top) / box.height) * L)));
    const j = Math.max(0, Math.min(S - 1, Math.floor(((ev.clientX - box.left) / box.width) * S)));
    return [i, j];
  };
  canvas.addEventListener("mousemove", (ev) => {
    const [i, j] = at(ev);
    const v = m[i][j];
    readout.textContent = `query ${tokenName(patches, words, i, "query")} → key ${tokenName(patches, words, j, "key")}: ${v === null ? "masked" : doc.causal && j > i ? "0 (after the query: left out by is_causal)" : fmt(v, 4)}`;
  });
  canvas.addEventListener("click", (ev) => pick(at(ev)[0]));
  return h(
    "figure",
    { class: "attn-matrix-fig" },
    h("div", { class: "attn-matrix-box" }, canvas, mark),
    h(
      "figcaption",
      null,
      h("div", { class: "attn-legend" }, h("span", null, fmt(span[0], 3)), h("span", { class: "attn-bar matrix", "aria-hidden": "true" }), h("span", null, fmt(span[1], 3))),
      h("p", { class: "small", id: "attn-matrix-range" }, `Rows: query tokens 0..${L - 1}, top to bottom; columns: key tokens 0..${S - 1}, left to right (each row sums to 1). White the smallest weight (min ${fmt(doc.matrix_min, 4)}), red the largest (max ${fmt(doc.matrix_max, 4)}).`, doc.causal ? " Grey above the diagonal: the keys after each query, which is_causal leaves out (weight 0)." : "", nullRows ? ` ${nullRows} masked row${nullRows === 1 ? "" : "s"} grey.` : ""),
      readout,
    ),
  );
}
