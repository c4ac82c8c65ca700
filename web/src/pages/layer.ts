/** `#/r/RUN/layer/LAYER?sort=max|mean|index&thumb=input|crop|featviz`: every unit as a thumbnail. */
import { cropCanvas, p, type LayerDoc } from "../api";
import { fitted, histogramChart, positionCount, sampleValueLabel } from "../charts";
import type { PageContext } from "../context";
import { append, facts, fill, fmt, h, notice, shape, withId } from "../dom";
import { anyPlace, averagedPlaces, type Places, featureBins, featureName, featureScale, imageState, layerPlaces, noImage, patchless, tokenSequence } from "../images";
import { outputClass } from "../classes";
import { durationText, secondsText, signalTilePlot } from "../signal";
import { filtersSection, layerFilters, orderFilters } from "../filters";

const SORTS = ["max", "mean", "index"] as const;
/** Cards built before the page first shows: more than a large screen holds. */
const FIRST_CARDS = 240;
/** Each later slice of cards runs about this long, so input and scrolling stay smooth. */
const SLICE_MS = 8;
type Sort = (typeof SORTS)[number];

export async function renderLayer(root: HTMLElement, ctx: PageContext, args: string[]): Promise<void> {
  const name = args[0];
  const [doc, images] = await Promise.all([ctx.api.json<LayerDoc>(p("runs", ctx.run, "layers", name)), imageState(ctx)]);
  // static export: each unit's top image is its sample's, the crop cut here from it
  const index = ctx.api.isStatic ? await ctx.api.unitsIndex(ctx.run, name) : null;
  document.title = `${name} · ${ctx.run} · lurker`;
  const params = new URLSearchParams(ctx.params);
  let sort: Sort = (SORTS as readonly string[]).includes(params.get("sort") ?? "") ? (params.get("sort") as Sort) : "max";
  // units with a feature visualization (`lurker featviz`): the grid shows a unit's channel
  // image, else its neuron image (a run made with --objective neuron only has those)
  const byObjective = doc.featviz_objectives ?? (doc.featviz_units?.length ? { channel: doc.featviz_units } : {});
  const featviz = new Map<number, string>();
  for (const o of ["channel", "neuron"]) for (const u of byObjective[o] ?? []) if (!featviz.has(u)) featviz.set(u, o);
  const fvCount = (o: string) => [...featviz.values()].filter((v) => v === o).length;
  const l = doc.layer;
  // the model's output layer: unit i is class i's score (the server checks that the
  // units are the dataset's classes; any other layer gets no names)
  const classNames = l.class_value && doc.class_names?.length === l.num_units ? doc.class_names : null;
  const className = (u: number): string | null => classNames?.[u] ?? null;
  // one value per unit and sample (a Linear's (N, units)): no positions, no crop (it
  // would be the whole image)
  const positions = positionCount({ shape: l.shape, layout: doc.layout });
  // what its positions are called: a conv's map, tokens (a ViT's, a text model's), time steps
  const places = layerPlaces({ rf: doc.rf, layout: doc.layout }, positions, images);
  const mapOrPlaces = places.kind === "spatial" ? "its map" : `its ${places.many}`;
  const oneOf = `one ${anyPlace(places)}`;
  const fvNote =
    fvCount("neuron") === 0
      ? `feature visualizations: channel objective (the unit's mean over ${mapOrPlaces})`
      : fvCount("channel") === 0
        ? `feature visualizations: neuron objective (the unit at ${oneOf}); this layer has no channel-objective images`
        : `feature visualizations: channel objective; neuron objective (the unit at ${oneOf}) for the ${fmt(fvCount("neuron"))} unit${fvCount("neuron") === 1 ? "" : "s"} with no channel image, marked "neuron"`;
  // token ids (a text model's inputs) have no picture: a tile shows the tokens instead
  // feature vectors (a tabular model's inputs) neither: a tile shows the values
  const vectors = (images.features ?? null) !== null;
  // (each bin holds its largest |value|: the strips' scale is every value's)
  const scale = featureScale(Object.values(doc.features ?? {}).map((t) => t.strip));
  // signals (a 1-D model's inputs, channels by time): a tile draws the top sample's lines
  const signal = images.signal ?? null;
  const thumbs = signal !== null ? ["signal", ...(featviz.size ? ["featviz"] : [])] : images.tokens !== null ? ["tokens"] : vectors ? ["features", ...(featviz.size ? ["featviz"] : [])] : ["input", ...(positions > 1 ? ["crop"] : []), ...(featviz.size ? ["featviz"] : [])];
  let thumb = thumbs.includes(params.get("thumb") ?? "") ? (params.get("thumb") as string) : thumbs[0];
  // units constant on the dataset (a ReLU that never fires): their top lists are ties,
  // so their tiles say so instead of showing a top image
  const units = doc.units as (LayerDoc["units"][number] & { constant?: boolean })[];
  const constantCount = (doc as LayerDoc & { constant_units?: number }).constant_units ?? units.filter((u) => u.constant).length;
  const silent = units.filter((u) => u.constant && u.max === 0).length;

  const grid = h("div", { class: "unit-grid", role: "list" });
  const sortButtons = h("div", { class: "seg", role: "group", "aria-label": "sort units" });
  const thumbButtons = h("div", { class: "seg", role: "group", "aria-label": "thumbnail" });
  const fvHint = h("span", { class: "muted small featviz-note" });
  // what a tile shows and what its two numbers are, for a reader new to the page
  const gridNote = h("p", { class: "muted small", id: "grid-note" });
  const statsText =
    `max: the unit's highest activation on any sample${positions > 1 ? ` at any ${anyPlace(places)}` : ""}; ` +
    `mean: its average over the dataset${positions > 1 ? ` (each sample's ${averagedPlaces(places)})` : ""}`;
  // a video model's layer (frames, rows, columns): a tile is one frame of a clip
  const clip = Array.isArray(doc.layout?.["positions"]) && (doc.layout?.["positions"] as unknown[]).length === 3;
  // a ViT's layer of patch tokens: it has no receptive field, and its crops are the tokens' patches
  const patches = Array.isArray(doc.layout?.["boxes"]);
  const tileText = (): string =>
    thumb === "signal"
      ? `Each tile: the signal of the sample that excites the unit most (its top sample by max), one line per channel${signal && signal[0] > 8 ? " (its first 8 of " + fmt(signal[0]) + ")" : ""} on one scale, each pixel column its samples' least to greatest value${positions > 1 ? "; shaded: the samples its peak sees (its receptive field)" : " (the unit sees the whole signal)"}`
      : thumb === "features"
      ? `Each tile: the feature values of the sample that excites the unit most (its top sample by max), one cell per feature in order (at most 64 cells: beyond, each cell spans consecutive features and shows the one of largest |value|), red above 0 and blue below (one scale for every tile: |value| ${fmt(scale)} is the deepest colour), and its ${Math.min(3, images.features ?? 0)} largest by |value| named`
      : thumb === "tokens"
      ? `Each tile: the token ids of the sample that excites the unit most (its top sample by max)${positions > 1 && positions === images.tokens ? ", around the token where it peaks, which is marked" : ", its first ones (this layer has no axis of one position per token)"}`
      : thumb === "featviz"
      ? signal !== null
        ? "Each tile: a signal optimized to excite the unit, one line per channel on one scale (in the model's input units), each pixel column its samples' least to greatest value"
        : "Each tile: an image optimized to excite the unit"
      : thumb === "crop"
        ? clip
          ? "Each tile: the part of the unit's top clip (by max) that its peak sees, its receptive field, on the frame of the peak"
          : patches
            ? "Each tile: the patch of the token where the unit peaks on its top sample (by max); through attention the token sees more of the image (a tile tagged “class token”: a token with no patch, the whole image)"
            : "Each tile: the part of the unit's top sample (by max) that its peak sees, its receptive field"
        : clip
          ? "Each tile: the clip that excites the unit most (its top sample by max), shown as the frame where the unit peaked"
          : "Each tile: the sample that excites the unit most (its top sample by max)";

  const thumbnail = (unit: number, top: number | null, constant: number | null, peak: number[] | null = null, window: { start: number; tokens: number[]; words: (string | null)[] | null } | null = null, span: number[] | null = null): HTMLElement => {
    if (thumb === "signal" && constant === null) {
      if (top === null) return noImage("no top sample");
      const tile = doc.signals?.[String(top)];
      if (!tile) return noImage(`top: sample #${top}; signal not at hand`);
      const rate = images.sampleRate ?? null;
      const label = `sample ${top}${span ? `: its peak sees samples ${span[0]}–${span[1] - 1}${rate ? ` (${secondsText(span[0], span[1] - 1, rate)})` : ""}` : ""}`;
      return h("div", { class: "signal-tile", title: label, "data-sample": top, "data-span": span ? span.join(" ") : null }, signalTilePlot(tile, { width: 96, height: 64, span, label }));
    }
    if (thumb === "tokens" && constant === null) {
      if (top === null) return noImage("no top sample");
      if (!window) return noImage("token ids not at hand");
      // (a layer whose positions are not the tokens, a strided convolution's, marks none)
      const at = positions > 1 && positions === images.tokens && peak ? peak[1] : null;
      return h("div", { class: "tok-thumb", title: `sample ${top}${at === null ? "" : `: peak at token ${at}`}` }, tokenSequence(window.tokens, at, window.start, images.tokens ?? window.tokens.length, window.words));
    }
    if (thumb === "features" && constant === null) {
      if (top === null) return noImage("no top sample");
      const tile = doc.features?.[String(top)];
      if (!tile) return noImage(`top: sample #${top}; values not at hand`);
      return h(
        "div",
        { class: "feat-thumb", title: `sample ${top}`, "data-sample": top },
        featureBins(tile, images.featureNames, scale),
        ...tile.top.map(({ index, value }) => h("span", { class: "feat-top", "data-feature": index }, h("span", { class: "feat-name" }, featureName(images.featureNames, index)), h("span", { class: "feat-num" }, value === null ? "not finite" : fmt(value)))),
      );
    }
    const tag = thumb === "featviz" || constant !== null || top === null ? null : patchless({ rf: doc.rf, layout: doc.layout }, peak?.[1]);
    const shown = image(unit, top, constant);
    // the top image's peak at a class token: no patch, the "crop" is the whole image
    return tag && shown.tagName !== "DIV" ? h("span", { class: "fv-thumb" }, shown, tag) : shown;
  };
  const image = (unit: number, top: number | null, constant: number | null): HTMLElement => {
    const alt = `unit ${unit}: top image`;
    if (constant !== null && thumb !== "featviz") {
      const word = constant === 0 ? "silent" : "constant";
      return h("div", { class: "no-img silent", title: `constant on the dataset: ${fmt(constant)} on every sample${positions > 1 ? ` at every ${places.one}` : ""}; its top lists are ties` }, h("strong", null, word), h("small", null, `${fmt(constant)} everywhere`));
    }
    if (thumb === "featviz") {
      const objective = featviz.get(unit);
      if (!objective) return noImage("no feature visualization");
      if (signal !== null) {
        // a signal run's featviz is a (C, T) signal: its stored PNG is a grey strip, so
        // the tile draws its lines from the layer document's values
        const tile = doc.featviz_signals?.[String(unit)];
        if (!tile) return noImage("feature visualization not at hand");
        const label = `unit ${unit}: feature visualization (${objective} objective)`;
        const plot = h("div", { class: "signal-tile featviz-signal", title: label, "data-objective": objective }, signalTilePlot(tile, { width: 96, height: 64, label, names: images.channelNames ?? null }));
        return objective === "channel" ? plot : h("span", { class: "fv-thumb" }, plot, h("small", { class: "fv-objective" }, objective));
      }
      const src = ctx.api.pngUrl(p("runs", ctx.run, "layers", name, "units", unit, "featviz", objective, "0.png"));
      const img = h("img", { src, loading: "lazy", decoding: "async", alt: `unit ${unit}: feature visualization (${objective} objective)`, title: `${objective} objective`, "data-objective": objective, width: 96, height: 96 });
      // a fallback to the neuron objective is marked on the tile itself
      return objective === "channel" ? img : h("span", { class: "fv-thumb" }, img, h("small", { class: "fv-objective" }, objective));
    }
    if (index) {
      const t = index.thumbs[unit];
      if (!t) return noImage(top === null ? "no top image" : "image not exported");
      // a clip's top entry: the frame of its peak (its crop is cut from it), not the middle one
      const url = ctx.api.pngUrl(t.frame != null ? p("runs", ctx.run, "samples", t.sample, "frames", `${t.frame}.png`) : p("runs", ctx.run, "samples", t.sample, "image.png"));
      if (thumb === "input") return h("img", { src: url, loading: "lazy", decoding: "async", alt, width: 96, height: 96 });
      if (!t.crop) return noImage("no peak to crop");
      const canvas = cropCanvas(url, t.box, alt + " (crop)", true);
      canvas.classList.add("crop");
      return canvas;
    }
    if (top === null || !images.ok) return noImage(top === null ? "no top image" : "no image");
    const src = ctx.api.pngUrl(p("runs", ctx.run, "layers", name, "units", unit, "max", 0, `${thumb}.png`));
    return h("img", { src, loading: "lazy", decoding: "async", alt, width: 96, height: 96, class: thumb === "crop" ? "crop" : null });
  };

  // The grid of a wide layer (resnet50's layer4: 2,048 units; a ViT MLP: 3,072) is built
  // in slices: the first screenful at once, the rest in short tasks that leave the page
  // responsive, every card in the DOM in the end (so Tab, find-in-page and links reach
  // every unit). Cards are made once per thumbnail kind and reused when the sort changes;
  // off-screen cards skip rendering (CSS content-visibility) and load their images lazily.
  const cards = new Map<number, HTMLElement>();
  const card = (u: (typeof units)[number]): HTMLElement => {
    let el = cards.get(u.unit);
    if (!el) {
      el = h(
        "a",
        { class: u.constant ? "unit-card constant" : "unit-card", role: "listitem", href: ctx.href("unit", name, u.unit), "data-unit": u.unit, "data-constant": u.constant ? "1" : null },
        thumbnail(u.unit, u.top_max, u.constant ? u.max ?? 0 : null, u.top_max_peak ?? null, u.top_max_tokens ? { start: u.top_max_tokens_start ?? 0, tokens: u.top_max_tokens, words: u.top_max_token_text ?? null } : null, u.top_max_span ?? null),
        h("span", { class: "unit-id" }, `unit ${u.unit}`),
        className(u.unit) === null ? null : h("span", { class: "unit-class", title: `the ${l.class_value} of ${outputClass(className(u.unit) ?? "", u.unit)}` }, outputClass(className(u.unit) ?? "", u.unit)),
        h("span", { class: "unit-stats", title: statsText }, h("span", null, `max ${fmt(u.max)}`), h("span", null, `mean ${fmt(u.mean)}`)),
      );
      cards.set(u.unit, el);
    }
    return el;
  };
  let generation = 0;
  const fillGrid = (order: typeof units) => {
    const mine = ++generation;
    grid.replaceChildren();
    grid.dataset.cards = String(order.length);
    let next = 0;
    const slice = (budgetMs: number, atLeast: number) => {
      const t0 = performance.now();
      const part = document.createDocumentFragment();
      const stop = Math.min(order.length, next + atLeast);
      while (next < order.length && (next < stop || performance.now() - t0 < budgetMs)) part.append(card(order[next++]));
      grid.append(part);
      if (next >= order.length) grid.dataset.complete = "1";
      else delete grid.dataset.complete;
    };
    slice(0, FIRST_CARDS);
    const more = () => {
      if (mine !== generation || ctx.signal.aborted) return; // re-sorted, or left the page
      slice(SLICE_MS, 64);
      if (next < order.length) setTimeout(more, 0);
    };
    if (next < order.length) setTimeout(more, 0);
  };

  // the filters card (a first convolution's), once loaded: its kernels in the grid's order
  let filters: HTMLElement | null = null;
  let order: number[] = [];
  const draw = () => {
    const sorted = [...units];
    if (sort !== "index") {
      const key = sort;
      sorted.sort((a, b) => (b[key] ?? -Infinity) - (a[key] ?? -Infinity));
    }
    fillGrid(sorted);
    order = sorted.map((u) => u.unit);
    if (filters) orderFilters(filters, order, sort);
    const seg = (el: HTMLElement, options: string[], value: string, set: (v: string) => void) =>
      fill(
        el,
        options.map((o) =>
          h("button", { type: "button", "aria-pressed": String(o === value), class: o === value ? "on" : null, onclick: () => set(o) }, o),
        ),
      );
    seg(sortButtons, [...SORTS], sort, (v) => {
      sort = v as Sort;
      params.set("sort", sort);
      ctx.replaceParams(params);
      if (ctx.stale()) return ctx.redraw();
      draw();
    });
    fill(fvHint, thumb === "featviz" ? fvNote : "");
    fill(gridNote, `${tileText()}. ${statsText[0].toUpperCase()}${statsText.slice(1)}. Click a tile for the unit's page.`);
    seg(thumbButtons, thumbs, thumb, (v) => {
      thumb = v;
      cards.clear(); // each card shows the thumbnail kind it was made with
      params.set("thumb", thumb);
      ctx.replaceParams(params);
      // the run was probed again: new thumbnails beside the earlier run's values would mix
      if (ctx.stale()) return ctx.redraw();
      draw();
    });
  };
  draw();
  // a first convolution's kernels as pictures, where the server has the model: the slot
  // stays empty (and takes no room) on any other layer or page
  const filtersSlot = h("div", { class: "filters-slot" });
  void layerFilters(ctx, name).then((f) => {
    if (!f) return;
    filters = filtersSection(ctx, name, f);
    orderFilters(filters, order, sort);
    fill(filtersSlot, filters);
  });

  append(root, 
    h("h1", null, name, h("span", { class: "sub" }, ` ${[l.kind, unitsText(l.shape, l.num_units, doc.layout, images.tokens)].filter(Boolean).join(" · ")}`)),
    h(
      "div",
      { class: "layer-head" },
      h(
        "section",
        { class: "card" },
        facts([
          ["module", l.module ? moduleFacts(l.module) : "–"],
          ["op", l.op ? h("a", { href: ctx.href("graph") + "?focus=" + encodeURIComponent(l.op) }, l.op) : "–"],
          ["output shape", shape(l.shape)],
          ["units", fmt(l.num_units)],
          ...(classNames ? [["units are", h("span", { id: "class-units" }, `the model's output: the ${l.class_value === "score" ? "score (logit)" : l.class_value} of each class, unit i for class i`)] as [string, Node]] : []),
          ["constant units", h("span", { id: "constant-count" }, constantCount ? `${fmt(constantCount)} of ${fmt(l.num_units)}${silent === constantCount ? ` (0 everywhere${/relu/i.test(l.kind ?? "") ? ": never fire" : ""})` : ""}` : "none")],
          ["receptive field", h("span", { id: "rf-text" }, !doc.rf && patches ? "none (patch tokens): a crop is the peak token's patch, where the token sits; through attention it sees more of the image" : !doc.rf && doc.rf_reason ? `none, so no crop: ${doc.rf_reason}` : rfText(doc.rf, signal !== null, images.sampleRate ?? null))],
        ]),
      ),
      h(
        "section",
        { class: "card chart-card" },
        h("h3", null, "Activations of all units"),
        fitted((width) => histogramChart(doc.histogram, { width, height: 190, xLabel: sampleValueLabel(places), yLabel: "samples × units" }), 460),
        h("p", { class: "muted small" }, positions > 1 ? "every unit's per-sample means, counted together" : "every unit's per-sample activations, counted together"),
      ),
    ),
    constantCount
      ? notice(
          `${constantCount === l.num_units ? `All ${fmt(constantCount)}` : `${fmt(constantCount)} of the ${fmt(l.num_units)}`} units of this layer are constant on the dataset` +
            `${silent === constantCount ? `: 0 on every sample${positions > 1 ? ` at every ${places.one}` : ""}${/relu/i.test(l.kind ?? "") ? " (ReLUs that never fire)" : ""}` : " (each the same value on every sample)"}. ` +
            "Their top lists are ties, ranked by sample id alone, so their tiles show no image.",
        )
      : null,
    images.notice,
    doc.features_error ? withId(notice(`No feature values to show: ${doc.features_error.replace(/\.+$/, "")}.`), "features-error") : null,
    doc.signals_error ? withId(notice(`No signals to draw: ${doc.signals_error.replace(/\.+$/, "")}.`), "signals-error") : null,
    // a static export without some samples' images: why, once (the tiles say it in a word)
    index?.no_image && doc.units.some((u) => u.top_max !== null && index.thumbs[u.unit] === null)
      ? withId(notice(`Some tiles have no image: ${index.no_image.replace(/\.+$/, "")}.`), "no-image-why")
      : null,
    directionsSection(ctx, name, doc, places),
    filtersSlot,
    h("div", { class: "toolbar" }, h("span", null, "Sort by"), sortButtons, h("span", null, "Thumbnail"), thumbButtons, fvHint),
    gridNote,
    grid,
  );
}

/** Feature visualizations of directions in the layer's units (`featviz(...,
 * objective="direction")`): a direction mixes the units, so it has no unit page; each is
 * shown here by its index, with the units it weighs most (linked) and what its images
 * reached. Null where the layer has none. */
function directionsSection(ctx: PageContext, name: string, doc: LayerDoc, places: Places): HTMLElement | null {
  const dirs = doc.featviz_directions ?? [];
  if (!dirs.length) return null;
  const weight = (w: number) => (w >= 0 ? "+" : "−") + fmt(Math.abs(w));
  return h(
    "section",
    { class: "card directions", id: "directions" },
    h("h2", null, `Directions `, h("span", { class: "muted small" }, `${dirs.length} with feature visualizations`)),
    h(
      "p",
      { class: "muted small" },
      `Images that maximize the dot product of this layer's unit vector with a direction, mean over ${places.many} (objective "direction"). A direction mixes the units, so it is shown here by its index, with the units it weighs most.`,
    ),
    h(
      "div",
      { class: "direction-grid" },
      dirs.map((d) =>
        h(
          "figure",
          { class: "direction", "data-direction": d.index },
          h(
            "div",
            { class: "direction-images" },
            d.activations.map((_, c) =>
              h("img", { src: ctx.api.pngUrl(p("runs", ctx.run, "layers", name, "featviz", "direction", d.index, `${c}.png`)), loading: "lazy", alt: `direction ${d.index}: feature visualization${d.activations.length > 1 ? ` ${c + 1}` : ""}`, width: 96, height: 96 }),
            ),
          ),
          h(
            "figcaption",
            { class: "small" },
            h("strong", null, `direction ${d.index}`),
            ` · reached ${d.activations.map((a) => fmt(a)).join(", ")}`,
            h("br"),
            h("span", { class: "muted" }, `strongest of ${fmt(d.units)} units: `),
            ...d.top_units.flatMap((u, i) => [i ? ", " : "", h("a", { href: ctx.href("unit", name, u.unit), class: "direction-unit" }, `${u.unit}`), ` (${weight(u.weight)})`]),
          ),
        ),
      ),
    ),
  );
}

/** The header's account of a layer, each thing once: `64 units · each a 56×56 map` (a
 * conv's C×H×W), `768 units · over 197 tokens` (a token layer: positions along one axis
 * that stand for image patches), `2,048 units` (a vector: no positions, where the output
 * shape would only repeat the unit count). Positions come from the stored layout (its
 * axes count the batch); runs without one are `(N, C, ...)`. */
export function unitsText(shapeNoBatch: number[], units: number, layout: Record<string, unknown> | null | undefined, inputTokens: number | null = null): string {
  const count = `${fmt(units)} unit${units === 1 ? "" : "s"}`;
  const positions = layout?.["positions"];
  const batch = layout?.["batch"];
  let sizes: number[];
  if (Array.isArray(positions) && typeof batch === "number") {
    const full = [...shapeNoBatch];
    full.splice(batch, 0, 1);
    sizes = positions.map((a: number) => full[a] ?? 1);
  } else sizes = shapeNoBatch.slice(1);
  if (!sizes.length || sizes.every((n) => n === 1)) return count;
  if (sizes.length === 1) {
    // (patch tokens, or a text model's tokens: one position per input token id)
    const tokens = Array.isArray(layout?.["boxes"]) || (inputTokens !== null && sizes[0] === inputTokens);
    return `${count} · over ${fmt(sizes[0])} ${tokens ? "token" : "position"}${sizes[0] === 1 ? "" : "s"}`;
  }
  return `${count} · each a ${shape(sizes)} map`;
}

/** `7×7 px, stride 2×2` from the receptive-field record's y and x axes; on a video
 * model's layer also its frames, as many as a clip of the probed length lets it see; on a
 * signal's (`signal`: its one axis, time, is the record's x) `16 samples, stride 4`. */
export function rfText(rf: Record<string, unknown> | null, signal = false, rate: number | null = null): string {
  const y = rf?.["y"] as { size?: number; stride?: number } | undefined;
  const x = rf?.["x"] as { size?: number; stride?: number } | undefined;
  if (!y || !x || y.size === undefined || x.size === undefined) return rf ? "recorded" : "–";
  if (signal) {
    if (x.stride === 0) return "the whole signal"; // its time axis reduced away
    // with the dataset's sampling rate, each also as a duration: `16 samples (125 ms)`
    const dur = (n: number | undefined): string => (rate && n !== undefined ? ` (${durationText(n, rate)})` : "");
    const back = (x.stride ?? 0) < 0 ? " (reversed)" : "";
    const step = x.stride === undefined ? undefined : Math.abs(x.stride);
    const samples = `${fmt(x.size)} sample${x.size === 1 ? "" : "s"}${dur(x.size)}, stride ${fmt(step)}${dur(step)}${back}`;
    return rf?.["full"] === true ? `the whole signal (${samples})` : samples;
  }
  if (y.stride === 0 && x.stride === 0) return "the whole input"; // spatial axes reduced away
  const time = framesText(rf);
  // a flip makes a stride negative (positions run backwards): its size, said mirrored
  const mirrored = (y.stride ?? 0) < 0 || (x.stride ?? 0) < 0 ? " (mirrored)" : "";
  const size = `${fmt(y.size)}×${fmt(x.size)} px, stride ${fmt(Math.abs(y.stride ?? 0))}×${fmt(Math.abs(x.stride ?? 0))}${mirrored}${time}`;
  // a field larger than the image (padding counted): every position sees all of it
  return rf?.["full"] === true ? `the whole input (${size})` : size;
}

/** A video model's layer: the most frames one position sees of a clip of the probed
 * length (its exact bounds, clipped to the clip as a box is to the image: the affine
 * window, counting padding, can be longer than the clip), and that window, labelled,
 * only where it is longer. Empty for other layers. */
function framesText(rf: Record<string, unknown> | null): string {
  const t = rf?.["t"] as { size?: number; stride?: number; lo?: number[]; hi?: number[] } | undefined;
  const clip = (rf?.["input_size"] as number[] | undefined)?.[0];
  if (t?.size === undefined || !t.lo?.length || !t.hi?.length || clip === undefined) return "";
  const seen = Math.max(...t.lo.map((lo, i) => (t.hi?.[i] ?? lo) - lo));
  const frames = (n: number) => `${fmt(n)} frame${n === 1 ? "" : "s"}`;
  const what = seen >= clip ? `all ${frames(clip)} of a clip` : `up to ${fmt(seen)} of a clip's ${frames(clip)}`;
  const stride = t.stride ? `, stride ${fmt(t.stride)} in time` : "";
  const window = t.size > seen ? ` (its window unclipped: ${frames(t.size)})` : "";
  return ` · sees ${what}${stride}${window}`;
}

/** `layer4.1.relu` (its 2nd call) for a module called more than once (`layer4.1.relu:2`). */
function moduleFacts(module: string): (HTMLElement | string)[] {
  const m = /^(.*):(\d+)$/.exec(module);
  if (!m) return [h("code", null, module)];
  const n = Number(m[2]);
  const nth = n % 10 === 1 && n % 100 !== 11 ? "st" : n % 10 === 2 && n % 100 !== 12 ? "nd" : n % 10 === 3 && n % 100 !== 13 ? "rd" : "th";
  return [h("code", null, m[1]), ` (its ${n}${nth} call)`];
}
