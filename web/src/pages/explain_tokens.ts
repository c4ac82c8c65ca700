/**
 * Explain on a run of token ids (a text model): each method's scores (attributions at the
 * embedding that looks the ids up, one per token; docs/explain.md "Token ids: text
 * models") as the sample's tokens, each coloured by its score.
 */
import type { RunSummary } from "../api";
import type { PageContext } from "../context";
import { fmt, h, notice } from "../dom";
import { featureColor, tokenSequence } from "../images";
import { renderFlatExplain } from "./explain_flat";

export function renderTokenExplain(root: HTMLElement, ctx: PageContext, summary: RunSummary, loading: HTMLElement): Promise<void> {
  return renderFlatExplain(root, ctx, summary, loading, {
    noun: "token",
    what: `sequences of ${summary.dataset.tokens} token ids`,
    css: "token-explain",
    legendId: "token-explain-legend",
    legend:
      "Each token coloured by its score for the target, attributed at the embedding that looks the ids up (one score per token: the attribution summed over the embedding's dimension; saliency and SmoothGrad: the length of the gradient, which has no sign). Signed methods: red tokens raise the target's score, blue ones lower it. One colour scale per method: its largest |score| is the deepest colour. Hover a token for its id and score.",
    sample: (doc) => (doc.tokens ? null : notice(`The sample's tokens are not at hand: ${(doc.tokens_error ?? "the run's dataset cannot be loaded").replace(/\.+$/, "")}.`, "error")),
    draw: (scores, doc) => {
      const scale = scores.reduce<number>((a, v) => (v === null ? a : Math.max(a, Math.abs(v))), 0);
      const seq = doc.tokens ? tokenSequence(doc.tokens, null, 0, doc.tokens.length, doc.token_text ?? null) : h("span", { class: "muted" }, scores.map((v) => (v === null ? "n/f" : fmt(v))).join(" "));
      for (const el of Array.from(seq.querySelectorAll<HTMLElement>(".tok[data-pos]"))) {
        const v = scores[Number(el.dataset.pos)] ?? null;
        el.style.background = featureColor(v, scale);
        el.dataset.score = v === null ? "" : String(v);
        el.title = `${el.title} · score ${v === null ? "not finite" : fmt(v)}`;
      }
      return seq;
    },
  });
}
