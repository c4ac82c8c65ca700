/**
 * `#/r/RUN/unit/LAYER/UNIT?tab=mean|max|relevance|featviz&img=input|grad&crop=0|1&objective=channel|neuron`: Torchlurk's popup as a
 * page. One JSON request (the unit) plus its images; toggles only swap image URLs.
 */
import { cropCanvas, p, type EntryKind, type FeatVizView, type Shown, type TopEntry, type UnitDoc } from "../api";
import { barChart, dataBins, fitted, histogramChart, positionCount, sampleValueLabel } from "../charts";
import type { PageContext } from "../context";
import { append, fill, fmt, h, notice, withId } from "../dom";
import { featureRows, featureScale, featureStrip, imageState, layerPlaces, type Places, noImage, patchless, tokenMeanOver, tokenSequence, topFeatures } from "../images";
import { secondsText, signalDocPlot, signalPlot } from "../signal";
import { layerFilters, unitFilter } from "../filters";
import { classLabel, classText, classWord, outputClass } from "../classes";

type Tab = "mean" | "max" | "relevance" | "featviz";
/** The tabs that show a top-k list. */
type List = Exclude<Tab, "featviz">;

export async function renderUnit(root: HTMLElement, ctx: PageContext, args: string[]): Promise<void> {
  const [layer, unitArg] = args;
  const unit = Number(unitArg);
  // static export: the unit comes from its layer's chunk, with which images the site holds
  const [{ doc, shown, noImage: noImageWhy }, images, summary] = await Promise.all([
    ctx.api.unit(ctx.run, layer, unitArg),
    imageState(ctx),
    ctx.api.summary(ctx.run).catch(() => null), // (held: the router asked for it) its class names
  ]);
  document.title = `${layer} unit ${unit} · ${ctx.run} · lurker`;
  const params = new URLSearchParams(ctx.params);
  const relevance = doc.top.relevance ?? null; // runs probed with relevance=True
  const asked = params.get("tab");
  const featviz = doc.featviz ?? null; // images made by `lurker featviz`
  // every objective the unit has images of (channel, neuron), one shown at a time
  const views: FeatVizView[] = featviz ? (featviz.views?.length ? featviz.views : [featviz]) : [];
  let view = views.find((v) => v.objective === params.get("objective")) ?? views[0] ?? null;
  let tab: Tab = asked === "mean" ? "mean" : asked === "relevance" && relevance ? "relevance" : asked === "featviz" && featviz ? "featviz" : "max";
  let img: "input" | "grad" = params.get("img") === "grad" ? "grad" : "input";
  // a layer with no position axes (a Linear's (N, units)): one activation per sample, no
  // peak to place, and a crop would be the whole image
  const positions = positionCount(doc.layer as UnitDoc["layer"] & { layout?: Record<string, unknown> | null });
  // what its positions are called: a conv's map, tokens (a ViT's, a text model's), time steps
  const places = layerPlaces(doc.layer, positions, images);
  // a layer with no receptive field (not tokens, which crop to their patch, nor a clip's
  // frames): every crop would be the whole input, so the crop button is disabled, saying why
  const noField =
    !tokenLayer(doc.layer) && !frameLayer(doc.layer) && !doc.layer.rf && doc.layer.rf_reason
      ? `no crop: this layer has no receptive field (${doc.layer.rf_reason})`
      : null;
  let crop = positions > 1 && noField === null && params.get("crop") === "1";
  // the same value on every sample everywhere: its max and mean lists are ties
  const constant = (doc as UnitDoc & { constant?: boolean }).constant === true;
  const relevanceTies = !!relevance?.length && relevance.every((e) => e.value === relevance[0].value);

  const goto = (u: number | null) => {
    if (u === null) return;
    const q = params.toString();
    ctx.navigate(ctx.href("unit", layer, u) + (q ? "?" + q : ""));
  };
  const onKey = (e: KeyboardEvent) => {
    if (e.target instanceof HTMLInputElement || e.altKey || e.ctrlKey || e.metaKey) return;
    if (e.key === "ArrowLeft") goto(doc.prev);
    if (e.key === "ArrowRight") goto(doc.next);
  };
  document.addEventListener("keydown", onKey);
  ctx.signal.addEventListener("abort", () => document.removeEventListener("keydown", onKey));

  const tabs = h("div", { class: "tabs", role: "tablist" });
  const toggles = h("div", { class: "toolbar" });
  const gallery = h("div", { class: "topk", role: "tabpanel" });

  // on a layer of tokens, what a sample's mean is over (a class token is one of them)
  const over = tokenMeanOver(doc.layer) ?? (images.tokens !== null && positions > 1 ? `its ${positions} tokens` : null);
  // what a crop is: a conv's receptive field, or (tokens, which have none) the patch a
  // token stands for; through attention a token sees more than its patch
  const region = tokenLayer(doc.layer)
    ? {
        name: "token's patch",
        peak: "the patch of the peak's token (through attention the token also sees the rest of the image)",
        box: "the patch of the peak's token",
        mean: "the patch of the unit's peak token in that sample",
      }
    : frameLayer(doc.layer) && !doc.layer.rf
    ? {
        name: "peak frame",
        peak: "the clip's frame where the unit peaked, whole (this run stores no receptive field over frames: probe it again for one)",
        box: "none (this run stores no receptive field over frames); the image is the clip's frame where the unit peaked",
        mean: "the clip's frame where the unit peaked in that sample, whole",
      }
    : !doc.layer.rf && doc.layer.rf_reason
    ? {
        // no field: the server's crop is the whole input; say so, and why
        name: "receptive-field crop",
        peak: `the whole input: this layer has no receptive field (${doc.layer.rf_reason})`,
        box: `none: this layer has no receptive field (${doc.layer.rf_reason})`,
        mean: "the whole input (this layer has no receptive field)",
      }
    : frameLayer(doc.layer)
    ? {
        name: "receptive-field crop",
        peak: "the part of the peak's frame that the peak sees (its receptive field), cut from the frame under each image; the peak sees the frames its caption names",
        box: "the peak's receptive field, drawn on the clip's frame named under each image; the peak sees the frames its caption names",
        mean: "the receptive field of the unit's peak in that sample, on the frame named under each image",
      }
    : {
        name: "receptive-field crop",
        peak: "the part of the input the peak sees (its receptive field)",
        box: "the peak's receptive field",
        mean: "the receptive field of the unit's peak in that sample",
      };
  const kind = (): EntryKind => (img === "grad" ? (crop ? "grad_crop" : "grad") : crop ? "crop" : "input");
  const sync = () => {
    params.set("tab", tab);
    params.set("img", img);
    params.set("crop", crop ? "1" : "0");
    if (view && views.length > 1) params.set("objective", view.objective);
    ctx.replaceParams(params);
    // the run was probed again: this page's entries are the earlier run's, the image
    // token the new one's (its pictures of other samples): draw the page anew instead
    if (ctx.stale()) return ctx.redraw();
    draw();
  };
  // `off`: values that cannot be chosen here, each with why (its button's tooltip)
  const seg = (label: string, options: [string, string][], value: string, set: (v: string) => void, off: Record<string, string> = {}) =>
    h(
      "div",
      { class: "seg", role: "group", "aria-label": label },
      options.map(([v, text]) =>
        h("button", { type: "button", "data-value": v, "aria-pressed": String(v === value), class: v === value ? "on" : null, disabled: v in off ? true : null, title: off[v] ?? null, onclick: () => set(v) }, text),
      ),
    );

  const entriesOf = (list: List) => (list === "relevance" ? relevance : doc.top[list]) ?? [];
  // runs probed before the mean list kept its peaks: where its crops are cut (a class
  // token: the whole image) is found with the model, asked once when its crops are first
  // shown; a run that stores them (e.y set) is tagged from them, in a static export too
  const meanStored = entriesOf("mean").every((e) => e.y !== null);
  // on a video model's layer, the frame such an entry is shown on is the found peak's
  // (asked with them, whatever the toggles); without the model it is not known
  const unrecordedFrames = frameLayer(doc.layer) && !meanStored;
  let meanPeaks: number[][] | null | undefined = (hasPatchless(doc.layer) || unrecordedFrames) && !ctx.api.isStatic && !meanStored ? undefined : null;
  let meanFrames: (number | null)[] | null = null;
  let noMeanFrames = ctx.api.isStatic; // no model to find them: the images are the clips' middle frames
  const askMeanPeaks = () => {
    meanPeaks = null;
    ctx.api
      .json<{ peaks: number[][]; frames?: (number | null)[] | null }>(p("runs", ctx.run, "layers", layer, "units", unit, "mean", "peaks"))
      .then((r) => {
        meanPeaks = r.peaks;
        meanFrames = r.frames ?? null;
        if (!ctx.signal.aborted && tab === "mean" && (crop || unrecordedFrames)) draw();
      })
      .catch(() => {
        // no model: no crops to tag either (they say why), no frames to name
        noMeanFrames = true;
        if (!ctx.signal.aborted && tab === "mean" && unrecordedFrames) draw();
      });
  };
  const tagOf = (list: List, e: TopEntry): HTMLElement | null =>
    list === "max"
      ? patchless(doc.layer, e.x)
      : list === "mean" && crop && e.y !== null
        ? patchless(doc.layer, e.x)
        : list === "mean" && crop && meanPeaks
          ? patchless(doc.layer, meanPeaks[e.rank]?.[1])
          : null;
  const captionOf = (list: List, e: TopEntry): HTMLElement | null =>
    list === "relevance"
      ? null
      : list === "mean" && unrecordedFrames && e.y === null
        ? unrecordedCaption(meanFrames?.[e.rank] ?? null, noMeanFrames, crop, doc.clip_frames ?? null)
        : clipCaption(e, doc.clip_frames ?? null);
  const draw = () => {
    if (tab === "mean" && (crop || unrecordedFrames) && meanPeaks === undefined) askMeanPeaks();
    fill(
      tabs,
      (
        [
          ["mean", "Average activation"],
          ["max", "Max activation"],
          ...(relevance ? [["relevance", "Relevance for the prediction"]] : []),
          ...(featviz ? [["featviz", "Feature visualization"]] : []),
        ] as [Tab, string][]
      ).map(([t, text]) =>
        h(
          "button",
          {
            type: "button",
            role: "tab",
            "data-tab": t,
            "aria-selected": String(t === tab),
            class: t === tab ? "on" : null,
            onclick: () => {
              tab = t;
              sync();
            },
          },
          text,
        ),
      ),
    );
    if (tab === "featviz" && view) {
      const pick =
        views.length > 1
          ? seg(
              "objective",
              views.map((v) => [v.objective, `${v.objective} objective`] as [string, string]),
              view.objective,
              (o) => {
                view = views.find((v) => v.objective === o) ?? view;
                sync();
              },
            )
          : null;
      fill(toggles, pick, h("span", { class: "muted featviz-caption" }, featvizCaption(view, places)));
      const beyond = featvizBeyondData(view);
      // a static export holds the best sample's image only where the unit's lists show it
      const best = view.best_sample;
      const held = !shown || (["mean", "max"] as const).some((w) => doc.top[w].some((e) => e.sample_id === best && shown.input?.[w]?.includes(e.rank)));
      if (view.signals) {
        fill(gallery, h("div", { class: "signal-list featviz-signals" }, beyond, ...featvizSignals(ctx, unit, view, images.channelNames ?? null, images.sampleRate ?? null, !doc.signal_error)));
        return;
      }
      fill(gallery, beyond, featvizFigures(ctx, layer, unit, view, images.ok, held ? null : (noImageWhy ?? NOT_EXPORTED.input)));
      return;
    }
    if (constant && (tab !== "relevance" || relevanceTies)) {
      fill(toggles);
      fill(gallery, h("div", { class: "notice constant-list" }, tiesText(tab as List, doc.max, relevance?.[0]?.value ?? null, entriesOf(tab as List).length)));
      return;
    }
    if (images.tokens !== null) {
      // token ids have no picture: each entry is its sequence, the peak token marked
      // (the max list's peak, and the mean list's on that sample, as the run stores them)
      const list = tab as List;
      const entries = entriesOf(list);
      const seq = `the sample's ${images.tokens} tokens`;
      fill(
        toggles,
        h(
          "span",
          { class: "muted", id: "token-caption" },
          list === "relevance"
            ? `value: the unit's LRP relevance for the model's prediction${positions > 1 ? ", summed over its tokens" : ""}`
            : positions <= 1
              ? "value: the unit's activation (this layer has no token axis: no token to mark)"
              : list === "max"
                ? `value: the unit's peak over ${seq}; marked: the token where it peaks`
                : `value: the unit's mean over ${seq}; marked: the token where it peaks on that sample`,
        ),
      );
      // why the ids are missing, unless the page's line above says it already (no dataset)
      const why = doc.tokens_error?.replace(/\.+$/, "") ?? null;
      const said = summary?.holds.dataset === false;
      fill(
        gallery,
        h(
          "div",
          { class: "token-list" },
          why && !said ? withId(notice(`No token ids to show: ${why}.`), "tokens-error") : null,
          entries.length ? entries.map((e) => tokenEntry(ctx, e, list !== "relevance" && positions > 1 && positions === doc.token_length ? e.x : null)) : notice("This list is empty."),
        ),
      );
      return;
    }
    if ((images.features ?? null) !== null) {
      // feature vectors have no picture: each entry is its value, sample and class, no
      // image / gradient toggle and no empty tiles
      const list = tab as List;
      const entries = entriesOf(list);
      fill(toggles, h("span", { class: "muted", id: "vector-caption" }, list === "relevance" ? "value: the unit's LRP relevance for the model's prediction" : `value: the unit's ${list === "max" ? "peak" : "mean"} activation on the sample`));
      const scale = featureScale(entries.map((e) => e.features));
      fill(
        gallery,
        h(
          "div",
          { class: "token-list vector-list" },
          doc.features_error ? withId(notice(`No feature values to show: ${doc.features_error.replace(/\.+$/, "")}.`), "features-error") : null,
          entries.length ? entries.map((e) => vectorEntry(ctx, e, images.featureNames, scale)) : notice("This list is empty."),
        ),
      );
      return;
    }
    if ((images.signal ?? null) !== null) {
      // signals are drawn as lines from their values, the peak's span shaded: no image /
      // gradient or crop toggle (an image of a signal is a strip a few pixels high)
      const list = tab as List;
      const entries = entriesOf(list);
      const spanned = list !== "relevance" && entries.some((e) => e.span);
      fill(toggles, h("span", { class: "muted", id: "signal-caption" }, list === "relevance" ? `value: the unit's LRP relevance for the model's prediction${positions > 1 ? `, summed over its ${places.many}` : ""}` : `value: the unit's ${list === "max" ? "peak" : "mean"} activation on the sample${spanned ? `; shaded: the samples its ${list === "max" ? "peak" : "peak on that sample"} sees (its receptive field)` : positions <= 1 ? " (it sees the whole signal)" : ""}`));
      fill(
        gallery,
        h(
          "div",
          { class: "signal-list" },
          doc.signal_error ? withId(notice(`No signals to draw: ${doc.signal_error.replace(/\.+$/, "")}.`), "signal-error") : null,
          entries.length ? entries.map((e) => signalEntry(ctx, e, list !== "relevance", !doc.signal_error, images.sampleRate ?? null)) : notice("This list is empty."),
        ),
      );
      return;
    }
    if (tab === "relevance") {
      fill(toggles, h("span", { class: "muted" }, `value: the unit's LRP relevance for the model's prediction${positions > 1 ? `, summed over its ${places.many}` : ""}: the samples where it carried the decision most`));
    } else fill(
      toggles,
      seg("image or gradient", [["input", "image"], ["grad", "gradient"]], img, (v) => {
        img = v as "input" | "grad";
        sync();
      }),
      positions > 1
        ? seg(
            `full or ${region.name}`,
            [["0", "full"], ["1", region.name]],
            crop ? "1" : "0",
            (v) => {
              crop = v === "1";
              sync();
            },
            noField === null ? {} : { "1": noField },
          )
        : null,
      h(
        "span",
        { class: "muted" },
        positions <= 1
          ? `value: the unit's activation${tab === "mean" ? " (one per sample: the same ranking as the max list)" : ""}`
          : tab === "max"
            ? `value: the peak of the unit's ${places.kind === "spatial" ? "map" : `values over its ${places.many}`}; ${crop ? `image: ${region.peak}` : `box: ${region.box}`}${entriesOf("max").some((e) => patchless(doc.layer, e.x)) ? "; “class token”: the peak is at a token with no patch, so the whole image is shown" : ""}`
            : `value: the mean of the unit's ${over ? `values over ${over}` : places.kind === "spatial" ? "map" : `values over its ${places.many}`}${crop ? `; image: ${region.mean}` : ""}${crop && entriesOf("mean").some((e) => tagOf("mean", e)) ? "; “class token”: the unit peaks at a token with no patch on that sample, so the whole image is shown" : ""}`,
      ),
    );
    const list = tab as List;
    const entries = entriesOf(list);
    // a list's tied tail (zeros ending a full list, a relevance of 0 where the unit carried
    // nothing, in a run of more samples): ties listed by sample id, so they are dimmed and
    // said; the server decides, by the rule the sample pages leave them out by. A tail that
    // is the whole list (all of one value: a peak every sample reaches, a relevance of 0
    // everywhere) is said as such: which samples it holds is by sample id alone
    const last = entries.length ? entries[entries.length - 1].value : null;
    const told = Math.min(doc.tied_tail?.[list] ?? 0, entries.length);
    const tied = entries.length > 1 && told === entries.length;
    const tailCount = tied ? 0 : told;
    const tailFrom = entries.length - tailCount;
    // each sample run live with this unit's map marked at its op (where a model is attached)
    // (a model still being checked counts: Live waits for the check and says its outcome)
    const liveOp = !ctx.api.isStatic && (summary?.holds.live || summary?.holds.model_check === "checking") && images.ok ? (doc.layer.op_label ?? doc.layer.op ?? null) : null;
    const liveHref = liveOp ? (e: TopEntry) => ctx.href("live") + "?" + new URLSearchParams({ image: `sample-${e.sample_id}`, op: liveOp, unit: String(unit) }) : null;
    const figures = entries.map((e) => figure(ctx, layer, unit, list, list === "relevance" ? "input" : kind(), e, tab === "max" && !crop && positions > 1, images.ok, shown, noImageWhy, tagOf(list, e), captionOf(list, e), liveHref?.(e) ?? null));
    // a static export's missing images: each tile says so in a word, the page says why once
    // (a sentence per tile does not fit in it)
    const whys = [...new Set(figures.flatMap((f) => [...f.querySelectorAll<HTMLElement>(".no-img[data-why]")].map((x) => x.dataset.why ?? "")))];
    const missing = whys.length ? notice(whys.map((w) => w.charAt(0).toUpperCase() + w.slice(1).replace(/\.+$/, "") + ".").join(" ")) : null;
    if (missing) missing.id = "entries-missing";
    figures.slice(tailFrom).forEach((f) => f.classList.add("tied"));
    const tail = entries.length - tailFrom;
    fill(
      gallery,
      tied ? h("div", { class: "notice constant-list", id: "tied-list" }, `All ${entries.length} samples of this list have the value ${fmt(entries[0].value)}: they are ties, in sample-id order, and more samples may share that value, so the list does not single them out.`) : null,
      tail ? h("div", { class: "notice constant-list", id: "tied-tail" }, `The last ${tail} samples of this list (dimmed) have the value ${fmt(last)}: they are ties, in sample-id order, and more samples may share that value${list === "relevance" && last === 0 ? " (the unit carried none of the decision on them)" : ""}; only the first ${tailFrom} ${tailFrom === 1 ? "stands" : "stand"} out.`) : null,
      missing,
      entries.length ? figures : notice("This list is empty."),
    );
  };
  draw();

  const classes = Object.entries(doc.class_means)
    .filter((kv): kv is [string, number] => kv[1] !== null && Number.isFinite(kv[1]))
    .sort((a, b) => b[1] - a[1])
    .slice(0, 10)
    // keyed by class name (a repeated name made unique with its index): named as every
    // page names a class, its index beside a name that is another number
    .map(([label, value]) => ({ label: classLabel(label, summary?.dataset.classes.indexOf(label) ?? -1), value }));
  const opLabel = doc.layer.op_label ?? doc.layer.op;

  // a first convolution's kernel, enlarged beside the top samples (where the server has the
  // model and the layer reads the input image; else the slot is empty and takes no room)
  const filterSlot = h("div", { class: "filter-slot" });
  void layerFilters(ctx, layer).then((f) => {
    const fig = f ? unitFilter(ctx, layer, unit, f) : null;
    if (fig) fill(filterSlot, fig);
  });
  append(root, 
    h(
      "div",
      { class: "unit-head" },
      h("h1", null, `${layer} · unit ${unit}`, h("span", { class: "sub" }, ` of ${doc.num_units}`)),
      doc.output_class ? h("p", { class: "output-class", id: "output-class" }, classMeaning(unit, doc.output_class)) : null,
      h(
        "div",
        { class: "unit-nav" },
        h("a", { class: "button", href: doc.prev === null ? null : ctx.href("unit", layer, doc.prev) + "?" + params, "aria-disabled": String(doc.prev === null), rel: "prev", title: "previous unit (←)" }, "← prev"),
        h("a", { class: "button", href: doc.next === null ? null : ctx.href("unit", layer, doc.next) + "?" + params, "aria-disabled": String(doc.next === null), rel: "next", title: "next unit (→)" }, "next →"),
        opLabel ? h("a", { class: "button", href: ctx.href("graph") + "?focus=" + encodeURIComponent(opLabel) }, "place in graph") : null,
      ),
    ),
    h("p", { class: "stats" }, `max ${fmt(doc.max)} · mean ${fmt(doc.mean)} · layer `, h("a", { href: ctx.href("layer", layer) }, layer), doc.layer.kind ? ` (${doc.layer.kind})` : ""),
    constant ? h("div", { class: "notice constant", id: "constant-unit" }, constantText(doc, places, relevance && !relevanceTies ? "relevance" : null)) : null,
    tabs,
    toggles,
    images.notice,
    h("div", { class: "topk-row" }, filterSlot, gallery),
    h(
      "div",
      { class: "cards two" },
      h(
        "section",
        { class: "card" },
        h("h3", null, "Classes that excite it most"),
        constant
          ? notice(`Every class's mean is ${fmt(doc.max)}: a constant unit tells no class from another.`)
          : classes.length
            ? fitted((width) => barChart(classes, { width, xLabel: "mean activation over the class's samples" }), 520)
            : notice(
                summary?.dataset.labels_ignored
                  ? `No class means: ${summary.dataset.labels_ignored}, so the probe kept the run unlabelled.`
                  : "No class means (unlabelled data).",
              ),
      ),
      h(
        "section",
        { class: "card" },
        h("h3", null, "Activation distribution"),
        fitted((width) => histogramChart(doc.histogram, { width, height: 220, mark: doc.mean, xLabel: sampleValueLabel(places), yLabel: "samples" }), 520),
        h("p", { class: "muted small", id: "unit-hist-note" }, `one value per sample: ${positions > 1 ? (over ? `the unit averaged over ${over}` : places.kind === "spatial" ? "the unit's map averaged over its positions" : `the unit averaged over its ${places.many}`) : "the unit's activation"}; the line marks the mean over the dataset`),
        constant ? h("p", { class: "muted small", id: "constant-bin" }, oneBinText(doc)) : withId(h("p", { class: "muted small" }, binsText(doc)), "unit-hist-bins"),
      ),
    ),
  );
}

