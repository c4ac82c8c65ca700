/**
 * `#/r/RUN/explain?image=ID&target=T&layer=L&opacity=A`: why the model decided this, for
 * the current live image (an upload or `sample-N`). Every attribution method's heatmap
 * side by side, each a bare RGBA heatmap stacked over the image, so the one opacity slider
 * changes every overlay at once without a request. The target is one of the top-5
 * predictions (default: the top class) or a unit `LAYER:CHANNEL`; Grad-CAM's layer has its
 * own chooser. Each heatmap is computed once per (image, method, target, layer) by the
 * server, which caches it. Below, concept relevance (when lurker has LRP): a chosen layer's
 * units ranked by their share of the relevance, each with its conditional heatmap and a
 * link to its unit page.
 *
 * A static export, or a server without the run's model, shows the explanations
 * precomputed into the run (`lurker images RUN --explanations`): only those samples,
 * their methods, for the top class.
 */
import { ApiError, p, serveCommand, type LiveImage, type RunSummary } from "../api";
import type { PageContext } from "../context";
import { append, fill, fmt, h, notice, pct, withCode } from "../dom";
import { imageTitle } from "../images";
import { imagePicker } from "../picker";
import { renderTokenExplain } from "./explain_tokens";
import { renderFeatureExplain } from "./explain_features";
import { renderSignalExplain } from "./explain_signal";
import { DELTA_NOTE, TITLES, fillSettings, settingsLine, unavailableCard } from "./explain_flat";
import { classLabel, classText, namesWidth } from "../classes";
import { conceptFrame, conceptLayerSelect, conceptLead, conceptNeedsModel, conceptPrecomputedNote, conceptUnavailable, conceptUnitTitle, type ConceptRanking } from "../concepts";

/** What integrated gradients' delta is (its completeness check), said where the number is shown. */

const PICKER = { id: "explain", title: "Image to explain", action: "Explain sample" };

interface ExplainMethod {
  name: string;
  summary: string;
  needs_layer: boolean;
  signed: boolean;
  /** why the run's model cannot give it (from its trace); null or absent: it can */
  unavailable?: string | null;
}

interface ExplainMethods {
  methods: ExplainMethod[];
  /** Grad-CAM's layer when none is asked; null: lurker.explain's own (found per image) */
  default_layer: string | null;
  /** concept relevance's default layer (a probed one); absent in older exports */
  concept_layer?: string | null;
  layers: string[];
  concepts: boolean;
  /** why the run's model cannot give concept relevance; null or absent: it can */
  concepts_reason?: string | null;
}

interface ExplainResult {
  method: string;
  target: string;
  target_class: number | null;
  target_name: string | null;
  layer: string | null;
  layer_module?: string | null;
  signed: boolean;
  shape: number[];
  min: number | null;
  max: number | null;
  sum: number | null;
  delta: number | null;
  options: Record<string, unknown>;
  seconds: number;
  cached: boolean;
  /** what the method warned of: a Grad-CAM map the target does not reach, a ReLU rule on a
   * network with no ReLU (the plain gradient); absent from caches of older servers */
  notes?: string[];
}


