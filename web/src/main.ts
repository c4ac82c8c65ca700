/**
 * The explorer's router: hash routes (`#/r/RUN/layer/LAYER?sort=max`), so every view has a
 * URL, back/forward work, and a static export needs no server rewrites. Pages load lazily
 * (dynamic imports) so first paint needs only this module and the run's manifest.
 */
import "./style.css";
import { Api, ApiError, type RunChange, type RunChanges, type RunSummary } from "./api";
import type { PageContext } from "./context";
import { fill, h, notice } from "./dom";

type Page = (root: HTMLElement, ctx: PageContext, args: string[]) => Promise<void> | void;

const pages: Record<string, () => Promise<Page>> = {
  home: () => import("./pages/home").then((m) => m.renderHome),
  layer: () => import("./pages/layer").then((m) => m.renderLayer),
  unit: () => import("./pages/unit").then((m) => m.renderUnit),
  sample: () => import("./pages/sample").then((m) => m.renderSample),
  samples: () => import("./pages/samples").then((m) => m.renderSamples),
  map: () => import("./pages/map").then((m) => m.renderMap),
  live: () => import("./pages/live").then((m) => m.renderLive),
  explain: () => import("./pages/explain").then((m) => m.renderExplain),
  graph: () => import("./graph/page").then((m) => m.renderGraphPage as Page),
};

const api = new Api();
const topbar = h("header", { class: "topbar" });
const crumbs = h("nav", { class: "crumbs", "aria-label": "breadcrumbs" });
const main = h("main", { id: "page" });
/** Says when the run shown was probed again since the tab read it (see `watchRun`). */
const changedBar = h("div", { class: "run-changed", role: "status", hidden: true });
let current: AbortController | null = null;
/** The page on screen shows the run as it was before it was probed again. */
let pageStale = false;
/** The run of the route shown (null on the runs page). */
let shownRun: string | null = null;

document.body.append(topbar, changedBar, crumbs, main);

/** How often an open page asks whether its run changed (one tiny request; only while
 * the tab is visible, and at once when it becomes visible again). */
const RUN_POLL_MS = 10_000;

/** What each page shows of what a command adds to a run (a re-probe touches them all). */
const SHOWS: Record<string, RunChange[]> = {
  home: ["featviz", "map"],
  layer: ["featviz", "vocab"],
  unit: ["featviz", "vocab"],
  map: ["map"],
  samples: ["map"],
  sample: ["map", "vocab"],
};

/** The changes of `changes` that a page of `kind` (its route args `args`) shows. */
function shownBy(kind: string, args: string[], changes: RunChanges): RunChange[] {
  // a layer's and its units' pages show that layer's feature visualizations alone
  const layer = kind === "layer" || kind === "unit" ? args[0] : undefined;
  const mine = (c: RunChange) =>
    c !== "featviz" || layer === undefined || changes.featvizLayers === null || changes.featvizLayers.includes(layer);
  return changes.kinds.filter((c) => c === "probe" || ((SHOWS[kind] ?? []).includes(c) && mine(c)));
}

/** The page kind shown (its route's third segment), and the segments after it. */
let shownKind = "";
let shownArgs: string[] = [];

/**
 * The run changed while a page of it is open: probed again (`lurker probe --overwrite`,
 * or a resumed probe finishing), or given what the page shows by `lurker featviz` or
 * `lurker map`. `stale` says the page on screen shows the earlier run (or lacks what was
 * added), with a button that draws it again from the run as it is now (never done
 * unasked: a live view's upload would be lost); `fresh` says the page just drawn shows
 * the new run (pages seen before showed the earlier one): said of a probe only, since a
 * page drawn after an addition simply shows it.
 */
