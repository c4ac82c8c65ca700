/** A first convolution's kernels as pictures: the layer page's grid and the unit page's
 * kernel. A served run with its model has them (the server draws them from the weights),
 * and a static export made with the run's recorded model (it wrote them then); any other
 * page, or a layer that does not read the input image, shows nothing. */
import { p, type LayerFilters } from "./api";
import type { PageContext } from "./context";
import { fmt, h } from "./dom";

/** The layer's filters document, or null where there is none to show: a run served
 * without its model, a static export that holds none of the layer (its units' index says:
 * no request for a file it lacks), a layer the server refuses (not a 1- or 3-channel
 * conv2d reading the input image; its 404 says why). */
export async function layerFilters(ctx: PageContext, layer: string): Promise<LayerFilters | null> {
  if (ctx.api.isStatic) {
    const index = await ctx.api.unitsIndex(ctx.run, layer).catch(() => null);
    if (!index?.filters) return null;
    return ctx.api.json<LayerFilters>(p("runs", ctx.run, "layers", layer, "filters")).catch(() => null);
  }
  const summary = await ctx.api.summary(ctx.run).catch(() => null);
  if (!summary?.holds.live) return null;
  // which layers have filters: one document per run, so no other layer's page asks (a 404)
  const listed = await ctx.api.json<{ layers: string[] }>(p("runs", ctx.run, "filters")).catch(() => null);
  if (!listed?.layers.includes(layer)) return null;
  return ctx.api.json<LayerFilters>(p("runs", ctx.run, "layers", layer, "filters")).catch(() => null);
}

/** `url` with `query` added (after the run's `?v=` token where {@link Api.pngUrl} put one). */
function withQuery(url: string, query: string): string {
  return url + (url.includes("?") ? "&" : "?") + query;
}

function scaleText(f: LayerFilters): string {
  const colours = f.colour === "rgb" ? "the kernel's input channels 0, 1, 2 drawn as red, green, blue" : "grey: one input channel";
  const norm = f.normalize ? `; the run's images were normalised as ${f.normalize === "none" ? "none (pixels in [0, 1])" : f.normalize}` : "";
  return `Each kernel's weights as pixels, ${colours}. Every unit shares one scale, symmetric around 0: mid-grey is 0, ±${fmt(f.max_abs)} (the layer's largest |w|) is full intensity${norm}.`;
}

/** The grid of every unit's kernel, each cell a link to its unit. */
export function filtersSection(ctx: PageContext, layer: string, f: LayerFilters): HTMLElement {
  const [ch, cw] = f.cell;
  const width = f.gap + f.columns * (cw + f.gap);
  const height = f.gap + f.rows * (ch + f.gap);
  const zoom = Math.max(1, Math.floor(480 / Math.max(width, height)));
  const pct = (v: number, of: number) => `${((100 * v) / of).toFixed(4)}%`;
  const cells = f.units.map((u) => {
    const y = f.gap + Math.floor(u.unit / f.columns) * (ch + f.gap);
    const x = f.gap + (u.unit % f.columns) * (cw + f.gap);
    return h("a", {
      class: "filter-cell",
      href: ctx.href("unit", layer, u.unit),
      "data-unit": u.unit,
      title: `unit ${u.unit}: weights ${fmt(u.min)} .. ${fmt(u.max)}`,
      "aria-label": `unit ${u.unit}`,
      style: `left:${pct(x, width)};top:${pct(y, height)};width:${pct(cw, width)};height:${pct(ch, height)}`,
    });
  });
  const img = h("img", {
    src: ctx.api.pngUrl(p("runs", ctx.run, "layers", layer, "filters.png")),
    alt: `the ${f.units.length} kernels of ${layer}`,
    width: width * zoom,
    height: height * zoom,
  });
  return h(
    "section",
    { class: "card filters", id: "filters" },
    h("h2", null, "Filters ", h("span", { class: "muted small" }, `${f.units.length} kernels ${f.shape[2]}×${f.shape[3]}, ${f.colour === "rgb" ? "RGB" : "grey"}, read from the input image`)),
    h("p", { class: "muted small" }, scaleText(f), " Click a kernel to open its unit."),
    h("div", { class: "filter-grid" }, img, ...cells),
  );
}

/** One unit's kernel, enlarged (nearest neighbour), with its range. */
export function unitFilter(ctx: PageContext, layer: string, unit: number, f: LayerFilters): HTMLElement | null {
  const u = f.units[unit];
  if (!u) return null;
  // the static export writes each kernel at this scale only (routes/filters.py unit_scale);
  // at most 64, the largest the server serves (a 1x1 kernel would ask 112)
  const scale = Math.min(64, Math.max(1, Math.ceil(112 / Math.max(f.shape[2], f.shape[3]))));
  const path = p("runs", ctx.run, "layers", layer, "units", unit, "filter.png");
  // a static file takes no query: the export names it by the query too, as pngUrl maps it
  const src = ctx.api.isStatic ? ctx.api.pngUrl(`${path}?scale=${scale}`) : withQuery(ctx.api.pngUrl(path), `scale=${scale}`);
  return h(
    "figure",
    { class: "card unit-filter", id: "unit-filter" },
    h("img", {
      src,
      alt: `unit ${unit}'s kernel`,
      width: f.shape[3] * scale,
      height: f.shape[2] * scale,
    }),
    h(
      "figcaption",
      { class: "small" },
      h("b", null, "Kernel "),
      `${f.shape[2]}×${f.shape[3]} ${f.colour === "rgb" ? "RGB" : "grey"}; weights ${fmt(u.min)} .. ${fmt(u.max)}`,
      u.nonfinite ? `, ${u.nonfinite} not finite (magenta)` : "",
      h("br"),
      h("span", { class: "muted" }, `mid-grey is 0; ±${fmt(f.max_abs)}, the layer's largest |w|, is full intensity (one scale for all units)`),
    ),
  );
}
