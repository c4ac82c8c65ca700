/** `#/r/RUN`: what the model and dataset are, what the run holds, and where to go next. */
import { serveCommand, type RunSummary } from "../api";
import type { PageContext } from "../context";
import { append, type Child, facts, flopsTotal, fmt, h, notice, probedAt, shape } from "../dom";
import { visibleText } from "../images";

export async function renderHome(root: HTMLElement, ctx: PageContext): Promise<void> {
  const s = await ctx.api.json<RunSummary>(`/runs/${encodeURIComponent(ctx.run)}`);
  document.title = `${ctx.run} · lurker`;
  const m = s.model;
  const d = s.dataset;
  const units = s.layers.reduce((a, l) => a + l.num_units, 0);
  const classes = d.classes.length;
  const featviz = s.holds.featviz ?? [];
  const explained = s.holds.explained ?? 0;
  // inputs with no picture (token ids, feature vectors): the image facts do not apply, a
  // top-k entry is a sample, and the live view takes a typed input instead of an image
  const tokens = d.tokens ?? null;
  const pictureless = tokens !== null || (d.features ?? null) !== null || (d.signal ?? null) !== null;
  // a text run's classes are tokens (a char model's next characters): a space or a
  // newline shown as Live shows them (␣, ↵), not as a blank between two commas
  const className = (n: string) => (tokens !== null || /^\s*$/.test(n) ? visibleText(n) : n);
  const shownClasses = d.classes.slice(0, 40).map(className).join(", ") + (classes > 40 ? `, … (${classes - 40} more)` : "");
  // what depends on the model's check against the run's fingerprint, which the server
  // runs in the background (the summary answers at once, "checking"): drawn again in
  // place when it ends, the rest of the page usable meanwhile
  const modelParts = (t: RunSummary) => {
    const live = t.holds.live;
    const explainCell = h("span", { class: "explanations" }, explained ? h("a", { href: ctx.href("explain") }, `${fmt(explained)} sample${explained === 1 ? "" : "s"} precomputed`) : live ? h("a", { href: ctx.href("explain") }, "computed on request") : h("span", { class: "muted" }, "none precomputed"));
    const check = t.holds.model_check ?? "none";
    const liveCell = h(
      "span",
      { class: "live-model", "data-model-check": check },
      ...(check === "checking"
        ? [h("span", { class: "check-spinner", "aria-hidden": "true" }), h("span", { class: "model-checking", role: "status" }, "checking the model… (loading it and comparing it with the one the run was probed with)")]
        : live
          ? [h("a", { href: ctx.href("live") }, "attached")]
          : ctx.api.isStatic
            ? [h("span", { class: "muted" }, `none in a static export (${serveCommand(t)})`)]
            : [h("span", { class: "muted" }, `none (${serveCommand(t, false)})`), t.holds.live_reason ? h("span", { class: "live-reason" }, `: ${t.holds.live_reason}`) : null]),
    );
    const links = h(
      "p",
      { class: "entry-links" },
      h("a", { class: "button", href: ctx.href("samples") }, "Browse samples"),
      t.holds.graph ? h("a", { class: "button", href: ctx.href("graph") }, "Open the graph") : null,
      // token ids and feature vectors are typed into Live; a signal is a dataset sample
      live ? h("a", { class: "button", href: ctx.href("live") }, tokens !== null || (d.features ?? null) !== null ? "Live: type an input" : "Live view") : null,
      t.holds.map ? h("a", { class: "button", href: ctx.href("map") }, "Dataset map") : null,
      // the Explain page works wherever explanations can be made or were precomputed
      live || explained ? h("a", { class: "button", href: ctx.href("explain") }, pictureless ? "Explain a sample" : "Explain an image") : null,
    );
    return { explainCell, liveCell, links };
  };
  const { explainCell, liveCell, links } = modelParts(s);
  if (s.holds.model_check === "checking" && !ctx.api.isStatic)
    void ctx.api.checkedSummary(ctx.run, ctx.signal).then((t) => {
      if (ctx.signal.aborted || t.holds.model_check === "checking") return;
      const now = modelParts(t);
      explainCell.replaceWith(now.explainCell);
      liveCell.replaceWith(now.liveCell);
      links.replaceWith(now.links);
    }, () => undefined);
  append(root, 
    h("h1", null, m.name ?? ctx.run, h("span", { class: "sub", title: "the run's name: its folder" }, ` · `, h("code", null, s.id))),
    s.missing.length ? notice(`This run lacks: ${s.missing.join("; ")}.`) : null,
    h(
      "div",
      { class: "cards" },
      h(
        "section",
        { class: "card" },
        h("h2", null, "Model"),
        facts([
          ["name", m.name ?? "–"],
          ["spec", h("code", null, m.spec ?? "–")],
          ["weights", m.weights ? h("code", null, m.weights) : "–"],
          ["parameters", fmt(m.params)],
          ["ops", fmt(m.ops)],
          ["input size", shape(m.input_shape)],
          ["FLOPs", flopsTotal(m.flops, m.flops_unknown)],
        ]),
      ),
      h(
        "section",
        { class: "card" },
        h("h2", null, "Dataset"),
        facts(([
          d.spec || !d.description ? ["spec", h("code", null, d.spec ?? "–")] : ["source", d.description],
          ["samples", fmt(d.size)],
          ["classes", classes ? `${classes}: ${shownClasses}` : d.labels_ignored ? unlabelledWhy(d.labels_ignored) : "unlabelled"],
          tokens !== null
            ? ["tokens per sample", fmt(tokens)]
            : d.features != null
              ? ["features per sample", fmt(d.features)]
              : d.signal
              ? ["signal", `${fmt(d.signal[0])} channel${d.signal[0] === 1 ? "" : "s"} × ${fmt(d.signal[1])} samples`]
              : ["image size", Array.isArray(d.image_size) ? shape(d.image_size) : fmt(d.image_size)],
          tokens !== null ? ["vocabulary", d.vocab_size ? `${fmt(d.vocab_size)} tokens` : h("span", { class: "muted" }, "none: ids shown (lurker serve RUN --vocab FILE)")] : null,
          pictureless ? null : ["skipped files", d.skipped_count ? String(d.skipped_count) : "none"],
          // only where lurker read the image files itself and so could check them: a
          // dataset it does not decode (tensors, a wrapped ImageFolder) has nothing to say
          pictureless || !d.transparent_images ? null : ["transparent images", transparency(d.transparent_images, d.spec || d.description)],
        ] as ([string, Child | Child[]] | null)[]).filter((r): r is [string, Child | Child[]] => r !== null)),
        d.skipped.length
          ? h(
              "details",
              null,
              h("summary", null, `${d.skipped_count} skipped file${d.skipped_count === 1 ? "" : "s"}`),
              h("ul", { class: "skipped" }, d.skipped.map((k) => h("li", null, h("code", null, k.path), ": ", k.reason))),
            )
          : null,
      ),
      h(
        "section",
        { class: "card" },
        h("h2", null, "This run holds"),
        facts([
          ["layers", `${s.layers.length} (${fmt(units)} units)`],
          ["top-k", `${s.probe.k} ${pictureless ? "samples" : "images"} per unit, by max, by mean${s.holds.relevance ? " and by relevance for the prediction" : ""}`],
          ["histograms", `${s.probe.hist_bins} bins per unit`],
          ["graph", s.holds.graph ? h("a", { href: ctx.href("graph") }, "traced graph") : "not recorded"],
          ["dataset map", s.holds.map ? h("a", { href: ctx.href("map") }, "made") : h("span", { class: "muted" }, "none (lurker map RUN)")],
          ["feature visualizations", featviz.length ? `${featviz.length} layer${featviz.length === 1 ? "" : "s"}: ${featviz.slice(0, 4).join(", ")}${featviz.length > 4 ? ", …" : ""}` : h("span", { class: "muted" }, "none (lurker featviz RUN --layer L)")],
          ["explanations", explainCell],
          // why not, where the server knows (its weights are gone, or the model loads but is
          // not the one the run was probed with: its fingerprint differs), said here once
          ["live model", liveCell],
          // the server makes a unit's or sample's images the first time a page shows
          // them and keeps them, so this count grows as one browses: say so, not leave a
          // number that changes unexplained (an export's count is fixed when written)
          // token ids and feature vectors have no picture: no image is ever cached
          tokens !== null || d.features != null
            ? ["images", h("span", { class: "muted cached-images" }, `none: the inputs are ${tokens !== null ? "token ids, which the pages show as their tokens" : "feature vectors, which the pages show as their values"}, not as pictures`)]
            : ctx.api.isStatic
            ? ["cached images", fmt(s.holds.cached_images)]
            : [
                "images cached so far",
                h(
                  "span",
                  { class: "cached-images", title: "Pages make their images on first view and keep them, so this count grows as you browse. `lurker images RUN` makes the units' images ahead of time." },
                  fmt(s.holds.cached_images),
                  h("span", { class: "muted" }, " (made as pages are first viewed)"),
                ),
              ],
          ["probed", [h("span", { title: s.probe.created ?? null }, probedAt(s.probe.created)), s.probe.lurker_version ? ` with lurker ${s.probe.lurker_version}` : ""]],
          ["status", s.probe.status ?? "–"],
        ]),
        links,
      ),
    ),
    h("h2", { id: "layers" }, "Layers"),
    // (scrolls sideways on a phone rather than widening the page)
    h(
      "div",
      { class: "table-scroll" },
      h(
        "table",
        { class: "table layers" },
        h("thead", null, h("tr", null, ["#", "layer", "op", "kind", "units", "output shape", ""].map((c) => h("th", null, c)))),
        h(
          "tbody",
          null,
          s.layers.map((l, i) =>
            h(
              "tr",
              null,
              h("td", { class: "num" }, i),
              h("td", null, h("a", { href: ctx.href("layer", l.name) }, l.name)),
              h("td", null, h("code", null, l.op ?? "–")),
              h("td", null, l.kind ?? "–"),
              h("td", { class: "num" }, fmt(l.num_units)),
              h("td", null, shape(l.shape)),
              h("td", null, s.holds.graph && l.op ? h("a", { href: ctx.href("graph") + "?focus=" + encodeURIComponent(l.op), class: "graph-link", title: `${l.op} in the traced graph` }, "in graph") : null),
            ),
          ),
        ),
      ),
    ),
  );
  if (ctx.params.get("show") === "layers") document.getElementById("layers")?.scrollIntoView();
}

