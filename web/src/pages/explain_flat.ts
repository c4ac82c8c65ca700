/**
 * Explain on a run whose inputs have no picture: a text model's token ids or a tabular
 * model's feature vectors. A dataset sample (uploads are images, which such a run does
 * not take; the picker is a sample id), the model's top classes as the target chooser,
 * and one card per method that scores each token or feature (the server's
 * `explain/methods`); how a card draws its scores is the kind's (`FlatKind`).
 */
import { p, serveCommand, type ExplainedIndex, type Prediction, type RunSummary, type SampleDoc } from "../api";
import type { PageContext } from "../context";
import { append, fill, fmt, h, notice, pct } from "../dom";
import { namesWidth } from "../classes";
import { predictionLabel } from "../predictions";

export interface FlatMethod {
  name: string;
  summary: string;
  signed: boolean;
  /** why the run's model cannot give it (from its trace); null or absent: it can */
  unavailable?: string | null;
}

export interface FlatResult {
  method: string;
  signed: boolean;
  min: number | null;
  max: number | null;
  sum: number | null;
  delta: number | null;
  options: Record<string, unknown>;
  notes?: string[];
  /** one score per token or feature, in the input's order (null: not finite) */
  scores?: (number | null)[] | null;
  /** a signal's scores along time: one list per channel, or one list for all of them */
  signal_scores?: (number | null)[][] | null;
}

/** LRP's bookkeeping in its options (relevance per op), not a setting a person re-runs with. */
const NOT_SETTINGS = new Set(["flows", "relevance_start", "relevance_input"]);
/** LRP options only the epsilon-gamma-box composite reads. */
const GAMMA_BOX = new Set(["gamma", "low", "high"]);

/** The settings a method ran with, from its result's `options`, for a person to read and
 * re-run it with (`lurker.explain(..., key=value)`): shown on each card, not only in a
 * hover title, which a projector or a touch screen never shows. Written as Python's values
 * (True, a tuple); None is left out, but a baseline of None, which is zeros. */
export function settingsText(options: Record<string, unknown> | null | undefined): string {
  const o = options ?? {};
  const value = (v: unknown): string =>
    typeof v === "boolean" ? (v ? "True" : "False") : typeof v === "number" ? (Number.isInteger(v) ? String(v) : fmt(v)) : Array.isArray(v) ? `(${v.map(value).join(", ")})` : typeof v === "object" ? JSON.stringify(v) : String(v);
  const parts: string[] = [];
  for (const [k, v] of Object.entries(o)) {
    if (NOT_SETTINGS.has(k)) continue;
    if (GAMMA_BOX.has(k) && "composite" in o && o.composite !== "epsilon_gamma_box") continue;
    if (v === null || v === undefined) {
      if (k === "baseline") parts.push("baseline=0 (zeros)");
      continue;
    }
    parts.push(`${k}=${value(v)}`);
  }
  return parts.join(" · ");
}

/** A card's settings line (empty until its result comes). */
export function settingsLine(): HTMLElement {
  return h("p", { class: "method-settings small muted" });
}

/** Fill a card's settings line from its result. */
export function fillSettings(line: HTMLElement, options: Record<string, unknown> | null | undefined): void {
  const text = settingsText(options);
  fill(line, text ? ["settings: ", h("code", null, text)] : null);
}

/** What differs between token ids and feature vectors. */
export interface FlatKind {
  /** "token" or "feature" */
  noun: string;
  /** the inputs in words: "sequences of 12 token ids", "vectors of 30 features" */
  what: string;
  /** the card grid's class and its cards' ("token-explain", "feature-explain") */
  css: string;
  /** the legend under the sample, and its id */
  legend: string;
  legendId: string;
  /** what the sample card shows of the sample (its strip), or why it is missing */
  sample(doc: SampleDoc): HTMLElement | SVGSVGElement | null;
  /** the scores of one method drawn, in place of the card's spinner */
  draw(scores: (number | null)[], doc: SampleDoc, result: FlatResult): HTMLElement | SVGSVGElement;
  /** what follows the method cards with the model at hand (a signal's concept relevance) */
  extra?(image: string, target: string, doc: SampleDoc, conceptsReason: string | null): HTMLElement | null;
  /** what follows the method cards of a precomputed sample (no model: a signal's concept
   * relevance as precomputed, or the command that precomputes it) */
  held?(held: ExplainedIndex["samples"][number], doc: SampleDoc): HTMLElement | null;
}

