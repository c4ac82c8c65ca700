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
  /** What each unit is of its class where the units are the model's output classes
   * ("score", "probability", "log-probability"); null for any other layer. */
  class_value?: string | null;
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
    /** ops of unknown FLOPs that ``flops`` leaves out (then a lower bound); null: no graph */
    flops_unknown?: number | null;
  };
  dataset: {
    spec: string | null;
    description?: string | null;
    size: number;
    classes: string[];
    skipped: { path: string; reason: string }[];
    skipped_count: number;
    /** images fed without their alpha; null: not checked (or a run from before) */
    transparent_images?: { count: number; examples: string[] } | null;
    /** why the items' labels gave no classes (not class indices); null: none, or an older run */
    labels_ignored?: string | null;
    image_size: number[] | number | null;
    mean: number[] | null;
    std: number[] | null;
    /** the token ids per sample where the inputs are token ids (no picture); null else */
    tokens?: number | null;
    vocab_size?: number | null;
    /** a character-level vocabulary: Live reads typed text one character per token */
    vocab_chars?: boolean;
    /** the values per sample where the inputs are flat vectors, not token ids (no picture); null else */
    features?: number | null;
    /** each feature's name (the dataset's `feature_names`), null where it gave none */
    feature_names?: string[] | null;
    /** `[C, T]` where the inputs are signals, channels by time (drawn as lines); null else */
    signal?: number[] | null;
    /** each channel's name (the dataset's `channel_names`: EEG electrodes); null: none */
    channel_names?: string[] | null;
    /** the signals' sampling rate in Hz (the dataset's `sample_rate`); null: none */
    sample_rate?: number | null;
    /** each channel's least and greatest finite value over the dataset and its count of
     * finite values, as the probe recorded them; null: not signals, or an older run */
    channel_range?: { min: (number | null)[]; max: (number | null)[]; finite: number[] } | null;
  };
  probe: {
    k: number;
    hist_bins: number;
    created: string | null;
    lurker_version: string | null;
    store_version: number | null;
    status: string | null;
  };
  holds: { graph: boolean; live: boolean; live_reason?: string | null; model_check?: ModelCheckState; dataset?: boolean; dataset_reason?: string | null; cached_images: number; featviz?: string[]; map?: boolean; relevance?: boolean; explained?: number };
  missing: string[];
  layers: LayerBrief[];
  /** A token of the run as probed: image URLs carrying it (`?v=`) are cached for good. */
  images_version?: string | null;
  /** A token of the run as this summary describes it (see {@link Api.runChanges}). */
  generation?: string | null;
  /** Tokens of what commands add to the run without probing it again, by kind. */
  additions?: Partial<Record<Addition, string | null>>;
  /** The featviz token of each layer with feature visualizations, by layer name. */
  featviz_layers?: Record<string, string>;
}

/** What a command adds to a run without probing it again: its feature visualizations
 * (`lurker featviz`) and its dataset map (`lurker map`). */
export type Addition = "featviz" | "map" | "vocab";
/** How a run changed under a page: probed again, or given new additions. */
export type RunChange = "probe" | Addition;
/** What {@link Api.runChanges} found: the kinds of change, and for `featviz` the layers
 * that `lurker featviz` wrote (a page of another layer shows nothing that changed; null:
 * every layer, where the server names none). */
export interface RunChanges {
  kinds: RunChange[];
  featvizLayers: string[] | null;
}

/** `GET /runs/RUN/generation`: what a page polls (see {@link Api.runChanges}). */
export interface RunGeneration {
  id: string;
  generation: string;
  status?: string | null;
  images_version?: string | null;
  additions?: Partial<Record<Addition, string | null>>;
  featviz_layers?: Record<string, string>;
}

export interface RunListEntry {
  id: string;
  model: string | null;
  spec?: string | null;
  weights?: string | null;
  dataset?: string | null;
  /** When the run was probed: UTC, ISO 8601. */
  created?: string | null;
  status: string | null;
  layers: number | null;
  units: number | null;
  samples: number | null;
  map?: boolean;
  error: string | null;
}

export interface Histogram {
  edges: (number | null)[];
  counts: (number | null)[];
}

/** A sample's feature vector as a layer tile shows it: at most 64 bins of consecutive
 * features (``starts``: each bin's first feature), each the signed value of largest
 * |value| in it (null: one is not finite), and the 3 largest features by |value|. */
export interface FeatureTile {
  count: number;
  starts: number[];
  strip: (number | null)[];
  top: { index: number; value: number | null }[];
}

/** A sample's signal as a tile draws it: per channel drawn (at most 8 of `channels`), per
 * column of consecutive samples (`starts`: each column's first sample, at most 48), its
 * least (`lo`) and greatest (`hi`) value; null where one is not finite. */
export interface SignalTile {
  length: number;
  channels: number;
  starts: number[];
  lo: (number | null)[][];
  hi: (number | null)[][];
}

/** One sample's signal document (`samples/{id}/signal.json`), channels first: every
 * value (`values`), or with `columns` each channel's per-column min..max (`starts`, `lo`,
 * `hi`, as a tile's). Fetched once per sample, shared by every entry that ranks it. */