/** "unlabelled", and why, where the items had labels that were not class indices (a
 * regression target, a mask): the probe kept no class statistics by them. */
function unlabelledWhy(reason: string): HTMLElement {
  return h("span", { class: "labels-ignored" }, `unlabelled: ${reason}, so the probe kept no class statistics (give items as (input, class index) for them)`);
}

/** The images the probe fed without their alpha (a transparent pixel as the colour it
 * stores, often black, not a background): the model saw them so, which explains odd
 * activations on them. */
function transparency(t: NonNullable<RunSummary["dataset"]["transparent_images"]>, source: unknown): HTMLElement | string {
  if (!t.count) return "none: every image file was checked, and the model saw each as stored";
  const n = `${fmt(t.count)} image${t.count === 1 ? "" : "s"}`;
  const root = typeof source === "string" ? source.replace(/\/+$/, "") + "/" : null;
  const short = (p: string) => (root && p.startsWith(root) ? p.slice(root.length) : p);
  return h(
    "span",
    { class: "transparent-images" },
    `${n}: fed with their alpha dropped (transparent areas as the colour they store, often black; composite them over a background before probing to feed that instead): `,
    ...t.examples.flatMap((p, i) => [i ? ", " : "", h("code", { title: p }, short(p))]),
    t.count > t.examples.length ? ", …" : "",
  );
}
