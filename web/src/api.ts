/**
 * The JSON/PNG client. Served mode reads `/api/...`; a static export (index.html carries
 * `<meta name="lurker-mode" content="static">`) reads the same documents from `data/...`
 * files, with each path segment made file-safe by {@link staticSegment}, which must stay
 * identical to Python's `static_segment`.
 */

export interface LayerBrief {
  name: string;
  module: string | null;
  op: string | null;
  kind: string | null;
  num_units: number;
  shape: number[];
  op_index: number | null;
}

export interface RunSummary {
  id: string;
  model: {
    name: string | null;
    spec: string | null;
    weights: string | null;
    params: number | null;
    ops: number | null;
    input_shape: number[] | null;
    flops: number | null;
  };
  dataset: {
    spec: string | null;
    description?: string | null;
    size: number;
    classes: string[];
    skipped: { path: string; reason: string }[];
    skipped_count: number;
    image_size: number[] | number | null;
    mean: number[] | null;
    std: number[] | null;
  };
  probe: {
    k: number;
    hist_bins: number;
    created: string | null;
    lurker_version: string | null;
    store_version: number | null;
    status: string | null;
  };
  holds: { graph: boolean; live: boolean; live_reason?: string | null; dataset?: boolean; dataset_reason?: string | null; cached_images: number; map?: boolean };
  missing: string[];
  layers: LayerBrief[];
}

export interface RunListEntry {
  id: string;
  model: string | null;
  status: string | null;
  layers: number | null;
  units: number | null;
  samples: number | null;
  error: string | null;
}

export interface Histogram {
  edges: (number | null)[];
  counts: (number | null)[];
}

export interface LayerDoc {
  layer: LayerBrief;
  rf: Record<string, unknown> | null;
  layout: Record<string, unknown> | null;
  histogram: Histogram;
  units: { unit: number; mean: number | null; max: number | null; top_max: number | null; top_mean: number | null }[];
}

export interface TopEntry {
  rank: number;
  sample_id: number;
  value: number | null;
  y: number | null;
  x: number | null;
  label: number | null;
  class_name: string | null;
  path: string | null;
}

export interface UnitDoc {
  layer: LayerBrief & { rf: Record<string, unknown> | null; op_label: string | null };
  unit: number;
  mean: number | null;
  max: number | null;
  top: { max: TopEntry[]; mean: TopEntry[]; relevance?: TopEntry[] | null };
  class_means: Record<string, number | null>;
  histogram: Histogram;
  prev: number | null;
  next: number | null;
  num_units: number;
}

export interface SampleBrief {
  id: number;
  path: string | null;
  label: number | null;
  class_name: string | null;
}

export interface Prediction {
  class: number;
  name: string | null;
  prob: number;
}

export interface Appearance {
  layer: string;
  unit: number;
  list: string;
  rank: number;
  value: number | null;
}

/** One sample and one page of the top-list entries that hold it (`total` in all). */
export interface SampleDoc {
  sample: SampleBrief;
  prediction: Prediction[] | null;
  prediction_error?: string | null;
  total: number;
  offset: number;
  limit: number;
  /** Entries per layer, in layer order: every layer that holds the sample. */
  layers: { layer: string; count: number }[];
  /** Entries `offset` to `offset + limit`: by layer order, then rank, list, unit. */
  appearances: Appearance[];
}

export interface SampleList {
  total: number;
  samples: SampleBrief[];
}

export interface LiveImage {
  image: string;
  predictions: Prediction[];
  width?: number;
  height?: number;
}

export interface LiveOp {
  op: string;
  input: { shape: number[]; channels: number } | null;
  output: { shape: number[]; channels: number };
  kernel: { shape: number[] } | null;
}

export interface Kernel {
  shape: number[];
  values: unknown;
  min: number;
  max: number;
}

/** An error the API answered with (its `detail`), or a network failure. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

/** Characters outside [A-Za-z0-9._-] become `~XX` (upper-case hex) per UTF-8 byte. */
export function staticSegment(s: string): string {
  let out = "";
  for (const byte of new TextEncoder().encode(s)) {
    const c = String.fromCharCode(byte);
    out += /[A-Za-z0-9._-]/.test(c) ? c : "~" + byte.toString(16).toUpperCase().padStart(2, "0");
  }
  return out;
}

/** Join segments into an API path, each one URL-encoded: `p("runs", id)` -> `/runs/ID`. */
export function p(...segments: (string | number)[]): string {
  return segments.map((s) => "/" + encodeURIComponent(String(s))).join("");
}

export class Api {
  readonly isStatic: boolean;
  private cache = new Map<string, Promise<unknown>>();

  constructor(isStatic?: boolean) {
    this.isStatic =
      isStatic ?? document.querySelector('meta[name="lurker-mode"]')?.getAttribute("content") === "static";
  }

  private staticPath(path: string): string {
    return (
      "data" +
      path
        .split("/")
        .slice(1)
        .map((seg) => "/" + staticSegment(decodeURIComponent(seg)))
        .join("")
    );
  }

  /** URL of a JSON document; `path` as built by {@link p}, query included. */
  jsonUrl(path: string): string {
    return this.isStatic ? this.staticPath(path) + ".json" : "api" + path;
  }

  /** URL of a PNG (static: the file the export wrote at the same path). */
  pngUrl(path: string): string {
    return this.isStatic ? this.staticPath(path) : "api" + path;
  }

  /** GET a JSON document; immutable run documents are cached for the page's life. */
  json<T>(path: string, { cache = true }: { cache?: boolean } = {}): Promise<T> {
    const url = this.jsonUrl(path);
    const hit = cache ? this.cache.get(url) : undefined;
    if (hit) return hit as Promise<T>;
    const req = fetch(url).then((res) => readJson<T>(res, url));
    if (cache) {
      this.cache.set(url, req);
      req.catch(() => this.cache.delete(url));
    }
    return req;
  }

  /** POST a file (live uploads; served mode only). */
  async upload<T>(path: string, file: Blob, name = "upload"): Promise<T> {
    const body = new FormData();
    body.append("file", file, name);
    const url = "api" + path;
    return readJson<T>(await fetch(url, { method: "POST", body }), url);
  }
}

async function readJson<T>(res: Response, url: string): Promise<T> {
  if (res.ok) return (await res.json()) as T;
  let detail = `${res.status} ${res.statusText} for ${url}`;
  try {
    const body = await res.json();
    if (typeof body?.detail === "string") detail = body.detail;
    else if (body?.detail) detail = JSON.stringify(body.detail);
  } catch {
    /* not JSON: keep the status line */
  }
  throw new ApiError(res.status, detail);
}
