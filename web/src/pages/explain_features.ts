/**
 * Explain on a run of feature vectors (a tabular model): a dataset sample's features, each
 * with its attribution for the target class as a bar from 0, one card per method that
 * scores each feature (the server's `explain/methods`: the attribution has the vector's
 * shape, one score per feature). Uploads are images, which such a run does not take; the
 * picker is a sample id.
 */
import { p, type RunSummary, type SampleDoc } from "../api";
import type { PageContext } from "../context";
import { append, fill, fmt, h, notice, pct } from "../dom";
import { featureRows, featureScale, featureStrip, topFeatures } from "../images";
import { classLabel, namesWidth } from "../classes";

interface FeatureMethod {
  name: string;
  summary: string;
  signed: boolean;
}

interface FeatureResult {
  signed: boolean;
  min: number | null;
  max: number | null;
  sum: number | null;
  delta: number | null;
  options: Record<string, unknown>;
  notes?: string[];
  scores?: (number | null)[] | null;
}

const TITLES: Record<string, string> = {
  saliency: "Saliency",
  input_x_gradient: "Input × gradient",
  integrated_gradients: "Integrated gradients",
  smoothgrad: "SmoothGrad",
};

/** How many features a card lists by |score| before the whole vector on request. */
const SHOWN = 10;

export async function renderFeatureExplain(root: HTMLElement, ctx: PageContext, summary: RunSummary, loading: HTMLElement): Promise<void> {
  const params = new URLSearchParams(ctx.params);
  const image = params.get("image");
  const target = params.get("target") || "top";
  const go = (next: Record<string, string | null>) => {
    const q = new URLSearchParams(params);
    for (const [k, v] of Object.entries(next)) (v === null ? q.delete(k) : q.set(k, v));
    ctx.navigate(ctx.href("explain") + "?" + q);
  };
  const length = summary.dataset.features;
  const names = summary.dataset.feature_names ?? null;
  if (ctx.api.isStatic || !summary.holds.live) {
    loading.remove();
    const why = ctx.api.isStatic ? "This is a static export" : `This run has no model attached${summary.holds.live_reason ? ` (${summary.holds.live_reason})` : ""}`;
    root.append(notice(`${why}: explaining a sample's features runs the model. Serve it with \`lurker serve ${ctx.run} --model SPEC\`.`, ctx.api.isStatic ? undefined : "error"));
    return;
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
    h("p", { class: "muted small" }, `The inputs are vectors of ${length} features: a dataset sample's features are explained (0..${summary.dataset.size - 1}).`),
    h("div", { class: "row" }, field, h("button", { type: "button", onclick: choose }, "Explain sample")),
  );
  if (!image || !/^sample-\d+$/.test(image)) {
    loading.remove();
    if (image) root.append(notice(`${image} is not a dataset sample: this run's inputs are feature vectors, so uploads (images) do not apply. Choose a sample.`, "error"));
    root.append(picker);
    return;
  }
  const sid = Number(image.slice(7));
  let doc: SampleDoc;
  let methods: FeatureMethod[];
  try {
    const [d, info] = await Promise.all([
      ctx.api.json<SampleDoc>(p("runs", ctx.run, "samples", sid) + "?limit=1"),
      ctx.api.json<{ methods: FeatureMethod[] }>(p("runs", ctx.run, "explain", "methods")),
    ]);
    doc = d;
    methods = info.methods;
  } catch (err) {
    loading.remove();
    root.append(notice((err as Error).message, "error"), picker);
    return;
  }
  if (ctx.signal.aborted) return;
  loading.remove();
  const preds = doc.prediction ?? [];
  const topClass = preds[0]?.class;
  const chooser = h(
    "ol",
    { class: "preds target-list", "aria-label": "target class", style: namesWidth(preds.map((q) => classLabel(q.name, q.class))) },
    preds.map((q) => {
      const on = target === String(q.class) || (target === "top" && q.class === topClass);
      return h(
        "li",
        null,
        h(
          "button",
          { type: "button", class: on ? "target on" : "target", "data-class": q.class, "aria-pressed": String(on), onclick: () => go({ target: String(q.class) }) },
          h("span", { class: "pname" }, classLabel(q.name, q.class)),
          h("span", { class: "pbar", style: `width:${(100 * q.prob).toFixed(1)}%` }),
          h("span", { class: "muted" }, pct(q.prob)),
        ),
      );
    }),
  );
  const values = doc.features ?? null;
  append(
    root,
    picker,
    h(
      "section",
      { class: "card explain-image" },
      h("h3", null, "Sample ", h("a", { href: ctx.href("sample", String(sid)), id: "image-name" }, `#${sid}`), h("span", { class: "muted" }, ` · ${length} features`)),
      values ? featureStrip(values, names, featureScale([values])) : notice(`The sample's values are not at hand: ${(doc.features_error ?? "the run's dataset cannot be loaded").replace(/\.+$/, "")}.`, "error"),
      doc.prediction_error ? notice(doc.prediction_error, "error") : h("div", null, h("p", { class: "muted small" }, "Target: a class the model predicts…"), chooser),
    ),
    h(
      "p",
      { class: "muted small", id: "feature-explain-legend" },
      `Each feature's score for the target, a bar from 0 (one scale per method: its largest |score| is the longest bar), the ${SHOWN} largest by |score| first, all of them in order on request. Signed methods: red raises the target's score, blue lowers it; saliency is the gradient's size, which has no sign.`,
    ),
    h("div", { class: "feature-explain" }, methods.map((m) => methodCard(ctx, image, m, target, names))),
  );
}

function methodCard(ctx: PageContext, image: string, m: FeatureMethod, target: string, names: string[] | null): HTMLElement {
  const body = h("div", { class: "spinner", role: "status", "aria-label": `computing ${m.name}` });
  const caption = h("p", { class: "small muted" }, "computing…");
  const sign = h("span", { class: "muted sign" }, m.signed ? " signed" : " ≥ 0");
  const card = h("section", { class: "card feature-explain-card", "data-method": m.name }, h("h3", { title: m.summary }, h("span", { class: "name" }, TITLES[m.name] ?? m.name), sign), body, caption);
  const url = `${p("runs", ctx.run, "live", image, "explain", m.name)}.json?${new URLSearchParams({ target })}`;
  void (async () => {
    try {
      const r = await ctx.api.json<FeatureResult>(url);
      sign.textContent = r.signed ? " signed" : " ≥ 0";
      const scores = r.scores ?? [];
      const scale = featureScale([scores]);
      const all = scores.map((_, i) => i);
      body.replaceWith(
        h(
          "div",
          null,
          featureRows(scores, names, scale, topFeatures(scores, SHOWN)),
          scores.length > SHOWN ? h("details", null, h("summary", null, `all ${scores.length} features, in order`), featureRows(scores, names, scale, all)) : null,
        ),
      );
      fill(
        caption,
        r.min === null || r.max === null ? "no finite score" : `min ${fmt(r.min)} · max ${fmt(r.max)} · sum ${fmt(r.sum)}`,
        r.delta !== null ? ` · delta ${fmt(r.delta)}` : null,
        ...(r.notes ?? []).map((n) => h("span", { class: "explain-note", role: "note" }, n)),
      );
      caption.title = `options: ${JSON.stringify(r.options)}`;
    } catch (err) {
      body.remove();
      fill(caption, h("span", { class: "error-text" }, (err as Error).message));
    }
  })();
  return card;
}