function figure(ctx: PageContext, layer: string, unit: number, list: List, kind: EntryKind, e: TopEntry, markPeak: boolean, images: boolean, shown: Shown | null, noImageWhy: string | null, tokenTag: HTMLElement | null = null, caption: HTMLElement | null = null, live: string | null = null): HTMLElement {
  const visual = images ? entryImage(ctx, layer, unit, list, kind, e, shown, noImageWhy) : noImage();
  const isCrop = kind === "crop" || kind === "grad_crop";
  const frame = h("div", { class: isCrop ? "frame crop" : "frame" }, visual, tokenTag);
  if (markPeak && e.box && visual instanceof HTMLImageElement) {
    // the box is in pixels of the image the model saw, which is the image shown
    const mark = h("div", { class: "peak", title: `peak at (${e.y}, ${e.x})`, hidden: true });
    const place = () => {
      if (!visual.naturalWidth) return;
      mark.setAttribute("style", peakBox(e.box!, visual.naturalHeight, visual.naturalWidth));
      mark.hidden = false;
    };
    visual.addEventListener("load", place);
    if (visual.complete) place();
    frame.append(mark);
  }
  return h(
    "figure",
    { class: "top-entry", "data-sample": e.sample_id, "data-rank": e.rank, "data-value": e.value === null ? null : String(e.value) },
    frame,
    h(
      "figcaption",
      null,
      h("span", { class: "value" }, fmt(e.value)),
      h("a", { class: "sample-link", href: sampleHref(ctx, e.sample_id, layer, unit) }, `#${e.sample_id}`),
      live ? h("a", { class: "live-link", href: live, title: `run the model on sample ${e.sample_id} in the live view, this unit's map marked` }, "live") : null,
      e.class_name ? classSpan(e.class_name, e.label) : null,
      caption,
    ),
  );
}