export interface SignalDoc {
  id: number;
  length: number;
  channels: number;
  channel_names?: string[] | null;
  values?: (number | null)[][] | null;
  starts?: number[] | null;
  lo?: (number | null)[][] | null;
  hi?: (number | null)[][] | null;
}

export interface LayerDoc {
  /** units with a stored feature visualization ("channel" objective), null for none */
  featviz_units?: number[] | null;
  /** Per objective (channel, neuron): the units with a stored image of it. */
  featviz_objectives?: Record<string, number[]> | null;
  /** Directions with stored images (objective "direction"): a direction mixes the
   * units, so the layer page shows them, by the direction's index. */
  featviz_directions?: { index: number; activations: (number | null)[]; units: number; top_units: { unit: number; weight: number }[] }[] | null;
  layer: LayerBrief;
  rf: Record<string, unknown> | null;
  /** why `rf` is null: the op that broke the chain from the input (null: not said) */
  rf_reason?: string | null;
  layout: Record<string, unknown> | null;
  histogram: Histogram;
  units: { unit: number; mean: number | null; max: number | null; top_max: number | null; top_mean: number | null; top_max_peak?: number[] | null; top_max_tokens?: number[] | null; top_max_tokens_start?: number | null; top_max_token_text?: (string | null)[] | null; top_max_span?: number[] | null }[];
  /** Unit i's class name where the units are the model's output classes, else null. */
  class_names?: string[] | null;
  /** a run of feature vectors with its dataset: each unit's top max sample's values, by
   * sample id (a non-finite value is null) */
  features?: Record<string, FeatureTile> | null;
  /** why such a run's tiles have no values */
  features_error?: string | null;
  /** a run of signals with its dataset: each unit's top max sample as its tile draws it */
  signals?: Record<string, SignalTile> | null;
  /** why such a run's tiles have no signals */
  signals_error?: string | null;
  /** a signal run's stored feature visualizations as tiles, by unit (the grid's featviz view) */
  featviz_signals?: Record<string, SignalTile> | null;
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
  /** the input box `[y0, y1, x0, x1]` (half-open) the peak sees, or null (max lists, and
   * mean lists where the run stores their peaks: y, x not null). */
  box?: number[] | null;
  /** a video model's layer: the clip frame the entry's images are cut from (and its box
   * drawn on), `samples/ID/frames/FRAME.png`; null for images. */
  frame?: number | null;
  /** the half-open range `[t0, t1]` of clip frames the peak sees, or null. */
  frames?: number[] | null;
  /** a run of token ids with its dataset: the sample's ids (its peak is token `x`). */
  tokens?: number[] | null;
  token_text?: (string | null)[] | null;
  /** a run of feature vectors with its dataset: the sample's values (non-finite: null). */
  features?: (number | null)[] | null;
  /** a run of signals: the half-open span `[t0, t1)` of samples the peak at `x` sees. */
  span?: number[] | null;
}

export interface FeatVizView {
  objective: string;
  /** What the images maximize, in words. */
  meaning?: string;
  activations: (number | null)[];
  settings: Record<string, unknown>;
  best_dataset: number | null;
  best_sample: number | null;
  /** a run of signals: per copy, the optimized signal `[C][T]` in the model's input units */
  signals?: number[][][] | null;
  /** per copy: the samples `[t0, t1)` the unit's peak on that signal sees, or null */
  spans?: (number[] | null)[] | null;
}

export interface FeatVizInfo extends FeatVizView {
  objectives: string[];
  /** Every objective's images (the top-level fields are the default objective's). */
  views?: FeatVizView[];
}

export interface UnitDoc {
  layer: LayerBrief & { rf: Record<string, unknown> | null; rf_reason?: string | null; op_label: string | null };
  unit: number;
  mean: number | null;
  max: number | null;
  top: { max: TopEntry[]; mean: TopEntry[]; relevance?: TopEntry[] | null };
  /** a video model's run: the frames of each clip. */
  clip_frames?: number | null;
  /** a run of token ids: the ids per sample; null for images */
  token_length?: number | null;
  /** why such a run's entries carry no tokens */
  tokens_error?: string | null;
  /** why a feature-vector run's entries carry no feature values */
  features_error?: string | null;
  /** a run of signals: `[C, T]`, its entries' `signal` */
  signal_shape?: number[] | null;
  /** why a signal run's entries carry no signal */
  signal_error?: string | null;
  /** Stored feature visualizations (`lurker featviz`), null when the unit has none. */
  featviz?: FeatVizInfo | null;
  class_means: Record<string, number | null>;
  /** Per list: how many entries end it as ties samples outside it may share (zeros ending
   * a full list): the sample pages leave them out, the unit page dims them. */
  tied_tail?: Partial<Record<"max" | "mean" | "relevance", number>>;
  histogram: Histogram;
  prev: number | null;
  next: number | null;
  num_units: number;
  /** The class the unit stands for, where its layer is the model's output classes. */
  output_class?: { class: number; name: string; value: string } | null;
}

export interface SampleBrief {
  id: number;
  path: string | null;
  label: number | null;
  class_name: string | null;
  /** In a page of samples: the run's recorded top class (a map or embedding), where the
   * model's outputs are the dataset's classes; null or absent otherwise. */
  pred?: number | null;
  pred_name?: string | null;
}