export async function renderExplain(root: HTMLElement, ctx: PageContext): Promise<void> {
  document.title = `explain · ${ctx.run} · lurker`;
  // a freshly started server loads the model on the first request (seconds): say so until
  // the image's predictions arrive, instead of a page with only its title
  const loading = h("p", { class: "loading busy", role: "status" }, "Loading…");
  append(root, h("h1", null, "Explain", h("span", { class: "sub" }, " why the model decided this, method by method")), loading);
  // (once the server's check of the model against the run's has ended)
  const summary = await ctx.api.checkedSummary(ctx.run, ctx.signal);
  if (ctx.signal.aborted) return;
  // a text model's run: its samples are token ids, explained token by token
  if ((summary.dataset.tokens ?? null) !== null) return renderTokenExplain(root, ctx, summary, loading);
  // a tabular model's run: its samples are feature vectors, explained feature by feature
  if ((summary.dataset.features ?? null) !== null) return renderFeatureExplain(root, ctx, summary, loading);
  // a 1-D model's run: its samples are signals, explained along time per channel
  if ((summary.dataset.signal ?? null) !== null) return renderSignalExplain(root, ctx, summary, loading);
  // no model (a static export, or a server that cannot load the run's): only what the
  // run's cache holds, precomputed by `lurker images RUN --explanations`
  const explained = ctx.api.isStatic || !summary.holds.live ? await ctx.api.explained(ctx.run) : null;
  const noModel = ctx.api.isStatic
    ? "This is a static export: explanations run the model, so they need a server"
    : `Explanations run the model, and this run has none attached${summary.holds.live_reason ? ` (${summary.holds.live_reason})` : ""}`;
  if (explained && !explained.samples.length) {
    loading.remove();
    root.append(
      notice(
        ctx.api.isStatic
          ? `${noModel}. Run: \`${serveCommand(summary)}\`${summary.model.spec ? " (it loads the model the run records)" : ""}. To show some here, precompute them before exporting: \`lurker images RUN --explanations top\`.`
          : `${noModel}. Serve it with: \`${serveCommand(summary, false)}\`.`,
        ctx.api.isStatic ? undefined : "error",
      ),
    );
    return;
  }
  const params = new URLSearchParams(ctx.params);
  const image = params.get("image");
  const asked = params.get("target") || "top";
  // a static export holds the top class's explanations only
  const target = explained ? "top" : asked;
  const picker = (current: string | null) =>
    imagePicker(
      ctx,
      summary,
      {
        ...PICKER,
        current,
        only: explained?.samples.map((e) => ({ sample: e.sample, note: e.top ? `predicted ${classLabel(e.top.name, e.top.class)}` : e.methods.join(", ") })),
      },
      (id) => go({ image: id, target: null }),
    );
  const go = (next: Record<string, string | null>) => {
    const q = new URLSearchParams(params);
    for (const [k, v] of Object.entries(next)) (v === null ? q.delete(k) : q.set(k, v));
    ctx.navigate(ctx.href("explain") + "?" + q);
  };

  if (!image) {
    loading.remove();
    root.append(picker(null));
    return;
  }
  loading.textContent = explained ? "Loading the image…" : "Loading the model and the image…";
  let live: LiveImage;
  let info: ExplainMethods;
  try {
    [live, info] = await Promise.all([
      ctx.api.json<LiveImage>(p("runs", ctx.run, "live", image), { cache: false }),
      ctx.api.json<ExplainMethods>(p("runs", ctx.run, "explain", "methods")),
    ]);
  } catch (err) {
    loading.remove();
    root.append(notice((err as Error).message, "error"), picker(image));
    return;
  }
  if (ctx.signal.aborted) return;
  loading.remove();
  const held = explained?.samples.find((e) => e.image === image);
  if (live.input_note) root.append(notice(`As the model sees this upload: ${live.input_note}.`));
  if (explained && asked !== "top")
    root.append(notice(`${ctx.api.isStatic ? "This export holds" : "Without the model, this server has"} explanations of the top class only: shown below. Target ${asked} runs the model: \`${serveCommand(summary, ctx.api.isStatic)}\`.`));
  // a layer asked in the link (one shared from a served page) is not what is shown: say so,
  // as for a target, rather than show the default layer's heatmaps under that URL
  const [gradcamAt, conceptAt] = [params.get("layer"), params.get("clayer")];
  const askedLayers = explained
    ? [
        gradcamAt && gradcamAt !== info.default_layer ? `Grad-CAM at layer ${gradcamAt}` : null,
        conceptAt && conceptAt !== held?.concepts ? `concept relevance at layer ${conceptAt}` : null,
      ].filter((x): x is string => x !== null)
    : [];
  if (askedLayers.length) {
    const said = notice(`${ctx.api.isStatic ? "This export holds" : "Without the model, this server has"} each method at its default layer only: shown below. ${askedLayers.join(" and ")} ${askedLayers.length > 1 ? "run" : "runs"} the model: \`${serveCommand(summary, ctx.api.isStatic)}\`.`);
    said.id = "explain-layer-not-held";
    root.append(said);
  }
  const layer = explained ? null : params.get("layer") || null;
  const opacity = clamp01(Number(params.get("opacity") ?? String(OPACITY)));
  const inputSrc = ctx.api.pngUrl(p("runs", ctx.run, "live", image, "input.png"));
  const isUnit = target.includes(":");
  const topClass = live.predictions[0]?.class;

  // -- the image and its target chooser
  const unitField = h("input", {
    type: "text",
    id: "explain-unit",
    placeholder: "LAYER:CHANNEL, e.g. " + (conceptDefault(info) ?? summary.layers[0]?.name ?? "layer") + ":0",
    value: isUnit ? target : "",
    "aria-label": "unit target LAYER:CHANNEL",
    list: "explain-layers",
  });
  const unitGo = () => {
    const v = unitField.value.trim();
    if (v) go({ target: v });
  };
  unitField.addEventListener("keydown", (e) => {
    if ((e as KeyboardEvent).key === "Enter") unitGo();
  });
  const chooser = h(
    "ol",
    { class: "preds target-list", "aria-label": "target class", style: namesWidth(live.predictions.map((q) => classLabel(q.name, q.class))) },
    live.predictions.map((q) => {
      const on = !isUnit && (target === String(q.class) || (target === "top" && q.class === topClass));
      const off = explained !== null && !on; // a static export: the top class only
      return h(
        "li",
        null,
        h(
          "button",
          {
            type: "button",
            class: on ? "target on" : "target",
            "data-class": q.class,
            "aria-pressed": String(on),
            disabled: off,
            title: off ? `precomputed for the top class only: other targets run the model (${serveCommand(summary, ctx.api.isStatic)})` : null,
            onclick: () => go({ target: String(q.class) }),
          },
          h("span", { class: "pname" }, classLabel(q.name, q.class)),
          h("span", { class: "pbar", style: `width:${(100 * q.prob).toFixed(1)}%` }),
          h("span", { class: "muted" }, pct(q.prob)),
        ),
      );
    }),
  );
  const unitLink = isUnit ? unitHref(ctx, summary, target) : null;
  const imageCard = h(
    "section",
    { class: "card explain-image" },
    h("h3", null, "Image ", h("span", { class: "muted image-name", id: "image-name", title: live.name ? `upload ${image}` : null }, imageTitle(image, live.name))),
    h(
      "div",
      { class: "live-result" },
      h("img", { class: "live-img pixelated", src: inputSrc, alt: "the image as the model sees it", width: 128, height: 128 }),
      h("div", null, h("p", { class: "muted small" }, "Target: a class the model predicts…"), chooser),
    ),
    explained
      ? h(
          "p",
          { class: "muted small static-note" },
          withCode(`${ctx.api.isStatic ? "This static export holds" : `${noModel}; the run's cache holds`} the explanations of the top class, precomputed with the run's model. Other classes, units, Grad-CAM layers and concept relevance at other layers run the model: \`${serveCommand(summary, ctx.api.isStatic)}\`.`),
        )
      : h(
      "div",
      { class: "row unit-row" },
      h("label", { for: "explain-unit", class: "muted small" }, "…or a unit"),
      unitField,
      h("button", { type: "button", onclick: unitGo }, "Explain unit"),
      h(
        "datalist",
        { id: "explain-layers" },
        summary.layers.map((l) => h("option", { value: `${l.name}:` })),
      ),
    ),
    isUnit
      ? h(
          "p",
          { class: "small" },
          "Explaining unit ",
          h("code", null, target),
          unitLink ? [" · ", h("a", { href: unitLink }, "its unit page")] : null,
          " · ",
          h("a", { href: "#", onclick: (e: Event) => (e.preventDefault(), go({ target: null })) }, "back to the top class"),
        )
      : null,
  );

  // -- the controls shared by every heatmap
  const slider = h("input", { type: "range", min: 0, max: 1, step: 0.05, value: opacity, id: "explain-opacity", "aria-label": "heatmap opacity" });
  const sliderValue = h("span", { class: "muted", id: "explain-opacity-value" }, `${Math.round(opacity * 100)}%`);
  const layerSelect = h(
    "select",
    { id: "explain-layer", "aria-label": "Grad-CAM layer" },
    // lurker.explain's own default (a ViT's last block's first norm, not a probed layer):
    // named once the Grad-CAM result says which layer it chose
    h("option", { value: "" }, isUnit ? "default (at or before the unit's layer)" : `default (${info.default_layer ?? "as lurker.explain chooses"})`),
    info.layers.map((l) => h("option", { value: l, selected: l === layer }, l)),
  );
  layerSelect.addEventListener("change", () => go({ layer: layerSelect.value || null }));
  if (explained) layerSelect.disabled = true;
  const controls = h(
    "section",
    { class: "card explain-controls" },
    h("h3", null, "Overlay"),
    h("div", { class: "row" }, h("label", { for: "explain-opacity" }, "Heatmap opacity"), slider, sliderValue),
    h("div", { class: "row" }, h("label", { for: "explain-layer" }, "Grad-CAM layer"), layerSelect),
    h(
      "p",
      { class: "muted small legend" },
      h("span", { class: "swatch signed" }),
      " signed methods: blue negative, white zero, red positive (one scale for both signs) · ",
      h("span", { class: "swatch unsigned" }),
      " unsigned: dark to yellow. Opacity grows with |attribution|; each map is scaled by its own max |value|.",
    ),
    explained ? null : h("p", { class: "small" }, h("a", { href: ctx.href("live") + "?image=" + encodeURIComponent(image) }, "Open this image in the live view")),
  );
  const grid = h("section", { class: "explain-grid methods", "aria-label": "heatmaps" });
  const page = h("div", { class: "explain-page" });
  root.append(page);
  // a target the model may not have (a typed unit, a class from a link): asked once, so
  // that a typo is one message by the input, not one error per method
  const probe = info.methods.find((m) => !m.needs_layer && !m.unavailable);
  if (!explained && target !== "top" && probe) {
    try {
      await ctx.api.json<ExplainResult>(`${p("runs", ctx.run, "live", image, "explain", probe.name)}.json?${new URLSearchParams({ target })}`);
    } catch (err) {
      if (ctx.signal.aborted) return;
      if (!(err instanceof ApiError) || err.status >= 500) throw err;
      // the server's message names the target when it can ("unit target L:99: channel 99 is out of range")
      const named = err.message.includes(`target ${target}`) || err.message.includes(`target class ${target}`);
      const msg = named ? err.message : `Target ${target}: ${err.message}`;
      append(page, h("div", { class: "explain-top" }, imageCard, controls), notice(msg, "error"));
      return;
    }
    if (ctx.signal.aborted) return;
  }
  append(page, h("div", { class: "explain-top" }, imageCard, controls), h("h2", null, "Heatmaps ", h("span", { class: "sub" }, targetLine(target, live))), grid);

  const setOpacity = (v: number) => {
    page.style.setProperty("--heat-opacity", String(v));
    sliderValue.textContent = `${Math.round(v * 100)}%`;
  };
  setOpacity(opacity);
  slider.addEventListener("input", () => setOpacity(Number(slider.value)));
  slider.addEventListener("change", () => {
    params.set("opacity", slider.value);
    ctx.replaceParams(params);
  });

  const shown = held ? info.methods.filter((m) => held.methods.includes(m.name)) : info.methods;
  const namedDefault = (r: ExplainResult) => {
    // the default option names the layer the server's default chose (once, the same for
    // Grad-CAM and Grad-CAM++)
    const opt = (layerSelect as HTMLSelectElement).options[0];
    if (!layer && !isUnit && r.layer && opt) opt.textContent = `default (${layerName(r)})`;
  };
  for (const m of shown) grid.append(methodCard(ctx, image, m, target, m.needs_layer ? layer : null, inputSrc, m.needs_layer ? namedDefault : undefined));
  if (explained && held?.concepts) {
    // precomputed with the run's model: the default layer's ranking, the layer fixed
    const section = conceptSection(ctx, summary, live, image, "top", null, inputSrc, () => undefined);
    const select = section.querySelector("select");
    if (select) select.disabled = true;
    section.append(conceptPrecomputedNote(ctx, summary, held.concepts));
    page.append(section);
  } else if (explained) {
    page.append(conceptNeedsModel(ctx, summary));
  } else if (info.concepts && info.concepts_reason) {
    page.append(conceptUnavailable(info.concepts_reason));
  } else if (info.concepts) {
    const clayer = params.get("clayer") || (isUnit ? null : conceptDefault(info)) || null;
    page.append(conceptSection(ctx, summary, live, image, target, clayer, inputSrc, (l) => go({ clayer: l })));
  }
}

