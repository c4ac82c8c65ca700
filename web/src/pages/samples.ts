/** `#/r/RUN/samples?offset=N`: the dataset, a page of thumbnails at a time. */
import { p, type SampleBrief, type SampleList } from "../api";
import type { PageContext } from "../context";
import { append, h, notice, withId } from "../dom";
import { imageState, noImage } from "../images";
import { classLabel, classText } from "../classes";

const LIMIT = 100;

export async function renderSamples(root: HTMLElement, ctx: PageContext): Promise<void> {
  const offset = Math.max(0, Math.floor(Number(ctx.params.get("offset") ?? 0)) || 0);
  // a static export holds the samples some unit ranks in its top-k: list those only
  const [exported, images] = await Promise.all([ctx.api.isStatic ? ctx.api.exportedSamples(ctx.run) : null, imageState(ctx)]);
  const list: { total: number; samples: (SampleBrief & { image?: boolean })[] } = exported
    ? { total: exported.samples.length, samples: exported.samples.slice(offset, offset + LIMIT) }
    : await ctx.api.json<SampleList>(p("runs", ctx.run, "samples") + `?offset=${offset}&limit=${LIMIT}`);
  document.title = `samples · ${ctx.run} · lurker`;
  // an offset past the end (an old link, a hand-edited URL): previous goes to the last page
  const last = Math.max(0, Math.floor((list.total - 1) / LIMIT) * LIMIT);
  const past = offset > 0 && offset >= list.total;
  const pager = () =>
    h(
      "div",
      { class: "pager" },
      h("a", { class: "button", href: offset > 0 ? ctx.href("samples") + `?offset=${Math.max(0, Math.min(offset - LIMIT, last))}` : null, "aria-disabled": String(offset <= 0) }, "← previous"),
      h("span", null, past ? `none of ${list.total}` : `${offset + 1}–${Math.min(offset + LIMIT, list.total)} of ${list.total}`),
      h("a", { class: "button", href: offset + LIMIT < list.total ? ctx.href("samples") + `?offset=${offset + LIMIT}` : null, "aria-disabled": String(offset + LIMIT >= list.total) }, "next →"),
    );
  append(root, 
    h("h1", null, "Samples", h("span", { class: "sub" }, ` ${list.total}`)),
    exported
      ? notice(
          `This static export holds the ${exported.samples.length} samples that some unit ranks in its top-k, of the run's ${exported.total}; ` +
            "the others are not here: serve the run (`lurker serve RUN`) to browse them all.",
        )
      : null,
    exported?.no_image ? withId(notice(`${exported.samples.filter((x) => !x.image).length} of them have no image here: ${exported.no_image.replace(/\.+$/, "")}.`), "no-image-why") : null,
    images.notice,
    past
      ? h(
          "div",
          { class: "notice", id: "past-the-end" },
          `There ${list.total === 1 ? "is 1 sample" : `are ${list.total} samples`}: none from ${offset + 1} on. `,
          h("a", { href: ctx.href("samples") + (last ? `?offset=${last}` : "") }, "Go to the last page"),
          ".",
        )
      : null,
    pager(),
    list.samples.length ? sampleKey(list.samples) : null,
    h(
      "div",
      { class: "sample-grid" },
      list.samples.map((s) =>
        h(
          "a",
          { class: "sample-card", href: ctx.href("sample", s.id), "data-sample": s.id },
          images.ok && s.image !== false
            ? h("img", {
                src: ctx.api.pngUrl(p("runs", ctx.run, "samples", s.id, "image.png")),
                loading: "lazy",
                alt: `sample ${s.id}`,
                width: 80,
                height: 80,
                onerror: (e: Event) => (e.target as HTMLElement).replaceWith(noImage()),
              })
            : noImage(s.image === false ? "image not exported" : "no image"),
          h("span", null, `#${s.id}`),
          // misclassified (the run's recorded top class is not the label): "label → predicted",
          // as the Map page's selection shows it and the sample's page says it
          s.pred !== null && s.pred !== undefined && s.label !== null && s.pred !== s.label
            ? h("small", { class: "error-text misclassified", title: `misclassified: predicted ${classLabel(s.pred_name, s.pred)}` }, `${classLabel(s.class_name, s.label)} → ${classLabel(s.pred_name, s.pred)}`)
            : h("small", { title: s.class_name ? classText(s.class_name, s.label) : "" }, s.class_name ? classLabel(s.class_name, s.label) : ""),
        ),
      ),
    ),
    pager(),
  );
}

/** What the two lines under each image are; where the run records the model's predictions,
 * what a red "2 → 8" means and how many this page has. */
function sampleKey(samples: { label: number | null; pred?: number | null }[]): HTMLElement {
  const known = samples.some((s) => s.pred !== null && s.pred !== undefined);
  const wrong = samples.filter((s) => s.pred !== null && s.pred !== undefined && s.label !== null && s.pred !== s.label).length;
  return h(
    "p",
    { class: "muted small", id: "samples-key" },
    "Under each image: the sample's index in the dataset (#) and its class",
    known
      ? [": in red, true class → the model's prediction where the model gets it wrong (", h("strong", { class: "error-text" }, String(wrong)), ` on this page). Click an image for the sample's page.`]
      : ". Click an image for the sample's page.",
  );
}