export interface Prediction {
  class: number;
  name: string | null;
  prob: number;
  /** a language model's (1, L, V) scores: the position whose next token this is (the
   * last, L - 1), the name then the vocabulary's token; null: one score per class */
  position?: number | null;
  /** with `position`: this next token as an Explain target, `LAYER:CLASS:0:POSITION` */
  target?: string | null;
}

export interface Appearance {
  layer: string;
  unit: number;
  list: string;
  rank: number;
  value: number | null;
}

/** One probed layer's units on a typed live input (`POST .../live/inputs`). */
export interface LiveLayerUnits {
  layer: string;
  op: string | null;
  num_units: number;
  positions: number;
  mean: (number | null)[];
  max: (number | null)[];
  /** each unit's argmax position (a token index where `positions` is the sequence's length); null without positions */
  peak: (number | null)[] | null;
  top: number[];
}

/** A typed live input's document: what was fed, the prediction, every probed layer. */
export interface LiveInput {
  input: string;
  ids: number[] | null;
  words: (string | null)[] | null;
  /** how the typed sequence was padded or truncated to the run's length; null: fed as typed */
  fitted: string | null;
  /** where the padding begins, when the sequence was padded to the run's length */
  padded_from?: number | null;
  features: number[] | null;
  feature_names: string[] | null;
  predictions: Prediction[];
  predictions_note: string | null;
  layers: LiveLayerUnits[];
}

/** One sample and one page of the top-list entries that hold it (`total` in all). */
export interface SampleDoc {
  sample: SampleBrief;
  prediction: Prediction[] | null;
  prediction_error?: string | null;
  /** a run of token ids with its dataset: the sample's ids (its picture) */
  tokens?: number[] | null;
  token_text?: (string | null)[] | null;
  tokens_error?: string | null;
  /** a run of feature vectors with its dataset: the sample's values (non-finite: null) */
  features?: (number | null)[] | null;
  features_error?: string | null;
  /** why a signal sample cannot be drawn (its values: {@link Api.signalDoc}) */
  signal_error?: string | null;
  /** The top class as the run recorded it (`lurker probe --embed`, `lurker map`): shown
   * where no model runs (a static export). */
  stored_prediction?: Prediction | null;
  total: number;
  offset: number;
  limit: number;
  /** Entries per layer, in layer order: every layer that holds the sample. */
  layers: { layer: string; count: number }[];
  /** Entries `offset` to `offset + limit`: by layer order, then rank, list, unit. */
  appearances: Appearance[];
  /** Entries in the lists of units constant on the dataset (ties), left out of the above. */
  left_out?: number;
  left_out_layers?: { layer: string; count: number }[];
}

/** A sample in a page of samples: on a run with no picture, what its tile shows. */
export interface ListedSample extends SampleBrief {
  /** a run of token ids with its dataset: the sample's first ids (at most 16) */
  tokens?: number[] | null;
  token_text?: (string | null)[] | null;
  /** a run of feature vectors with its dataset: its values binned as a layer tile's */
  features?: FeatureTile | null;
  /** a run of signals with its dataset: the sample as a tile draws it */
  signal?: SignalTile | null;
}

export interface SampleList {
  total: number;
  samples: ListedSample[];
  /** why a run of token ids lists no `tokens` (no dataset, or one that changed) */
  tokens_error?: string | null;
  /** why a run of feature vectors lists no `features` */
  features_error?: string | null;
  /** why a run of signals lists no `signal` */
  signal_error?: string | null;
}

/** Image kinds of a top-k entry, by list, with the ranks a static export can show. */
export type EntryKind = "input" | "crop" | "grad" | "grad_crop";
export type Shown = Partial<Record<EntryKind, Partial<Record<"max" | "mean" | "relevance", number[]>>>>;

/** Static export: a chunk of a layer's unit documents (`units` as the API answers). */
export interface UnitChunk {
  layer: string;
  offset: number;
  units: UnitDoc[];
  images: Shown[];
}

/** Static export: how a layer's units are chunked, and each unit's top image for the grid. */
export interface UnitsIndex {
  layer: string;
  num_units: number;
  chunk: number;
  thumbs: ({ sample: number; box: number[] | null; crop: boolean; frame?: number | null } | null)[];
  /** Why some top-k samples have no image in the export (null: all have one; absent in
   * older exports). */
  no_image?: string | null;
  /** Whether the export holds the layer's filters (drawn from the run's model while
   * exporting; absent in older exports: none). */
  filters?: boolean;
}

/** Static export: the samples it holds (those some unit ranks in its top-k). */
export interface ExportedSamples {
  total: number;
  samples: (ListedSample & { image: boolean })[];
  /** Why some of them have no image (null: all have one; absent in older exports). */
  no_image?: string | null;
}

/** The samples whose explanations a run's cache or a static export holds (precomputed for
 * the top class by `lurker images RUN --explanations`), with the methods each has. */