/** Each attribution method's title on the Explain pages (images, signals, tokens, features). */
export const TITLES: Record<string, string> = {
  saliency: "Saliency",
  input_x_gradient: "Input × gradient",
  integrated_gradients: "Integrated gradients",
  smoothgrad: "SmoothGrad",
  guided_backprop: "Guided backprop",
  deconvnet: "Deconvnet",
  gradcam: "Grad-CAM",
  gradcam_plus_plus: "Grad-CAM++",
  occlusion: "Occlusion",
  lrp: "LRP",
};

export async function renderFlatExplain(root: HTMLElement, ctx: PageContext, summary: RunSummary, loading: HTMLElement, kind: FlatKind): Promise<void> {
  const params = new URLSearchParams(ctx.params);
  const image = params.get("image");
  let target = params.get("target") || "top";
  const go = (next: Record<string, string | null>) => {
    const q = new URLSearchParams(params);
    for (const [k, v] of Object.entries(next)) (v === null ? q.delete(k) : q.set(k, v));
    ctx.navigate(ctx.href("explain") + "?" + q);
  };
  // no model (a static export, or a server that cannot load the run's): only what
  // `lurker images RUN --explanations` precomputed, the top class of some samples
  const explained = ctx.api.isStatic || !summary.holds.live ? await ctx.api.explained(ctx.run) : null;
  if (explained && !explained.samples.length) {
    loading.remove();
    const why = ctx.api.isStatic ? "This is a static export" : `This run has no model attached${summary.holds.live_reason ? ` (${summary.holds.live_reason})` : ""}`;
    root.append(
      notice(
        `${why}: explaining a sample's ${kind.noun}s runs the model. Serve it with \`${serveCommand(summary, ctx.api.isStatic)}\`, or precompute the top class's explanations of the top-k samples into the run with \`lurker images RUN --explanations top\`${ctx.api.isStatic ? " and export again" : ""}.`,
        ctx.api.isStatic ? undefined : "error",
      ),
    );
    return;
  }
  if (explained) {
    const held = explained.samples.find((e) => e.image === image) ?? null;
    // a language model's samples are precomputed for their top next token at the last
    // position (LAYER:CLASS:0:L-1), the served page's default, not the top class
    const nextToken = explained.samples.some((e) => e.top?.position != null);
    const what = nextToken ? "the top next token at the last position" : "the top class";
    const list = h(
      "section",
      { class: "card", id: "explain-picker" },
      h("h3", null, "Sample to explain"),
      h("p", { class: "muted small" }, `The inputs are ${kind.what}. ${explained.samples.length} samples' explanations were precomputed (${what} only):`),
      h("p", { class: "explained-list" }, explained.samples.flatMap((e, i) => [i ? " " : null, h("a", { href: ctx.href("explain") + "?image=" + e.image, class: e.image === image ? "on" : null, "data-sample": e.sample, title: e.top ? `predicted ${predictionLabel(e.top)}` : e.methods.join(", ") }, `#${e.sample}`)])),
    );
    const said = `${ctx.api.isStatic ? "This static export holds" : "Without the model, this server has"} the explanations of ${what} of the samples listed, precomputed with the run's model; other samples and ${nextToken ? "targets" : "classes"} run the model: \`${serveCommand(summary, ctx.api.isStatic)}\`.`;
    if (!held) {
      loading.remove();
      if (image) root.append(notice(`${image} has no precomputed explanation here. ${said}`, "error"));
      else root.append(notice(said));
      root.append(list);
      return;
    }
    if (target !== "top" && target !== held.target) root.append(notice(`Only ${what} is precomputed: shown below. Target ${target} runs the model: \`${serveCommand(summary, ctx.api.isStatic)}\`.`));
    return renderHeld(root, ctx, held, list, said, loading, kind);
  }
  const field = h("input", { type: "number", min: 0, max: Math.max(0, summary.dataset.size - 1), id: "explain-sample", "aria-label": "sample id", value: image?.startsWith("sample-") ? image.slice(7) : "" });
  const choose = () => {
    const v = (field as HTMLInputElement).value.trim();
    if (/^\d+$/.test(v)) go({ image: `sample-${v}`, target: null });
  };
  field.addEventListener("keydown", (e) => {
    if ((e as KeyboardEvent).key === "Enter") choose();
  });
  const picker = h(
    "section",
    { class: "card", id: "explain-picker" },
    h("h3", null, "Sample to explain"),
    h("p", { class: "muted small" }, `The inputs are ${kind.what}: a dataset sample's ${kind.noun}s are explained (0..${summary.dataset.size - 1}).`),
    h("div", { class: "row" }, field, h("button", { type: "button", onclick: choose }, "Explain sample")),
  );
  if (!image || !/^sample-\d+$/.test(image)) {
    loading.remove();
    if (image) root.append(notice(`${image} is not a dataset sample: this run's inputs are ${kind.what}, so uploads (images) do not apply. Choose a sample.`, "error"));
    root.append(picker);
    return;
  }
  const sid = Number(image.slice(7));
  let doc: SampleDoc;
  let methods: FlatMethod[];
  let conceptsReason: string | null = null;
  try {
    const [d, info] = await Promise.all([
      ctx.api.json<SampleDoc>(p("runs", ctx.run, "samples", sid) + "?limit=1"),
      ctx.api.json<{ methods: FlatMethod[]; concepts_reason?: string | null }>(p("runs", ctx.run, "explain", "methods")),
    ]);
    doc = d;
    methods = info.methods;
    conceptsReason = info.concepts_reason ?? null;
  } catch (err) {
    loading.remove();
    root.append(notice((err as Error).message, "error"), picker);
    return;
  }
  if (ctx.signal.aborted) return;
  loading.remove();
  const preds = doc.prediction ?? [];
  const topClass = preds[0]?.class;
  // a language model's scores at every position: its prediction is the next token at the
  // last position, so that token's score there is the default target, LAYER:CLASS:0:L-1
  // (not the class's score averaged over the positions), and the chooser's targets are
  // the top-5 next tokens'
  const nextAt = preds[0]?.position ?? null;
  if (target === "top" && preds[0]?.target) target = preds[0].target;
  const choiceOf = (q: Prediction) => q.target ?? String(q.class);
  // a unit target LAYER:CHANNEL: the unit's activation averaged over its positions (tokens,
  // time steps), as lurker.explain(model, x, target=(layer, channel)) scores it
  const isUnit = target.includes(":") && !preds.some((q) => q.target === target);
  const unitField = h("input", {
    type: "text",
    id: "explain-unit",
    placeholder: "LAYER:CHANNEL, e.g. " + (summary.layers[summary.layers.length - 1]?.name ?? "layer") + ":0",
    value: isUnit ? target : "",
    "aria-label": "unit target LAYER:CHANNEL",
    list: "explain-layers",
  }) as HTMLInputElement;
  const unitGo = () => {
    const v = unitField.value.trim();
    if (v) go({ target: v });
  };
  unitField.addEventListener("keydown", (e) => {
    if ((e as KeyboardEvent).key === "Enter") unitGo();
  });
  const unitLayer = isUnit ? summary.layers.find((l) => target.startsWith(l.name + ":")) : undefined;
  const unitRow = h(
    "div",
    { class: "row unit-target" },
    h("label", { class: "muted small", for: "explain-unit" }, `…or a unit (${UNIT_SCORE[kind.noun] ?? "its mean over the positions"}):`),
    unitField,
    h("datalist", { id: "explain-layers" }, summary.layers.map((l) => h("option", { value: `${l.name}:` }))),
    h("button", { type: "button", onclick: unitGo }, "Explain unit"),
    unitLayer ? h("a", { href: ctx.href("unit", unitLayer.name, target.slice(unitLayer.name.length + 1)), id: "explain-unit-page" }, "unit page") : null,
  );
  const chooser = h(
    "ol",
    { class: "preds target-list", "aria-label": "target class", style: namesWidth(preds.map(predictionLabel)) },
    preds.map((q) => {
      const on = !isUnit && (target === choiceOf(q) || (target === "top" && q.class === topClass));
      return h(
        "li",
        null,
        h(
          "button",
          { type: "button", class: on ? "target on" : "target", "data-class": q.class, "data-target": choiceOf(q), "aria-pressed": String(on), title: q.target ? `target ${q.target}: this token's score at position ${q.position}` : null, onclick: () => go({ target: choiceOf(q) }) },
          h("span", { class: "pname" }, predictionLabel(q)),
          h("span", { class: "pbar", style: `width:${(100 * q.prob).toFixed(1)}%` }),
          h("span", { class: "muted" }, pct(q.prob)),
        ),
      );
    }),
  );
  append(
    root,
    picker,
    h(
      "section",
      { class: "card explain-image" },
      h("h3", null, "Sample ", h("a", { href: ctx.href("sample", String(sid)), id: "image-name" }, `#${sid}`), h("span", { class: "muted" }, ` · ${kind.what.replace(/^\w+ of /, "")}`)),
      kind.sample(doc),
      doc.prediction_error ? notice(doc.prediction_error, "error") : h("div", null, h("p", { class: "muted small", id: "target-head" }, nextAt !== null ? `Target: a next token the model predicts at the last position (${nextAt}), its score there…` : "Target: a class the model predicts…"), chooser),
      unitRow,
    ),
    h("p", { class: "muted small", id: kind.legendId }, kind.legend),
    h("div", { class: kind.css }, methods.map((m) => methodCard(ctx, image, m, target, doc, kind))),
    kind.extra?.(image, target, doc, conceptsReason) ?? null,
  );
}

