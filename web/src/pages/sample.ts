/**
 * `#/r/RUN/sample/ID`: one dataset image, its label, the prediction, and the units that
 * rank it in their top-k. A sample can sit in the top-k of thousands of units, so the API
 * pages those entries (strongest rank first within each layer); the page shows every
 * layer with its count at once and fills the layers page by page on "show more". Entries
 * that are ties (ranked by sample id alone) are left out, and the page says how many: the
 * lists of units constant on the dataset (a ReLU that never fires lists the first k
 * samples) and a list's tail of samples sharing its last value (a relevance of 0).
 */
import { p, serveCommand, type RunSummary, type Appearance, type LiveImage, type Prediction, type SampleBrief, type SampleDoc } from "../api";
import type { PageContext } from "../context";
import { append, facts, fill, fmt, h, notice, pct } from "../dom";
import { featureRows, featureScale, featureStrip, imageState, tokenSequence } from "../images";
import { durationText, fetchedSignal, signalDocPlot } from "../signal";
import { classLabel, classText } from "../classes";
import { predictionLabel } from "../predictions";

/** Entries per "show more" request (the server's default page, so a static export holds
 * the same pages: `?offset=N&limit=PAGE`). */
const PAGE = 200;

/** The unit a sample page was reached from (its query's `layer` and `unit`), with the op
 * its layer probes; null where the query names none, or a layer or unit the run lacks. */
function fromUnit(params: URLSearchParams, summary: RunSummary): { layer: string; unit: number; op: string } | null {
  const raw = params.get("unit") ?? "";
  const l = summary.layers.find((x) => x.name === params.get("layer"));
  if (!l?.op || !/^\d+$/.test(raw) || Number(raw) >= l.num_units) return null;
  return { layer: l.name, unit: Number(raw), op: l.op };
}

/** The sample's class as every page names one (see classes.ts): `4`, `cat`, `10 (index 0)`. */
export function labelText(s: SampleBrief): string {
  if (s.label === null) return "unlabelled";
  return classLabel(s.class_name || null, s.label);
}

