/**
 * Live on a run whose inputs have no picture: a text model's token ids (a sentence typed
 * as words, looked up in the run's vocabulary, or as ids) or a tabular model's feature
 * vectors (one number per feature, named by the dataset's `feature_names`), pre-filled
 * from a dataset sample (`?sample=N`). The server runs the live model on it
 * (`POST .../live/inputs`): the prediction, then every probed layer's units, the ones
 * that fire most linked to their pages; on a text model, the attention weights of a chosen
 * attention op (an SDPA call or a hand-written attention's softmax) on the sequence
 * (`?op=`, see live_attention.ts).
 */
import { p, type LiveInput, type LiveLayerUnits, type RunSummary, type SampleDoc } from "../api";
import type { PageContext } from "../context";
import { append, fill, fmt, h, notice } from "../dom";
import { visibleText } from "../images";
import { topPredictions } from "../predictions";
import { attentionCard } from "./live_attention";

export async function renderFlatLive(root: HTMLElement, ctx: PageContext, summary: RunSummary): Promise<void> {
  const tokens = summary.dataset.tokens ?? null;
  const count = tokens ?? summary.dataset.features ?? 0;
  const names = summary.dataset.feature_names ?? null;
  const hasVocab = !!summary.dataset.vocab_size;
  // a character-level vocabulary (a char GPT's): the text is read one character per token
  const chars = hasVocab && !!summary.dataset.vocab_chars;
  const params = new URLSearchParams(ctx.params);
  const sample = params.get("sample");
  const result = h("section", { class: "live-flat-result", id: "live-result", "aria-live": "polite" });

  // the input: a text box (token runs) or one number field per feature
  const mode = h("select", { id: "live-mode", "aria-label": "what the text box holds" }, h("option", { value: "text", disabled: hasVocab ? null : "" }, chars ? "characters" : "words"), h("option", { value: "ids" }, "token ids"));
  (mode as HTMLSelectElement).value = hasVocab ? "text" : "ids";
  const text = h("textarea", { id: "live-text", rows: 3, "aria-label": "the input sequence", placeholder: chars ? "type text: one token per character, spaces included (Shift+Enter: a newline)" : hasVocab ? "type a sentence: words split at spaces" : "type token ids: 12 7 3 …" });
  const fields: HTMLInputElement[] = [];
  const grid = h("div", { class: "feature-form", id: "live-features" });
  if (tokens === null) {
    for (let i = 0; i < count; i++) {
      const label = names?.[i] ?? `feature ${i}`;
      const input = h("input", { type: "number", step: "any", "data-feature": i, id: `feature-${i}`, value: "0" }) as HTMLInputElement;
      input.addEventListener("change", () => void run());
      fields.push(input);
      grid.append(h("label", { for: `feature-${i}`, title: label }, h("span", { class: "fname" }, label), input));
    }
  }
  const sampleField = h("input", { type: "number", min: 0, max: Math.max(0, summary.dataset.size - 1), id: "live-sample", "aria-label": "sample id", value: sample ?? "" }) as HTMLInputElement;
  const useSample = h("button", { type: "button", id: "live-use-sample" }, "Fill from sample");
  useSample.addEventListener("click", () => {
    const v = sampleField.value.trim();
    if (/^\d+$/.test(v)) ctx.navigate(ctx.href("live") + "?sample=" + v);
  });
  const runButton = h("button", { type: "button", class: "button", id: "live-run" }, "Run the model");
  runButton.addEventListener("click", () => void run());
  text.addEventListener("keydown", (e) => {
    const k = e as KeyboardEvent;
    if (k.key === "Enter" && !k.shiftKey) {
      e.preventDefault();
      void run();
    }
  });
  const what = tokens !== null ? `a sequence (the run's have ${tokens} tokens)` : `${count} feature values`;
  const fits = " A model that takes only that length gets a longer sequence cut to its first tokens, and a shorter one padded at its end with the run's padding id (the embedding's padding_idx, or the vocabulary's <pad>) where it knows one; the answer says so.";
  const form = h(
    "section",
    { class: "card live-form" },
    h("h3", null, tokens !== null ? "Sequence" : "Features"),
    h("p", { class: "muted small" }, `Type ${what}; the model runs on it as you ${tokens !== null ? "press Enter" : "change a value"}.${tokens !== null ? fits : ""}${tokens !== null && !hasVocab ? " This run has no vocabulary, so it takes ids (serve it with `--vocab FILE` to type words)." : ""}`),
    tokens !== null ? h("div", { class: "live-text-row" }, text, h("div", null, mode)) : grid,
    h("p", { class: "live-actions" }, runButton, " ", h("span", { class: "muted" }, "or fill from dataset sample "), sampleField, " ", useSample),
  );
  append(root, form, result);
  // a sample filled in as words: the ids it holds, checked against the ids the words look
  // up (a vocabulary that names two ids alike would feed another sequence than the sample)
  let expected: number[] | null = null;

  if (sample !== null && /^\d+$/.test(sample)) {
    try {
      const doc = await ctx.api.json<SampleDoc>(p("runs", ctx.run, "samples", sample) + "?limit=1");
      if (ctx.signal.aborted) return;
      if (tokens !== null && doc.tokens) {
        const words = doc.token_text;
        const asWords = hasVocab && !!words && words.every((w) => w !== null && (chars || !/\s/.test(w)));
        (mode as HTMLSelectElement).value = asWords ? "text" : "ids";
        (text as HTMLTextAreaElement).value = asWords ? words!.join(chars ? "" : " ") : doc.tokens.join(" ");
        expected = asWords ? doc.tokens.slice() : null;
      } else if (doc.features) {
        doc.features.forEach((v, i) => fields[i] && (fields[i].value = v === null ? "" : String(v)));
      } else {
        result.append(notice(`Sample ${sample} gives no values to fill: ${doc.tokens_error ?? doc.features_error ?? "the dataset is not available"}.`, "error"));
        return;
      }
    } catch (err) {
      result.append(notice((err as Error).message, "error"));
      return;
    }
    await run();
  } else if (tokens === null) {
    await run();
  } else {
    result.append(notice("Type a sequence and press Enter (or Run the model), or fill the box from a dataset sample."));
  }

  async function run(): Promise<void> {
    let body: Record<string, unknown>;
    if (tokens !== null) {
      const typed = (text as HTMLTextAreaElement).value;
      const raw = typed.trim();
      // characters are tokens, spaces at either end included
      if ((mode as HTMLSelectElement).value === "text") body = { text: chars ? typed : raw };
      else body = { ids: raw.split(/[\s,]+/).filter((t) => t).map((t) => (/^-?\d+$/.test(t) ? Number(t) : t)) };
    } else {
      // a field the browser cannot read as a number is sent as typed, so the server names it
      body = { features: fields.map((f) => (f.value.trim() === "" || Number.isNaN(f.valueAsNumber) ? f.value : f.valueAsNumber)) };
    }
    result.setAttribute("aria-busy", "true");
    let doc: LiveInput;
    try {
      doc = await ctx.api.postJson<LiveInput>(p("runs", ctx.run, "live", "inputs"), body);
    } catch (err) {
      fill(result, notice((err as Error).message, "error"));
      result.id = "live-result";
      result.removeAttribute("aria-busy");
      return;
    }
    if (ctx.signal.aborted) return;
    const want = expected;
    expected = null;
    if (want && (!doc.ids || doc.ids.join(" ") !== want.join(" "))) {
      (mode as HTMLSelectElement).value = "ids";
      (text as HTMLTextAreaElement).value = want.join(" ");
      await run();
      result.prepend(notice(`Sample ${sample}'s words look up other ids than it holds (its vocabulary spells several ids alike): the box holds its ids instead.`));
      return;
    }
    result.removeAttribute("aria-busy");
    fill(result, fedCard(doc), ...doc.layers.map((l) => layerCard(ctx, l, doc)));
    if (tokens !== null) void attentionOps(ctx, result, doc.input, doc.words ?? null);
  }
}

