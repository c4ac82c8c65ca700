/**
 * Pieces the image and signal Explain pages share for concept relevance: the ranking
 * document, the layer chooser, each unit card's heading and the section around them.
 */
import { serveCommand, type RunSummary } from "./api";
import type { PageContext } from "./context";
import { fmt, h, notice, withCode } from "./dom";

/** GET .../explain/concepts.json: a layer's units ranked by their share of the relevance. */
export interface ConceptRanking {
  layer: string;
  probed: boolean;
  target: string;
  composite: string;
  channels: number;
  total: number;
  /** `signal_scores`: on a signal run, each unit's conditional heatmap (C, T). */
  units: { unit: number; relevance: number; share: number | null; heatmap_sum: number; signal_scores?: (number | null)[][] | null }[];
  seconds: number;
}

/** The layer chooser: "default layer" and every probed layer, `layer` selected. */
export function conceptLayerSelect(summary: RunSummary, layer: string | null, choose: (layer: string | null) => void): HTMLSelectElement {
  const select = h(
    "select",
    { id: "concept-layer", "aria-label": "concept relevance layer" },
    h("option", { value: "" }, "default layer"),
    summary.layers.map((l) => h("option", { value: l.name, selected: l.name === layer }, `${l.name} (${l.num_units} units)`)),
  ) as HTMLSelectElement;
  select.addEventListener("change", () => choose(select.value || null));
  return select;
}

/** A unit card's heading: the unit (linked to its page where the layer was probed) and its share. */
export function conceptUnitTitle(ctx: PageContext, r: ConceptRanking, u: ConceptRanking["units"][number]): HTMLElement {
  return h(
    "h3",
    null,
    r.probed ? h("a", { class: "name", href: ctx.href("unit", r.layer, u.unit), title: "its unit page" }, `unit ${u.unit}`) : h("span", { class: "name" }, `unit ${u.unit}`),
    h("span", { class: "muted" }, u.share === null ? "" : ` ${(100 * u.share).toFixed(1)}%`),
  );
}

/** The section: heading, layer chooser, status line and the units' cards. */
export function conceptFrame(select: HTMLElement, status: HTMLElement, list: HTMLElement): HTMLElement {
  return h(
    "section",
    { class: "concept-section" },
    h("h2", null, "Concept relevance ", h("span", { class: "sub" }, "which units of a layer carried this decision")),
    h("div", { class: "toolbar" }, h("label", { for: "concept-layer" }, "Layer"), select),
    status,
    list,
  );
}

/** Where no model is attached and nothing was precomputed: what runs concept relevance. */
export function conceptNeedsModel(ctx: PageContext, summary: RunSummary): HTMLElement {
  const where = ctx.api.isStatic ? "a server" : "one attached";
  return h(
    "section",
    { class: "concept-section" },
    h("h2", null, "Concept relevance ", h("span", { class: "sub" }, "which units of a layer carried this decision")),
    notice(`Concept relevance runs LRP through the model, so it needs ${where}: \`${serveCommand(summary, ctx.api.isStatic)}\`. To show it here, precompute it: \`lurker images RUN --explanations top\`${ctx.api.isStatic ? " and export again" : ""}.`),
  );
}

/** In place of the section when the run's model cannot give concept relevance (LRP has no
 * rule for one of its layers, said by `explain/methods` from its trace): why, and what
 * to use instead, rather than a 400 after a ranking request. */
export function conceptUnavailable(reason: string): HTMLElement {
  return h(
    "section",
    { class: "concept-section concept-unavailable" },
    h("h2", null, "Concept relevance ", h("span", { class: "sub" }, "not available for this model")),
    notice(reason.charAt(0).toUpperCase() + reason.slice(1).replace(/\.?$/, ".")),
  );
}

/** Under a precomputed ranking: where it was made, and what the other layers need. */
export function conceptPrecomputedNote(ctx: PageContext, summary: RunSummary, layer: string): HTMLElement {
  return h("p", { class: "muted small static-note" }, withCode(`Precomputed at \`${layer}\` for the top class; other layers run LRP through the model: \`${serveCommand(summary, ctx.api.isStatic)}\`.`));
}

/** The ranking's status line: how many units of which layer, for what target (`target`:
 * its words, a class's name where the page knows it), and what the cards show (`shows`). */
export function conceptLead(r: ConceptRanking, target: string, shows: string): (string | HTMLElement)[] {
  // a card's % is of the units' summed |relevance|, not of the signed total said before it
  // (units that oppose the target count too): name that sum, else 1.93 of 12.2 reads as
  // 15.8%, not the 14.7% the card shows
  const u = r.units.find((x) => x.share !== null && x.share !== 0);
  const shares = u ? ` Each unit's % is its share of the ${r.channels} units' summed |relevance|, ${fmt(Math.abs(u.relevance / (u.share as number)))} (units that oppose the target count too).` : "";
  return [`The ${r.units.length} of ${r.channels} units of `, h("code", null, r.layer), ` with the most relevance (LRP, ${r.composite}) for ${target}; the layer's total relevance is ${fmt(r.total)}.${shares} ${shows}`];
}
