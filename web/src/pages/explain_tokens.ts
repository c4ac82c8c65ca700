/**
 * Explain on a run of token ids (a text model): a dataset sample's tokens, each coloured
 * by its attribution for the target class, one row per method that applies to token ids
 * (the server's `explain/methods`: attributions at the embedding that looks the ids up,
 * one score per token; see docs/explain.md "Token ids: text models"). Uploads are images,
 * which such a run does not take; the picker is a sample id.
 */
import { p, type RunSummary, type SampleDoc } from "../api";
import type { PageContext } from "../context";
import { append, fill, fmt, h, notice, pct } from "../dom";
import { featureColor, tokenSequence } from "../images";
import { classLabel, namesWidth } from "../classes";

interface TokenMethod {
  name: string;
  summary: string;
  signed: boolean;
}

interface TokenResult {
  method: string;
  target: string;
  target_class: number | null;
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

export async function renderTokenExplain(root: HTMLElement, ctx: PageContext, summary: RunSummary, loading: HTMLElement): Promise<void> {
  const params = new URLSearchParams(ctx.params);
  const image = params.get("image");
  const target = params.get("target") || "top";
  const go = (next: Record<string, string | null>) => {
    const q = new URLSearchParams(params);
    for (const [k, v] of Object.entries(next)) (v === null ? q.delete(k) : q.set(k, v));
    ctx.navigate(ctx.href("explain") + "?" + q);
  };
  const length = summary.dataset.tokens;
  if (ctx.api.isStatic || !summary.holds.live) {
    loading.remove();
    const why = ctx.api.isStatic ? "This is a static export" : `This run has no model attached${summary.holds.live_reason ? ` (${summary.holds.live_reason})` : ""}`;
    root.append(notice(`${why}: explaining a sample's tokens runs the model. Serve it with \`lurker serve ${ctx.run} --model SPEC\`.`, ctx.api.isStatic ? undefined : "error"));
    return;
  }
  // the picker: a sample id (an upload is an image, which this run does not take)
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
    h("p", { class: "muted small" }, `The inputs are sequences of ${length} token ids: a dataset sample's tokens are explained (0..${summary.dataset.size - 1}).`),
    h("div", { class: "row" }, field, h("button", { type: "button", onclick: choose }, "Explain sample")),
  );
  if (!image || !/^sample-\d+$/.test(image)) {
    loading.remove();
    if (image) root.append(notice(`${image} is not a dataset sample: this run's inputs are token ids, so uploads (images) do not apply. Choose a sample.`, "error"));
    root.append(picker);
    return;
  }
  const sid = Number(image.slice(7));
  let doc: SampleDoc;
  let methods: TokenMethod[];
  try {
    const [d, info] = await Promise.all([
      ctx.api.json<SampleDoc>(p("runs", ctx.run, "samples", sid) + "?limit=1"),
      ctx.api.json<{ methods: TokenMethod[] }>(p("runs", ctx.run, "explain", "methods")),
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
  append(
    root,
    h(
      "section",
      { class: "card explain-image" },
      h("h3", null, "Sample ", h("a", { href: ctx.href("sample", String(sid)), id: "image-name" }, `#${sid}`), h("span", { class: "muted" }, ` · ${length} tokens`)),
      doc.prediction_error ? notice(doc.prediction_error, "error") : h("div", null, h("p", { class: "muted small" }, "Target: a class the model predicts…"), chooser),
    ),
    h(
      "p",
      { class: "muted small", id: "token-explain-legend" },
      "Each token coloured by its score for the target, attributed at the embedding that looks the ids up (one score per token: the attribution summed over the embedding's dimension; saliency and SmoothGrad: the length of the gradient, which has no sign). Signed methods: red tokens raise the target's score, blue ones lower it. One colour scale per method: its largest |score| is the deepest colour. Hover a token for its id and score.",
    ),
    doc.tokens ? null : notice(`The sample's tokens are not at hand: ${(doc.tokens_error ?? "the run's dataset cannot be loaded").replace(/\.+$/, "")}.`, "error"),
    h("div", { class: "token-explain" }, methods.map((m) => methodRow(ctx, image, m, target, doc))),
  );
}

function methodRow(ctx: PageContext, image: string, m: TokenMethod, target: string, doc: SampleDoc): HTMLElement {
  const body = h("div", { class: "spinner", role: "status", "aria-label": `computing ${m.name}` });
  const caption = h("p", { class: "small muted" }, "computing…");
  // on token ids SmoothGrad, like saliency, is a gradient's length: the result says which
  const sign = h("span", { class: "muted sign" }, m.signed ? " signed" : " ≥ 0");
  const card = h(
    "section",
    { class: "card token-explain-card", "data-method": m.name },
    h("h3", { title: m.summary }, h("span", { class: "name" }, TITLES[m.name] ?? m.name), sign),
    body,
    caption,
  );
  const url = `${p("runs", ctx.run, "live", image, "explain", m.name)}.json?${new URLSearchParams({ target })}`;
  void (async () => {
    try {
      const r = await ctx.api.json<TokenResult>(url);
      sign.textContent = r.signed ? " signed" : " ≥ 0";
      const scores = r.scores ?? [];
      const scale = scores.reduce<number>((a, v) => (v === null ? a : Math.max(a, Math.abs(v))), 0);
      const seq = doc.tokens ? tokenSequence(doc.tokens, null, 0, doc.tokens.length, doc.token_text ?? null) : h("span", { class: "muted" }, scores.map((v) => (v === null ? "n/f" : fmt(v))).join(" "));
      for (const el of Array.from(seq.querySelectorAll<HTMLElement>(".tok[data-pos]"))) {
        const v = scores[Number(el.dataset.pos)] ?? null;
        el.style.background = featureColor(v, scale);
        el.dataset.score = v === null ? "" : String(v);
        el.title = `${el.title} · score ${v === null ? "not finite" : fmt(v)}`;
      }
      body.replaceWith(seq);
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
