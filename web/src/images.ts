/**
 * Whether a run can show its images. A run probed from Python records neither its
 * dataset nor its model; unless some images were cached, every image request would 404,
 * so the pages show why (and how to fix it) instead of a grid of broken images.
 */
import { p, type FeatureTile, type RunSummary } from "./api";
import type { PageContext } from "./context";
import { fmt, h, notice } from "./dom";

export interface ImageState {
  /** Image requests can succeed: the dataset loads, or some images are cached/exported. */
  ok: boolean;
  /** A notice saying why there are no images and what to do; null when `ok`. */
  notice: HTMLElement | null;
  /** The token ids per sample where the inputs are token ids (a text model's): they have
   * no picture, and the pages show each sample's ids instead; null for images. */
  tokens: number | null;
  /** The values per sample where the inputs are flat vectors of numbers, not token ids (a
   * tabular model's features): they have no picture; null for images and token ids. */
  features?: number | null;
  /** Each feature's name (the dataset's `feature_names`, as the probe stored them); null
   * where it gave none. */
  featureNames?: string[] | null;
  /** `[C, T]` where the inputs are signals, channels by time: the pages draw each sample
   * as lines (its picture as an image would be a C-pixel-high strip); null else. */
  signal?: number[] | null;
  /** Each channel's name (the dataset's `channel_names`); null where it gave none. */
  channelNames?: string[] | null;
  /** The signals' sampling rate in Hz (the dataset's `sample_rate`): times are given in
   * seconds beside samples by it; null where it gave none. */
  sampleRate?: number | null;
}

export async function imageState(ctx: PageContext): Promise<ImageState> {
  const s = await ctx.api.json<RunSummary>(p("runs", ctx.run));
  const tokens = s.dataset.tokens ?? null;
  if (tokens !== null) {
    // no image to ask for: every request would fail; the pages show the token ids
    const why = s.holds.dataset === false ? ` They cannot be shown here either: ${(s.holds.dataset_reason ?? "the run's dataset cannot be loaded").replace(/\.+$/, "")}.` : "";
    // with a vocabulary (stored in the run or given to the server) the ids are shown as words
    const shown = (s.dataset.vocab_size ?? null) !== null ? "its tokens as the vocabulary spells them (hover a token for its id)" : "its token ids (the run holds no vocabulary: `lurker serve RUN --vocab FILE` shows words)";
    const el = notice(`The inputs are sequences of ${tokens} token ids, not images: each sample is shown as ${shown} (on a unit's lists, the token where it peaks marked).${why}`);
    el.id = "token-inputs";
    return { ok: false, notice: el, tokens };
  }
  const features = s.dataset.features ?? null;
  if (features !== null) {
    // no picture to ask for (every request would answer 409): say so once, no broken images
    const el = notice(`The inputs are vectors of ${features} features, not images: they have no picture to show. Each sample is shown as its feature values, as the model was fed them.`);
    el.id = "vector-inputs";
    return { ok: false, notice: el, tokens, features, featureNames: s.dataset.feature_names ?? null };
  }
  const signal = s.dataset.signal ?? null;
  if (signal !== null) {
    // drawn as lines from the values the API gives, never as a C-pixel-high image
    const why = s.holds.dataset === false ? ` They cannot be drawn here: ${(s.holds.dataset_reason ?? "the run's dataset cannot be loaded").replace(/\.+$/, "")}.` : "";
    const el = notice(`The inputs are signals of ${signal[0]} channel${signal[0] === 1 ? "" : "s"} × ${signal[1].toLocaleString()} samples, not images: each sample is drawn as one line per channel (on one scale), and on a unit's lists the samples its peak sees (its receptive field) are shaded.${why}`);
    el.id = "signal-inputs";
    return { ok: false, notice: el, tokens, signal, channelNames: s.dataset.channel_names ?? null, sampleRate: s.dataset.sample_rate ?? null };
  }
  const ok = ctx.api.isStatic || s.holds.dataset !== false || s.holds.cached_images > 0;
  if (ok) return { ok, notice: null, tokens };
  const why = (s.holds.dataset_reason ?? "the run's dataset cannot be loaded").replace(/\.+$/, "");
  return { ok, notice: notice(`No images to show: ${why}.`), tokens };
}

/**
 * A sequence of token ids (a text model's sample, or part of it from `start`), each id a
 * chip, the one at `peak` (its index in the whole sequence) marked; "…" where the shown
 * part leaves tokens out. What a run of token ids shows in place of an image. With the
 * run's vocabulary (`words`, one per id) a chip shows the token's text as the vocabulary
 * spells it (sub-word markers such as GPT-2's Ġ kept; spaces, tabs and newlines made
 * visible), its id in its title and `data-id`; an id the vocabulary does not name shows
 * the id.
 */