/** Concept relevance: the units of `layer` ranked by their share of the relevance for the
 * target, each with its conditional heatmap (the relevance that flowed through it). */
function conceptSection(ctx: PageContext, summary: RunSummary, live: LiveImage, image: string, target: string, layer: string | null, inputSrc: string, choose: (layer: string | null) => void): HTMLElement {
  const select = conceptLayerSelect(summary, layer, choose);
  const status = h("p", { class: "muted small" }, "Ranking the units…");
  const list = h("div", { class: "explain-grid concepts", "aria-label": "units by relevance" });
  const q = new URLSearchParams({ target });
  if (layer) q.set("layer", layer);
  const base = p("runs", ctx.run, "live", image, "explain", "concepts");
  void (async () => {
    let r: ConceptRanking;
    try {
      r = await ctx.api.json<ConceptRanking>(`${base}.json?${q}&top=8`);
    } catch (err) {
      fill(status, h("span", { class: "error-text" }, (err as Error).message));
      return;
    }
    if (ctx.signal.aborted) return;
    if (!layer) select.value = summary.layers.some((l) => l.name === r.layer) ? r.layer : "";
    const target = r.target.includes(":") ? `unit ${r.target}` : /^\d+$/.test(r.target) ? className(Number(r.target), live) : `class ${r.target}`;
    fill(status, ...conceptLead(r, target, "Each map is the relevance that flowed through that unit alone (blue negative, red positive)."));
    const cq = new URLSearchParams(q);
    cq.set("layer", r.layer);
    cq.set("overlay", "0");
    for (const u of r.units) {
      const heat = h("img", { class: "heat pixelated", alt: `unit ${u.unit} conditional heatmap`, "data-unit": u.unit, loading: "lazy", decoding: "async" });
      const stack = h("div", { class: "stack busy" }, h("img", { class: "base pixelated", src: inputSrc, alt: "" }), heat, h("div", { class: "spinner", role: "status", "aria-label": `computing unit ${u.unit}` }));
      heat.addEventListener("load", () => stack.classList.remove("busy"));
      heat.addEventListener("error", () => (stack.classList.remove("busy"), stack.classList.add("failed")));
      heat.src = ctx.api.pngUrl(`${base}/${u.unit}.png?${cq}`);
      list.append(
        h(
          "figure",
          { class: "card explain-card concept", "data-unit": u.unit },
          conceptUnitTitle(ctx, r, u),
          stack,
          h("figcaption", { class: "small muted" }, `relevance ${fmt(u.relevance)} · map sum ${fmt(u.heatmap_sum)}`),
        ),
      );
    }
  })();
  return conceptFrame(select, status, list);
}