/** A top-list entry of a run of token ids: its value, sample and class, and its sequence
 * with the token at `peak` marked (null: nothing to mark); the ids where the server has
 * the dataset, else a word that they are not at hand (the page says why once). */
function tokenEntry(ctx: PageContext, e: TopEntry, peak: number | null): HTMLElement {
  return h(
    "div",
    { class: "token-entry top-entry", "data-sample": e.sample_id, "data-rank": e.rank, "data-value": e.value === null ? null : String(e.value), "data-peak": peak === null ? null : String(peak) },
    h("span", { class: "value" }, fmt(e.value)),
    h("a", { href: ctx.href("sample", e.sample_id) }, `#${e.sample_id}`),
    e.class_name ? classSpan(e.class_name, e.label) : h("span"),
    e.tokens ? tokenSequence(e.tokens, peak, 0, e.tokens.length, e.token_text ?? null) : h("span", { class: "muted small" }, peak === null ? "token ids not at hand" : `peak at token ${peak}; token ids not at hand`),
  );
}

/** The pixel width of a signal entry's plot (its document asks for as many columns). */
const ENTRY_WIDTH = 280;

/** A top-list entry of a run of signals: the sample drawn as lines (from its signal
 * document, fetched once per sample however many entries rank it; `drawable` false where
 * the run's dataset is not at hand), the samples its peak sees shaded (`spanned`), its
 * value, sample and class, and the span in words. */
