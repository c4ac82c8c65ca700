/** Small DOM helpers: enough to build pages without a framework. */

export type Child = Node | string | number | null | undefined | false;
type Attrs = Record<string, string | number | boolean | null | undefined | EventListener>;

/** `h("a", {href: "#/"}, "Home")`: an element with attributes (on* = listeners) and children. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs | null = null,
  ...children: (Child | Child[])[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "class") {
      el.className = String(value);
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, ...children);
  return el;
}

export function append(el: Element, ...children: (Child | Child[])[]): void {
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
}

/** Replace everything inside `el`. */
export function fill(el: Element, ...children: (Child | Child[])[]): void {
  el.replaceChildren();
  append(el, ...children);
}

/** A number shown compactly: 1234567 -> "1.23M"; small floats to 3 significant digits. */
export function fmt(v: number | null | undefined, digits = 3): string {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (Number.isInteger(v) && a < 1e4) return String(v);
  if (a >= 1e9) return (v / 1e9).toPrecision(3) + "G";
  if (a >= 1e6) return (v / 1e6).toPrecision(3) + "M";
  if (a >= 1e4) return (v / 1e3).toPrecision(3) + "k";
  if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(2);
  return String(Number(v.toPrecision(digits)));
}

/** A model's FLOPs total: "at least 96, 1 op of unknown FLOPs" where ``unknown`` ops
 * (arguments lurker cannot read) are left out of it, so a lower bound never passes for the
 * whole (as `lurker trace`'s summary says it). */
export function flopsTotal(flops: number | null | undefined, unknown: number | null | undefined): string {
  if (!unknown || flops === null || flops === undefined) return fmt(flops);
  return `at least ${fmt(flops)}, ${fmt(unknown)} op${unknown === 1 ? "" : "s"} of unknown FLOPs`;
}

/** A probability as a percentage to 0.1%, never rounded to a certainty it is not:
 * 0.99996 is ">99.9%" and 0.00002 "<0.1%" (toFixed(1) showed them as 100.0% and 0.0%);
 * only an exact 1 or 0 reads 100.0% or 0.0%. */
export function pct(p: number): string {
  if (!Number.isFinite(p)) return "–"; // (a model's NaN: not a probability to show)
  if (p < 0 || p > 1) return `${(100 * p).toFixed(1)}% (not a probability)`;
  if (p > 0 && p < 0.0005) return "<0.1%";
  if (p < 1 && p >= 0.9995) return ">99.9%";
  return `${(100 * p).toFixed(1)}%`;
}

/** `2026-01-31T12:34:56+00:00` as `2026-01-31 12:34 UTC` (the store writes UTC):
 * the runs list and a run's home page say when it was probed alike. */
export function probedAt(iso: string | null | undefined): string {
  if (!iso) return "–";
  const m = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2})/.exec(iso);
  return m ? `${m[1]} ${m[2]}${/(\+00:00|Z)$/.test(iso) ? " UTC" : ""}` : iso;
}

export function shape(s: number[] | null | undefined): string {
  return s && s.length ? s.join("×") : "–";
}

/** `text` with each Markdown-style `span` in backticks (a command, a path) as a <code>
 * element, so that no page shows the backticks themselves. */
export function withCode(text: string): (string | HTMLElement)[] {
  return text.split(/`([^`\n]+)`/).map((part, i) => (i % 2 ? h("code", null, part) : part)).filter((part) => part !== "");
}

/** A message box (errors say what went wrong and what to do); `commands` in backticks are
 * shown as code. */
export function notice(text: string, kind: "error" | "info" = "info"): HTMLElement {
  return h("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, withCode(text));
}

/** `el` with its id set: a notice that tests and links find. */
export function withId(el: HTMLElement, id: string): HTMLElement {
  el.id = id;
  return el;
}

/** Key/value rows as a definition list. */
export function facts(rows: [string, Child | Child[]][]): HTMLElement {
  return h("dl", { class: "facts" }, rows.flatMap(([k, v]) => [h("dt", null, k), h("dd", null, ...[v].flat())]));
}
