/**
 * Explain on a run of signals (a Conv1d stack's EEG or audio, each sample channels by
 * time): each method's card draws the sample's lines with the attribution as a colour
 * band along time under each channel, or one band under all of them where the method
 * gives each position one value (Grad-CAM's map along time, occlusion's windows across
 * every channel). Below them, concept relevance: the chosen layer's most relevant units,
 * each with its conditional heatmap (the relevance that flowed through that unit alone)
 * as bands under the same lines.
 */
import { p, type RunSummary, type SampleDoc } from "../api";
import type { PageContext } from "../context";
import { fill, fmt, h, notice } from "../dom";
import { fetchedSignal, signalDocPlot } from "../signal";
import { renderFlatExplain } from "./explain_flat";
import { conceptFrame, conceptLayerSelect, conceptLead, conceptNeedsModel, conceptPrecomputedNote, conceptUnavailable, conceptUnitTitle, type ConceptRanking } from "../concepts";

export function renderSignalExplain(root: HTMLElement, ctx: PageContext, summary: RunSummary, loading: HTMLElement): Promise<void> {
  const [c, t] = summary.dataset.signal ?? [0, 0];
  // the run's channel names label the lanes and its rate puts the time axis in seconds
  const names = summary.dataset.channel_names ?? null;
  const rate = summary.dataset.sample_rate ?? null;
  const missing = (why: string | null | undefined) => notice(`The sample's values are not at hand: ${(why ?? "the run's dataset cannot be loaded").replace(/\.+$/, "")}.`, "error");
  return renderFlatExplain(root, ctx, summary, loading, {
    noun: "signal",
    what: `signals of ${c} channel${c === 1 ? "" : "s"} x ${t} samples`,
    css: "signal-explain",
    legendId: "signal-explain-legend",
    legend: "Each method's score along time, a colour band under each channel (one scale per method: its largest |score| is the strongest colour); one band under all channels where the method gives each position one value (Grad-CAM, occlusion across all channels). Signed methods: red raises the target's score, blue lowers it; saliency is the gradient's size, which has no sign.",
    // the sample's values: its signal document, one request for all the method cards
    sample: (doc) => (doc.signal_error ? missing(doc.signal_error) : fetchedSignal(ctx.api, ctx.run, doc.sample.id, undefined, (sig) => signalDocPlot(sig, { width: 640, height: 40 * c + 22, axis: true, names, rate, label: `sample signal, ${c} channel${c === 1 ? "" : "s"} x ${t} samples` }), missing)),
    draw: (_scores, doc, r) => {
      if (doc.signal_error) return missing(doc.signal_error);
      // the bands are named by channel, as the lanes: each band's tooltip its channel
      return fetchedSignal(ctx.api, ctx.run, doc.sample.id, undefined, (sig) => signalDocPlot(sig, { width: 560, height: 48 * c + 22 + (r.signal_scores?.length === 1 ? 14 : 0), axis: true, names, rate, bands: r.signal_scores ?? [], signed: r.signed, label: `${r.method} along time` }), missing);
    },
    // a model LRP has no rule for (an LSTM): why, in place of the section, no request
    extra: (image, target, doc, reason) => (reason ? conceptUnavailable(reason) : conceptSection(ctx, summary, image, target, doc, missing)),
    // no model: the concept relevance precomputed at the default layer for the top class
    // (the layer chooser disabled, as on an image's page), or the command that makes it
    held: (held, doc) => {
      if (!held.concepts) return conceptNeedsModel(ctx, summary);
      const section = conceptSection(ctx, summary, held.image, "top", doc, missing, true);
      section.append(conceptPrecomputedNote(ctx, summary, held.concepts));
      return section;
    },
  });
}

/** Concept relevance on a signal: the layer's 8 most relevant units (LRP), each card the
 * sample's lines with the unit's conditional heatmap as a band under each channel. */
function conceptSection(ctx: PageContext, summary: RunSummary, image: string, target: string, doc: SampleDoc, missing: (why: string | null | undefined) => HTMLElement, precomputed = false): HTMLElement {
  const [c] = summary.dataset.signal ?? [0, 0];
  // the lanes named and the axis in seconds as on the method cards above
  const names = summary.dataset.channel_names ?? null;
  const rate = summary.dataset.sample_rate ?? null;
  const params = new URLSearchParams(ctx.params);
  // precomputed: the default layer's ranking only (the path a static export holds)
  const layer = precomputed ? null : params.get("clayer");
  const select = conceptLayerSelect(summary, layer, (chosen) => {
    const q = new URLSearchParams(params);
    if (chosen) q.set("clayer", chosen);
    else q.delete("clayer");
    ctx.navigate(ctx.href("explain") + "?" + q);
  });
  select.disabled = precomputed;
  const status = h("p", { class: "muted small" }, "Ranking the units…");
  const list = h("div", { class: "signal-explain concepts", "aria-label": "units by relevance" });
  const q = new URLSearchParams({ target, top: "8" });
  if (layer) q.set("layer", layer);
  void (async () => {
    let r: ConceptRanking;
    try {
      r = await ctx.api.json<ConceptRanking>(`${p("runs", ctx.run, "live", image, "explain", "concepts")}.json?${q}`);
    } catch (err) {
      fill(status, h("span", { class: "error-text" }, (err as Error).message));
      return;
    }
    if (ctx.signal.aborted) return;
    if (!layer) select.value = summary.layers.some((l) => l.name === r.layer) ? r.layer : "";
    fill(status, ...conceptLead(r, r.target.includes(":") ? `unit ${r.target}` : `class ${r.target}`, "Each unit's bands are the relevance that flowed through that unit alone, per channel along time (one scale per unit; red supports the target, blue opposes it)."));
    for (const u of r.units) {
      const plot = doc.signal_error ? missing(doc.signal_error) : fetchedSignal(ctx.api, ctx.run, doc.sample.id, undefined, (sig) => signalDocPlot(sig, { width: 560, height: 48 * c + 22, axis: true, names, rate, bands: u.signal_scores ?? [], signed: true, label: `unit ${u.unit}'s conditional relevance along time` }), missing);
      list.append(
        h(
          "section",
          { class: "card signal-concept-card concept", "data-unit": u.unit },
          conceptUnitTitle(ctx, r, u),
          plot,
          h("p", { class: "small muted" }, `relevance ${fmt(u.relevance)} · map sum ${fmt(u.heatmap_sum)}`),
        ),
      );
    }
  })();
  return conceptFrame(select, status, list);
}