function signalEntry(ctx: PageContext, e: TopEntry, spanned: boolean, drawable: boolean, rate: number | null): HTMLElement {
  const span = spanned ? (e.span ?? null) : null;
  const plot = h("span", { class: "no-img muted small signal-pending" }, drawable ? "loading…" : "signal not at hand");
  if (drawable) {
    ctx.api.signalDoc(ctx.run, e.sample_id, ENTRY_WIDTH).then(
      (doc) => {
        if (ctx.signal.aborted) return;
        plot.replaceWith(signalDocPlot(doc, { width: ENTRY_WIDTH, height: Math.min(150, 24 + 22 * doc.channels), span, rate, label: `sample ${e.sample_id}${span ? `, samples ${span[0]}–${span[1] - 1} shaded` : ""}` }));
      },
      (err: Error) => {
        plot.textContent = `signal not at hand: ${err.message}`;
      },
    );
  }
  return h(
    "figure",
    { class: "signal-entry top-entry", "data-sample": e.sample_id, "data-rank": e.rank, "data-value": e.value === null ? null : String(e.value), "data-span": span ? span.join(" ") : null },
    h(
      "a",
      { href: ctx.href("sample", e.sample_id) },
      plot,
    ),
    h(
      "figcaption",
      null,
      h("span", { class: "value" }, fmt(e.value)),
      " ",
      h("a", { href: ctx.href("sample", e.sample_id) }, `#${e.sample_id}`),
      " ",
      e.class_name ? classSpan(e.class_name, e.label) : null,
      span ? h("div", { class: "muted small span-text" }, `sees samples ${span[0]}–${span[1] - 1} (${span[1] - span[0]})${rate ? ` · ${secondsText(span[0], span[1] - 1, rate)}` : ""}`) : null,
    ),
  );
}