export interface ExplainedIndex {
  target: string;
  /** `concepts`: the layer whose concept relevance (top units, with maps) is held, or null */
  /** each sample's `target`: what its explanations were made for and are asked by, "top"
   * (the top class) or a language model's next token at the last position, `LAYER:CLASS:0:L-1` */
  samples: { image: string; sample: number; methods: string[]; concepts: string | null; top: Prediction | null; target?: string }[];
}

export interface LiveImage {
  /** The uploaded file's name; null for a dataset sample or a nameless upload. */
  name?: string | null;
  image: string;
  predictions: Prediction[];
  width?: number;
  height?: number;
  /** Why `predictions` is empty (the output is not one score per class). */
  predictions_note?: string | null;
  /** How an upload was changed as the dataset loader changes it (transparency dropped). */
  input_note?: string | null;
  /** What preparing an upload did to it (size and colours as sent -> the model's input); null for a sample. */
  prepared?: string | null;
}

/** One side (input or output) of a live op: a map per unit. */
export interface FeatureSide {
  shape: number[];
  channels: number;
  map_shape: number[];
  /** The axis of `shape` the maps index; null: not one map per unit, or unknown. */
  unit_axis?: number | null;
  /** How the maps are laid out where it is not plain (tokens on a patch grid, ...). */
  note?: string | null;
  /** Maps of one value each, shown as one 1xC map: its position i is channel i. */
  one_value_maps?: boolean;
  /** Maps whose values are all equal, by channel: that value (null: none finite). Their
   * PNGs are flat grey (no range to scale), so the page writes the value on them. */
  constant?: Record<string, number | null>;
  /** Maps holding values that are not finite (NaN, ±inf), by channel: how many. Their
   * PNGs draw those positions magenta; their range leaves them out. */
  nonfinite?: Record<string, number>;
  /** Maps of tokens on their patch grid: the tokens with no patch (a class token), left
   * out of the maps, each with its value at unit i (map i); null: not finite. */
  patchless?: { token: number; values: (number | null)[] }[];
}

/** Where a side of an op lies along a signal run's time. */
export interface SignalTime {
  /** the side is the model's input itself: its maps are the signal's channels */
  model_input: boolean;
  /** its maps are the model input's channels in order (the input, or elementwise ops on it) */
  channels?: boolean;
  /** input samples per step, where the receptive field tells it exactly; null: unknown */
  stride: number | null;
  start: number | null;
}

/** A tensor argument of an op besides the one shown as its input: an op's output or a parameter. */
export interface OtherInput {
  op: string | null;
  param: string | null;
  shape: number[];
}

export interface LiveOp {
  op: string;
  input: FeatureSide | null;
  /** the op's other tensor arguments, which `input` does not show (absent: a server before them) */
  other_inputs?: OtherInput[];
  output: FeatureSide;
  kernel: { shape: number[] } | null;
  /** on a run of (C, T) signals, each side's place along time; null elsewhere */
  input_time?: SignalTime | null;
  output_time?: SignalTime | null;
  /** the op is attention (scaled_dot_product_attention, or a softmax of attention written out
   * by hand, whose output is the weights): its weights are at `.../attention` */
  attention?: boolean;
}

/** Where an attention op's tokens lie on the image (a ViT's patch grid). */
export interface AttentionPatches {
  rows: number;
  cols: number;
  /** [height, width] of the image as the model sees it: the frame of `boxes` */
  image_size: number[];
  /** per key token its [row, col] on the grid; null: no patch (a class token) */
  keys: (number[] | null)[];
  /** per query token, the same */
  queries: (number[] | null)[];
  /** per key token its patch [y0, y1, x0, x1] in the image (half-open); null: none */
  boxes: (number[] | null)[];
  /** the tokens are one window's (Swin): `rows` x `cols` is the whole grid, `boxes` the window's patches */
  window?: boolean;
}

/** An attention op's weights on one image (`.../ops/OP/attention?query=Q&head=H`). */
export interface LiveAttention {
  op: string;
  heads: number;
  queries: number;
  keys: number;
  /** the query token `rows` and `mean` are of */
  query: number;
  /** the head `matrix` is of; null: the mean over heads */
  head: number | null;
  /** the scale of the scores; null on a softmax op (its output is the weights as computed) */
  scale: number | null;
  causal: boolean;
  mask: string | null;
  notes: string[];
  /** per head, the query's weight on each key token (null: masked, no weight) */
  rows: (number | null)[][];
  mean: (number | null)[];
  /** queries x keys of `head` (or the mean); null when too large (`matrix_note`) */
  matrix: (number | null)[][] | null;
  matrix_min: number | null;
  matrix_max: number | null;
  matrix_note: string | null;
  patches: AttentionPatches | null;
  patches_note: string | null;
  /** query tokens whose every key is masked out: no weights */
  masked: number[];
  /** op type: `scaled_dot_product_attention`, or `softmax` for attention written out by hand */
  name: string;
  /** sequences on the batch axis for this one input (a Swin's windows), and the one shown */
  windows: number;
  window: number | null;
  /** on a softmax op: the op making its scores (q kᵀ) and the one weighing the values */
  scores_op: string | null;
  values_op: string | null;
  /** cross-attention (keys from other model inputs than the queries): each side's inputs in words */
  cross: string | null;
  /** what each of `windows` is: a window of the image, or a sequence lurker cannot name */
  sequence: "window" | "sequence";
}