/** The model's attention ops (`scaled_dot_product_attention`, or a softmax of attention
 * written out by hand: the graph view's `a`), a chooser of them and the
 * chosen one's weights on this sequence; nothing where the model has none. */
async function attentionOps(ctx: PageContext, result: HTMLElement, input: string, words: (string | null)[] | null): Promise<void> {
  let ops: string[];
  try {
    const view = await ctx.api.json<{ nodes: { l: string; t: string; a?: number }[] }>(p("runs", ctx.run, "graph"));
    // `a`: an attention op (an SDPA call, or a softmax of attention written out by hand)
    ops = view.nodes.filter((n) => n.a === 1 || n.t === "scaled_dot_product_attention").map((n) => n.l);
  } catch {
    return; // the graph view says why on its own page; the units above stand
  }
  if (!ops.length || ctx.signal.aborted || !result.isConnected) return;
  const asked = ctx.params.get("op");
  let op = asked !== null && ops.includes(asked) ? asked : ops[0];
  const slot = h("div", null, attentionCard(ctx, input, op, words));
  const select = h(
    "select",
    { id: "attn-op", "aria-label": "attention op" },
    ops.map((o) => h("option", { value: o, selected: o === op }, o)),
  ) as HTMLSelectElement;
  select.addEventListener("change", () => {
    op = select.value;
    // ctx.params too: the card builds its URL (query, head) from them
    ctx.params.set("op", op);
    ctx.params.delete("query"); // another op's tokens: its own defaults
    ctx.params.delete("head");
    ctx.replaceParams(new URLSearchParams(ctx.params));
    fill(slot, attentionCard(ctx, input, op, words));
  });
  result.append(
    h("section", { class: "live-attention", id: "live-attention" }, h("p", { class: "attn-controls" }, h("label", null, `Attention op (${ops.length}) `, select)), slot),
  );
}