/** A top-list entry of a run of feature vectors (no picture): its value, sample and class,
 * and the sample's feature values: a strip of all of them (one colour ``scale`` for the
 * list), its five largest by |value| named, and every value in order on request. */
function vectorEntry(ctx: PageContext, e: TopEntry, names: string[] | null | undefined, scale: number): HTMLElement {
  const values = e.features ?? null;
  return h(
    "div",
    { class: "token-entry vector-entry top-entry", "data-sample": e.sample_id, "data-rank": e.rank, "data-value": e.value === null ? null : String(e.value) },
    h("span", { class: "value" }, fmt(e.value)),
    h("a", { href: ctx.href("sample", e.sample_id) }, `#${e.sample_id}`),
    e.class_name ? classSpan(e.class_name, e.label) : h("span"),
    values
      ? h(
          "div",
          { class: "entry-features" },
          featureStrip(values, names, scale),
          featureRows(values, names, scale, topFeatures(values, 5)),
          values.length > 5 ? h("details", null, h("summary", null, `all ${values.length} values`), featureRows(values, names, scale, values.map((_, i) => i))) : null,
        )
      : h("span", { class: "muted small" }, "feature values not at hand"),
  );
}

/** Under a video model's mean-list entry whose peak the run does not record (probed before
 * the mean lists kept them): the frame the model found it on, or that it is not known and
 * which frame the image is instead (the clip's middle one), never a frame made up. */
function unrecordedCaption(found: number | null, none: boolean, crop: boolean, clipFrames: number | null): HTMLElement {
  const of = clipFrames ? ` of ${clipFrames}` : "";
  const why = "this run does not record on which frame the unit peaked on this sample (it was probed before the mean lists kept their peaks)";
  if (found !== null) return h("span", { class: "frames", title: `${why}; the model found the peak on frame ${found} (numbered from 0), the frame the image is cut from` }, `frame ${found}${of} · found with the model`);
  if (!none) return h("span", { class: "frames", title: `${why}; finding it with the model` }, "peak's frame not recorded");
  const middle = clipFrames ? Math.floor(clipFrames / 2) : null;
  const shown = !crop && middle !== null ? ` · image: middle frame ${middle}${of}` : "";
  return h("span", { class: "frames", title: `${why}, and finding it needs the model${shown ? `: the image is the clip's middle frame, ${middle}, not the peak's` : ""}. Serve the run with --model, or probe it again` }, `peak's frame not recorded${shown}`);
}