export interface Kernel {
  shape: number[];
  /** Weights that are not finite are null. */
  values: unknown;
  /** Over the finite weights (null: none is finite). */
  min: number | null;
  max: number | null;
  /** How many weights are not finite, by kind (`nan`, `+inf`, `-inf`). */
  nonfinite?: Record<string, number>;
}

/** A first convolution's kernels as pictures (`GET .../layers/L/filters`). */
export interface LayerFilters {
  layer: string;
  op: string;
  param: string;
  /** `[units, channels, kh, kw]` */
  shape: number[];
  channels: number;
  colour: "grey" | "rgb";
  /** the layer's largest |w|: every kernel is scaled by it, 0 mid-grey */
  max_abs: number;
  scaling: string;
  normalize: string | null;
  columns: number;
  rows: number;
  /** a grid cell's [height, width] in pixels, and the gap around cells */
  cell: number[];
  gap: number;
  units: { unit: number; min: number | null; max: number | null; nonfinite: number }[];
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

/** The run's images that change only when it is probed again: a sample's image and a
 * top-k entry's images (not feature visualizations, which `lurker featviz` rewrites). */
/** A feature visualization's image (a unit's, or a direction's of the layer). */
const FEATVIZ_IMAGE = /^\/runs\/([^/]+)\/layers\/([^/]+)\/(?:units\/\d+\/)?featviz\//;
const RUN_IMAGE = /^\/runs\/([^/]+)\/(?:samples\/[^/]+\/image|layers\/[^/]+\/units\/\d+\/(?:max|mean)\/\d+\/[a-z_]+)\.png$/;

/** Join segments into an API path, each one URL-encoded: `p("runs", id)` -> `/runs/ID`. */
export function p(...segments: (string | number)[]): string {
  return segments.map((s) => "/" + encodeURIComponent(String(s))).join("");
}

/** Where the server's check of a run's model against its recorded fingerprint stands. */
export type ModelCheckState = "checking" | "ok" | "refused" | null;

/** `GET /runs/RUN/model-check`: the check's state and what the summary's holds say now. */
export interface ModelCheck {
  state: ModelCheckState;
  live: boolean;
  live_reason: string | null;
}

export class Api {
  readonly isStatic: boolean;
  private cache = new Map<string, Promise<unknown>>();
  /** Per run id, its summary's `images_version`, once the summary was read. */
  private versions = new Map<string, string>();
  /** Per run id, the `generation` of the summary the page's cached documents belong to. */
  private generations = new Map<string, string>();
  /** Per run id, the `additions` of the summary the page's cached documents belong to. */
  private additions = new Map<string, Partial<Record<Addition, string | null>>>();
  /** Per run id, each layer's featviz token, as {@link additions}. */
  private featvizLayers = new Map<string, Record<string, string>>();
  /** Per run id, the {@link runChanges} check under way. */
  private checking = new Map<string, Promise<RunChanges>>();

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

  /** URL of a PNG (static: the file the export wrote at the same path). A run's sample
   * and top-k entry images carry its `images_version` (`?v=`), which the server answers
   * as immutable: a page seen again costs no request per image, and a run probed again
   * has another token, so never a stale picture. */
  pngUrl(path: string): string {
    if (this.isStatic) return this.staticPath(path);
    const f = FEATVIZ_IMAGE.exec(path);
    if (f) {
      // `lurker featviz` rewrites these files under the same path: the layer's featviz
      // token makes each write's images new URLs, never the browser's copy of the old ones
      const run = decodeURIComponent(f[1]);
      const layers = this.featvizLayers.get(run);
      const token = layers ? layers[decodeURIComponent(f[2])] : this.additions.get(run)?.featviz;
      return "api" + path + (token ? "?f=" + encodeURIComponent(token) : "");
    }
    const m = RUN_IMAGE.exec(path);
    const version = m ? this.versions.get(decodeURIComponent(m[1])) : undefined;
    return "api" + path + (version ? "?v=" + encodeURIComponent(version) : "");
  }

  /**
   * A sample's signal document, fetched once per page life and URL (the entries of all
   * the units that rank the sample share it). Served: `columns` cuts each channel into
   * per-column min..max, and the run's token (`?v=`) lets the browser keep it for good,
   * as a sample's image. A static export holds one file of every value per sample.
   */
  signalDoc(run: string, id: number, columns?: number): Promise<SignalDoc> {
    const path = p("runs", run, "samples", id, "signal");
    if (this.isStatic) return this.get<SignalDoc>(this.staticPath(path) + ".json", true, null);
    const q = new URLSearchParams();
    if (columns) q.set("columns", String(columns));
    const version = this.versions.get(run);
    if (version) q.set("v", version);
    const query = q.toString();
    return this.get<SignalDoc>("api" + path + ".json" + (query ? "?" + query : ""), true, null);
  }

  /** The run's summary (its manifest). */
  summary(run: string): Promise<RunSummary> {
    return this.json<RunSummary>(p("runs", run));
  }

