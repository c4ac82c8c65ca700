/**
 * `#/r/RUN/live?image=ID&op=LABEL`: run the attached model on an uploaded image or a
 * dataset sample; show the top-5, then any op's input and output feature maps, one PNG
 * per channel loaded as it scrolls into view, and for an op with a kernel the weights
 * between a chosen (input, output) channel pair.
 */
import { p, type FeatureSide, type Kernel, type LiveImage, type LiveOp, type RunSummary } from "../api";
import type { PageContext } from "../context";
import { append, fill, fmt, h, notice, shape } from "../dom";
import { imagePicker } from "../picker";

interface ViewNode {
  l: string;
  t: string;
  m?: number;
  s?: number[][];
  k?: string;
  P?: number;
}
interface ViewDoc {
  nodes: ViewNode[];
  groups: { p: string }[];
}

const PAGE = 128;

export async function renderLive(root: HTMLElement, ctx: PageContext): Promise<void> {
  document.title = `live · ${ctx.run} · lurker`;
  append(root, h("h1", null, "Live", h("span", { class: "sub" }, " the model on one image, op by op")));
  if (ctx.api.isStatic) {
    root.append(
      notice(
        `This is a static export: the live view runs the model, so it needs a server. Run: lurker serve ${ctx.run} --model SPEC (and --weights W).`,
      ),
    );
    return;
  }
  const summary = await ctx.api.json<RunSummary>(p("runs", ctx.run));
  if (!summary.holds.live) {
    append(
      root,
      notice(
        `The live view runs the model, and this run has none attached${summary.holds.live_reason ? ` (${summary.holds.live_reason})` : ""}. Serve it with: lurker serve ${ctx.run} --model SPEC --weights W.`,
        "error",
      ),
    );
    return;
  }
  const params = new URLSearchParams(ctx.params);
  const image = params.get("image");
  const op = params.get("op") ?? (image ? summary.layers.find((l) => l.op)?.op ?? null : null);
  const go = (next: Record<string, string | null>) => {
    const q = new URLSearchParams(params);
    for (const [k, v] of Object.entries(next)) (v === null ? q.delete(k) : q.set(k, v));
    ctx.navigate(ctx.href("live") + "?" + q);
  };

  const left = imagePicker(ctx, summary, { id: "live", title: "Image", action: "Use sample", current: image }, (id) => go({ image: id, op }));
  const picker = h("section", { class: "card op-picker" }, h("h3", null, "Op"), h("p", { class: "muted" }, "Loading the graph…"));
  const maps = h("section", { class: "live-maps" });
  append(root, h("div", { class: "live-top" }, left, picker), maps);

  void fillPicker(picker, ctx, summary, op, (label) => go({ op: label }));

  if (!image) {
    maps.append(notice("Upload an image or pick a dataset sample to run the model on it."));
    return;
  }
  let live: LiveImage;
  try {
    live = await ctx.api.json<LiveImage>(p("runs", ctx.run, "live", image), { cache: false });
  } catch (err) {
    maps.append(notice((err as Error).message, "error"));
    return;
  }
  if (ctx.signal.aborted) return;
  left.append(
    h(
      "div",
      { class: "live-result" },
      h("img", { class: "live-img pixelated", src: ctx.api.pngUrl(p("runs", ctx.run, "live", image, "input.png")), alt: "the image as the model sees it", width: 128, height: 128 }),
      h(
        "div",
        null,
        h(
          "ol",
          { class: "preds" },
          live.predictions.map((q) =>
            h("li", null, h("span", { class: "pname" }, String(q.name ?? q.class)), h("span", { class: "pbar", style: `width:${(100 * q.prob).toFixed(1)}%` }), h("span", { class: "muted" }, `${(100 * q.prob).toFixed(1)}%`)),
          ),
        ),
        h("p", null, h("a", { class: "button", id: "explain-this", href: ctx.href("explain") + "?image=" + encodeURIComponent(image) }, "Explain this image")),
      ),
    ),
  );
  if (!op) {
    maps.append(notice("Choose an op to see its feature maps."));
    return;
  }
  await showOp(maps, ctx, image, op);
}

