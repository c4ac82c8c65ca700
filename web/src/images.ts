/**
 * Whether a run can show its images. A run probed from Python records neither its
 * dataset nor its model; unless some images were cached, every image request would 404,
 * so the pages show why (and how to fix it) instead of a grid of broken images.
 */
import { p, type RunSummary } from "./api";
import type { PageContext } from "./context";
import { h, notice } from "./dom";

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
}

export async function imageState(ctx: PageContext): Promise<ImageState> {
  const s = await ctx.api.json<RunSummary>(p("runs", ctx.run));
  const tokens = s.dataset.tokens ?? null;
  if (tokens !== null) {
    // no image to ask for: every request would fail; the pages show the token ids
    const why = s.holds.dataset === false ? ` They cannot be shown here either: ${(s.holds.dataset_reason ?? "the run's dataset cannot be loaded").replace(/\.+$/, "")}.` : "";
    // with a vocabulary (stored in the run or given to the server) the ids are shown as words
    const shown = (s.dataset.vocab_size ?? null) !== null ? "its tokens as the vocabulary spells them (hover a token for its id)" : "its token ids (the run holds no vocabulary: `lurker serve RUN --vocab FILE` shows words)";
    const el = notice(`The inputs are sequences of ${tokens} token ids, not images: each sample is shown as ${shown}, the token where the unit peaks marked.${why}`);
    el.id = "token-inputs";
    return { ok: false, notice: el, tokens };
  }
  const features = s.dataset.features ?? null;
  if (features !== null) {
    // no picture to ask for (every request would answer 409): say so once, no broken images
    const el = notice(`The inputs are vectors of ${features} features, not images: they have no picture to show. A sample's page shows the model's prediction on its features.`);
    el.id = "vector-inputs";
    return { ok: false, notice: el, tokens, features };
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
export function noImage(text = "no image"): HTMLElement {
  return h("div", { class: "no-img" }, text);
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