  /**
   * The run's summary once the server's check of its model against the run's recorded
   * fingerprint has ended (`holds.model_check` no longer "checking": the first summary
   * starts it in the background and answers at once, not live meanwhile). Waits on
   * `/runs/RUN/model-check?wait=20`, which answers as soon as the check ends, then reads
   * the summary again; gives up (the summary as it is) when `signal` fires.
   */
  async checkedSummary(run: string, signal?: AbortSignal): Promise<RunSummary> {
    let s = await this.summary(run);
    while (!this.isStatic && s.holds.model_check === "checking" && !signal?.aborted) {
      const c = await this.get<ModelCheck>(this.jsonUrl(p("runs", run, "model-check")) + "?wait=20", false, null);
      if (c.state === "checking") continue;
      this.cache.delete(this.jsonUrl(p("runs", run)));
      s = await this.summary(run);
    }
    return s;
  }

  /** GET a JSON document; immutable run documents are cached for the page's life. A
   * run's summary, whoever asks for it first, also tells {@link pngUrl} the run's token
   * (until then its images are asked for without one, and revalidated). */
  json<T>(path: string, { cache = true }: { cache?: boolean } = {}): Promise<T> {
    const got = this.get<T>(this.jsonUrl(path), cache, path);
    const summary = /^\/runs\/([^/?]+)$/.exec(path);
    if (!summary) return got;
    return got.then((doc) => {
      const run = decodeURIComponent(summary[1]);
      const { images_version: version, generation, additions, featviz_layers: layers } = doc as RunSummary;
      if (version) this.versions.set(run, version);
      if (generation && !this.generations.has(run)) this.generations.set(run, generation);
      if (additions && !this.additions.has(run)) this.additions.set(run, additions);
      if (layers && !this.featvizLayers.has(run)) this.featvizLayers.set(run, layers);
      return doc;
    });
  }

  /**
   * How the run changed since the page read its summary: one small request
   * (`/runs/RUN/generation`). `probe`: probed again (or its resumed probe finished);
   * `featviz`, `map`: `lurker featviz` or `lurker map` wrote into it (for `featviz`, the
   * layers it wrote). On any change, everything the page holds of the run (its
   * documents, decoded images; for a probe its image token too) is dropped, so the next
   * page asks the server again and never shows the earlier run's values or pictures, or
   * lacks what was added, as the current ones; on new feature visualizations alone, only
   * the summary and the documents of the layers written (another layer's pages changed
   * nothing).
   * When only the run's image cache was remade (`cache/` deleted: same generation,
   * another `images_version`), the image token and decoded images alone are dropped, and
   * it answers no change: no value the page shows changed. No change in a static export
   * (it never changes under a page), before the summary was read, and when the server
   * cannot be reached. One check per run at a time: a second caller while one is under
   * way shares its answer (two would both see the old token and both report the one
   * change).
   */
  runChanges(run: string): Promise<RunChanges> {
    const pending = this.checking.get(run);
    if (pending) return pending;
    const check = this.checkRun(run).finally(() => this.checking.delete(run));
    this.checking.set(run, check);
    return check;
  }

  private async checkRun(run: string): Promise<RunChanges> {
    const none: RunChanges = { kinds: [], featvizLayers: [] };
    const known = this.generations.get(run);
    if (this.isStatic || known === undefined) return none;
    let now: RunGeneration;
    try {
      now = await this.get<RunGeneration>(this.jsonUrl(p("runs", run, "generation")), false, null);
    } catch {
      return none;
    }
    const prefix = this.jsonUrl(p("runs", run));
    const had = this.additions.get(run) ?? {};
    const added = (["featviz", "map", "vocab"] as const).filter((k) => now.additions !== undefined && (had[k] ?? null) !== (now.additions[k] ?? null));
    if (now.generation === known && !added.length) {
      const version = this.versions.get(run);
      if (version !== undefined && (now.images_version ?? undefined) !== version) {
        // the cached summary would hand the old token out again
        this.cache.delete(prefix);
        for (const url of [...decoded.keys()]) if (url.startsWith(prefix + "/")) decoded.delete(url);
        this.versions.delete(run);
        if (now.images_version) this.versions.set(run, now.images_version);
      }
      return none;
    }
    // the layers `lurker featviz` wrote: those whose token differs (all, where a server
    // gives no layer's token)
    const before = this.featvizLayers.get(run);
    const after = now.featviz_layers;
    const layers =
      before && after ? [...new Set([...Object.keys(before), ...Object.keys(after)])].filter((l) => before[l] !== after[l]) : null;
    // a re-probe or a map changes what any page may show: everything held is dropped; new
    // feature visualizations, only the summary and the documents of the layers written
    const all = now.generation !== known || added.includes("map") || added.includes("vocab") || layers === null;
    const scopes = all ? [prefix] : [prefix + "?", ...layers.map((l) => this.jsonUrl(p("runs", run, "layers", l)))];
    const under = (url: string) => scopes.some((s) => url === s || url.startsWith(s + "/") || url.startsWith(s + "?"));
    for (const url of [...this.cache.keys()]) if (url === prefix || under(url) || url === this.jsonUrl("/runs")) this.cache.delete(url);
    for (const url of [...decoded.keys()]) if (under(url)) decoded.delete(url);
    this.versions.delete(run);
    this.generations.delete(run);
    this.additions.delete(run);
    this.featvizLayers.delete(run);
    // the new summary sets the new token and generation before any page asks for images
    await this.summary(run).catch(() => undefined);
    if (!this.generations.has(run)) this.generations.set(run, now.generation);
    if (!this.additions.has(run) && now.additions) this.additions.set(run, now.additions);
    if (!this.featvizLayers.has(run) && now.featviz_layers) this.featvizLayers.set(run, now.featviz_layers);
    if (now.generation !== known) return { kinds: ["probe"], featvizLayers: [] };
    return { kinds: added, featvizLayers: layers };
  }

