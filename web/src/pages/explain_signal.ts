/**
 * Explain on a run of signals (a Conv1d stack's EEG or audio, each sample channels by
 * time): each method's card draws the sample's lines with the attribution as a colour
 * band along time under each channel, or one band under all of them where the method
 * gives each position one value (Grad-CAM's map along time, occlusion's windows across
 * every channel).
 */
import type { RunSummary } from "../api";
import type { PageContext } from "../context";
import { notice } from "../dom";
import { fetchedSignal, signalDocPlot } from "../signal";
import { renderFlatExplain } from "./explain_flat";

export function renderSignalExplain(root: HTMLElement, ctx: PageContext, summary: RunSummary, loading: HTMLElement): Promise<void> {
  const [c, t] = summary.dataset.signal ?? [0, 0];
  // the run's channel names label the lanes and its rate puts the time axis in seconds
  const names = summary.dataset.channel_names ?? null;
  const rate = summary.dataset.sample_rate ?? null;
  const missing = (why: string | null | undefined) => notice(`The sample's values are not at hand: ${(why ?? "the run's dataset cannot be loaded").replace(/\.+$/, "")}.`, "error");
  return renderFlatExplain(root, ctx, summary, loading, {
    noun: "signal",
    what: `signals of ${c} channels x ${t} samples`,
    css: "signal-explain",
    legendId: "signal-explain-legend",
    legend: "Each method's score along time, a colour band under each channel (one scale per method: its largest |score| is the strongest colour); one band under all channels where the method gives each position one value (Grad-CAM, occlusion across all channels). Signed methods: red raises the target's score, blue lowers it; saliency is the gradient's size, which has no sign.",
    // the sample's values: its signal document, one request for all the method cards
    sample: (doc) => (doc.signal_error ? missing(doc.signal_error) : fetchedSignal(ctx.api, ctx.run, doc.sample.id, undefined, (sig) => signalDocPlot(sig, { width: 640, height: 40 * c + 22, axis: true, names, rate, label: `sample signal, ${c} channels x ${t} samples` }), missing)),
    draw: (_scores, doc, r) => {
      if (doc.signal_error) return missing(doc.signal_error);
      // the bands are named by channel, as the lanes: each band's tooltip its channel
      return fetchedSignal(ctx.api, ctx.run, doc.sample.id, undefined, (sig) => signalDocPlot(sig, { width: 560, height: 48 * c + 22 + (r.signal_scores?.length === 1 ? 14 : 0), axis: true, names, rate, bands: r.signal_scores ?? [], signed: r.signed, label: `${r.method} along time` }), missing);
    },
  });
}