export function tokenSequence(tokens: number[], peak: number | null, start = 0, total: number = tokens.length, words: (string | null)[] | null = null): HTMLElement {
  return h(
    "span",
    { class: words ? "tokens tokens-words" : "tokens", "data-peak": peak === null ? null : String(peak) },
    start > 0 ? h("span", { class: "tok-more", title: `${start} tokens before` }, "…") : null,
    tokens.map((t, i) => {
      const word = words?.[i] ?? null;
      const at = start + i === peak ? " (the peak)" : "";
      const title = word === null ? `token ${start + i}: id ${t}${words ? ", not in the vocabulary" : ""}${at}` : `token ${start + i}: id ${t}, ${JSON.stringify(word)}${at}`;
      return h("span", { class: start + i === peak ? "tok tok-peak" : "tok", "data-pos": start + i, "data-id": t, title }, word === null ? String(t) : visibleText(word));
    }),
    start + tokens.length < total ? h("span", { class: "tok-more", title: `${total - start - tokens.length} tokens after` }, "…") : null,
  );
}

/** A token's text with its whitespace made visible (a chip of spaces would look empty). */
export function visibleText(word: string): string {
  if (word === "") return "∅";
  return word.replace(/ /g, "␣").replace(/\t/g, "⇥").replace(/\r?\n/g, "↵");
}

/** The grey tile drawn where an image is missing. */
/** Feature ``i``'s name: the dataset's, else its index. */
export function featureName(names: string[] | null | undefined, i: number): string {
  return names?.[i] ?? `feature ${i}`;
}

/** The largest |value| of some feature vectors: the colour scale of their strips (one
 * scale for all of a page's, so strips compare); 0 for none. */
export function featureScale(vectors: ((number | null)[] | null | undefined)[]): number {
  let m = 0;
  for (const v of vectors) for (const x of v ?? []) if (x !== null) m = Math.max(m, Math.abs(x));
  return m;
}

/** A value's colour on a diverging scale: blue below 0, red above, white at 0; grey for a
 * value that is not finite (null). */
export function featureColor(v: number | null, scale: number): string {
  if (v === null) return "#9a9a9a";
  const t = scale > 0 ? Math.max(-1, Math.min(1, v / scale)) : 0;
  const mix = (to: number) => Math.round(255 + (to - 255) * Math.abs(t));
  return t >= 0 ? `rgb(${mix(192)},${mix(57)},${mix(43)})` : `rgb(${mix(33)},${mix(102)},${mix(172)})`;
}

/** The indices of the ``n`` values of largest |value| (ties by index), largest first. */
export function topFeatures(values: (number | null)[], n: number): number[] {
  return values
    .map((v, i) => [v === null ? -1 : Math.abs(v), i] as const)
    .sort((a, b) => b[0] - a[0] || a[1] - b[1])
    .slice(0, n)
    .map(([, i]) => i);
}

/** A feature vector as a heat strip, one cell per feature in order, each titled with its
 * name and value (colour: the value against ``scale``). */
export function featureStrip(values: (number | null)[], names: string[] | null | undefined, scale: number): HTMLElement {
  return h(
    "div",
    { class: "feat-strip", role: "img", "aria-label": `${values.length} feature values` },
    ...values.map((v, i) => h("span", { style: `background:${featureColor(v, scale)}`, "data-value": v === null ? null : String(v), title: `${featureName(names, i)}: ${v === null ? "not finite" : fmt(v)}` })),
  );
}

/** A layer tile's strip: one cell per bin of consecutive features (at most 64, however
 * many features: a tile per unit of a wide layer would otherwise be a million cells), each
 * coloured by its value of largest |value|, signed, and titled with the features it spans. */
export function featureBins(tile: FeatureTile, names: string[] | null | undefined, scale: number): HTMLElement {
  return h(
    "div",
    { class: "feat-strip", role: "img", "aria-label": `${tile.count} feature values in ${tile.strip.length} cells` },
    ...tile.strip.map((v, b) => {
      const first = tile.starts[b];
      const last = (b + 1 < tile.starts.length ? tile.starts[b + 1] : tile.count) - 1;
      const what = first === last ? featureName(names, first) : `features ${first}-${last} (largest |value|)`;
      return h("span", { style: `background:${featureColor(v, scale)}`, "data-value": v === null ? null : String(v), "data-first": first, "data-last": last, title: `${what}: ${v === null ? "not finite" : fmt(v)}` });
    }),
  );
}

/** Feature values as rows of name, value and a bar from 0 (its length: |value| against
 * ``scale``), in the order given by ``order``. */