  /** A file only a static export has (`data/` + safe segments), e.g. the unit chunks. */
  private exportFile<T>(...segments: (string | number)[]): Promise<T> {
    return this.get<T>("data/" + segments.map((s) => staticSegment(String(s))).join("/") + ".json", true, null);
  }

  private get<T>(url: string, cache: boolean, path: string | null): Promise<T> {
    const hit = cache ? this.cache.get(url) : undefined;
    if (hit) return hit as Promise<T>;
    // a static export answers a missing document with the server's 404 text (what exists)
    // and never asks for a file it does not hold
    const missing = this.isStatic && path !== null ? this.missing(path) : Promise.resolve(null);
    const req = missing.then((why) => {
      if (why) throw new ApiError(404, why);
      return fetch(url).then((res) => readJson<T>(res, url));
    });
    if (cache) {
      this.cache.set(url, req);
      req.catch(() => this.cache.delete(url));
    }
    return req;
  }

  /** Static mode: why the export has no document at `path` (null: it has one). */
  private async missing(path: string): Promise<string | null> {
    const segs = path.split("?")[0].split("/").slice(1).map((s) => decodeURIComponent(s));
    if (segs[0] !== "runs" || segs.length < 2) return null;
    const run = segs[1];
    if (segs.length === 2) {
      const { runs } = await this.json<{ runs: RunListEntry[] }>("/runs");
      const ids = runs.map((r) => r.id);
      return ids.includes(run) ? null : `no run '${run}'; runs: ${listing(ids)}`;
    }
    if (segs[2] === "explain" && segs[3] === "methods") return null;
    if (segs[2] === "live" || segs[2] === "explain") {
      const held = segs[2] === "live" ? (await this.explained(run)).samples.find((e) => e.image === segs[3]) : undefined;
      const query = new URLSearchParams(path.split("?")[1] ?? "");
      const method = (segs[5] ?? "").replace(/\.(json|png)$/, "");
      const top = query.get("target") === "top" && !query.has("layer");
      const precomputed = segs[4] === "explain" && top && (held?.methods.includes(method) || (method === "concepts" && !!held?.concepts));
      if (held && (segs.length === 4 || segs[4] === "input.png" || precomputed)) return null;
      const summary = await this.json<RunSummary>(p("runs", run));
      return `this static export has no model: the live views, and explanations other than the precomputed ones, need \`${serveCommand(summary)}\``;
    }
    const summary = await this.json<RunSummary>(p("runs", run));
    if (segs[2] === "map" && !summary.holds.map)
      return `this export holds no dataset map of run '${run}': make one with \`lurker map RUN\`, then export again`;
    if (segs[2] === "layers" && segs.length >= 4) {
      const names = summary.layers.map((l) => l.name);
      if (!names.includes(segs[3])) return `no layer '${segs[3]}' in run '${run}'; layers: ${listing(names)}`;
    }
    if (segs[2] === "samples" && segs.length === 4) {
      const ex = await this.exportedSamples(run);
      if (!ex.samples.some((s) => String(s.id) === segs[3]))
        return (
          `sample ${segs[3]} is not in this static export: it holds the ${ex.samples.length} samples that ` +
          `some unit ranks in its top-k (of ${ex.total}); serve the run (\`lurker serve RUN\`) to see every sample`
        );
    }
    return null;
  }

  /** Static mode: how the layer's unit documents are chunked, and its grid's top images. */
  unitsIndex(run: string, layer: string): Promise<UnitsIndex> {
    return this.json<RunSummary>(p("runs", run)).then((summary) => {
      const names = summary.layers.map((l) => l.name);
      if (!names.includes(layer)) throw new ApiError(404, `no layer '${layer}' in run '${run}'; layers: ${listing(names)}`);
      return this.exportFile<UnitsIndex>("runs", run, "layers", layer, "units", "index");
    });
  }

  /** The samples whose explanations the run's cache (a static export: the export) holds,
   * which need no model (none for an export made before explanations were exported). */
  explained(run: string): Promise<ExplainedIndex> {
    const doc = this.isStatic ? this.exportFile<ExplainedIndex>("runs", run, "explained") : this.json<ExplainedIndex>(p("runs", run, "explained"), { cache: false });
    return doc.catch(() => ({ target: "top", samples: [] }));
  }

  /** Static mode: the samples the export holds. */
  exportedSamples(run: string): Promise<ExportedSamples> {
    return this.exportFile<ExportedSamples>("runs", run, "exported-samples");
  }