/** An entry's class; one that carries its index ("class 10 (index 1)") gets a line of its
 * own, whole: cut to "class 1…" it would name another class. */
function classSpan(name: string, label: number | null): HTMLElement {
  const word = classWord(name, label);
  const indexed = word.endsWith(")") && word !== `class ${name}` && word !== name;
  return h("span", { class: indexed ? "cls indexed" : "cls", title: classText(name, label) }, word);
}

/** Under a video model's entry: the frame its image is (numbered from 0) and the frames of
 * the clip its peak sees ("frame 2 · sees frames 1–3 of 8"). */
function clipCaption(e: TopEntry, clipFrames: number | null): HTMLElement | null {
  if (e.frame == null) return null;
  const of = clipFrames ? ` of ${clipFrames}` : "";
  const seen = e.frames ? ` · sees frames ${e.frames[0]}–${e.frames[1] - 1}${of}` : of;
  const title = e.frames
    ? `the image is frame ${e.frame} of the clip (numbered from 0); the peak sees frames ${e.frames[0]} to ${e.frames[1] - 1}${of}, and the same box on each`
    : `the image is frame ${e.frame} of the clip (numbered from 0), where the unit peaked`;
  return h("span", { class: "frames", title }, `frame ${e.frame}${seen}`);
}

/** What a unit of the model's output layer is: "unit 4 — the score of class '4'" (the
 * logit of that class; a softmax after it gives its probability). */
export function classMeaning(unit: number, c: { class: number; name: string; value: string }): string {
  const what = c.value === "score" ? "score (logit)" : c.value;
  return `unit ${unit} — the ${what} of ${outputClass(c.name, c.class)}: this layer is the model's output, one unit per class`;
}

const NOT_EXPORTED: Record<EntryKind, string> = {
  // an export from before it said why (`no_image`): its one reason then
  input: "the sample's image is not in this export (the run's dataset could not be loaded)",
  crop: "no crop in this export: this run's mean list stores no peaks, so its crops need the model (run `lurker images RUN --kinds crop,grad_crop` before exporting, or probe again)",
  grad: "no gradient in this export: run `lurker images RUN` before exporting",
  // a stored peak's gradient crop is cut from the gradient image: without it, none
  grad_crop: "no gradient crop in this export: run `lurker images RUN` before exporting (a run whose mean list stores no peaks: `--kinds grad,grad_crop`)",
};

/**
 * One entry's image. Served: the API's PNG. Static export: the sample's image (held once
 * per sample), the receptive-field crop of an entry with a stored peak cut from it in the
 * browser (the server's crop, pixel for pixel), and its gradient crop from its gradient
 * image likewise, other kinds as exported files, and a note where the export holds none
 * (never a request for a file it lacks).
 */
function entryImage(ctx: PageContext, layer: string, unit: number, list: List, kind: EntryKind, e: TopEntry, shown: Shown | null, noImageWhy: string | null): HTMLElement {
  const alt = `rank ${e.rank + 1}: sample ${e.sample_id} (${kind})`;
  if (!ctx.api.isStatic) {
    // a relevance entry is a whole sample (no peak, no gradient image of its own)
    const src = ctx.api.pngUrl(list === "relevance" ? p("runs", ctx.run, "samples", e.sample_id, "image.png") : p("runs", ctx.run, "layers", layer, "units", unit, list, e.rank, `${kind}.png`));
    return h("img", { src, alt, "data-kind": kind, onerror: (ev: Event) => (ev.target as HTMLElement).replaceWith(noImage()) });
  }
  if (!shown?.[kind]?.[list]?.includes(e.rank)) {
    // the input, and a max list's crop (cut from it), are missing with the sample's image:
    // the export says why (the dataset did not load, or it was made with --no-images)
    const sampleImage = kind === "input" || (kind === "crop" && list === "max");
    if (kind === "crop" && list === "max" && e.y === null) return h("div", { class: "no-img", "data-kind": kind, title: "this entry has no peak position" }, "no peak to crop");
    const why =
      sampleImage && !shown?.input?.[list]?.includes(e.rank)
        ? noImageWhy
          ? `the sample's image is not in this export: ${noImageWhy}`
          : NOT_EXPORTED.input
        : NOT_EXPORTED[kind];
    return h("div", { class: "no-img", "data-kind": kind, "data-why": why }, "not in this export");
  }
  // a clip's entry: the frame of its peak (its crop is cut from it, its box drawn on it)
  const sample = ctx.api.pngUrl(list !== "relevance" && e.frame != null ? p("runs", ctx.run, "samples", e.sample_id, "frames", `${e.frame}.png`) : p("runs", ctx.run, "samples", e.sample_id, "image.png"));
  if (kind === "input") return h("img", { src: sample, alt, "data-kind": kind });
  if ((kind === "crop" || kind === "grad_crop") && list !== "relevance" && e.y !== null) {
    // cut by the peak's box, from the sample's image or from the entry's gradient image
    const grad = ctx.api.pngUrl(p("runs", ctx.run, "layers", layer, "units", unit, list, e.rank, "grad.png"));
    const canvas = cropCanvas(kind === "crop" ? sample : grad, e.box ?? null, alt);
    canvas.dataset.kind = kind;
    return canvas;
  }
  return h("img", { src: ctx.api.pngUrl(p("runs", ctx.run, "layers", layer, "units", unit, list, e.rank, `${kind}.png`)), alt, "data-kind": kind });
}

/** CSS box (in % of an H x W image) of a half-open pixel box `[y0, y1, x0, x1]`. */
function peakBox([y0, y1, x0, x1]: number[], H: number, W: number): string {
  const pct = (v: number, n: number) => `${((100 * v) / n).toFixed(2)}%`;
  return `top:${pct(y0, H)};height:${pct(y1 - y0, H)};left:${pct(x0, W)};width:${pct(x1 - x0, W)}`;
}

