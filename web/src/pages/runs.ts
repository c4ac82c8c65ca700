/** `#/`: the runs being served; goes straight to the run when there is only one. */
import type { Api, RunListEntry } from "../api";
import { fill, fmt, h, notice } from "../dom";

export async function renderRuns(root: HTMLElement, api: Api, signal: AbortSignal): Promise<void> {
  document.title = "lurker explorer";
  const { runs } = await api.json<{ runs: RunListEntry[] }>("/runs");
  if (signal.aborted) return;
  const ok = runs.filter((r) => !r.error);
  if (runs.length === 1 && ok.length === 1) {
    location.replace("#/r/" + encodeURIComponent(ok[0].id));
    return;
  }
  fill(
    root,
    h("h1", null, "Runs"),
    runs.length === 0
      ? notice("No runs here. Serve a run directory (`lurker serve RUN`) or a folder that holds runs.")
      : h(
          "table",
          { class: "table" },
          h("thead", null, h("tr", null, ["run", "model", "status", "layers", "units", "samples"].map((c) => h("th", null, c)))),
          h(
            "tbody",
            null,
            runs.map((r) =>
              h(
                "tr",
                null,
                h("td", null, r.error ? r.id : h("a", { href: "#/r/" + encodeURIComponent(r.id) }, r.id)),
                r.error
                  ? h("td", { colspan: 5, class: "error-text" }, r.error)
                  : [
                      h("td", null, r.model ?? "–"),
                      h("td", null, r.status ?? "–"),
                      h("td", { class: "num" }, fmt(r.layers)),
                      h("td", { class: "num" }, fmt(r.units)),
                      h("td", { class: "num" }, fmt(r.samples)),
                    ],
              ),
            ),
          ),
        ),
  );
}
