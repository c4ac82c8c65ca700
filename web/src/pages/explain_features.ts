/**
 * Explain on a run of feature vectors (a tabular model): each method's scores (the
 * attribution has the vector's shape, one score per feature) as bars from 0, the largest
 * by |score| first and every feature in order on request.
 */
import type { RunSummary } from "../api";
import type { PageContext } from "../context";
import { h, notice } from "../dom";
import { featureRows, featureScale, featureStrip, topFeatures } from "../images";
import { renderFlatExplain } from "./explain_flat";

/** How many features a card lists by |score| before the whole vector on request. */
const SHOWN = 10;

export function renderFeatureExplain(root: HTMLElement, ctx: PageContext, summary: RunSummary, loading: HTMLElement): Promise<void> {
  const names = summary.dataset.feature_names ?? null;
  return renderFlatExplain(root, ctx, summary, loading, {
    noun: "feature",
    what: `vectors of ${summary.dataset.features} features`,
    css: "feature-explain",
    legendId: "feature-explain-legend",
    legend: `Each feature's score for the target, a bar from 0 (one scale per method: its largest |score| is the longest bar), the ${SHOWN} largest by |score| first, all of them in order on request. Signed methods: red raises the target's score, blue lowers it; saliency is the gradient's size, which has no sign.`,
    sample: (doc) =>
      doc.features ? featureStrip(doc.features, names, featureScale([doc.features])) : notice(`The sample's values are not at hand: ${(doc.features_error ?? "the run's dataset cannot be loaded").replace(/\.+$/, "")}.`, "error"),
    draw: (scores) => {
      const scale = featureScale([scores]);
      return h(
        "div",
        null,
        featureRows(scores, names, scale, topFeatures(scores, SHOWN)),
        scores.length > SHOWN ? h("details", null, h("summary", null, `all ${scores.length} features, in order`), featureRows(scores, names, scale, scores.map((_, i) => i))) : null,
      );
    },
  });
}