/**
 * What the page says of a constant unit: its value, where, and that its top lists are ties
 * (every sample has the same value, so a list is the first k samples by id).
 */
function constantText(doc: UnitDoc, places: Places, kept: "relevance" | null): string {
  const where = places.kind !== "vector" ? `on every sample at every ${places.one}` : "on every sample";
  const relu = doc.max === 0 && /relu/i.test(doc.layer.kind ?? "") ? " (a ReLU that never fires)" : "";
  // the stored mean is rounded (float32 sums): equal to the max within that rounding
  const rounded = doc.mean !== doc.max ? ` (to float32 rounding: its dataset mean is ${doc.mean})` : "";
  const lists = kept ? "Its max and mean lists are ties" : "Its top lists are ties";
  const relevance = kept ? " Its relevance list is not: the samples where that constant counted most for the prediction." : "";
  return `This unit is constant on the dataset: ${fmt(doc.max)} ${where}${relu}${rounded}. ${lists}, so they say nothing about what it responds to.${relevance}`;
}

/** Under a constant unit's histogram: its one bar is the bin that holds the value, not a
 * spread (the bins are the layer's, shared by all its units). */
function oneBinText(doc: UnitDoc): string {
  const { edges, counts } = doc.histogram;
  const i = counts.findIndex((c) => (c ?? 0) > 0);
  const n = counts.reduce((a: number, c) => a + (c ?? 0), 0);
  if (i < 0) return "";
  return `every sample's value is ${fmt(doc.max)}: all ${fmt(n)} are in one bin, [${fmt(edges[i])}, ${fmt(edges[i + 1])}) of the layer's shared bins; the bar's width is that bin's, not a spread`;
}

/** Under a unit's histogram: its bars are the layer's shared bins (exact across batches,
 * docs/probe.md), so a unit of a narrow range fills a few of them; the x axis spans those
 * alone, and says so, rather than the layer's whole range. Empty where it fills them all. */
function binsText(doc: UnitDoc): string {
  const edges = doc.histogram.edges.map((e) => e ?? 0); // (as the chart reads them)
  const counts = doc.histogram.counts;
  const held = dataBins(counts.map((c) => c ?? 0));
  if (held === null || edges.length < 2) return "";
  const spans = held[1] - held[0] + 1;
  if (spans >= counts.length) return "";
  const width = edges[1] - edges[0];
  return `x axis: the ${fmt(spans)} of the layer's ${fmt(counts.length)} bins from its lowest to its highest value, [${fmt(edges[held[0]])}, ${fmt(edges[held[1] + 1])}); the bins (each ${fmt(width)} wide) are shared by the layer's units, so a unit of a narrow range has few bars`;
}

/** In place of a constant unit's list: why it shows no images. */
function tiesText(list: List, max: number | null, relevance: number | null, k: number): string {
  const what = list === "max" ? `peak is ${fmt(max)}` : list === "mean" ? `mean is ${fmt(max)}` : `relevance is ${fmt(relevance)}`;
  return `Every sample's ${what}: this list is ${k} tied samples, ranked by sample id alone, so it shows no images.`;
}

/** A layer of a video model (frames, rows, columns): its entries are shown on the frame of
 * their peak (without a receptive field, an older run's, whole). */
function frameLayer(layer: { rf?: Record<string, unknown> | null; layout?: Record<string, unknown> | null }): boolean {
  const positions = layer.layout?.["positions"];
  return Array.isArray(positions) && positions.length === 3;
}

/** A layer of tokens: positions map to patches (layout boxes), not to a receptive field. */
function tokenLayer(layer: { rf?: Record<string, unknown> | null; layout?: Record<string, unknown> | null }): boolean {
  return !layer.rf && Array.isArray(layer.layout?.["boxes"]);
}

/** A layer of tokens some of which stand for no patch (a class token). */
function hasPatchless(layer: { rf?: Record<string, unknown> | null; layout?: Record<string, unknown> | null }): boolean {
  const boxes = layer.layout?.["boxes"];
  return tokenLayer(layer) && Array.isArray(boxes) && boxes.includes(null);
}

/** The bounds a signal's values were optimized within: each channel's dataset range
 * (settings `bounds`), or ±amplitude (`amplitude=`, or a run that recorded no ranges). */
function signalBounds(st: Record<string, unknown>): string {
  if (Array.isArray(st["bounds"])) return "within each channel's dataset range";
  const note = typeof st["amplitude_note"] === "string" ? st["amplitude_note"] : null;
  return `within ±${st["amplitude"]}${note ? ` (${note.replace(/^±\S+: /, "")})` : ""}`;
}

/** What the feature visualization tab says about how its images were made. */
function featvizCaption(f: FeatVizView, places: Places): string {
  const st = f.settings;
  const made = [st["steps"] ? `${st["steps"]} steps` : null, st["size"] ? (st["input"] === "signal" ? `${([] as unknown[]).concat(st["size"]).slice(-1)} samples ${signalBounds(st)}` : `${([] as unknown[]).concat(st["size"]).join("\u00d7")} px`) : null, st["param"] ? `${st["param"]} parametrization` : null]
    .filter(Boolean)
    .join(", ");
  // several images per unit are pushed apart by a diversity term, which can cost activation
  const n = Number(st["images_per_unit"] ?? 1);
  const apart = n > 1 && Number(st["diversity"] ?? 0) > 0 ? `; ${n} images pushed apart by a diversity term of weight ${st["diversity"]}, which trades activation for variety` : "";
  const meaning = f.meaning ?? (f.objective === "channel" ? (places.kind === "vector" ? "the unit's value" : `the unit's mean over its ${places.kind === "spatial" ? "map" : places.many}`) : f.objective);
  const beside = f.best_sample !== null ? ", beside the best dataset sample's" : "";
  const what = st["input"] === "signal" ? "signals" : "images";
  return `${what} optimized to excite the unit (${f.objective} objective: ${meaning}${made ? `; ${made}` : ""}${apart}); value: what each reached${beside}`;
}

/** How many times the best dataset sample's value an optimized input must reach for the
 * page to say why it looks like no sample (saturated noise rather than a digit). */
