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
  // the kernels are the model's weights: only once the server's model passed its check
  // against the run's (the summary says "checking" until then)
  const summary = await ctx.api.checkedSummary(ctx.run, ctx.signal).catch(() => null);
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
  return `Each kernel's weights as pixels, ${colours}. Every unit shares one scale, symmetric around 0: mid-grey is 0, ±${fmt(f.max_abs)} (the layer's largest |w|) is full intensity.${normalizeText(f.normalize)}`;
}

/** What the run's image normalisation means for reading the kernels, in words: a kernel
 * is what it multiplies the model's input by, so its colours are those of the image as
 * the model is fed it. */
export function normalizeText(normalize: string | null | undefined): string {
  if (!normalize) return "";
  if (normalize === "none")
    return " The model is fed the image's pixels as they are, each from 0 (black) to 1 (white), so a kernel's bright weights add where the image is bright and its dark ones subtract.";
  if (normalize === "raw")
    return " The model is fed the image's raw pixel values, 0 to 255, and scales them itself: a kernel's bright weights still add where the image is bright.";
  return ` The model is fed the image normalised (${normalize}: each channel less its mean, over its spread), so 0 is an average pixel, not black: a kernel's bright weights add where the image is brighter than average, its dark ones where it is darker.`;
}

/** The card of every unit's kernel, each a link to its unit, numbered by unit and in the
 * unit grid's order (see {@link orderFilters}); each kernel is its cell of the server's
 * one grid picture (one request), cropped. */
export function filtersSection(ctx: PageContext, layer: string, f: LayerFilters): HTMLElement {
  const [ch, cw] = f.cell;
  const width = f.gap + f.columns * (cw + f.gap);
  // about 48 px a kernel (a 3x3 one was 16 px wide in a 480 px picture, too small to read)
  const zoom = Math.max(1, Math.round(48 / Math.max(ch, cw)));
  const src = ctx.api.pngUrl(p("runs", ctx.run, "layers", layer, "filters.png"));
  const cells = f.units.map((u) => {
    const y = f.gap + Math.floor(u.unit / f.columns) * (ch + f.gap);
    const x = f.gap + (u.unit % f.columns) * (cw + f.gap);
    return h(
      "a",
      {
        class: "filter-cell",
        href: ctx.href("unit", layer, u.unit),
        "data-unit": u.unit,
        title: `unit ${u.unit}: weights ${fmt(u.min)} .. ${fmt(u.max)}`,
        "aria-label": `unit ${u.unit}`,
      },
      h(
        "span",
        { class: "filter-pic", style: `width:${cw * zoom}px;height:${ch * zoom}px` },
        h("img", { src, alt: "", style: `width:${width * zoom}px;left:${-x * zoom}px;top:${-y * zoom}px` }),
      ),
      h("span", { class: "filter-num" }, String(u.unit)),
    );
  });
  return h(
    "section",
    { class: "card filters", id: "filters" },
    h("h2", null, "Filters ", h("span", { class: "muted small" }, `${f.units.length} kernels ${f.shape[2]}×${f.shape[3]}, ${f.colour === "rgb" ? "RGB" : "grey"}, read from the input image`)),
    h("p", { class: "muted small" }, scaleText(f), " Each kernel is numbered by its unit; click one to open its unit. ", h("span", { id: "filters-order" }, "In unit order.")),
    h("div", { class: "filter-grid" }, ...cells),
  );
}

/** Puts the filters card's kernels in `units`' order (the unit grid's sort), and says
 * which order that is (`sort`: the grid's sort key). */
export function orderFilters(section: HTMLElement, units: number[], sort: string): void {
  const grid = section.querySelector(".filter-grid");
  if (!grid) return;
  const byUnit = new Map([...grid.querySelectorAll<HTMLElement>(".filter-cell")].map((c) => [Number(c.dataset.unit), c]));
  for (const u of units) {
    const cell = byUnit.get(u);
    if (cell) grid.append(cell);
  }
  const said = section.querySelector("#filters-order");
  if (said) said.textContent = sort === "index" ? "In unit order, as the grid below." : `In the grid's order below: by ${sort}, highest first.`;
  (grid as HTMLElement).dataset.order = sort;
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
