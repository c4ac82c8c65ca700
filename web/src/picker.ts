/**
 * The image chooser of the pages that run the model on one image (Live, Explain): upload
 * an image file (the server answers with its content id) or name a dataset sample
 * (`sample-N`, no upload). One module so both pages take images the same way.
 */
import { p, serveCommand, type LiveImage, type RunSummary } from "./api";
import type { PageContext } from "./context";
import { fill, h, notice, withCode } from "./dom";

export interface PickerOptions {
  /** Prefix of the controls' ids: `PREFIX-file`, `PREFIX-sample`, `PREFIX-use-sample`. */
  id: string;
  /** The card's heading. */
  title: string;
  /** The sample button's text. */
  action: string;
  /** The image shown now (`sample-N` preselects N). */
  current?: string | null;
  /** Only these dataset samples, from a list, and no upload (the precomputed ones of a
   * static export or a server without the model, each with a note such as its top class). */
  only?: { sample: number; note: string }[];
}

/** A card with the upload button and the sample chooser; `choose(id)` gets the image id. */
export function imagePicker(ctx: PageContext, summary: RunSummary, opts: PickerOptions, choose: (id: string) => void): HTMLElement {
  const status = h("div", { class: "status-line", role: "status" });
  if (opts.only) {
    const select = h(
      "select",
      { id: `${opts.id}-sample`, "aria-label": "dataset sample" },
      opts.only.map((o) => h("option", { value: o.sample, selected: opts.current === `sample-${o.sample}` }, `sample ${o.sample} · ${o.note}`)),
    );
    return h(
      "section",
      { class: "card live-input" },
      h("h3", null, opts.title),
      h("div", { class: "row" }, h("span", null, "dataset sample"), select, h("button", { type: "button", id: `${opts.id}-use-sample`, onclick: () => choose(`sample-${select.value}`) }, opts.action)),
      h("p", { class: "muted small" }, withCode(`The ${opts.only.length} samples whose explanations are precomputed. Other images (and uploads) run the model: \`${serveCommand(summary, ctx.api.isStatic)}\`.`)),
    );
  }
  const file = h("input", { type: "file", accept: "image/*", id: `${opts.id}-file`, class: "visually-hidden", "aria-label": "upload an image" });
  file.addEventListener("change", async () => {
    const f = file.files?.[0];
    if (!f) return;
    fill(status, "Uploading…");
    try {
      const res = await ctx.api.upload<LiveImage>(p("runs", ctx.run, "live", "images"), f, f.name);
      choose(res.image);
    } catch (err) {
      fill(status, notice((err as Error).message, "error"));
    }
  });
  const last = Math.max(0, summary.dataset.size - 1);
  const now = /^sample-(\d+)$/.exec(opts.current ?? "");
  const sampleInput = h("input", { type: "number", min: 0, max: last, value: now ? Number(now[1]) : 0, id: `${opts.id}-sample`, "aria-label": "dataset sample id" });
  const useSample = () => {
    const n = Math.floor(Number(sampleInput.value));
    if (!Number.isFinite(n) || n < 0 || n > last) {
      fill(status, notice(`No sample ${sampleInput.value}: the dataset has samples 0 to ${last}.`, "error"));
      return;
    }
    choose(`sample-${n}`);
  };
  sampleInput.addEventListener("keydown", (e) => {
    if ((e as KeyboardEvent).key === "Enter") useSample();
  });
  return h(
    "section",
    { class: "card live-input" },
    h("h3", null, opts.title),
    h("div", { class: "row" }, h("label", { class: "button", for: `${opts.id}-file` }, "Upload an image…"), file),
    h("div", { class: "row" }, h("span", null, "or dataset sample"), sampleInput, h("button", { type: "button", id: `${opts.id}-use-sample`, onclick: useSample }, opts.action)),
    status,
  );
}