async function fillPicker(el: HTMLElement, ctx: PageContext, summary: RunSummary, current: string | null, choose: (label: string) => void): Promise<void> {
  let rows: { label: string; type: string; module: string; shape: string; layer: boolean }[];
  const probed = new Set(summary.layers.map((l) => l.op).filter((x): x is string => !!x));
  try {
    const view = await ctx.api.json<ViewDoc>(p("runs", ctx.run, "graph"));
    rows = view.nodes
      .filter((n) => !n.k || n.k === "op" || n.k === "output")
      .map((n) => ({ label: n.l, type: n.t, module: view.groups[n.m ?? 0]?.p ?? "", shape: n.s?.[0] ? shape(n.s[0]) : "", layer: probed.has(n.l) }));
  } catch {
    rows = summary.layers.filter((l) => l.op).map((l) => ({ label: l.op!, type: l.kind ?? "", module: l.module ?? "", shape: shape(l.shape), layer: true }));
  }
  if (ctx.signal.aborted) return;
  const search = h("input", { type: "search", placeholder: `search ${rows.length} ops: label, op type or module`, "aria-label": "search ops", id: "op-search" });
  const list = h("ul", { class: "op-list", role: "listbox" });
  const draw = () => {
    const q = search.value.trim().toLowerCase();
    const hits = rows.filter((r) => !q || r.label.toLowerCase().includes(q) || r.type.toLowerCase().includes(q) || r.module.toLowerCase().includes(q));
    fill(
      list,
      hits.slice(0, 300).map((r) =>
        h(
          "li",
          { role: "option", "aria-selected": String(r.label === current), class: r.label === current ? "on" : null, "data-op": r.label, onclick: () => choose(r.label) },
          h("code", null, r.label),
          h("span", { class: "muted" }, ` ${r.type}`),
          r.layer ? h("span", { class: "tag" }, "probed") : null,
          h("span", { class: "op-shape" }, r.shape),
        ),
      ),
      hits.length > 300 ? h("li", { class: "muted" }, `${hits.length - 300} more: refine the search`) : null,
    );
  };
  search.addEventListener("input", draw);
  draw();
  const heading = current
    ? h("h3", null, "Op ", h("code", null, current), " · ", h("a", { href: graphHref(ctx, current), class: "in-graph" }, "show in the graph"))
    : h("h3", null, "Op ", h("span", { class: "muted" }, `choose one of ${rows.length}`));
  fill(el, heading, search, list);
  list.querySelector("li.on")?.scrollIntoView({ block: "nearest" });
}