const FAR_ABOVE_DATA = 2;

/** Where an optimized input reached far more than any dataset sample (at least
 * FAR_ABOVE_DATA times the best one's positive value), a sentence saying that this is
 * expected: the optimizer is free to leave the data, so its images can look like noise. */
function featvizBeyondData(f: FeatVizView): HTMLElement | null {
  const best = f.best_dataset;
  const reached = f.activations.filter((a): a is number => a !== null && Number.isFinite(a));
  if (best === null || !(best > 0) || !reached.length) return null;
  const top = Math.max(...reached);
  if (top < FAR_ABOVE_DATA * best) return null;
  const what = f.settings["input"] === "signal" ? "signal" : "image";
  return withId(
    notice(
      `The optimized ${what} reaches ${fmt(top)}, ${fmt(top / best, 2)}× the best dataset sample's ${fmt(best)}. That is expected: the optimizer is free to make inputs no dataset ${what} is like (often saturated, noise-like patterns), so it shows what drives the unit hardest, not what it responds to in the data; for that, see the max and average activation tabs.`,
    ),
    "featviz-beyond",
  );
}

/** On a run of signals: each optimized signal drawn as lines (a lane per channel, named),
 * the samples its unit's peak sees shaded, with the value it reached; then the best
 * dataset sample's signal, as the top lists draw it. */
function featvizSignals(ctx: PageContext, unit: number, f: FeatVizView, names: string[] | null, rate: number | null, drawable: boolean): HTMLElement[] {
  const width = ENTRY_WIDTH;
  // the neuron objective's span is what its one position sees, not where a signal peaks
  const t = f.objective === "neuron" ? (f.settings?.position as number[] | undefined)?.[0] : undefined;
  const who = t === undefined ? "peak" : `step ${t}`;
  const out = (f.signals ?? []).map((values, copy) => {
    const span = f.spans?.[copy] ?? null;
    const a = f.activations[copy] ?? null;
    return h(
      "figure",
      { class: "signal-entry top-entry featviz", "data-objective": f.objective, "data-copy": copy, "data-value": a === null ? null : String(a), "data-span": span ? span.join(" ") : null },
      signalPlot(values, { width, height: Math.min(220, 44 + 22 * values.length), axis: true, span, names, rate, label: `optimized signal ${copy + 1} of unit ${unit}${span ? `, samples ${span[0]}–${span[1] - 1} shaded (its ${who})` : ""}` }),
      h("figcaption", null, h("span", { class: "value" }, fmt(a)), h("span", { class: "cls" }, f.activations.length > 1 ? `signal ${copy + 1}` : "optimized")),
      span ? h("div", { class: "muted small span-text" }, `${who} sees samples ${span[0]}–${span[1] - 1} (${span[1] - span[0]})${rate ? ` · ${secondsText(span[0], span[1] - 1, rate)}` : ""}`) : null,
    );
  });
  if (f.best_sample !== null) {
    const plot = h("span", { class: "no-img muted small signal-pending" }, drawable ? "loading…" : "signal not at hand");
    if (drawable) {
      ctx.api.signalDoc(ctx.run, f.best_sample, width).then(
        (doc) => {
          if (!ctx.signal.aborted) plot.replaceWith(signalDocPlot(doc, { width, height: Math.min(150, 24 + 22 * doc.channels), rate, label: `best dataset sample ${f.best_sample}` }));
        },
        (err: Error) => {
          plot.textContent = `signal not at hand: ${err.message}`;
        },
      );
    }
    out.push(
      h(
        "figure",
        { class: "signal-entry top-entry best", "data-sample": f.best_sample, "data-value": f.best_dataset === null ? null : String(f.best_dataset) },
        plot,
        h("figcaption", null, h("span", { class: "value" }, fmt(f.best_dataset)), h("a", { href: ctx.href("sample", f.best_sample) }, `#${f.best_sample}`), h("span", { class: "cls", title: "the best dataset sample (rank 1 of the mean list)" }, "best sample")),
      ),
    );
  }
  return out;
}

/** The optimized images with the value each reached, then the best dataset sample. */
function featvizFigures(ctx: PageContext, layer: string, unit: number, f: FeatVizView, images: boolean, notHeld: string | null): HTMLElement[] {
  const out = f.activations.map((a, copy) =>
    h(
      "figure",
      { class: "top-entry featviz", "data-objective": f.objective, "data-copy": copy, "data-value": a === null ? null : String(a) },
      h("div", { class: "frame" }, h("img", { src: ctx.api.pngUrl(p("runs", ctx.run, "layers", layer, "units", unit, "featviz", f.objective, `${copy}.png`)), alt: `feature visualization ${copy + 1} of unit ${unit} (${f.objective} objective)` })),
      h("figcaption", null, h("span", { class: "value" }, fmt(a)), h("span", { class: "cls" }, f.activations.length > 1 ? `image ${copy + 1}` : "optimized")),
    ),
  );
  if (f.best_sample !== null) {
    const src = ctx.api.pngUrl(p("runs", ctx.run, "samples", f.best_sample, "image.png"));
    out.push(
      h(
        "figure",
        { class: "top-entry best", "data-sample": f.best_sample, "data-value": f.best_dataset === null ? null : String(f.best_dataset) },
        h(
          "div",
          { class: "frame" },
          notHeld !== null ? h("div", { class: "no-img", title: notHeld }, "not in this export") : images ? h("img", { src, alt: `best dataset sample ${f.best_sample}` }) : noImage(),
        ),
        h("figcaption", null, h("span", { class: "value" }, fmt(f.best_dataset)), h("a", { class: "sample-link", href: sampleHref(ctx, f.best_sample, layer, unit) }, `#${f.best_sample}`), h("span", { class: "cls", title: "the best dataset sample (rank 1 of the mean list)" }, "best sample")),
      ),
    );
  }
  return out;
}

/** A sample's page reached from this unit: it says so in its query (`layer`, `unit`), so
 * its "Open in live view" opens Live at the unit's op with the unit's map marked. */
function sampleHref(ctx: PageContext, sample: number, layer: string, unit: number): string {
  return ctx.href("sample", sample) + "?" + new URLSearchParams({ layer, unit: String(unit) });
}
