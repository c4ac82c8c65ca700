/**
 * The live view of a run of signals (each sample channels by time, read by a Conv1d
 * stack): a dataset sample drawn as lines, the model's top 5 on it, and the chosen op's
 * input and output one line per unit over time, each unit on its own scale (a unit's map
 * is one row over time: as a grayscale image it would be a strip one pixel high).
 */
import { p, type LiveImage, type LiveOp, type RunSummary, type SampleDoc, type SignalTime } from "../api";
import type { PageContext } from "../context";
import { append, fmt, h, notice } from "../dom";
import { topPredictions } from "../predictions";
import { channelName, durationText, fetchedSignal, signalDocPlot, signalPlot } from "../signal";

interface Lines {
  shape: number[];
  values: (number | null)[][];
  nonfinite?: Record<string, number>;
}

type Picker = (el: HTMLElement, ctx: PageContext, summary: RunSummary, current: string | null, choose: (label: string) => void) => Promise<void>;

export async function renderSignalLive(root: HTMLElement, ctx: PageContext, summary: RunSummary, fillPicker: Picker, showOp: (el: HTMLElement, ctx: PageContext, image: string, op: string) => Promise<void>): Promise<void> {
  const [channels, length] = summary.dataset.signal ?? [0, 0];
  const rate = summary.dataset.sample_rate ?? null;
  const params = new URLSearchParams(ctx.params);
  const image = params.get("image");
  const sample = /^sample-(\d+)$/.exec(image ?? "");
  const op = params.get("op") ?? (sample ? summary.layers.find((l) => l.op)?.op ?? null : null);
  const go = (next: Record<string, string | null>) => {
    const q = new URLSearchParams(params);
    for (const [k, v] of Object.entries(next)) (v === null ? q.delete(k) : q.set(k, v));
    ctx.navigate(ctx.href("live") + "?" + q);
  };
  const last = Math.max(0, (summary.dataset.size ?? 1) - 1);
  const field = h("input", { type: "number", min: 0, max: last, value: sample ? sample[1] : "0", id: "live-sample", "aria-label": "sample id" });
  const left = h(
    "section",
    { class: "card live-signal-pick" },
    h("h3", null, "Sample"),
    h("p", { class: "muted small" }, `The inputs are signals of ${fmt(channels)} channel${channels === 1 ? "" : "s"} × ${fmt(length)} samples: pick one of the dataset's samples (0–${fmt(last)}); an image upload has no meaning for this model.`),
    h("form", { onsubmit: (ev: Event) => (ev.preventDefault(), go({ image: `sample-${Math.max(0, Math.floor(Number((field as HTMLInputElement).value)) || 0)}`, op })) }, field, " ", h("button", { type: "submit", class: "button" }, "Use sample")),
  );
  const picker = h("section", { class: "card op-picker" }, h("h3", null, "Op"), h("p", { class: "muted" }, "Loading the graph…"));
  const maps = h("section", { class: "live-maps" });
  append(root, h("div", { class: "live-top" }, left, picker), maps);
  void fillPicker(picker, ctx, summary, op, (label) => go({ op: label }));
  if (image !== null && !sample) {
    maps.append(notice(`${image} is not a dataset sample: a run of signals is shown live for a sample of its dataset only (sample-N).`, "error"));
    return;
  }
  if (!sample) {
    maps.append(notice("Pick a dataset sample to run the model on it."));
    return;
  }
  let live: LiveImage;
  let doc: SampleDoc;
  try {
    [live, doc] = await Promise.all([ctx.api.json<LiveImage>(p("runs", ctx.run, "live", image!), { cache: false }), ctx.api.json<SampleDoc>(p("runs", ctx.run, "samples", sample[1]) + "?limit=1")]);
  } catch (err) {
    maps.append(notice((err as Error).message, "error"));
    return;
  }
  if (ctx.signal.aborted) return;
  left.append(
    h(
      "div",
      { class: "sample-signal", id: "live-signal-input" },
      doc.signal_error
        ? notice(`The sample's signal is not at hand: ${doc.signal_error.replace(/\.+$/, "")}.`)
        : fetchedSignal(
            ctx.api,
            ctx.run,
            doc.sample.id,
            undefined,
            (sig) => signalDocPlot(sig, { width: 540, height: Math.min(150, 24 + 22 * sig.channels), axis: true, rate, label: `sample ${sample[1]} as the model is fed it` }),
            (why) => notice(`The sample's signal is not at hand: ${why.replace(/\.+$/, "")}.`),
          ),
    ),
    h(
      "div",
      { class: "live-signal-result" },
      h("p", { class: "image-name", id: "image-name" }, `sample ${sample[1]}`),
      ...topPredictions(live.predictions, live.predictions_note),
      h("p", null, h("a", { class: "button", id: "explain-this", href: ctx.href("explain") + "?image=" + encodeURIComponent(image!) }, "Explain this sample")),
    ),
  );
  if (!op) {
    maps.append(notice("Choose an op to see its units over time."));
    return;
  }
  const base = p("runs", ctx.run, "live", image!, "ops", op);
  let info: LiveOp;
  try {
    info = await ctx.api.json<LiveOp>(base, { cache: false });
  } catch (err) {
    maps.append(notice((err as Error).message, "error"));
    return;
  }
  if (ctx.signal.aborted) return;
  // a side over time (maps one row high, more than one step): lines; else (a vector, an
  // image-like map) the ordinary view, which draws those well
  const overTime = (t: LiveOp["output"] | null) => !!t && t.map_shape.length === 2 && t.map_shape[0] === 1 && t.map_shape[1] > 1 && !t.one_value_maps;
  if (!overTime(info.output) && !overTime(info.input)) return showOp(maps, ctx, image!, op);
  for (const side of ["input", "output"] as const) {
    const t = side === "input" ? info.input : info.output;
    if (!t) continue;
    if (!overTime(t)) {
      maps.append(h("section", { class: "card" }, h("h3", null, `${side}: ${t.shape.join(" × ")}`), h("p", { class: "muted" }, `Not over time (shape ${t.shape.join(" × ")}): choose the op that reads it to see its values.`)));
      continue;
    }
    let lines: Lines;
    try {
      lines = await ctx.api.json<Lines>(`${base}/${side}`, { cache: false });
    } catch (err) {
      maps.append(notice((err as Error).message, "error"));
      continue;
    }
    if (ctx.signal.aborted) return;
    const bad = Object.values(lines.nonfinite ?? {}).reduce((a, b) => a + b, 0);
    const axis = timeAxis(side === "input" ? info.input_time : info.output_time, lines.shape[1], length, rate);
    // only the model's input (and elementwise ops on it, which keep its channels in order)
    // has the dataset's channels: another op's units are not its channels
    const names = axis.channels ? (summary.dataset.channel_names ?? null) : null;
    const what = axis.channels ? `channel${lines.shape[0] === 1 ? "" : "s"}` : `unit${lines.shape[0] === 1 ? "" : "s"}`;
    maps.append(
      h(
        "section",
        { class: "card live-lines", "data-side": side },
        h("h3", null, `${side} · ${fmt(lines.shape[0])} ${what} × ${fmt(lines.shape[1])} ${axis.unit === "steps" ? "steps" : "samples"}${axis.channels ? (axis.input ? " (the model's input)" : " (the input's channels)") : ""}`),
        h("p", { class: "muted small" }, `${axis.channels ? (axis.input ? "Each channel of the sample as the model is fed it" : "Each channel of the sample, made value by value from the model's input by elementwise ops,") : `Each unit's ${side === "input" ? "input channel" : "output"}`} over time (${axis.about}), each line on its own scale (its least value at the bottom, its greatest at the top: the numbers above it)${bad ? `; ${fmt(bad)} values are not finite (gaps)` : ""}.`),
        h(
          "div",
          { class: "unit-lines" },
          lines.values.map((row, u) => {
            const finite = row.filter((v): v is number => v !== null);
            const range = finite.length ? `${fmt(Math.min(...finite))} … ${fmt(Math.max(...finite))}` : "no finite value";
            const name = axis.channels ? channelName(names, u) : `unit ${u}`;
            return h(
              "figure",
              { class: "unit-line", "data-unit": u, "data-side": side },
              h("figcaption", { class: "small" }, h("strong", null, axis.channels ? (names?.[u] ?? `${u}`) : `${u}`), h("span", { class: "muted" }, ` ${range}`)),
              signalPlot([row], { width: 260, height: 62, axis: true, rate: axis.unit === "s" ? rate : null, axisUnit: axis.unit === "steps" ? "steps" : "samples", inlineText: false, names: names ? [channelName(names, u)] : null, label: `${side} ${name} over time: ${range}` }),
              h("p", { class: "muted small line-axis" }, axis.note),
            );
          }),
        ),
      ),
    );
  }
}

interface TimeAxis {
  /** the lanes are the model's input channels (named by the dataset's channel names) */
  channels: boolean;
  /** the lanes are the model's input itself (not an elementwise op's copy of it) */
  input: boolean;
  /** `s`: seconds (a step is a sample and the rate is known); `samples`; `steps`: an op's */
  unit: "s" | "samples" | "steps";
  /** the axis's caption: its unit, and a step's length where it is known exactly */
  note: string;
  /** the description's words for the axis */
  about: string;
}

/**
 * How a side of `steps` positions is put on time: the model's input (or a side whose step
 * is exactly one input sample from sample 0) in samples, or seconds with a rate; another
 * length in steps, with the step's length in samples (and seconds) only where the
 * receptive field gives it exactly. Never a guess: an unknown stride is said so.
 */
function timeAxis(time: SignalTime | null | undefined, steps: number, length: number, rate: number | null): TimeAxis {
  const sampled = (channels: boolean): TimeAxis => ({ channels, input: !!time?.model_input, unit: rate ? "s" : "samples", note: rate ? `time (s), ${Number(rate.toPrecision(6))} Hz` : "samples", about: rate ? `in seconds, ${Number(rate.toPrecision(6))} Hz` : "in samples, left to right" });
  if (time?.model_input || time?.channels) return sampled(true);
  if (time?.stride === 1 && time.start === 0 && steps === length) return sampled(false);
  const stride = time?.stride ?? null;
  if (stride === null) return { channels: false, input: false, unit: "steps", note: "steps (stride not known exactly)", about: "its steps, left to right; how many input samples a step spans is not known exactly" };
  const each = `${Number(stride.toPrecision(6))} sample${stride === 1 ? "" : "s"}${rate ? ` (${durationText(stride, rate)})` : ""}`;
  return { channels: false, input: false, unit: "steps", note: `steps · 1 step = ${each}`, about: `its steps, left to right: each step ${each} of the input` };
}