  /** A unit's document (the API's), and in static mode which of its images the export holds. */
  async unit(run: string, layer: string, unit: string): Promise<{ doc: UnitDoc; shown: Shown | null; noImage: string | null }> {
    if (!this.isStatic) return { doc: await this.json<UnitDoc>(p("runs", run, "layers", layer, "units", unit)), shown: null, noImage: null };
    const index = await this.unitsIndex(run, layer);
    const u = Number(unit);
    if (!/^\d+$/.test(unit) || u >= index.num_units) {
      throw new ApiError(404, `no unit ${unit} in layer '${layer}': it has ${index.num_units} units (0..${index.num_units - 1})`);
    }
    const chunk = await this.exportFile<UnitChunk>("runs", run, "layers", layer, "units", `chunk-${Math.floor(u / index.chunk)}`);
    return { doc: chunk.units[u - chunk.offset], shown: chunk.images[u - chunk.offset], noImage: index.no_image ?? null };
  }

  /** POST a JSON body (the live view's typed inputs; served mode only). */
  async postJson<T>(path: string, body: unknown): Promise<T> {
    const url = "api" + path;
    return readJson<T>(await fetch(url, { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } }), url);
  }

  /** POST a file (live uploads; served mode only). */
  async upload<T>(path: string, file: Blob, name = "upload"): Promise<T> {
    const body = new FormData();
    body.append("file", file, name);
    const url = "api" + path;
    return readJson<T>(await fetch(url, { method: "POST", body }), url);
  }
}

/** `a, b, c, ... (12 more)`: the first 40 names, as the server's 404 bodies list them. */
function listing(names: string[], limit = 40): string {
  const more = names.length - limit;
  return (names.slice(0, limit).join(", ") || "(none)") + (more > 0 ? `, ... (${more} more)` : "");
}

const decoded = new Map<string, Promise<HTMLImageElement>>();

/** A decoded image, loaded once per URL (a sample is the top image of many units). */
export function loadImage(url: string): Promise<HTMLImageElement> {
  let hit = decoded.get(url);
  if (!hit) {
    const img = new Image();
    img.src = url;
    hit = img.decode().then(() => img);
    decoded.set(url, hit);
    hit.catch(() => decoded.delete(url));
  }
  return hit;
}

let watcher: IntersectionObserver | null = null;
const pending = new WeakMap<Element, () => void>();

/**
 * The receptive-field crop of an image, cut in the browser exactly as the server's
 * `lurker.probe.images.crop` cuts it: the half-open box `[y0, y1, x0, x1]` (null: the
 * whole image) clipped to the image, then enlarged by nearest neighbour by
 * `ceil(64 / longer side)` when that side is under 64 px. With `lazy`, drawn when it
 * scrolls into view. The canvas gets `data-ready` once drawn.
 */
export function cropCanvas(url: string, box: number[] | null, label: string, lazy = false): HTMLCanvasElement {
  const canvas = document.createElement("canvas");
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", label);
  canvas.dataset.src = url;
  if (box) canvas.dataset.box = box.join(",");
  const draw = () =>
    loadImage(url).then(
      (img) => {
        const W = img.naturalWidth;
        const H = img.naturalHeight;
        const [by0, by1, bx0, bx1] = box ?? [0, H, 0, W];
        const y0 = Math.max(by0, 0);
        const y1 = Math.min(by1, H);
        const x0 = Math.max(bx0, 0);
        const x1 = Math.min(bx1, W);
        if (y1 <= y0 || x1 <= x0) {
          canvas.dataset.error = `the box ${box} does not overlap the ${H}x${W} image`;
          return;
        }
        const longest = Math.max(y1 - y0, x1 - x0);
        const k = longest < 64 ? Math.ceil(64 / longest) : 1;
        canvas.width = (x1 - x0) * k;
        canvas.height = (y1 - y0) * k;
        const c = canvas.getContext("2d");
        if (!c) return;
        c.imageSmoothingEnabled = false;
        c.drawImage(img, x0, y0, x1 - x0, y1 - y0, 0, 0, canvas.width, canvas.height);
        canvas.dataset.ready = "1";
      },
      () => (canvas.dataset.error = `cannot load ${url}`),
    );
  if (!lazy || typeof IntersectionObserver === "undefined") {
    void draw();
    return canvas;
  }
  watcher ??= new IntersectionObserver(
    (seen) => {
      for (const e of seen) {
        if (!e.isIntersecting) continue;
        watcher?.unobserve(e.target);
        pending.get(e.target)?.();
        pending.delete(e.target);
      }
    },
    { rootMargin: "200px" },
  );
  pending.set(canvas, () => void draw());
  watcher.observe(canvas);
  return canvas;
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

/** The command that serves a run with its model. RUN stands for the run's folder, as in
 * the docs: the run's id is a name, not a path a reader can pass (a run named "run" read as
 * a verb). A static export of a run that records its model needs nothing more; a server
 * without a model although the run records one could not load it, so it names both. */
export function serveCommand(summary: RunSummary, isStatic = true): string {
  return isStatic && summary.model.spec ? "lurker serve RUN" : "lurker serve RUN --model SPEC --weights W";
}
