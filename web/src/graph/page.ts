/** Minimal graph page for the router to compile against; the graph helper replaces it. */
import { p } from "../api";
import type { PageContext } from "../context";
import { h } from "../dom";

interface ViewDoc {
  nodes: { l: string; t: string; m?: number; L?: string }[];
  groups: { p: string; c: string }[];
}

export async function renderGraphPage(root: HTMLElement, ctx: PageContext): Promise<void> {
  const doc = await ctx.api.json<ViewDoc>(p("runs", ctx.run, "graph"));
  const focus = ctx.params.get("focus");
  root.append(
    h("h1", null, "Graph"),
    h(
      "ol",
      { class: "graph-ops" },
      doc.nodes.map((n) =>
        h(
          "li",
          { id: "op-" + n.l, class: n.l === focus ? "on" : null },
          h("code", null, n.l),
          ` ${n.t} · ${doc.groups[n.m ?? 0]?.p || "(top)"}`,
          n.L ? [" · ", h("a", { href: ctx.href("layer", n.L) }, n.L)] : null,
        ),
      ),
    ),
  );
  if (focus) document.getElementById("op-" + focus)?.scrollIntoView({ block: "center" });
}