/** A precomputed sample: its values, its top class (the only target) and each method held. */
async function renderHeld(root: HTMLElement, ctx: PageContext, held: ExplainedIndex["samples"][number], list: HTMLElement, said: string, loading: HTMLElement, kind: FlatKind): Promise<void> {
  let doc: SampleDoc;
  let methods: FlatMethod[];
  try {
    const [d, info] = await Promise.all([
      // (a static export holds each sample's first page, not a page of one entry)
      ctx.api.json<SampleDoc>(p("runs", ctx.run, "samples", held.sample) + (ctx.api.isStatic ? "" : "?limit=1")),
      ctx.api.json<{ methods: FlatMethod[] }>(p("runs", ctx.run, "explain", "methods")),
    ]);
    doc = d;
    methods = info.methods.filter((m) => held.methods.includes(m.name));
  } catch (err) {
    loading.remove();
    root.append(notice((err as Error).message, "error"), list);
    return;
  }
  if (ctx.signal.aborted) return;
  loading.remove();
  const top = held.top;
  const heldTarget = held.target ?? "top";
  append(
    root,
    h("div", { id: "explained-only" }, notice(said)),
    list,
    h(
      "section",
      { class: "card explain-image" },
      h("h3", null, "Sample ", h("a", { href: ctx.href("sample", String(held.sample)), id: "image-name" }, `#${held.sample}`), h("span", { class: "muted" }, ` · ${kind.what.replace(/^\w+ of /, "")}`)),
      kind.sample(doc),
      top
        ? h(
            "div",
            null,
            h("p", { class: "muted small", id: "target-head" }, top.position != null ? `Target: the next token the model predicts at the last position (${top.position}), its score there, ${heldTarget} (precomputed)` : "Target: the class the model predicts (precomputed)"),
            h("ol", { class: "preds target-list", "aria-label": "target class", style: namesWidth([predictionLabel(top)]) }, h("li", null, h("button", { type: "button", class: "target on", "data-class": top.class, "data-target": heldTarget, "aria-pressed": "true", disabled: true }, h("span", { class: "pname" }, predictionLabel(top)), h("span", { class: "pbar", style: `width:${(100 * top.prob).toFixed(1)}%` }), h("span", { class: "muted" }, pct(top.prob))))),
          )
        : null,
    ),
    h("p", { class: "muted small", id: kind.legendId }, kind.legend),
    h("div", { class: kind.css }, methods.map((m) => methodCard(ctx, held.image, m, heldTarget, doc, kind))),
    kind.held?.(held, doc) ?? null,
  );
}