export function featureRows(values: (number | null)[], names: string[] | null | undefined, scale: number, order: number[]): HTMLElement {
  return h(
    "table",
    { class: "feat-table" },
    h(
      "tbody",
      null,
      ...order.map((i) => {
        const v = values[i];
        const w = v === null || scale <= 0 ? 0 : (50 * Math.abs(v)) / scale;
        const bar = h("span", { class: "feat-bar" }, h("span", { style: `${v !== null && v < 0 ? `right:50%` : `left:50%`};width:${w.toFixed(1)}%;background:${featureColor(v === null ? null : Math.sign(v) * scale, scale)}` }));
        return h("tr", { "data-feature": i, "data-value": v === null ? null : String(v) }, h("th", { scope: "row" }, featureName(names, i)), h("td", { class: "feat-value" }, v === null ? "not finite" : fmt(v)), h("td", null, bar));
      }),
    ),
  );
}

export function noImage(text = "no image"): HTMLElement {
  return h("div", { class: "no-img" }, text);
}

/**
 * What the places of a layer's output are called where the pages say where a unit peaks,
 * what its per-sample mean is over and what its relevance is summed over: a conv's map
 * ("position", "spatial"), tokens (a ViT's patch and class tokens, a text model's: a
 * class token is no place in the image, "map" would mislead), a signal layer's time steps
 * ("time"), or none (a vector, one value per unit and sample: "vector").
 */
export interface Places {
  kind: "spatial" | "tokens" | "time" | "vector";
  /** one of them: "position", "token", "time step" */
  one: string;
  /** all of them: "positions", "tokens", "time steps" */
  many: string;
}

export function layerPlaces(
  layer: { rf?: Record<string, unknown> | null; layout?: Record<string, unknown> | null },
  positions: number,
  images: { tokens: number | null; signal?: number[] | null },
): Places {
  if (positions <= 1) return { kind: "vector", one: "position", many: "positions" };
  if ((!layer.rf && Array.isArray(layer.layout?.["boxes"])) || images.tokens !== null) return { kind: "tokens", one: "token", many: "tokens" };
  if ((images.signal ?? null) !== null) return { kind: "time", one: "time step", many: "time steps" };
  return { kind: "spatial", one: "position", many: "positions" };
}

/** Where a unit peaks, after "at any": "position of its map", "token", "time step". */
export function anyPlace(p: Places): string {
  return p.kind === "spatial" ? "position of its map" : p.one;
}

/** What a sample's mean is, after "each sample's": "map averaged over its positions",
 * "values averaged over its tokens". */
export function averagedPlaces(p: Places): string {
  return `${p.kind === "spatial" ? "map" : "values"} averaged over its ${p.many}`;
}

/**
 * On a layer of tokens, what a unit's per-sample mean is taken over, in words: "its 17
 * tokens (the class token included)" (the probe averages every token, a patchless class
 * token too); null on any other layer.
 */
export function tokenMeanOver(layer: { rf?: Record<string, unknown> | null; layout?: Record<string, unknown> | null }): string | null {
  const boxes = layer.layout?.["boxes"];
  if (layer.rf || !Array.isArray(boxes)) return null;
  const none = boxes.filter((b) => b === null).length;
  const which = none === 1 && boxes[0] === null ? "the class token" : `the ${none} tokens with no patch`;
  return `its ${boxes.length} tokens${none ? ` (${which} included)` : ""}`;
}

/**
 * On a layer of tokens, the tag of a peak at a token with no patch (a class token: its
 * layout box is null), which has no box to draw and whose "patch" is the whole image;
 * null for a peak at a patch token, or on any other layer.
 */
export function patchless(layer: { rf?: Record<string, unknown> | null; layout?: Record<string, unknown> | null }, token: number | null | undefined): HTMLElement | null {
  const boxes = layer.layout?.["boxes"];
  if (layer.rf || !Array.isArray(boxes) || token === null || token === undefined || boxes[token] !== null) return null;
  const name = token === 0 ? "class token" : `token ${token}`;
  return h("span", { class: "token-tag", title: `the peak is at token ${token}, which stands for no patch of the image (${token === 0 ? "the class token" : "a token the model adds"}): no box to draw, and the image shown is the whole image` }, name);
}

/** What the Live and Explain pages call an image: an upload by its file's name (its id,
 * a content hash, only where the server does not know the name), `sample-N` as
 * "sample N". */
export function imageTitle(image: string, name: string | null | undefined): string {
  if (name) return name;
  const sample = /^sample-(\d+)$/.exec(image);
  return sample ? `sample ${sample[1]}` : image;
}