function showRunChanged(run: string, state: "stale" | "fresh", changes: RunChange[]): void {
  const probe = changes.includes("probe");
  if (state === "fresh" && !probe) {
    changedBar.hidden = true;
    pageStale = false;
    return;
  }
  changedBar.hidden = false;
  changedBar.dataset.state = state;
  changedBar.dataset.change = probe ? "probe" : changes.join(" ");
  pageStale = state === "stale";
  const dismiss = h("button", { type: "button", class: "link", onclick: () => (changedBar.hidden = true) }, "dismiss");
  const added = [changes.includes("featviz") ? "new feature visualizations (lurker featviz)" : "", changes.includes("map") ? "a new dataset map (lurker map)" : "", changes.includes("vocab") ? "a new vocabulary (probe(..., vocab=...))" : ""]
    .filter(Boolean)
    .join(" and ");
  if (state === "stale" && !probe)
    fill(
      changedBar,
      h("strong", null, `Run ${run} was given ${added}`),
      " since this page was drawn: what it shows is the run as it was before. ",
      h("button", { type: "button", class: "reload-run", onclick: () => void render() }, "Show the new results"),
    );
  else if (state === "stale")
    fill(
      changedBar,
      h("strong", null, `Run ${run} was probed again`),
      " since this page was drawn: what it shows is the earlier run. ",
      h("button", { type: "button", class: "reload-run", onclick: () => void render() }, "Show the new run"),
    );
  else
    fill(
      changedBar,
      h("strong", null, `Run ${run} was probed again`),
      " since this tab first read it: this page shows the new run (pages seen before showed the earlier one). ",
      dismiss,
    );
}

/** Navigations begun so far, and how many are asking whether their run changed: the
 * answer is theirs to give (the page they draw is the new run's: "fresh"), never a
 * poll's ("stale" over a page just drawn from the new run). */
let renders = 0;
let renderChecks = 0;

async function watchRun(): Promise<void> {
  const run = shownRun;
  if (run === null || document.visibilityState !== "visible" || renderChecks > 0) return;
  const seen = renders;
  const [kind, args] = [shownKind, shownArgs];
  const changes = shownBy(kind, args, await api.runChanges(run));
  if (changes.length && run === shownRun && renders === seen) showRunChanged(run, "stale", changes);
}

if (!api.isStatic) {
  setInterval(() => void watchRun(), RUN_POLL_MS);
  document.addEventListener("visibilitychange", () => void watchRun());
}

// Back and forward return to where a page was scrolled (a layer's grid of hundreds of
// units): each history entry gets a key in its state, and its scroll position is kept
// under that key. The browser's own restoration cannot do it: a page renders after its
// data arrives, into a view that is short until then.
history.scrollRestoration = "manual";
const scrolls = new Map<string, number>();
let entryKey = "";
let entries = 0;
window.addEventListener("scroll", () => entryKey && scrolls.set(entryKey, window.scrollY), { passive: true });

/** The current history entry's key (given one when new), and its scroll position when
 * it was shown before (back, forward), else undefined. */
function enterEntry(): number | undefined {
  const state: unknown = history.state;
  const known = state !== null && typeof state === "object" && typeof (state as { key?: unknown }).key === "string";
  entryKey = known ? (state as { key: string }).key : `${Date.now().toString(36)}-${++entries}`;
  if (!known) history.replaceState({ ...(state !== null && typeof state === "object" ? state : {}), key: entryKey }, "");
  return scrolls.get(entryKey);
}