/** What a unit target's score is, by the kind's noun: its mean over what its layer has
 * several of per sample (as lurker.explain scores it), said in the run's own terms. */
const UNIT_SCORE: Record<string, string> = {
  token: "its mean over the tokens, where its layer has a token axis",
  signal: "its mean over the time steps, where its layer has them",
  feature: "its activation, averaged over any positions its layer has",
};

/** What integrated gradients' delta is, wherever a card shows one. */
export const DELTA_NOTE = "delta: the map's sum minus how much the score rose from the baseline input to this one; near 0, the map accounts for the whole score (the completeness check).";

/** A method the run's model cannot give (`explain/methods` says why, from its trace):
 * disabled, its reason in place of the result, and no request made for it. */
export function unavailableCard(m: { name: string; summary: string }, title: string, reason: string, css: string): HTMLElement {
  const said = reason.charAt(0).toUpperCase() + reason.slice(1).replace(/\.?$/, ".");
  return h(
    "section",
    { class: css, "data-method": m.name, "aria-disabled": "true", title: said },
    h("h3", { title: m.summary }, h("span", { class: "name" }, title), h("span", { class: "muted" }, " not available")),
    h("p", { class: "small unavailable-reason", role: "note" }, said),
  );
}

function methodCard(ctx: PageContext, image: string, m: FlatMethod, target: string, doc: SampleDoc, kind: FlatKind): HTMLElement {
  if (m.unavailable) return unavailableCard(m, TITLES[m.name] ?? m.name, m.unavailable, `card ${kind.css}-card unavailable`);
  const body = h("div", { class: "spinner", role: "status", "aria-label": `computing ${m.name}` });
  const caption = h("p", { class: "small muted" }, "computing…");
  const settings = settingsLine();
  // SmoothGrad, like saliency, is a gradient's size here: the result says which
  const sign = h("span", { class: "muted sign" }, m.signed ? " signed" : " ≥ 0");
  const card = h(
    "section",
    { class: `card ${kind.css}-card`, "data-method": m.name },
    h("h3", { title: m.summary }, h("span", { class: "name" }, TITLES[m.name] ?? m.name), sign),
    body,
    caption,
    settings,
    m.summary ? h("p", { class: "method-summary small muted" }, m.summary) : null,
  );
  const url = `${p("runs", ctx.run, "live", image, "explain", m.name)}.json?${new URLSearchParams({ target })}`;
  void (async () => {
    try {
      const r = await ctx.api.json<FlatResult>(url);
      sign.textContent = r.signed ? " signed" : " ≥ 0";
      body.replaceWith(kind.draw(r.scores ?? [], doc, r));
      fill(
        caption,
        r.min === null || r.max === null ? "no finite score" : `min ${fmt(r.min)} · max ${fmt(r.max)} · sum ${fmt(r.sum)}`,
        r.delta !== null ? [` · delta ${fmt(r.delta)}`, h("span", { class: "delta-note", role: "note" }, DELTA_NOTE)] : null,
        ...(r.notes ?? []).map((n) => h("span", { class: "explain-note", role: "note" }, n)),
      );
      caption.title = `options: ${JSON.stringify(r.options)}`;
      fillSettings(settings, r.options);
    } catch (err) {
      body.remove();
      fill(caption, h("span", { class: "error-text" }, (err as Error).message));
    }
  })();
  return card;
}
