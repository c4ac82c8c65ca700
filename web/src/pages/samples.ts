/** `#/r/RUN/samples?offset=N`: the dataset, a page of thumbnails at a time. */
import { p, type SampleList } from "../api";
import type { PageContext } from "../context";
import { append, h, notice } from "../dom";
import { imageState, noImage } from "../images";

const LIMIT = 100;

export async function renderSamples(root: HTMLElement, ctx: PageContext): Promise<void> {
  const offset = Math.max(0, Math.floor(Number(ctx.params.get("offset") ?? 0)) || 0);
  const [list, images] = await Promise.all([ctx.api.json<SampleList>(p("runs", ctx.run, "samples") + `?offset=${offset}&limit=${LIMIT}`), imageState(ctx)]);
  document.title = `samples · ${ctx.run} · lurker`;
  const pager = () =>
    h(
      "div",
      { class: "pager" },
      h("a", { class: "button", href: offset > 0 ? ctx.href("samples") + `?offset=${Math.max(0, offset - LIMIT)}` : null, "aria-disabled": String(offset <= 0) }, "← previous"),
      h("span", null, `${offset + 1}–${Math.min(offset + LIMIT, list.total)} of ${list.total}`),
      h("a", { class: "button", href: offset + LIMIT < list.total ? ctx.href("samples") + `?offset=${offset + LIMIT}` : null, "aria-disabled": String(offset + LIMIT >= list.total) }, "next →"),
    );
  append(root, 
    h("h1", null, "Samples", h("span", { class: "sub" }, ` ${list.total}`)),
    ctx.api.isStatic ? notice("This static export holds the images of the samples that some unit ranks in its top-k; the other samples have no image here.") : null,
    images.notice,
    pager(),
    h(
      "div",
      { class: "sample-grid" },
      list.samples.map((s) =>
        h(
          "a",
          { class: "sample-card", href: ctx.href("sample", s.id), "data-sample": s.id },
          images.ok
            ? h("img", {
                src: ctx.api.pngUrl(p("runs", ctx.run, "samples", s.id, "image.png")),
                loading: "lazy",
                alt: `sample ${s.id}`,
                width: 80,
                height: 80,
                onerror: (e: Event) => (e.target as HTMLElement).replaceWith(noImage(ctx.api.isStatic ? "not exported" : "no image")),
              })
            : noImage(),
          h("span", null, `#${s.id}`),
          h("small", { title: s.class_name ?? "" }, s.class_name ?? ""),
        ),
      ),
    ),
    pager(),
  );
}