/** `#/r/RUN/unit/L/3?tab=max` -> {path: ["r", "RUN", "unit", "L", "3"], params}. */
export function parseHash(hash: string): { path: string[]; params: URLSearchParams } {
  const raw = hash.replace(/^#\/?/, "");
  const q = raw.indexOf("?");
  const pathPart = q >= 0 ? raw.slice(0, q) : raw;
  const params = new URLSearchParams(q >= 0 ? raw.slice(q + 1) : "");
  const path = pathPart
    .split("/")
    .filter((s) => s.length)
    .map((s) => {
      try {
        return decodeURIComponent(s);
      } catch {
        return s;
      }
    });
  return { path, params };
}

export function runHref(run: string, ...segments: (string | number)[]): string {
  return "#/" + ["r", run, ...segments].map((s) => encodeURIComponent(String(s))).join("/");
}

function navigate(hash: string): void {
  if (location.hash === hash) void render();
  else location.hash = hash;
}

function renderTopbar(run: string | null, active: string, summary: RunSummary | null): void {
  const link = (name: string, label: string, seg: string[]) =>
    h("a", { href: runHref(run!, ...seg), class: active === name ? "active" : null }, label);
  fill(
    topbar,
    h("a", { class: "brand", href: "#/" }, "lurker"),
    run
      ? [
          h("span", { class: "run-name", title: summary?.model.spec ?? run }, run, summary?.model.name ? h("small", null, " · " + summary.model.name) : null),
          h(
            "nav",
            { class: "main-nav" },
            h("a", { href: runHref(run!), class: active === "home" && !location.hash.includes("show=layers") ? "active" : null }, "Home"),
            link("graph", "Graph", ["graph"]),
            h(
              "a",
              { href: runHref(run) + "?show=layers", class: active === "layer" || active === "unit" || (active === "home" && location.hash.includes("show=layers")) ? "active" : null },
              "Layers",
            ),
            link("samples", "Samples", ["samples"]),
            link("map", "Map", ["map"]),
            link("live", "Live", ["live"]),
            link("explain", "Explain", ["explain"]),
          ),
        ]
      : h("span", { class: "run-name" }, "runs"),
  );
}

function renderCrumbs(run: string | null, kind: string, args: string[]): void {
  const items: (HTMLElement | string)[] = [h("a", { href: "#/" }, "runs")];
  if (run) items.push(kind === "home" ? run : h("a", { href: runHref(run) }, run));
  if (run && kind === "layer") items.push("layer " + args[0]);
  if (run && kind === "unit") items.push(h("a", { href: runHref(run, "layer", args[0]) }, "layer " + args[0]), "unit " + args[1]);
  if (run && kind === "samples") items.push("samples");
  if (run && kind === "sample") items.push(h("a", { href: runHref(run, "samples") }, "samples"), "sample " + args[0]);
  if (run && (kind === "live" || kind === "graph" || kind === "explain" || kind === "map")) items.push(kind);
  fill(
    crumbs,
    items.flatMap((it, i) => (i ? [h("span", { class: "sep", "aria-hidden": "true" }, "›"), it] : [it])),
  );
}

/**
 * Draw the page of the current URL. Whether the run changed since the tab read it is
 * asked beside the page's own requests, not before them (a round trip on every click):
 * when the answer is a change the page shows (a re-probe; an addition it shows), what the
 * page drew may be the earlier run's, from documents held since, so it is drawn again,
 * from the run as it is now, before anything else (`checked`: that answer, for the redraw,
 * which needs no second check). A page the reader may already have worked in (a live
 * upload, an explanation) is not drawn again unasked: its bar says it is stale instead.
 */
async function render(checked?: RunChange[]): Promise<void> {
  current?.abort();
  const ctl = new AbortController();
  current = ctl;
  renders++;
  pageStale = false;
  const { path, params } = parseHash(location.hash);
  const scrolled = enterEntry();
  window.scrollTo(0, 0);
  const restore = () => {
    if (scrolled !== undefined && !ctl.signal.aborted) restoreScroll(scrolled, ctl.signal);
  };
  // Each navigation renders into a fresh view, swapped into <main> at once: a page of an
  // earlier navigation whose data arrives late writes into its own, detached view and can
  // never add itself to this one.
  const view = h("div", { class: "view" }, h("p", { class: "loading" }, "Loading…"));
  main.replaceChildren(view);
  if (path[0] !== "r" || !path[1]) {
    shownRun = null;
    shownKind = "";
    changedBar.hidden = true;
    renderTopbar(null, "", null);
    renderCrumbs(null, "", []);
    const { renderRuns } = await import("./pages/runs");
    if (ctl.signal.aborted) return;
    view.replaceChildren();
    await guard(view, () => renderRuns(view, api, ctl.signal));
    restore();
    return;
  }
  const run = path[1];
  const kind = path[2] ?? "home";
  const args = path.slice(3);
  if (shownRun !== run) changedBar.hidden = true;
  shownRun = run;
  shownKind = kind;
  shownArgs = args;
  renderCrumbs(run, kind, args);
  renderTopbar(run, kind, null);
  // the bar of a stale page: this one is drawn from the run as it is now
  if (!changedBar.hidden && changedBar.dataset.state === "stale")
    showRunChanged(run, "fresh", (changedBar.dataset.change ?? "").split(" ") as RunChange[]);
  let drawn = false;
  if (checked !== undefined) {
    if (checked.includes("probe")) showRunChanged(run, "fresh", checked);
  } else {
    // a run changed since the tab read it: its cached documents (and image token) are
    // dropped by the check, and the page drawn meanwhile is drawn again from the new run
    renderChecks++;
    void api
      .runChanges(run)
      .finally(() => renderChecks--)
      .then((all) => {
        const changes = shownBy(kind, args, all);
        if (ctl.signal.aborted || !changes.length) return;
        if (drawn && (kind === "live" || kind === "explain")) showRunChanged(run, "stale", changes);
        else void render(changes);
      });
  }
  api
    .summary(run)
    .then((s) => !ctl.signal.aborted && renderTopbar(run, kind, s))
    .catch(() => undefined);
  const loader = pages[kind];
  if (!loader) {
    fill(view, notice(`No page '${kind}'. Pages: ${Object.keys(pages).join(", ")}.`, "error"));
    return;
  }
  const ctx: PageContext = {
    run,
    params,
    api,
    navigate,
    stale: () => pageStale && !ctl.signal.aborted,
    redraw: () => void render(),
    signal: ctl.signal,
    href: (...segments) => runHref(run, ...segments),
    replaceParams(next) {
      const base = location.hash.split("?")[0];
      const q = next.toString();
      history.replaceState(history.state, "", base + (q ? "?" + q : ""));
    },
  };
  main.className = "page-" + kind;
  const page = await loader();
  if (ctl.signal.aborted) return;
  view.replaceChildren();
  await guard(view, () => page(view, ctx, args));
  drawn = true;
  restore();
  prefetch();
}

/** Scroll back to `y`, also when the page is still shorter than that: a page that builds
 * its content in slices (a layer's grid of thousands of units, a second or two on a slow
 * machine) grows after it renders, so the scroll is retried as it grows, until it lands,
 * the reader scrolls or navigates, or ten seconds pass. */
function restoreScroll(y: number, signal: AbortSignal): void {
  window.scrollTo(0, y);
  if (Math.abs(window.scrollY - y) < 2 || typeof ResizeObserver === "undefined") return;
  const stop = () => {
    grow.disconnect();
    for (const e of ["wheel", "touchstart", "keydown", "mousedown"]) window.removeEventListener(e, stop);
    clearTimeout(timer);
  };
  const grow = new ResizeObserver(() => {
    if (signal.aborted) return stop();
    window.scrollTo(0, y);
    if (Math.abs(window.scrollY - y) < 2) stop();
  });
  grow.observe(main);
  for (const e of ["wheel", "touchstart", "keydown", "mousedown"]) window.addEventListener(e, stop, { passive: true });
  const timer = setTimeout(stop, 10_000);
}

let prefetched = false;
/** After the first page is up, fetch the layer and unit pages' code (a few KB) so that a
 * click into a unit costs one JSON request and its images, nothing else. */
function prefetch(): void {
  if (prefetched) return;
  prefetched = true;
  const idle = window.requestIdleCallback ?? ((f: () => void) => setTimeout(f, 300));
  idle(() => void Promise.all([pages.layer(), pages.unit()]).catch(() => undefined));
}

async function guard(view: HTMLElement, fn: () => Promise<void> | void): Promise<void> {
  try {
    await fn();
  } catch (err) {
    if (err instanceof DOMException && err.name === "AbortError") return;
    const msg = err instanceof ApiError || err instanceof Error ? err.message : String(err);
    view.replaceChildren(notice(msg, "error"));
  }
}

window.addEventListener("hashchange", () => void render());
void render();
