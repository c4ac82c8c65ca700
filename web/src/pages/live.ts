/**
 * `#/r/RUN/live?image=ID&op=LABEL`: run the attached model on an uploaded image or a
 * dataset sample; show the top-5, then any op's input and output feature maps, one PNG
 * per channel loaded as it scrolls into view (a side with no positions, a vector, drawn
 * as a chart of its values instead), and for a convolution the kernel between a chosen
 * (input, output) channel pair, the inputs that feed a chosen output of a grouped one
 * marked. An attention op gets its weights above its maps (see live_attention.ts).
 */
import { p, serveCommand, type FeatureSide, type Kernel, type LiveImage, type LiveOp, type RunSummary } from "../api";
import type { PageContext } from "../context";
import { axisBottom, axisLeft } from "d3-axis";
import { scaleLinear } from "d3-scale";
import { create } from "d3-selection";
import { barChart } from "../charts";
import { append, fill, fmt, h, notice, shape } from "../dom";
import { imageTitle } from "../images";
import { imagePicker } from "../picker";
import { topPredictions } from "../predictions";
import { attentionCard } from "./live_attention";
import { renderFlatLive } from "./live_flat";
import { renderSignalLive } from "./live_signal";

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
  ops: number;
}

const PAGE = 128;

/** What the live view runs the model on, as its heading says it. */
function liveInput(summary: RunSummary): string {
  if ((summary.dataset.tokens ?? null) !== null) return "typed sequence, layer by layer";
  if ((summary.dataset.features ?? null) !== null) return "typed feature vector, layer by layer";
  if ((summary.dataset.signal ?? null) !== null) return "sample of the dataset (a signal), op by op";
  return "image, op by op";
}

