/**
 * Whether a run can show its images. A run probed from Python records neither its
 * dataset nor its model; unless some images were cached, every image request would 404,
 * so the pages show why (and how to fix it) instead of a grid of broken images.
 */
import { p, type RunSummary } from "./api";
import type { PageContext } from "./context";
import { h, notice } from "./dom";

export interface ImageState {
  /** Image requests can succeed: the dataset loads, or some images are cached/exported. */
  ok: boolean;
  /** A notice saying why there are no images and what to do; null when `ok`. */
  notice: HTMLElement | null;
}

export async function imageState(ctx: PageContext): Promise<ImageState> {
  const s = await ctx.api.json<RunSummary>(p("runs", ctx.run));
  const ok = ctx.api.isStatic || s.holds.dataset !== false || s.holds.cached_images > 0;
  if (ok) return { ok, notice: null };
  const why = (s.holds.dataset_reason ?? "the run's dataset cannot be loaded").replace(/\.+$/, "");
  return { ok, notice: notice(`No images to show: ${why}.`) };
}

/** The grey tile drawn where an image is missing. */
export function noImage(text = "no image"): HTMLElement {
  return h("div", { class: "no-img" }, text);
}