async function showOp(el: HTMLElement, ctx: PageContext, image: string, op: string): Promise<void> {
  const base = p("runs", ctx.run, "live", image, "ops", op);
  let info: LiveOp;
  try {
    info = await ctx.api.json<LiveOp>(base, { cache: false });
  } catch (err) {
    el.append(notice((err as Error).message, "error"));
    return;
  }
  if (ctx.signal.aborted) return;
  const sel: { in: number | null; out: number | null } = { in: null, out: null };
  const kernelBox = h("div", { class: "kernel-box" });
  const pair = h("section", { class: "card pair", "aria-label": "chosen maps and kernel" });

  const showPair = async () => {
    document.querySelectorAll(".fmap.sel").forEach((n) => n.classList.remove("sel"));
    if (sel.in !== null) document.querySelector(`.fmaps[data-side=input] .fmap[data-channel="${sel.in}"]`)?.classList.add("sel");
    if (sel.out !== null) document.querySelector(`.fmaps[data-side=output] .fmap[data-channel="${sel.out}"]`)?.classList.add("sel");
    const big = (side: "input" | "output", c: number | null) =>
      c === null
        ? h("div", { class: "big-map empty" }, `click an ${side} map`)
        : h("figure", { class: "big-map" }, h("img", { class: "pixelated", src: ctx.api.pngUrl(`${base}/${side}/${c}.png`), alt: `${side} channel ${c}` }), h("figcaption", null, `${side} ${c}`));
    fill(kernelBox, info.kernel && sel.in !== null && sel.out !== null ? h("p", { class: "muted" }, "Loading the kernel…") : info.kernel ? h("p", { class: "muted" }, "kernel: pick an input and an output map") : null);
    fill(pair, big("input", sel.in), kernelBox, big("output", sel.out));
    if (info.kernel && sel.in !== null && sel.out !== null) {
      try {
        const k = await ctx.api.json<Kernel>(`${base}/kernels/${sel.out}/${sel.in}.json`);
        fill(kernelBox, kernelGrid(k, sel.out, sel.in));
      } catch (err) {
        fill(kernelBox, notice((err as Error).message, "error"));
      }
    }
  };

  const grid = (side: "input" | "output", t: FeatureSide) => {
    const box = h("div", { class: "fmaps", "data-side": side });
    let shown = 0;
    const more = h("button", { type: "button", class: "more" });
    const add = () => {
      const upto = Math.min(t.channels, shown + PAGE);
      for (let c = shown; c < upto; c++) {
        box.append(
          h(
            "button",
            {
              type: "button",
              class: "fmap",
              "data-channel": c,
              title: `${side} channel ${c}`,
              onclick: () => {
                sel[side === "input" ? "in" : "out"] = c;
                void showPair();
              },
            },
            h("img", { class: "pixelated", src: ctx.api.pngUrl(`${base}/${side}/${c}.png`), loading: "lazy", alt: `${side} channel ${c}`, width: 64, height: 64 }),
            h("span", null, c),
          ),
        );
      }
      shown = upto;
      more.textContent = `show ${Math.min(PAGE, t.channels - shown)} more of ${t.channels - shown}`;
      more.hidden = shown >= t.channels;
    };
    more.addEventListener("click", add);
    add();
    const what = `${t.channels} map${t.channels === 1 ? "" : "s"}${t.unit_axis === null || t.unit_axis === undefined ? "" : ` (units on axis ${t.unit_axis})`} of ${t.map_shape.join("×")}`;
    return h(
      "section",
      { class: "card", "data-side": side },
      h("h3", null, `${side} `, h("span", { class: "muted" }, `${shape(t.shape)} · ${what}`)),
      t.note ? h("p", { class: "muted small map-note" }, t.note) : null,
      box,
      more,
    );
  };

  append(
    el,
    h(
      "h2",
      null,
      h("code", null, info.op),
      info.kernel ? h("span", { class: "sub" }, ` kernel ${shape(info.kernel.shape)}`) : null,
      h("span", { class: "sub" }, " · ", h("a", { href: graphHref(ctx, info.op), class: "in-graph" }, "show in the graph")),
    ),
    info.kernel ? h("p", { class: "muted" }, "Click an input map, then an output map, to see the kernel between them.") : null,
    h(
      "div",
      { class: "maps-row" },
      info.input ? grid("input", info.input) : h("section", { class: "card" }, notice("This op has no tensor input.")),
      pair,
      grid("output", info.output),
    ),
  );
  void showPair();
}

/** The graph page with `label` focused. */
function graphHref(ctx: PageContext, label: string): string {
  return ctx.href("graph") + "?focus=" + encodeURIComponent(label);
}

/** The weights `weight[out, in]` as a heat grid (blue < 0 < red), values in the cells. */
function kernelGrid(k: Kernel, out: number, inp: number): HTMLElement {
  const rows = toRows(k.values as unknown);
  const lim = Math.max(Math.abs(k.min), Math.abs(k.max)) || 1;
  const cols = rows[0]?.length ?? 0;
  const cell = cols > 9 ? 14 : 44;
  const color = (v: number) => {
    const t = Math.min(1, Math.abs(v) / lim);
    const [r, g, b] = v >= 0 ? [214, 39, 40] : [31, 119, 180];
    const mix = (c: number) => Math.round(255 + (c - 255) * t);
    return `rgb(${mix(r)},${mix(g)},${mix(b)})`;
  };
  return h(
    "figure",
    { class: "kernel", "data-out": out, "data-in": inp },
    h(
      "table",
      { class: "heat", style: `--cell:${cell}px` },
      h(
        "tbody",
        null,
        rows.map((r) =>
          h(
            "tr",
            null,
            r.map((v) => h("td", { style: `background:${color(v)}`, title: String(v), "data-value": String(v) }, cols <= 9 ? fmt(v, 2) : "")),
          ),
        ),
      ),
    ),
    h("figcaption", null, `weight[${out}, ${inp}] ${shape(k.shape)} · min ${fmt(k.min)} · max ${fmt(k.max)}`),
  );
}

/** Kernel values of any rank as rows: a scalar (linear) is 1x1, a vector one row, and
 * leading axes of a 3-D slice (conv3d) are stacked. */
function toRows(v: unknown): number[][] {
  if (typeof v === "number") return [[v]];
  if (!Array.isArray(v)) return [];
  if (v.every((x) => typeof x === "number")) return [v as number[]];
  return v.flatMap((x) => toRows(x));
}