/** What the model was fed (words with their ids) and its top classes. */
function fedCard(doc: LiveInput): HTMLElement {
  const fed = doc.ids
    ? h("p", { class: "token-strip", id: "live-fed" }, doc.ids.map((id, i) => h("span", { class: "tok", title: `token ${i}: id ${id}` }, doc.words?.[i] != null ? visibleText(doc.words[i]!) : String(id), doc.words?.[i] != null ? h("sub", { class: "muted" }, String(id)) : null)))
    : null;
  return h(
    "section",
    { class: "card live-flat-preds" },
    h("h3", null, "Prediction"),
    doc.fitted ? h("p", { class: "notice small", id: "live-fitted" }, doc.fitted) : null,
    fed,
    ...topPredictions(doc.predictions, doc.predictions_note, { class: "live-preds", id: "live-preds" }, doc.padded_from ?? null),
  );
}

/** Where a unit peaks: the token at its max position (its word, else its id) where the
 * layer's positions are the sequence's tokens, else the position alone. */
function peakAt(l: LiveLayerUnits, u: number, doc: LiveInput): HTMLElement | null {
  const at = l.peak?.[u];
  if (at == null || l.positions < 2) return null;
  const tokens = doc.ids && doc.ids.length === l.positions;
  // whitespace made visible: a peak at a space would read as empty quotes
  const spelled = tokens ? (doc.words?.[at] ?? null) : null;
  const word = spelled === null ? null : visibleText(spelled);
  const tok = tokens ? (word ?? `id ${doc.ids![at]}`) : null;
  // a peak on the padding the server added is no word the user typed: said so
  const padding = tokens && doc.padded_from != null && at >= doc.padded_from;
  const title = `the unit's max is at position ${at} of ${l.positions}${tok !== null ? `, token “${tok}”` : ""}${padding ? " (padding)" : ""}`;
  return h("span", { class: padding ? "peak-at small muted padding" : "peak-at small", "data-peak": at, title }, ...(word !== null ? ["at “", h("span", { class: "peak-word" }, word), `” (token ${at}${padding ? ", padding" : ""})`] : [tok !== null ? `at ${tok} (token ${at}${padding ? ", padding" : ""})` : `at position ${at}`]));
}

/** One probed layer: the units that fire most, each linked to its page, with its value. */
function layerCard(ctx: PageContext, l: LiveLayerUnits, doc: LiveInput): HTMLElement {
  // bars from zero, as long as |value| (negative ones another colour): a bar from the
  // layer's lowest value would give a negative value a long bar
  const finite = l.max.filter((v): v is number => v !== null);
  const span = Math.max(0, ...finite.map(Math.abs)) || 1;
  const peakWord = l.positions > 1 ? `max over its ${l.positions} positions (its mean with it)` : "activation";
  return h(
    "section",
    { class: "card live-layer", "data-layer": l.layer },
    h("h3", null, h("a", { href: ctx.href("layer", l.layer) }, l.layer), h("span", { class: "muted small" }, ` · ${l.num_units} units${l.positions > 1 ? ` · ${l.positions} positions` : ""}`)),
    h("p", { class: "muted small" }, `The ${l.top.length} units that fire most, by ${peakWord}:`),
    h(
      "ol",
      { class: "live-top-units" },
      l.top.map((u) =>
        h(
          "li",
          null,
          h("a", { href: ctx.href("unit", l.layer, u), "data-unit": u }, `unit ${u}`),
          h("span", { class: l.max[u]! < 0 ? "pbar neg" : "pbar", style: `width:${((100 * Math.abs(l.max[u]!)) / span).toFixed(1)}%` }),
          h("span", { class: "value" }, fmt(l.max[u]!)),
          // where it peaks and its mean share the rest of the row, the mean wrapping under
          // the peak where the card is too narrow for both (at 800 px it spilled out)
          h(
            "span",
            { class: "unit-notes" },
            peakAt(l, u, doc),
            l.positions > 1 ? h("span", { class: "muted small unit-mean" }, `mean ${l.mean[u] === null ? "not finite" : fmt(l.mean[u]!)}`) : null,
          ),
        ),
      ),
    ),
    l.max.some((v) => v === null) ? h("p", { class: "notice error small" }, `${l.max.filter((v) => v === null).length} units are not finite (NaN or ±inf).`) : null,
  );
}
