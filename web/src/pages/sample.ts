/** `#/r/RUN/sample/ID`: one dataset image, its label, the prediction, the units that rank it. */
import { p, type SampleDoc } from "../api";
import type { PageContext } from "../context";
import { append, facts, fmt, h, notice } from "../dom";
import { imageState } from "../images";

export async function renderSample(root: HTMLElement, ctx: PageContext, args: string[]): Promise<void> {
  const id = args[0];
  const [doc, images] = await Promise.all([ctx.api.json<SampleDoc>(p("runs", ctx.run, "samples", id)), imageState(ctx)]);
  const s = doc.sample;
  document.title = `sample ${s.id} · ${ctx.run} · lurker`;
  const byLayer = new Map<string, SampleDoc["appearances"]>();
  for (const a of doc.appearances) byLayer.set(a.layer, [...(byLayer.get(a.layer) ?? []), a]);
  const pred = doc.prediction;
  append(root, 
    h("h1", null, `Sample ${s.id}`, s.class_name ? h("span", { class: "sub" }, ` · class ${s.class_name}`) : null),
    h(
      "div",
      { class: "sample-head" },
      images.ok
        ? h("img", { class: "sample-img pixelated", src: ctx.api.pngUrl(p("runs", ctx.run, "samples", s.id, "image.png")), alt: `sample ${s.id}`, width: 224, height: 224 })
        : h("div", { class: "sample-img" }, images.notice),
      h(
        "section",
        { class: "card" },
        facts([
          ["label", s.label === null ? "unlabelled" : `${s.class_name ?? ""} (${s.label})`],
          ["file", s.path ? h("code", null, s.path) : "–"],
          [
            "prediction",
            pred
              ? h("ol", { class: "preds" }, pred.map((q) => h("li", { class: q.class === s.label ? "match" : null }, `${q.name ?? q.class} `, h("span", { class: "muted" }, `${(100 * q.prob).toFixed(1)}%`))))
              : "no model attached (lurker serve RUN --model SPEC)",
          ],
          ["in top-k of", `${doc.appearances.length} unit list${doc.appearances.length === 1 ? "" : "s"} in ${byLayer.size} layer${byLayer.size === 1 ? "" : "s"}`],
        ]),
        h(
          "p",
          { class: "entry-links" },
          h("a", { class: "button", href: ctx.href("live") + "?image=sample-" + s.id }, "Open in live view"),
          pred ? h("a", { class: "button", id: "explain-this", href: ctx.href("explain") + "?image=sample-" + s.id }, "Explain this image") : null,
        ),
      ),
    ),
    h("h2", null, "Units that rank it in their top-k"),
    doc.appearances.length
      ? [...byLayer].map(([layer, rows]) =>
          h(
            "section",
            { class: "appear" },
            h("h3", null, h("a", { href: ctx.href("layer", layer) }, layer), h("span", { class: "muted" }, ` ${rows.length}`)),
            h(
              "div",
              { class: "chips" },
              rows
                .sort((a, b) => a.unit - b.unit || a.list.localeCompare(b.list))
                .map((a) =>
                  h(
                    "a",
                    { class: "chip", href: ctx.href("unit", layer, a.unit) + `?tab=${a.list}`, "data-unit": a.unit, "data-list": a.list, title: `${a.list} list, rank ${a.rank + 1}, value ${fmt(a.value)}` },
                    `unit ${a.unit}`,
                    h("small", null, ` ${a.list} #${a.rank + 1}`),
                  ),
                ),
            ),
          ),
        )
      : notice("No unit ranks this sample in its top-k."),
  );
}