export async function renderSample(root: HTMLElement, ctx: PageContext, args: string[]): Promise<void> {
  const id = args[0];
  const path = p("runs", ctx.run, "samples", id);
  const [doc, images, summary] = await Promise.all([ctx.api.json<SampleDoc>(path), imageState(ctx), ctx.api.json<RunSummary>(p("runs", ctx.run))]);
  const s = doc.sample;
  // entries of units constant on the dataset (ties) are not in the document: counted only
  const leftOut = doc.left_out ? { total: doc.left_out, layers: doc.left_out_layers ?? [] } : null;
  // a static export lists whether it holds the sample's image (it may not: no dataset)
  const exported = ctx.api.isStatic ? await ctx.api.exportedSamples(ctx.run) : null;
  const hasImage = exported ? exported.samples.some((x) => x.id === s.id && x.image) : true;
  // ...and whether it holds the sample's precomputed explanations
  const explained = ctx.api.isStatic && (await ctx.api.explained(ctx.run)).samples.some((x) => x.sample === s.id);
  document.title = `sample ${s.id} · ${ctx.run} · lurker`;
  // a static export has no model, but it holds the predictions made with the run's model
  // for the samples whose explanations were precomputed
  const held = explained && !doc.prediction ? await ctx.api.json<LiveImage>(p("runs", ctx.run, "live", `sample-${s.id}`)).catch(() => null) : null;
  const pred = held?.predictions.length ? held.predictions : doc.prediction;
  // no model ran here, but the run recorded the top class (the Map page shows it too)
  const stored = !pred?.length ? (doc.stored_prediction ?? null) : null;
  const predItem = (q: Prediction) => h("li", { class: q.name !== null && q.class === s.label ? "match" : null }, `${predictionLabel(q)} `, h("span", { class: "muted" }, pct(q.prob)));
  // the top class against the label, said in words (a bold true class lower in the
  // top-5 did not say the model got it wrong); only where the outputs are the dataset's
  // classes (a prediction has a name then), as the Map page calls samples misclassified
  const top = pred?.[0] ?? stored;
  const verdict =
    top && top.name !== null && s.label !== null
      ? top.class === s.label
        ? h("p", { class: "verdict", id: "verdict", "data-verdict": "correct" }, `predicted ${predictionLabel(top)}: correct`)
        : h("p", { class: "verdict error-text", id: "verdict", "data-verdict": "misclassified" }, h("strong", null, `predicted ${predictionLabel(top)}, true ${labelText(s)}: misclassified`))
      : null;
  // reached from a unit's page (`?layer=L&unit=U`): Live opens at that unit's op with its map
  // marked, as the unit page's own live links do; else on Live's default op
  const from = fromUnit(ctx.params, summary);
  const liveHref = ctx.href("live") + "?" + new URLSearchParams(from ? { image: `sample-${s.id}`, op: from.op, unit: String(from.unit) } : { image: `sample-${s.id}` });
  const plural = (n: number, word: string) => `${n} ${word}${n === 1 ? "" : "s"}`;
  append(
    root,
    h("h1", null, `Sample ${s.id}`, s.class_name ? h("span", { class: "sub" }, ` · ${classText(s.class_name, s.label)}`) : null, verdict?.dataset.verdict === "misclassified" ? h("span", { class: "sub error-text" }, " · misclassified") : null),
    h(
      "div",
      // a signal is drawn full width below: the facts take the row
      { class: (images.signal ?? null) !== null ? "sample-head one-col" : "sample-head" },
      images.tokens !== null
        ? // token ids have no picture: the sample is its sequence of ids
          h(
            "section",
            { class: "card sample-tokens", id: "sample-tokens" },
            h("h3", null, `${images.tokens} token ids`),
            doc.tokens ? tokenSequence(doc.tokens, null, 0, doc.tokens.length, doc.token_text ?? null) : notice(`Not at hand: ${(doc.tokens_error ?? "the run's dataset cannot be loaded").replace(/\.+$/, "")}.`),
          )
        : (images.signal ?? null) !== null
        ? null // drawn full width below
        : !hasImage && (images.features ?? null) === null // a vector has no image to hold
        ? notice(`This export holds no image of this sample: ${(exported?.no_image ?? "the run's dataset could not be loaded when it was made").replace(/\.+$/, "")}.`)
        : images.ok
          ? h("img", { class: "sample-img pixelated", src: ctx.api.pngUrl(p("runs", ctx.run, "samples", s.id, "image.png")), alt: `sample ${s.id}`, width: 224, height: 224 })
          : h("div", { class: "sample-img" }, images.notice),
      h(
        "section",
        { class: "card" },
        facts([
          ["label", h("span", { id: "sample-label" }, labelText(s))],
          ["file", s.path ? h("code", null, s.path) : "–"],
          [
            "prediction",
            pred && pred.length
              ? [
                  verdict,
                  h("ol", { class: "preds" }, pred.map(predItem)),
                  pred[0].position != null ? h("span", { class: "muted small", id: "pred-position" }, `the next token at the last position (${pred[0].position}), softmax over the vocabulary`) : null,
                  held ? h("span", { class: "muted small", id: "pred-precomputed" }, "made with the run's model when its explanations were precomputed") : null,
                ]
              : stored
                ? [
                    verdict,
                    h("ol", { class: "preds", id: "pred-stored" }, predItem(stored)),
                    h("span", { class: "muted small" }, "the top class, as the run recorded it (lurker probe --embed, lurker map)"),
                    doc.prediction_error ? h("div", { class: "muted small" }, `not made now: ${doc.prediction_error}`) : null,
                  ]
                : doc.prediction_error ??
                  (pred
                    ? "none (the model's output is not one score per class)"
                    : ctx.api.isStatic
                      ? `not in this export: the model runs under ${serveCommand(summary)} (or make the run's map, lurker map RUN, before exporting: it records every sample's prediction)`
                      : `no model attached (${serveCommand(summary, false)})`),
          ],
          ["in top-k of", h("span", { id: "top-k-of" }, `${plural(doc.total, "unit list")} in ${plural(doc.layers.length, "layer")}`, leftOut ? h("span", { class: "muted" }, ` (and ${leftOut.total} tied, left out)`) : null)],
        ]),
        // a static export runs no model: no button to a view that cannot open (and no row
        // at all where it holds no explanation either)
        // (token ids and feature vectors: Live fills its typed input from the sample, and
        // Explain scores each token or feature)
        (images.tokens !== null || (images.features ?? null) !== null) && !ctx.api.isStatic && pred
          ? h(
              "p",
              { class: "entry-links" },
              h("a", { class: "button", id: "open-live", href: ctx.href("live") + "?sample=" + s.id }, "Try it in live view"),
              h("a", { class: "button", id: "explain-this", href: ctx.href("explain") + "?image=sample-" + s.id }, "Explain this sample"),
            )
          : (ctx.api.isStatic && !(pred || explained)) || images.tokens !== null || (images.features ?? null) !== null
          ? null
          : h(
              "p",
              { class: "entry-links" },
              ctx.api.isStatic ? null : h("a", { class: "button", id: "open-live", href: liveHref, title: from ? `at ${from.layer}'s op (${from.op}), unit ${from.unit}'s map marked` : "the model run on this sample, op by op" }, from ? `Open in live view at unit ${from.unit}` : "Open in live view"),
              pred || explained ? h("a", { class: "button", id: "explain-this", href: ctx.href("explain") + "?image=sample-" + s.id }, (images.signal ?? null) !== null ? "Explain this sample" : "Explain this image") : null,
            ),
      ),
    ),
    (images.signal ?? null) !== null
      ? // a signal is drawn as lines, one per channel, from its values
          h(
            "section",
            { class: "card sample-signal", id: "sample-signal" },
            h("h3", null, `${images.signal![0]} channel${images.signal![0] === 1 ? "" : "s"} × ${images.signal![1].toLocaleString()} samples${images.sampleRate ? ` (${durationText(images.signal![1], images.sampleRate)} at ${Number(images.sampleRate.toPrecision(6))} Hz)` : ""}`, h("span", { class: "muted small" }, ` as the model is fed them; one lane per channel (${images.channelNames?.length ? images.channelNames[0] : "0"} at the top), one scale for all`)),
            doc.signal_error
              ? notice(`Not at hand: ${doc.signal_error.replace(/\.+$/, "")}.`)
              : fetchedSignal(
                  ctx.api,
                  ctx.run,
                  s.id,
                  undefined,
                  (sig) => signalDocPlot(sig, { width: 1200, height: Math.min(420, 40 + 60 * sig.channels), axis: true, rate: images.sampleRate ?? null, label: `sample ${s.id}: ${sig.channels} channels` }),
                  (why) => notice(`Not at hand: ${why.replace(/\.+$/, "")}.`),
                ),
          )
      : null,
    (images.features ?? null) !== null
      ? // feature vectors have no picture: the sample is its values, as the model is fed them
        h(
          "section",
          { class: "card sample-features", id: "sample-features" },
          h("h3", null, `${images.features} feature values`, h("span", { class: "muted small" }, " as the model is fed them, in order; bars from 0, one scale: the largest |value| of the sample")),
          doc.features
            ? [featureStrip(doc.features, images.featureNames, featureScale([doc.features])), featureRows(doc.features, images.featureNames, featureScale([doc.features]), doc.features.map((_, i) => i))]
            : notice(`Not at hand: ${(doc.features_error ?? "the run's dataset cannot be loaded").replace(/\.+$/, "")}.`),
        )
      : null,
    h("h2", null, "Units that rank it in their top-k"),
  );
  if (leftOut) {
    root.append(
      h(
        "p",
        { class: "left-out muted", id: "left-out" },
        `Left out: ${leftOut.total} ${leftOut.total === 1 ? "entry" : "entries"} that are ties, ranked by sample id alone, so they say nothing about this sample (lists of units constant on the dataset; zeros ending a full list, or a full list all of one value, which more samples may share): `,
        // "layer 8 (34)": a Sequential's layers are numbers, and "8 34" would read as two
        leftOut.layers.flatMap(({ layer, count }, i) => [i ? ", " : "", "layer ", h("a", { href: ctx.href("layer", layer), "data-layer": layer, "data-count": count }, layer), ` (${count})`]),
        ".",
      ),
    );
  }
  if (!doc.total) {
    root.append(notice(leftOut ? "No unit ranks this sample in its top-k, other than by the ties above." : "No unit ranks this sample in its top-k."));
    return;
  }

  // one section per layer that holds the sample, with its count; chips arrive page by page
  const sections = new Map<string, { chips: HTMLElement; shown: HTMLElement; count: number; loaded: number }>();
  for (const { layer, count } of doc.layers) {
    const chips = h("div", { class: "chips" });
    const shown = h("span", { class: "muted shown" });
    sections.set(layer, { chips, shown, count, loaded: 0 });
    root.append(
      h(
        "section",
        { class: "appear", "data-layer": layer },
        h("h3", null, h("span", { class: "muted" }, "layer "), h("a", { href: ctx.href("layer", layer) }, layer), h("span", { class: "muted" }, ` · ${plural(count, "list")}`), shown),
        chips,
      ),
    );
  }
  let loaded = 0;
  const add = (rows: Appearance[]) => {
    for (const a of rows) {
      const sec = sections.get(a.layer);
      if (!sec) continue;
      sec.chips.append(
        h(
          "a",
          { class: "chip", href: ctx.href("unit", a.layer, a.unit) + `?tab=${a.list}`, "data-unit": a.unit, "data-list": a.list, title: `${a.list} list, rank ${a.rank + 1}, value ${fmt(a.value)}` },
          `unit ${a.unit}`,
          h("small", null, ` ${a.list} rank ${a.rank + 1}`),
        ),
      );
      sec.loaded++;
    }
    loaded += rows.length;
    for (const sec of sections.values()) {
      fill(sec.shown, sec.loaded < sec.count ? ` · ${sec.loaded} shown` : "");
    }
  };
  add(doc.appearances);

  const status = h("span", { class: "muted", role: "status" });
  const more = h("button", { type: "button", class: "more", id: "more-appearances" });
  const label = () => {
    const left = doc.total - loaded;
    more.textContent = left <= PAGE ? `show the other ${left}` : `show ${PAGE} more of the ${left} left`;
    more.hidden = left <= 0;
  };
  more.addEventListener("click", async () => {
    more.disabled = true;
    fill(status, " loading…");
    try {
      const next = await ctx.api.json<SampleDoc>(`${path}?offset=${loaded}&limit=${PAGE}`);
      if (ctx.signal.aborted) return;
      add(next.appearances);
      fill(status);
    } catch (err) {
      fill(status, notice((err as Error).message, "error"));
    } finally {
      more.disabled = false;
      label();
    }
  });
  label();
  root.append(h("p", { class: "more-row" }, more, status));
}
