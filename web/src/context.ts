/** What every page renderer gets from the router. */
import type { Api } from "./api";

export interface PageContext {
  /** The run id (the run folder's name), as in the URL. */
  run: string;
  /** The route's query (the part after `?` in the hash), e.g. `focus`, `sort`, `tab`. */
  params: URLSearchParams;
  /** The JSON/PNG client; maps paths to /api or to the static export's data/ files. */
  api: Api;
  /** Go to another view: `hash` like `#/r/RUN/layer/L` (pushes a history entry). */
  navigate(hash: string): void;
  /** Replace the current URL's query without a new history entry or a re-render. */
  replaceParams(params: URLSearchParams): void;
  /** Hash for a view of this run: `href("layer", name)` -> `#/r/RUN/layer/NAME`. */
  href(...segments: (string | number)[]): string;
  /**
   * Whether the run was probed again since this page was drawn (the bar says so). A
   * control that only swaps image URLs must then call {@link redraw} instead: the image
   * token is the new run's, the values and ranks on the page the earlier run's.
   */
  stale(): boolean;
  /** Draw the page again from the run as it is now (the URL's query kept). */
  redraw(): void;
  /** Set when the route is left; long work and listeners should stop when it fires. */
  signal: AbortSignal;
}
