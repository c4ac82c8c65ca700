/**
 * The model's top classes as the live pages show them: a line that says what the rows
 * are (a bare "7  99.6%" under an input reads as anything), one row per class with its
 * probability as a bar, or why there is no top 5.
 */
import type { Prediction } from "./api";
import { classLabel, namesWidth } from "./classes";
import { h, pct } from "./dom";
import { visibleText } from "./images";

/** A prediction's name as the pages show it: a language model's next token as its text
 * with whitespace made visible (a space as ␣, a newline as ↵), else the class's label. */
export function predictionLabel(q: Prediction): string {
  return q.position != null && q.name != null ? visibleText(q.name) : classLabel(q.name, q.class);
}

/** What a list of predictions is: "next token after position 19 (the last)" for a
 * language model's scores at every position (`paddedFrom`: where Live padded the typed
 * input, the prediction then at the last typed token's position), else the top classes. */
export function predictionsHead(preds: Prediction[], paddedFrom: number | null = null): string {
  const at = preds[0]?.position;
  const where = paddedFrom != null && at === paddedFrom - 1 ? `the last typed position (${at}), not the padding after it` : `the last position (${at})`;
  return at != null
    ? `The model's top ${preds.length} next tokens: its prediction at ${where}, token and probability (softmax over the vocabulary)`
    : `The model's top ${preds.length}: class and probability`;
}

/** `[why none, head, list]`: the first null when there are predictions, the second when
 * there are none; `list` carries the extra class and id a page styles or tests by. */
export function topPredictions(
  preds: Prediction[],
  note: string | null | undefined,
  list: { class?: string; id?: string } = {},
  paddedFrom: number | null = null,
): [HTMLElement | null, HTMLElement | null, HTMLElement] {
  return [
    !preds.length && note ? h("p", { class: "muted small", id: "no-predictions" }, `No top-5: ${note}.`) : null,
    preds.length ? h("p", { class: "muted small", id: "preds-head" }, predictionsHead(preds, paddedFrom)) : null,
    h(
      "ol",
      { class: list.class ? `preds ${list.class}` : "preds", id: list.id ?? null, style: namesWidth(preds.map(predictionLabel)) },
      preds.map((q) => h("li", null, h("span", { class: "pname" }, predictionLabel(q)), h("span", { class: "pbar", style: `width:${(100 * q.prob).toFixed(1)}%` }), h("span", { class: "muted" }, pct(q.prob)))),
    ),
  ];
}
