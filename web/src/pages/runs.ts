/** `#/`: the runs being served; goes straight to the run when there is only one. Runs of
 * one architecture look alike, so each row names what tells them apart: the model's spec
 * and weights, the dataset and when it was probed. */
import type { Api, RunListEntry } from "../api";
import { fill, fmt, h, notice, probedAt } from "../dom";


/** The last component of a path (`/data/w/r18.pt` -> `r18.pt`). */
const baseName = (path: string) => path.split(/[\\/]/).filter(Boolean).pop() ?? path;

function modelCell(r: RunListEntry): HTMLElement {
  const detail = [r.spec, r.weights ? baseName(r.weights) : null].filter(Boolean).join(" · ");
  return h(
    "td",
    { class: "run-model", title: [r.spec, r.weights].filter(Boolean).join("\n") || null },
    r.model ?? "–",
    detail ? h("div", { class: "muted small run-spec" }, detail) : null,
  );
}

export async function renderRuns(root: HTMLElement, api: Api, signal: AbortSignal): Promise<void> {
  document.title = "lurker explorer";
  const { runs } = await api.json<{ runs: RunListEntry[] }>("/runs");
  if (signal.aborted) return;
  const ok = runs.filter((r) => !r.error);
  if (runs.length === 1 && ok.length === 1) {
    location.replace("#/r/" + encodeURIComponent(ok[0].id));
    return;
  }
  const columns = ["run", "model", "dataset", "probed", "status", "layers", "units", "samples", "map"];
  fill(
    root,
    h("h1", null, "Runs", h("span", { class: "sub" }, ` ${runs.length}`)),
    runs.length === 0
      ? notice("No runs here. Serve a run directory (`lurker serve RUN`) or a folder that holds runs.")
      : h(
          "div",
          { class: "table-scroll" },
          h(
            "table",
            { class: "table runs" },
            h("thead", null, h("tr", null, columns.map((c) => h("th", null, c)))),
            h(
              "tbody",
              null,
              runs.map((r) =>
                h(
                  "tr",
                  { "data-run": r.id },
                  h("td", null, r.error ? r.id : h("a", { href: "#/r/" + encodeURIComponent(r.id) }, r.id)),
                  r.error
                    ? h("td", { colspan: columns.length - 1, class: "error-text" }, r.error)
                    : [
                        modelCell(r),
                        h("td", { class: "run-dataset" }, r.dataset ?? "–"),
                        h("td", { class: "run-probed", title: r.created ?? null }, probedAt(r.created)),
                        h("td", null, r.status ?? "–"),
                        h("td", { class: "num" }, fmt(r.layers)),
                        h("td", { class: "num" }, fmt(r.units)),
                        h("td", { class: "num" }, fmt(r.samples)),
                        h(
                          "td",
                          { class: "run-map" },
                          r.map
                            ? h("a", { href: "#/r/" + encodeURIComponent(r.id) + "/map" }, "map")
                            : h("span", { class: "muted", title: `make one: lurker map RUN` }, "–"),
                        ),
                      ],
                ),
              ),
            ),
          ),
        ),
  );
}