export async function renderLive(root: HTMLElement, ctx: PageContext): Promise<void> {
  document.title = `live · ${ctx.run} · lurker`;
  // the run's summary first (a static export holds it too): the heading names its input,
  // which is no image on a run of token ids, feature vectors or signals
  // (once the server's check of the model against the run's has ended: never computed
  // with before it passes)
  const summary = await ctx.api.checkedSummary(ctx.run, ctx.signal);
  if (ctx.signal.aborted) return;
  append(root, h("h1", null, "Live", h("span", { class: "sub" }, ` the model on one ${liveInput(summary)}`)));
  if (ctx.api.isStatic) {
    root.append(
      notice(
        `This is a static export: the live view runs the model, so it needs a server. Run: \`${serveCommand(summary)}\`${summary.model.spec ? " (it loads the model the run records)" : ""}.`,
      ),
    );
    return;
  }
  if (!summary.holds.live) {
    append(
      root,
      notice(
        `The live view runs the model, and this run has none attached${summary.holds.live_reason ? ` (${summary.holds.live_reason})` : ""}. Serve it with: \`${serveCommand(summary, false)}\`.`,
        "error",
      ),
    );
    return;
  }
  // token ids and feature vectors have no picture: a typed input, and every probed layer's units
  if ((summary.dataset.tokens ?? null) !== null || (summary.dataset.features ?? null) !== null) {
    await renderFlatLive(root, ctx, summary);
    return;
  }
  // signals (channels by time) are drawn as lines: a unit's map is one row over time
  if ((summary.dataset.signal ?? null) !== null) {
    await renderSignalLive(root, ctx, summary, fillPicker, showOp);
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
  const [none, head, list] = topPredictions(live.predictions, live.predictions_note);
  left.append(
    h(
      "div",
      { class: "live-result" },
      h("img", { class: "live-img pixelated", src: ctx.api.pngUrl(p("runs", ctx.run, "live", image, "input.png")), alt: "the image as the model sees it", width: 128, height: 128 }),
      h(
        "div",
        null,
        h("p", { class: "image-name", id: "image-name", title: live.name ? `upload ${image}` : null }, imageTitle(image, live.name)),
        none,
        live.prepared ? h("p", { class: "small", id: "input-prepared" }, live.prepared) : null,
        live.input_note ? h("p", { class: "notice info small", id: "input-note", role: "status" }, `As the model sees it: ${live.input_note}.`) : null,
        head,
        list,
        // an upload is not from the dataset: a confident answer on it can still mean nothing
        live.prepared
          ? h("p", { class: "muted small", id: "upload-caveat" }, "The model only learned this run's dataset: on a picture unlike those, it still names one of its classes, often confidently, and the answer means little.")
          : null,
        h("p", null, h("a", { class: "button", id: "explain-this", href: ctx.href("explain") + "?image=" + encodeURIComponent(image) }, "Explain this image")),
      ),
    ),
  );
  if (!op) {
    maps.append(notice("Choose an op to see its feature maps."));
    return;
  }
  // a probed op's output maps are its layer's units: linked to their pages, and the unit a
  // unit page sent here with (`unit=U`) marked
  const layer = summary.layers.find((l) => l.op === op)?.name ?? null;
  const unit = params.get("unit");
  await showOp(maps, ctx, image, op, layer ? { layer, unit: unit !== null && /^\d+$/.test(unit) ? Number(unit) : null } : null);
}

async function fillPicker(el: HTMLElement, ctx: PageContext, summary: RunSummary, current: string | null, choose: (label: string) => void): Promise<void> {
  let rows: { label: string; type: string; module: string; shape: string; layer: boolean; end: boolean }[];
  let total: number | null = null; // the model's ops as Home and Graph count them
  const probed = new Set(summary.layers.map((l) => l.op).filter((x): x is string => !!x));
  try {
    const view = await ctx.api.json<ViewDoc>(p("runs", ctx.run, "graph"));
    total = view.ops;
    rows = view.nodes
      .filter((n) => !n.k || n.k === "op" || n.k === "input" || n.k === "output")
      .map((n) => ({ label: n.l, type: n.t, module: view.groups[n.m ?? 0]?.p ?? "", shape: n.s?.[0] ? shape(n.s[0]) : "", layer: probed.has(n.l), end: n.k === "input" || n.k === "output" }));
  } catch {
    rows = summary.layers.filter((l) => l.op).map((l) => ({ label: l.op!, type: l.kind ?? "", module: l.module ?? "", shape: shape(l.shape), layer: true, end: false }));
  }
  if (ctx.signal.aborted) return;
  // the model's ops, the input and output nodes apart, as the Home and Graph pages count
  // them (else this page said 17 ops where they said 15); where the list holds fewer (an
  // op run in a loop is one row, arange and the like are not listed), both numbers
  const ends = rows.filter((r) => r.end).length;
  const ops = rows.length - ends;
  const of = total !== null && total !== ops ? ` (of the model's ${fmt(total)}: an op run in a loop is listed once, one that reads no tensor, like arange, not at all)` : "";
  const what = `${ops} op${ops === 1 ? "" : "s"}${ends ? " and the input and output" : ""}${of}`;
  const search = h("input", { type: "search", placeholder: `search ${what}: label, op type or module`, "aria-label": "search ops", id: "op-search" });
  const list = h("ul", { class: "op-list", role: "listbox" });
  const draw = () => {
    const q = search.value.trim().toLowerCase();
    const hits = rows.filter((r) => !q || r.label.toLowerCase().includes(q) || r.type.toLowerCase().includes(q) || r.module.toLowerCase().includes(q));
    fill(
      list,
      hits.slice(0, 300).map((r) =>
        h(
          "li",
          {
            role: "option",
            "aria-selected": String(r.label === current),
            class: r.label === current ? "on" : null,
            "data-op": r.label,
            tabindex: 0, // chosen by keyboard too: Tab to it, Enter or Space
            onclick: () => choose(r.label),
            onkeydown: (e: Event) => {
              const key = (e as KeyboardEvent).key;
              if (key !== "Enter" && key !== " ") return;
              e.preventDefault();
              choose(r.label);
            },
          },
          h("code", null, r.label),
          h("span", { class: "muted op-type", title: r.type }, r.type),
          r.layer ? h("span", { class: "tag" }, "probed") : null,
          h("span", { class: "op-shape" }, r.shape),
        ),
      ),
      hits.length > 300 ? h("li", { class: "muted" }, `${hits.length - 300} more: refine the search`) : null,
    );
  };
  search.addEventListener("input", draw);
  // Enter in the search box chooses the first op it lists
  search.addEventListener("keydown", (e) => {
    if (e.key !== "Enter") return;
    const first = list.querySelector<HTMLElement>("li[data-op]");
    if (first?.dataset.op) choose(first.dataset.op);
  });
  draw();
  const heading = current
    ? h("h3", null, "Op ", h("code", null, current), " · ", h("a", { href: graphHref(ctx, current), class: "in-graph" }, "show in the graph"))
    : h("h3", null, "Op ", h("span", { class: "muted" }, `choose one of ${what}`));
  fill(el, heading, search, list);
  list.querySelector("li.on")?.scrollIntoView({ block: "nearest" });
}

/** A convolution's kernel as the op document describes it (groups: which inputs feed which outputs). */
interface ConvKernel {
  shape: number[];
  param?: string;
  groups?: number;
  transposed?: boolean;
  in_channels?: number | null;
  out_channels?: number | null;
}
type OpDoc = Omit<LiveOp, "kernel"> & { kind?: string; name?: string; input_op?: string | null; kernel: ConvKernel | null };
type KernelDoc = Kernel & { param?: string | null; index?: number[] | null; groups?: number; transposed?: boolean };
interface MapValues {
  shape: number[];
  min: number | null;
  max: number | null;
  values: (number | null)[][];
  /** How many values are not finite, by kind (`nan`, `+inf`, `-inf`); they are null in `values`. */
  nonfinite?: Record<string, number>;
}

/** The colour of a value that is not finite, in the server's PNGs and here. */
const NONFINITE = "rgb(255, 0, 255)";

/** `3 NaN, 1 +inf`: the non-finite values by kind. */
function kinds(counts: Record<string, number> | undefined): string {
  const names: Record<string, string> = { nan: "NaN", "+inf": "+inf", "-inf": "−inf" };
  return Object.entries(counts ?? {})
    .filter(([, n]) => n > 0)
    .map(([k, n]) => `${n} ${names[k] ?? k}`)
    .join(", ");
}

/** The input channels that feed output `out` of a (grouped, possibly transposed) convolution. */
function inputsOf(k: ConvKernel, out: number, inChannels: number, outChannels: number): [number, number] {
  const g = Math.max(1, k.groups ?? 1);
  const cin = k.in_channels ?? inChannels;
  const cout = k.out_channels ?? outChannels;
  const per = Math.floor(cin / g);
  const group = Math.floor(out / Math.max(1, Math.floor(cout / g)));
  return [group * per, group * per + per - 1];
}

/** A side with no positions (a vector: a Linear's input or logits) is one map of 1xN. */
function isVector(t: FeatureSide): boolean {
  return t.channels === 1 && t.map_shape[0] === 1;
}

function span(lo: number, hi: number): string {
  return lo === hi ? `input ${lo}` : `inputs ${lo}–${hi}`;
}

/** The probed layer an op's output is (its maps are the layer's units) and the unit to mark. */
interface Probed {
  layer: string;
  unit: number | null;
}

async function showOp(el: HTMLElement, ctx: PageContext, image: string, op: string, probed: Probed | null = null): Promise<void> {
  const base = p("runs", ctx.run, "live", image, "ops", op);
  let info: OpDoc;
  try {
    info = await ctx.api.json<OpDoc>(base, { cache: false });
  } catch (err) {
    el.append(notice((err as Error).message, "error"));
    return;
  }
  if (ctx.signal.aborted) return;
  const kernel = info.kernel;
  // the op's tensor arguments besides the one shown: said under the input, which else reads
  // as the op's whole input (a residual add's other branch, a cat's other parts, attention's
  // keys and values, a position embedding)
  const others = info.other_inputs ?? [];
  const opLink = (label: string, cls?: string) => h("a", { href: ctx.href("live") + "?" + new URLSearchParams({ image, op: label }), class: cls }, h("code", null, label));
  const othersShown = (): (string | HTMLElement)[] => {
    if (!others.length) return [];
    const items = others.flatMap((o, i) => [
      i ? ", " : "",
      ...(o.op !== null ? [opLink(o.op, "other-input")] : ["the parameter ", h("code", { class: "other-input" }, o.param ?? "")]),
      ` (${shape(o.shape)})`,
    ]);
    return [`: one of its ${others.length + 1} inputs, the only one shown here; ${others.length === 1 ? "the other" : "the others"}: `, ...items];
  };
  const inCount = info.input?.channels ?? 0;
  const outCount = info.output.channels;
  // the output maps are the probed layer's units where the live maps and the probe agree on
  // the axis that holds them
  const units = probed && info.output.unit_axis !== null && info.output.unit_axis !== undefined && !isVector(info.output) ? probed : null;
  const marked = units && units.unit !== null && units.unit < outCount ? units.unit : null;
  const sel: { in: number | null; out: number | null } = { in: null, out: kernel ? marked : null };
  // the sides shown as vectors (one value per index), once their values have loaded
  const vectors: Partial<Record<"input" | "output", VectorHandle>> = {};
  // a side whose vector indexes channels (maps of one value each): picked by index
  const isVec = (side: "input" | "output") => {
    const t = side === "input" ? info.input : info.output;
    return !!t && isVector(t) && !!t.one_value_maps;
  };
  const kernelBox = h("div", { class: "kernel-box" });
  const pair = h("section", { class: "card pair", "aria-label": "chosen maps and kernel" });
  const linked = (): [number, number] | null => (kernel && sel.out !== null ? inputsOf(kernel, sel.out, inCount, outCount) : null);

  /** Marks the input maps that feed the chosen output (a grouped convolution feeds each
   * output from its group's inputs only) and dims the others. */
  const mark = () => {
    const feeds = linked();
    const grouped = (kernel?.groups ?? 1) > 1;
    el.querySelectorAll<HTMLElement>('.fmaps[data-side=input] .fmap').forEach((n) => {
      const c = Number(n.dataset.channel);
      const on = feeds === null || !grouped || (c >= feeds[0] && c <= feeds[1]);
      n.dataset.linked = feeds === null || !grouped ? "" : on ? "1" : "0";
      n.style.opacity = on ? "" : "0.3";
      n.style.outline = feeds !== null && grouped && on ? "2px dashed #1f77b4" : "";
      n.style.outlineOffset = feeds !== null && grouped && on ? "1px" : "";
      n.title = `input channel ${c}` + (feeds !== null && grouped ? (on ? ` (feeds output ${sel.out})` : ` (does not feed output ${sel.out})`) : "");
    });
  };

  const showPair = async () => {
    el.querySelectorAll(".fmap.sel").forEach((n) => n.classList.remove("sel"));
    if (sel.in !== null) el.querySelector(`.fmaps[data-side=input] .fmap[data-channel="${sel.in}"]`)?.classList.add("sel");
    if (sel.out !== null) el.querySelector(`.fmaps[data-side=output] .fmap[data-channel="${sel.out}"]`)?.classList.add("sel");
    mark();
    vectors.input?.select(sel.in);
    vectors.output?.select(sel.out);
    const big = (side: "input" | "output", c: number | null) => {
      if (c === null) return h("div", { class: "big-map empty" }, isVec(side) ? `click an index in the ${side} chart` : `click an ${side} map`);
      if (isVec(side)) {
        const v = vectors[side]?.values[c];
        return h(
          "figure",
          { class: "big-map big-value", "data-side": side },
          h("div", { class: "value" }, v === undefined ? "…" : Number.isFinite(v) ? fmt(v) : "not finite"),
          h("figcaption", null, `${side} ${c} (one value)`),
        );
      }
      const t = side === "input" ? info.input : info.output;
      const flat = constantOf(t, c);
      const bad = nonfiniteOf(t, c);
      const img = h("img", { class: "pixelated", src: ctx.api.pngUrl(`${base}/${side}/${c}.png`), alt: `${side} channel ${c}` });
      return h(
        "figure",
        { class: "big-map" + (flat === undefined ? "" : " constant") + (bad ? " nonfinite" : ""), "data-side": side, "data-nonfinite": bad ? String(bad) : null },
        flat === undefined ? img : h("div", { class: "map-box" }, img, h("span", { class: "flat-value" }, constantText(flat, bad))),
        h(
          "figcaption",
          null,
          `${side} ${c}`,
          flat === undefined || flat === null ? "" : ` · constant ${constantText(flat, bad)}`,
          bad ? h("span", { class: "nf-note" }, flat === null ? ` · all ${bad} values not finite (magenta)` : ` · ${bad} not finite (magenta)`) : "",
        ),
      );
    };
    if (!kernel) return;
    const feeds = linked();
    const groups = kernel.groups ?? 1;
    const fed =
      feeds && groups > 1
        ? h("p", { class: "muted small kernel-feeds" }, `output ${sel.out} is fed by ${span(feeds[0], feeds[1])} only (group ${Math.floor(feeds[0] / (feeds[1] - feeds[0] + 1)) + 1} of ${groups}; marked)`)
        : null;
    const cut = feeds !== null && sel.in !== null && (sel.in < feeds[0] || sel.in > feeds[1]);
    if (sel.in === null || sel.out === null) fill(kernelBox, h("p", { class: "muted" }, "kernel: pick an input and an output map"), fed);
    else if (cut)
      fill(
        kernelBox,
        notice(
          `Input ${sel.in} does not feed output ${sel.out}: this is a grouped ${kernel.transposed ? "transposed " : ""}convolution with ${groups} groups, and output ${sel.out} is fed by ${span(feeds![0], feeds![1])} only. Click a marked input map.`,
        ),
        fed,
      );
    else fill(kernelBox, h("p", { class: "muted" }, "Loading the kernel…"));
    fill(pair, big("input", sel.in), kernelBox, big("output", sel.out));
    if (sel.in !== null && sel.out !== null && !cut) {
      const want = [sel.in, sel.out];
      try {
        const k = await ctx.api.json<KernelDoc>(`${base}/kernels/${sel.out}/${sel.in}.json`);
        if (want[0] !== sel.in || want[1] !== sel.out) return; // a later click
        fill(kernelBox, kernelGrid(k, sel.out, sel.in), fed);
      } catch (err) {
        fill(kernelBox, notice((err as Error).message, "error"), fed);
      }
    }
  };

  const choose = (side: "input" | "output", c: number) => {
    sel[side === "input" ? "in" : "out"] = c;
    // an output fed by one input only (a depthwise convolution): that input
    const feeds = linked();
    if (side === "output" && feeds && feeds[0] === feeds[1]) sel.in = feeds[0];
    void showPair();
  };

  const grid = (side: "input" | "output", t: FeatureSide) => {
    const box = h("div", { class: "fmaps", "data-side": side });
    let shown = 0;
    const more = h("button", { type: "button", class: "more" });
    const add = () => {
      const upto = Math.min(t.channels, shown + PAGE);
      for (let c = shown; c < upto; c++) {
        const img = h("img", { class: "pixelated", src: ctx.api.pngUrl(`${base}/${side}/${c}.png`), loading: "lazy", alt: `${side} channel ${c}`, width: 64, height: 64 });
        // a constant map has no range to scale: flat grey, its value written on it
        const flat = constantOf(t, c);
        // values that are not finite are magenta in the PNG; the tile says how many
        const bad = nonfiniteOf(t, c);
        const face =
          flat === undefined && !bad
            ? img
            : h(
                "div",
                { class: "map-box" },
                img,
                flat === undefined ? null : h("span", { class: "flat-value" }, constantText(flat, bad)),
                bad && flat !== null ? h("span", { class: "nf-badge" }, `${bad} n/f`) : null,
              );
        const attrs = {
          class: "fmap" + (flat === undefined ? "" : " constant") + (bad ? " nonfinite" : ""),
          "data-channel": c,
          "data-constant": flat === undefined ? null : String(flat),
          "data-nonfinite": bad ? String(bad) : null,
          title:
            `${side} channel ${c}` +
            (flat === undefined ? "" : `: constant, ${constantText(flat, bad)} at every position`) +
            (bad ? ` (${bad} value${bad === 1 ? "" : "s"} not finite: NaN or ±inf, magenta)` : ""),
        };
        const tile = kernel ? h("button", { type: "button", ...attrs, onclick: () => choose(side, c) }, face, h("span", null, c)) : h("div", attrs, face, h("span", null, c));
        if (side === "output" && c === marked) {
          tile.classList.add("unit-mark");
          tile.id = "marked-unit";
        }
        box.append(tile);
      }
      shown = upto;
      more.textContent = `show ${Math.min(PAGE, t.channels - shown)} more of ${t.channels - shown}`;
      more.hidden = shown >= t.channels;
      mark();
    };
    more.addEventListener("click", add);
    const vector = isVector(t);
    const what = vector
      ? `${t.map_shape[1]} value${t.map_shape[1] === 1 ? "" : "s"}, ${t.one_value_maps ? "one per map" : t.shape.length > 2 ? "one map" : "no positions"}`
      : // in plain words: a map per channel, and where the units are, which axis holds them
        // (the model's own input has channels, not units: input_N is how lurker labels it)
        `${t.channels} channel map${t.channels === 1 ? "" : "s"}${t.unit_axis === null || t.unit_axis === undefined ? "" : `, one per ${side === "input" && /^input_\d+$/.test(info.input_op ?? "") ? "channel of the model's input" : "unit"} (axis ${t.unit_axis} of the shape)`}, each ${t.map_shape.join("×")}`;
    const from =
      side === "input" && info.input_op
        ? h(
            "p",
            { class: "muted small input-from" },
            "the output of ",
            opLink(info.input_op, "input-op"),
            info.kind === "output" ? ", which the model returns" : "",
            ...othersShown(),
          )
        : null;
    const card = h(
      "section",
      { class: "card", "data-side": side },
      h("h3", null, `${side} `, h("span", { class: "muted" }, `${shape(t.shape)} · ${what}`)),
      from,
      side === "output" && units ? unitsLine(ctx, units.layer, marked) : null,
      t.note ? h("p", { class: "muted small map-note" }, t.note) : null,
      ...(t.patchless ?? []).map((tok, _, all) => patchlessStrip(tok, side, all.length === 1)),
    );
    if (!vector) {
      // (a map with no finite value is counted with the non-finite ones)
      const flats = Object.values(t.constant ?? {}).filter((v) => v !== null).length;
      const bads = Object.keys(t.nonfinite ?? {}).length;
      card.append(
        h(
          "p",
          { class: "muted small map-legend" },
          "Each map is scaled to its own range of finite values: black its lowest value, white its highest. A constant map has no range: flat grey, its value written on it" +
            (flats ? ` (${flats} of ${t.channels} here).` : "."),
          // said only where a map holds such values: on every other op it would be noise
          bads > 0 &&
            h(
              "span",
              { class: "nf-legend" },
              h("span", { class: "nf-swatch", "aria-hidden": "true" }),
              " Magenta: a value that is not finite (NaN or ±inf), left out of the range; " +
                `${bads} of ${t.channels} map${t.channels === 1 ? "" : "s"} here hold such values, marked “n/f” with their count.`,
            ),
        ),
      );
    }
    if (vector) {
      const view = h("div", { class: "vector-view", "data-side": side }, h("p", { class: "muted" }, "Loading the values…"));
      card.append(view);
      const pick = kernel && t.one_value_maps ? (i: number) => choose(side, i) : undefined;
      void vectorView(view, ctx, `${base}/${side}/0`, side, pick).then((handle) => {
        if (!handle) return;
        vectors[side] = handle;
        handle.select(side === "input" ? sel.in : sel.out);
        if ((side === "input" ? sel.in : sel.out) !== null) void showPair(); // its value, now known
      });
    } else {
      card.append(box, more);
      add();
      while (side === "output" && marked !== null && shown <= marked) add();
    }
    return card;
  };

  const params = others.filter((o) => o.param !== null);
  const noInput =
    info.kind === "input"
      ? "This is the model's input: the image as the model sees it (resized, cropped and normalised), one map per channel on the right."
      : params.length
        ? `This op takes no tensor from another op: its tensor argument${params.length === 1 ? " is the model's parameter" : "s are the model's parameters"} ${params.map((o) => `${o.param} (${shape(o.shape)})`).join(", ")}.`
        : `This op takes no tensor from another op (its arguments, if any, are constants).`;
  const inputCard = info.input ? grid("input", info.input) : h("section", { class: "card", "data-side": "input" }, notice(noInput));
  const outputCard = grid("output", info.output);
  append(
    el,
    h(
      "h2",
      null,
      h("code", null, info.op),
      kernel ? h("span", { class: "sub" }, ` kernel ${shape(kernel.shape)}${(kernel.groups ?? 1) > 1 ? ` · ${kernel.groups} groups` : ""}${kernel.transposed ? " · transposed" : ""}`) : null,
      h("span", { class: "sub" }, " · ", h("a", { href: graphHref(ctx, info.op), class: "in-graph" }, "show in the graph")),
      probed ? h("span", { class: "sub" }, " · probed layer ", h("a", { href: ctx.href("layer", probed.layer), class: "probed-layer" }, probed.layer)) : null,
    ),
    // attention: a fused call's weights are computed apart; a hand-written one's softmax output is read
    info.attention ? attentionCard(ctx, image, info.op) : null,
    kernel
      ? h(
          "p",
          { class: "muted" },
          (isVec("input") || isVec("output")
            ? "Click an input, then an output (a map, or an index in a chart of values), to see the kernel between them."
            : "Click an input map, then an output map, to see the kernel between them.") +
            ((kernel.groups ?? 1) > 1 ? ` A grouped convolution (${kernel.groups} groups): each output is fed by its group's inputs only, marked when an output is chosen.` : ""),
        )
      : null,
    kernel
      ? h("div", { class: "maps-row" }, inputCard, pair, outputCard)
      : h("div", { class: "maps-row", style: "grid-template-columns: minmax(0, 1fr) minmax(0, 1fr)" }, inputCard, outputCard),
  );
  if (kernel) void showPair();
  if (marked !== null) el.querySelector("#marked-unit")?.scrollIntoView({ block: "center" });
}

/** Under a probed op's output heading: its maps are the layer's units, each with its page;
 * the one a unit page sent here with is named and linked. */
function unitsLine(ctx: PageContext, layer: string, marked: number | null): HTMLElement {
  return h(
    "p",
    { class: "small units-line" },
    "These maps are the units of the probed layer ",
    h("a", { href: ctx.href("layer", layer) }, layer),
    ": map i is unit i, whose page shows what it responds to over the dataset.",
    marked !== null ? [" Marked (orange): ", h("a", { href: ctx.href("unit", layer, marked), id: "marked-unit-link" }, `unit ${marked}`), "."] : "",
  );
}

/** A token with no patch (a ViT's class token), which the maps of a patch grid leave
 * out: its value at every unit, index i being map i, as a strip chart under its name.
 * Named "class token" only when it is the one such token: with register tokens beside
 * it, which one is the class token (if any) is the model's to say. */
function patchlessStrip(tok: { token: number; values: (number | null)[] }, side: string, alone: boolean): HTMLElement {
  const name = alone && tok.token === 0 ? "class token" : `token ${tok.token} (no patch)`;
  const vals = tok.values.map((v) => (v === null ? NaN : v));
  const fin = vals.filter(Number.isFinite);
  const readout = h("p", { class: "small vec-readout", "aria-live": "polite" }, "hover over the chart for a unit's value");
  const range = fin.length ? `min ${fmt(Math.min(...fin))} · max ${fmt(Math.max(...fin))}` : "no finite value";
  const bad = vals.length - fin.length;
  return h(
    "div",
    { class: "patchless", "data-token": tok.token },
    h("h4", null, name, h("span", { class: "muted small" }, ` (token ${tok.token}, no patch of the image): its value at each unit, index i being map i · ${range}${bad ? ` · ${bad} not finite (magenta)` : ""}`)),
    stripChart(vals, readout, side).svg,
    readout,
  );
}

/** How many values of channel `c` are not finite (0: none). */
function nonfiniteOf(t: FeatureSide | null, c: number): number {
  return t?.nonfinite?.[String(c)] ?? 0;
}

/** The value of channel `c` when its map is constant (null: no finite value), else undefined. */
function constantOf(t: FeatureSide | null, c: number): number | null | undefined {
  const v = t?.constant?.[String(c)];
  return v === undefined ? undefined : v;
}

function constantText(v: number | null, nonfinite = 0): string {
  return v === null ? "not finite" : `= ${fmt(v)}${nonfinite ? " where finite" : ""}`;
}

/** A vector side once loaded: its values, and a way to mark the chosen index. */
interface VectorHandle {
  values: number[];
  select: (i: number | null) => void;
}

/** A vector (a side with no positions) as a reader can read it: its range, a strip chart
 * of every value by index (hover for the value; with ``pick``, a click chooses the index),
 * and its highest values with indices. */
async function vectorView(el: HTMLElement, ctx: PageContext, url: string, side: string, pick?: (i: number) => void): Promise<VectorHandle | null> {
  let doc: MapValues;
  try {
    doc = await ctx.api.json<MapValues>(url, { cache: false });
  } catch (err) {
    fill(el, notice((err as Error).message, "error"));
    return null;
  }
  if (ctx.signal.aborted) return null;
  const raw = doc.values.flat();
  const n = raw.length;
  const vals = raw.map((v) => (v === null ? NaN : v));
  const order = vals.map((_, i) => i).filter((i) => Number.isFinite(vals[i])).sort((a, b) => vals[b] - vals[a] || a - b);
  const bad = kinds(doc.nonfinite);
  if (!order.length) {
    fill(el, notice(`${n} values, none finite${bad ? ` (${bad})` : ""}.`));
    return null;
  }
  const hiI = order[0];
  // the first index of the minimum, as of the maximum (a ReLU's many zeros: the first)
  const loI = order.find((i) => vals[i] === vals[order[order.length - 1]])!;
  const mean = order.reduce((s, i) => s + vals[i], 0) / order.length;
  const readout = h("p", { class: "small vec-readout", "aria-live": "polite" }, pick ? "hover over the chart for a value; click to choose that index" : "hover over the chart for a value");
  const top = order.slice(0, Math.min(10, order.length));
  const strip = stripChart(vals, readout, side, pick);
  fill(
    el,
    h(
      "p",
      { class: "small vec-range" },
      `${n} value${n === 1 ? "" : "s"} · min ${fmt(vals[loI])} at index ${loI} · max ${fmt(vals[hiI])} at index ${hiI} · mean ${fmt(mean)}`,
      order.length < n
        ? h(
            "span",
            { class: "nf-note" },
            ` · ${n - order.length} not finite${bad ? ` (${bad})` : ""}, at ${n - order.length === 1 ? "index" : "indices"} ${nonfiniteIndexes(vals)}: left out of min, max, mean and the highest ${Math.min(10, order.length)}, marked magenta above the chart`,
          )
        : "",
    ),
    strip.svg,
    readout,
    h("h4", null, `Highest ${top.length}`),
    barChart(top.map((i) => ({ label: `index ${i}`, value: vals[i] })), { width: 360, xLabel: "value" }),
  );
  return { values: vals, select: strip.select };
}

/** The indexes of the values that are not finite: the first 5, and how many more. */
function nonfiniteIndexes(vals: number[]): string {
  const at = vals.flatMap((v, i) => (Number.isFinite(v) ? [] : [i]));
  return at.slice(0, 5).join(", ") + (at.length > 5 ? ` and ${at.length - 5} more` : "");
}

/** Every value of a vector by index: a bar per index, or per pixel column the range of
 * the indices it covers when they are more than the columns; a zero line; labelled axes;
 * hovering shows the index and value under the pointer. */
function stripChart(vals: number[], readout: HTMLElement, side: string, pick?: (i: number) => void): { svg: SVGSVGElement; select: (i: number | null) => void } {
  const width = 520;
  const height = 180;
  const m = { top: 10, right: 12, bottom: 38, left: 56 };
  const n = vals.length;
  const fin = vals.filter(Number.isFinite);
  const lo = Math.min(0, ...fin);
  const hi = Math.max(0, ...fin);
  const x = scaleLinear().domain([0, n]).range([m.left, width - m.right]);
  const y = scaleLinear().domain(lo === hi ? [lo - 1, hi + 1] : [lo, hi]).nice().range([height - m.bottom, m.top]);
  const svg = create("svg")
    .attr("class", "chart vector-strip")
    .attr("data-side", side)
    .attr("data-n", n)
    .attr("viewBox", `0 0 ${width} ${height}`)
    .attr("width", width)
    .attr("height", height)
    .attr("role", "img")
    .attr("aria-label", `the ${n} values by index`);
  const cols = Math.round(width - m.left - m.right);
  const bars: { x0: number; x1: number; lo: number; hi: number }[] = [];
  if (n <= cols) {
    for (let i = 0; i < n; i++) if (Number.isFinite(vals[i])) bars.push({ x0: x(i), x1: x(i + 1), lo: Math.min(0, vals[i]), hi: Math.max(0, vals[i]) });
  } else {
    for (let c = 0; c < cols; c++) {
      const a = Math.floor((c * n) / cols);
      const b = Math.max(a + 1, Math.floor(((c + 1) * n) / cols));
      let l = Infinity;
      let u = -Infinity;
      for (let i = a; i < b; i++) {
        if (!Number.isFinite(vals[i])) continue;
        l = Math.min(l, vals[i]);
        u = Math.max(u, vals[i]);
      }
      if (l <= u) bars.push({ x0: x(a), x1: x(b), lo: Math.min(0, l), hi: Math.max(0, u) });
    }
  }
  svg
    .append("g")
    .attr("class", "bars")
    .selectAll("rect")
    .data(bars)
    .join("rect")
    .attr("x", (b) => b.x0)
    .attr("width", (b) => Math.max(0.6, b.x1 - b.x0 - (n <= cols / 3 ? 1 : 0)))
    .attr("y", (b) => y(b.hi))
    .attr("height", (b) => Math.max(0.5, y(b.lo) - y(b.hi)));
  svg.append("line").attr("x1", m.left).attr("x2", width - m.right).attr("y1", y(0)).attr("y2", y(0)).attr("stroke", "#888").attr("stroke-width", 0.6);
  // values that are not finite have no bar: a magenta mark above the plot at their index
  const bad = vals.flatMap((v, i) => (Number.isFinite(v) ? [] : [i]));
  svg
    .append("g")
    .attr("class", "nonfinite-marks")
    .selectAll("rect")
    .data(bad)
    .join("rect")
    .attr("x", (i) => x(i))
    .attr("width", (i) => Math.max(1.5, x(i + 1) - x(i)))
    .attr("y", 1)
    .attr("height", m.top - 3)
    .attr("fill", NONFINITE)
    .attr("data-index", (i) => i);
  svg
    .append("g")
    .attr("transform", `translate(0,${height - m.bottom})`)
    // index i's bar spans [i, i + 1): its tick is at its middle
    .call(axisBottom(x.copy().domain([-0.5, n - 0.5])).ticks(Math.min(8, n)).tickFormat((d) => (Number.isInteger(Number(d)) && Number(d) >= 0 && Number(d) < n ? String(d) : "")));
  svg.append("g").attr("transform", `translate(${m.left},0)`).call(axisLeft(y).ticks(5).tickFormat((d) => fmt(Number(d))));
  svg.append("text").attr("class", "axis-label").attr("x", (m.left + width - m.right) / 2).attr("y", height - 4).attr("text-anchor", "middle").attr("fill", "currentColor").text("index");
  svg
    .append("text")
    .attr("class", "axis-label")
    .attr("transform", `translate(12,${(m.top + height - m.bottom) / 2}) rotate(-90)`)
    .attr("text-anchor", "middle")
    .attr("fill", "currentColor")
    .text("value");
  const marker = svg.append("line").attr("class", "mark").attr("y1", m.top).attr("y2", height - m.bottom).attr("visibility", "hidden");
  const picked = svg.append("line").attr("class", "picked").attr("y1", m.top).attr("y2", height - m.bottom).attr("visibility", "hidden");
  const indexAt = (ev: MouseEvent) => {
    const box = svg.node()!.getBoundingClientRect();
    const px = ((ev.clientX - box.left) / box.width) * width;
    return Math.max(0, Math.min(n - 1, Math.floor(x.invert(px))));
  };
  const hover = svg
    .append("rect")
    .attr("class", "hover")
    .attr("x", m.left)
    .attr("y", m.top)
    .attr("width", width - m.left - m.right)
    .attr("height", height - m.top - m.bottom)
    .attr("fill", "transparent")
    .on("mousemove", (ev: MouseEvent) => {
      const i = indexAt(ev);
      marker.attr("x1", x(i + 0.5)).attr("x2", x(i + 0.5)).attr("visibility", "visible");
      readout.textContent = `index ${i}: ${Number.isFinite(vals[i]) ? vals[i].toPrecision(5) : "not finite"}`;
      readout.dataset.index = String(i);
    })
    .on("mouseleave", () => {
      marker.attr("visibility", "hidden");
    });
  if (pick) hover.style("cursor", "pointer").on("click", (ev: MouseEvent) => pick(indexAt(ev)));
  const select = (i: number | null) => {
    picked.attr("visibility", i === null ? "hidden" : "visible");
    if (i !== null) picked.attr("x1", x(i + 0.5)).attr("x2", x(i + 0.5));
    svg.attr("data-picked", i === null ? null : String(i));
  };
  return { svg: svg.node()!, select };
}

/** The graph page with `label` focused. */
function graphHref(ctx: PageContext, label: string): string {
  return ctx.href("graph") + "?focus=" + encodeURIComponent(label);
}

/** The kernel from input `inp` to output `out` as a heat grid (blue < 0 < red), values in
 * the cells; captioned with the weight index it is (`weight[out, in - group start]`,
 * transposed `weight[in, out - group start]`). */
function kernelGrid(k: KernelDoc, out: number, inp: number): HTMLElement {
  const rows = toRows(k.values as unknown);
  const lim = Math.max(Math.abs(k.min ?? 0), Math.abs(k.max ?? 0)) || 1;
  const cols = rows[0]?.length ?? 0;
  const cell = cols > 9 ? 14 : 44;
  const nf = k.nonfinite ?? {};
  const bad = Object.values(nf).reduce((a, b) => a + b, 0);
  // a weight that is not finite (null in the JSON): magenta, named by its kind when one
  const only = Object.keys(nf).length === 1 ? ({ nan: "NaN", "+inf": "+inf", "-inf": "−inf" } as Record<string, string>)[Object.keys(nf)[0]] : "n/f";
  const color = (v: number | null) => {
    if (v === null || !Number.isFinite(v)) return NONFINITE;
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
            r.map((v) =>
              v === null || !Number.isFinite(v)
                ? h("td", { class: "nonfinite", style: `background:${color(v)}`, title: `not finite (${only})`, "data-value": "nonfinite" }, cols <= 9 ? only : "")
                : h("td", { style: `background:${color(v)}`, title: String(v), "data-value": String(v) }, cols <= 9 ? fmt(v, 2) : ""),
            ),
          ),
        ),
      ),
    ),
    h(
      "figcaption",
      null,
      `${k.param ?? "weight"}[${(k.index ?? [out, inp]).join(", ")}] ${shape(k.shape)}`,
      h("br"),
      `input ${inp} → output ${out}${k.transposed ? " (transposed: weight[in, out within the group])" : (k.groups ?? 1) > 1 ? " (weight[out, in within the group])" : ""} · ` +
        (k.min === null || k.max === null ? "no finite weight" : `min ${fmt(k.min)} · max ${fmt(k.max)}`),
      bad ? h("span", { class: "nf-note" }, ` · ${bad} weight${bad === 1 ? "" : "s"} not finite (${kinds(nf)}; magenta), left out of min and max`) : "",
    ),
  );
}

/** Kernel values of any rank as rows: a scalar (linear) is 1x1, a vector one row, and
 * leading axes of a 3-D slice (conv3d) are stacked. */
function toRows(v: unknown): (number | null)[][] {
  if (typeof v === "number" || v === null) return [[v]];
  if (!Array.isArray(v)) return [];
  if (v.every((x) => typeof x === "number" || x === null)) return [v as (number | null)[]];
  return v.flatMap((x) => toRows(x));
}
