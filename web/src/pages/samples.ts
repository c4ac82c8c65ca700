/** `#/r/RUN/samples?offset=N`: the dataset, a page of thumbnails at a time (on a run of
 * token ids, each sample's first tokens; of feature vectors, its binned feature strip). */
import { p, type ListedSample, type SampleList } from "../api";
import type { PageContext } from "../context";
import { append, fmt, h, notice, withId } from "../dom";
import { featureBins, featureName, featureScale, imageState, noImage, tokenSequence, type ImageState } from "../images";
import { classLabel, classText } from "../classes";
import { durationText, signalTilePlot } from "../signal";

const LIMIT = 100;

export async function renderSamples(root: HTMLElement, ctx: PageContext): Promise<void> {
  const offset = Math.max(0, Math.floor(Number(ctx.params.get("offset") ?? 0)) || 0);
  // a static export holds the samples some unit ranks in its top-k: list those only
  const [exported, images] = await Promise.all([ctx.api.isStatic ? ctx.api.exportedSamples(ctx.run) : null, imageState(ctx)]);
  const list: { total: number; samples: (ListedSample & { image?: boolean })[]; tokens_error?: string | null; features_error?: string | null; signal_error?: string | null } = exported
    ? { total: exported.samples.length, samples: exported.samples.slice(offset, offset + LIMIT) }
    : await ctx.api.json<SampleList>(p("runs", ctx.run, "samples") + `?offset=${offset}&limit=${LIMIT}`);
  document.title = `samples · ${ctx.run} · lurker`;
  // an offset past the end (an old link, a hand-edited URL): previous goes to the last page
  const last = Math.max(0, Math.floor((list.total - 1) / LIMIT) * LIMIT);
  const past = offset > 0 && offset >= list.total;
  // a run with no picture: each tile shows the sample's tokens or feature strip instead
  // (a signal's tile draws its lines)
  const signal = (images.signal ?? null) !== null;
  const flat = images.tokens !== null || (images.features ?? null) !== null || signal;
  const what = images.tokens !== null ? "tokens" : signal ? "signals" : "feature values";
  const flatWhy = images.tokens !== null ? list.tokens_error : signal ? list.signal_error : list.features_error;
  const scale = featureScale(list.samples.map((s) => s.features?.strip));
  const pager = () =>
    h(
      "div",
      { class: "pager" },
      h("a", { class: "button", href: offset > 0 ? ctx.href("samples") + `?offset=${Math.max(0, Math.min(offset - LIMIT, last))}` : null, "aria-disabled": String(offset <= 0) }, "← previous"),
      h("span", null, past ? `none of ${list.total}` : `${offset + 1}–${Math.min(offset + LIMIT, list.total)} of ${list.total}`),
      h("a", { class: "button", href: offset + LIMIT < list.total ? ctx.href("samples") + `?offset=${offset + LIMIT}` : null, "aria-disabled": String(offset + LIMIT >= list.total) }, "next →"),
    );
  append(root, 
    h("h1", null, "Samples", h("span", { class: "sub" }, ` ${list.total}`)),
    exported
      ? notice(
          `This static export holds the ${exported.samples.length} samples that some unit ranks in its top-k, of the run's ${exported.total}; ` +
            "the others are not here: serve the run (`lurker serve RUN`) to browse them all.",
        )
      : null,
    exported?.no_image ? withId(notice(`${exported.samples.filter((x) => !x.image).length} of them have no image here: ${exported.no_image.replace(/\.+$/, "")}.`), "no-image-why") : null,
    images.notice,
    // (once: the inputs' notice may already say why, the run having no dataset)
    flat && flatWhy && !exported && !images.notice?.textContent?.includes(flatWhy.replace(/`/g, "").replace(/\.+$/, "")) ? withId(notice(`The samples' ${what} are not at hand: ${flatWhy.replace(/\.+$/, "")}.`, "error"), "flat-why") : null,
    past
      ? h(
          "div",
          { class: "notice", id: "past-the-end" },
          `There ${list.total === 1 ? "is 1 sample" : `are ${list.total} samples`}: none from ${offset + 1} on. `,
          h("a", { href: ctx.href("samples") + (last ? `?offset=${last}` : "") }, "Go to the last page"),
          ".",
        )
      : null,
    pager(),
    list.samples.length ? sampleKey(list.samples, flat) : null,
    h(
      "div",
      { class: "sample-grid" },
      list.samples.map((s) =>
        h(
          "a",
          { class: "sample-card", href: ctx.href("sample", s.id), "data-sample": s.id },
          flat
            ? flatTile(s, images, scale)
            : images.ok && s.image !== false
            ? h("img", {
                src: ctx.api.pngUrl(p("runs", ctx.run, "samples", s.id, "image.png")),
                loading: "lazy",
                alt: `sample ${s.id}`,
                width: 80,
                height: 80,
                onerror: (e: Event) => (e.target as HTMLElement).replaceWith(noImage()),
              })
            : noImage(s.image === false ? "image not exported" : "no image"),
          h("span", null, `#${s.id}`),
          // misclassified (the run's recorded top class is not the label): "label → predicted",
          // as the Map page's selection shows it and the sample's page says it
          s.pred !== null && s.pred !== undefined && s.label !== null && s.pred !== s.label
            ? h("small", { class: "error-text misclassified", title: `misclassified: predicted ${classLabel(s.pred_name, s.pred)}` }, `${classLabel(s.class_name, s.label)} → ${classLabel(s.pred_name, s.pred)}`)
            : h("small", { title: s.class_name ? classText(s.class_name, s.label) : "" }, s.class_name ? classLabel(s.class_name, s.label) : ""),
        ),
      ),
    ),
    pager(),
  );
}

/** A sample of a run with no picture as its tile shows it: its first tokens (words with a
 * vocabulary) or its feature strip (at most 64 cells, as the layer page's tiles), or a grey
 * tile where the dataset cannot give them (the page says why once). */
function flatTile(s: ListedSample, images: ImageState, scale: number): HTMLElement {
  if (s.signal) {
    const rate = images.sampleRate ?? null;
    const label = `sample ${s.id}: ${s.signal.channels} channel${s.signal.channels === 1 ? "" : "s"} × ${s.signal.length} samples${rate ? ` (${durationText(s.signal.length, rate)} at ${Number(rate.toPrecision(6))} Hz)` : ""}`;
    return h("div", { class: "signal-tile", title: label, "data-sample": s.id }, signalTilePlot(s.signal, { width: 80, height: 56, label }));
  }
  if (s.tokens) return h("div", { class: "tok-thumb", title: `sample ${s.id}: its first ${s.tokens.length} of ${images.tokens ?? s.tokens.length} tokens` }, tokenSequence(s.tokens, null, 0, images.tokens ?? s.tokens.length, s.token_text ?? null));
  if (s.features)
    return h(
      "div",
      { class: "feat-thumb", title: `sample ${s.id}: its ${s.features.count} features (the strip) and the 3 largest by |value|` },
      featureBins(s.features, images.featureNames, scale),
      ...s.features.top.map(({ index, value }) => h("span", { class: "feat-top", "data-feature": index }, h("span", { class: "feat-name" }, featureName(images.featureNames, index)), h("span", { class: "feat-num" }, value === null ? "not finite" : fmt(value)))),
    );
  return noImage(images.tokens !== null ? "tokens not at hand" : (images.signal ?? null) !== null ? "signal not at hand" : "values not at hand");
}

/** What the two lines under each tile are; where the run records the model's predictions,
 * what a red "2 → 8" means and how many this page has. A run with no picture (token ids,
 * feature vectors) says "sample", not "image". */
function sampleKey(samples: { label: number | null; pred?: number | null }[], flat: boolean): HTMLElement {
  const one = flat ? "sample" : "image";
  const aOne = flat ? "a sample" : "an image";
  const known = samples.some((s) => s.pred !== null && s.pred !== undefined);
  const wrong = samples.filter((s) => s.pred !== null && s.pred !== undefined && s.label !== null && s.pred !== s.label).length;
  return h(
    "p",
    { class: "muted small", id: "samples-key" },
    `Under each ${one}: the sample's index in the dataset (#) and its class`,
    known
      ? [": in red, true class → the model's prediction where the model gets it wrong (", h("strong", { class: "error-text" }, String(wrong)), ` on this page). Click ${aOne} for the sample's page.`]
      : `. Click ${aOne} for the sample's page.`,
  );
}