function methodCard(ctx: PageContext, image: string, m: ExplainMethod, target: string, layer: string | null, inputSrc: string, resolved?: (r: ExplainResult) => void): HTMLElement {
  if (m.unavailable) return unavailableCard(m, TITLES[m.name] ?? m.name, m.unavailable, "card explain-card unavailable");
  const base = p("runs", ctx.run, "live", image, "explain", m.name);
  const q = new URLSearchParams({ target });
  if (layer) q.set("layer", layer);
  const caption = h("figcaption", { class: "small muted" }, "computing…");
  const spinner = h("div", { class: "spinner", role: "status", "aria-label": `computing ${m.name}` });
  const heat = h("img", { class: "heat pixelated", alt: `${m.name} heatmap`, "data-method": m.name, loading: "lazy", decoding: "async" });
  const stack = h("div", { class: "stack busy" }, h("img", { class: "base pixelated", src: inputSrc, alt: "" }), heat, spinner);
  const settings = settingsLine(); // what it ran with, to re-run it in Python
  const card = h(
    "figure",
    { class: "card explain-card", "data-method": m.name },
    h("h3", { title: m.summary }, h("span", { class: "name" }, TITLES[m.name] ?? m.name), h("span", { class: "muted sign" }, m.signed ? " signed" : " ≥ 0")),
    stack,
    caption,
    settings,
    // what the method computes, in one sentence from the server: a hover title alone is unseen on a projector or a touch screen
    m.summary ? h("p", { class: "method-summary small muted" }, m.summary) : null,
  );
  const jq = q.toString(); // the JSON's query: no overlay
  heat.addEventListener("load", async () => {
    stack.classList.remove("busy");
    try {
      const r = await ctx.api.json<ExplainResult>(`${base}.json?${jq}`);
      resolved?.(r);
      fill(
        caption,
        r.layer ? [h("span", null, "at ", h("a", { class: "explain-layer", href: `${ctx.href("graph")}?focus=${encodeURIComponent(r.layer)}`, title: "this layer's op in the graph" }, h("code", null, layerName(r)))), " · "] : null,
        // null (X-Lurker-Min/Max "none"): no finite value to give a range, not a range of "–"
        r.min === null || r.max === null
          ? h("span", { class: "explain-note nf-note", role: "note" }, "no finite value: every attribution is NaN or ±inf (a NaN or inf in the model's weights or its input), so nothing is drawn")
          : `min ${fmt(r.min)} · max ${fmt(r.max)} · sum ${fmt(r.sum)}`,
        r.delta !== null ? [` · delta ${fmt(r.delta)}`, h("span", { class: "delta-note", role: "note" }, DELTA_NOTE)] : null,
        // a map that is all zeros, or the gradient under another name, says so
        ...(r.notes ?? []).map((n) => h("span", { class: "explain-note", role: "note" }, n)),
      );
      caption.title = `options: ${JSON.stringify(r.options)}`;
      fillSettings(settings, r.options);
    } catch (err) {
      fill(caption, (err as Error).message);
    }
  });
  heat.addEventListener("error", async () => {
    stack.classList.remove("busy");
    stack.classList.add("failed");
    // the image request's body is not readable from an <img>: ask the JSON for the reason
    try {
      await ctx.api.json<ExplainResult>(`${base}.json?${jq}`, { cache: false });
      fill(caption, h("span", { class: "error-text" }, "the heatmap did not load"));
    } catch (err) {
      fill(caption, h("span", { class: "error-text" }, (err as Error).message));
    }
  });
  q.set("overlay", "0");
  heat.src = ctx.api.pngUrl(`${base}.png?${q}`);
  return card;
}

/** A result's layer for a person: a trace label with the module that ran it, when that
 * module is not the name already. */
function layerName(r: ExplainResult): string {
  return r.layer_module && r.layer_module !== r.layer ? `${r.layer} (${r.layer_module})` : r.layer ?? "";
}

/** Concept relevance's default layer (a probed one; older exports named it default_layer). */
function conceptDefault(info: ExplainMethods): string | null {
  return info.concept_layer !== undefined ? info.concept_layer : info.default_layer;
}

/** `class objects`, `class 10 (index 0)`: a class as the heatmaps' heading names it (and
 * every page: see classes.ts). */
function className(cls: number, live: LiveImage): string {
  return classText(live.predictions.find((q) => q.class === cls)?.name, cls);
}

function targetLine(target: string, live: LiveImage): string {
  if (target.includes(":")) return `for unit ${target}`;
  const cls = target === "top" ? live.predictions[0]?.class : Number(target);
  const pred = live.predictions.find((q) => q.class === cls);
  return `for ${classText(pred?.name, cls ?? null)}${target === "top" ? " (the top prediction)" : ""}${pred ? ` · ${probability(pred.prob)}` : ""}`;
}

/** `p = 42.0%`, but `p > 99.9%` and `p < 0.1%`: a bound is not an equality. */
function probability(p: number): string {
  const shown = pct(p);
  return /^[<>]/.test(shown) ? `p ${shown[0]} ${shown.slice(1)}` : `p = ${shown}`;
}

/** The unit page of a `LAYER:CHANNEL` target when LAYER is a probed layer of the run. */
function unitHref(ctx: PageContext, summary: RunSummary, target: string): string | null {
  const parts = target.split(":");
  for (let cut = parts.length - 1; cut >= 1; cut--) {
    const name = parts.slice(0, cut).join(":");
    const layer = summary.layers.find((l) => l.name === name);
    const unit = Number(parts[cut]);
    if (layer && Number.isInteger(unit) && unit >= 0 && unit < layer.num_units) return ctx.href("unit", name, unit);
  }
  return null;
}

/** The heatmap's opacity at its strongest by default: Explanation.overlay's alpha and
 * `lurker explain --alpha`'s, so one explanation looks the same on the page, from Python
 * and from the command line. */
const OPACITY = 0.5;

function clamp01(v: number): number {
  return Number.isFinite(v) ? Math.min(1, Math.max(0, v)) : OPACITY;
}
