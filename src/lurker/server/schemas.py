"""Pydantic models of every JSON response of the explorer's API (see docs/explorer.md).

They are the contract the web front end and scripts build against; ``/openapi.json`` is
generated from them. Floats that the run stores as NaN travel as ``null``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every error: one sentence or paragraph that says what went wrong and what exists."""

    detail: str


# -- runs ---------------------------------------------------------------------------------


class RunListEntry(BaseModel):
    id: str
    model: str | None = None
    #: How the run loads its model, its weights and its dataset, and when it was probed:
    #: what tells two runs of one architecture apart on the runs page.
    spec: str | None = None
    weights: str | None = None
    dataset: str | None = None
    created: str | None = None
    status: str | None = None
    layers: int = 0
    units: int = 0
    samples: int = 0
    #: The run holds a dataset map (``lurker map RUN``).
    map: bool = False
    #: Set for a folder entry that is not a readable run (the reason); such a run
    #: cannot be opened.
    error: str | None = None


class RunList(BaseModel):
    runs: list[RunListEntry]


class ModelInfo(BaseModel):
    name: str | None = None
    spec: str | None = None
    weights: str | None = None
    params: int | None = None
    ops: int | None = None
    input_shape: list[int] | None = None
    flops: int | None = None
    #: ops whose FLOPs are unknown, left out of ``flops`` (then a lower bound)
    flops_unknown: int | None = None


class SkippedFile(BaseModel):
    path: str
    reason: str


class TransparentImages(BaseModel):
    count: int = Field(description="images whose transparency the loader dropped")
    examples: list[str] = Field(description="up to two of their paths")


class DatasetInfo(BaseModel):
    spec: str | None = None
    description: str | None = None
    size: int
    classes: list[str]
    skipped: list[SkippedFile] = Field(description="the first 100 unreadable inputs")
    skipped_count: int
    transparent_images: TransparentImages | None = Field(
        None,
        description="the run's meta transparent_images: images fed without their alpha "
        "(null: not checked, a dataset lurker does not decode itself or a run from before)",
    )
    labels_ignored: str | None = Field(
        None,
        description="why the probe kept no classes though the items had labels (the reason "
        "of the run's meta labels_ignored: they were not class indices); null: none, or a "
        "run from before",
    )
    image_size: list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    #: The token ids per sample where the inputs are sequences of token ids (a text
    #: model's): they have no picture, and the pages show their tokens instead. Null for
    #: images and clips.
    tokens: int | None = None
    #: How many ids the run's vocabulary names (the pages show words beside the ids);
    #: null without one, and for inputs that are not token ids.
    vocab_size: int | None = None
    #: Whether that vocabulary is character-level (every token one character, space and
    #: newline included): Live then reads typed text one character per token, not words.
    vocab_chars: bool = False
    #: Why the vocabulary given to the server shows no words on this run (it does not fit
    #: it: the pages show the ids), ``run '<id>': ...``; null when it fits or none is given.
    vocab_error: str | None = None
    #: The values per input where the inputs are flat vectors of numbers and not token ids
    #: (a tabular model's features): they have no picture. Null else.
    features: int | None = None
    #: The name of each feature of such vectors, from the dataset's ``feature_names`` as
    #: the probe stored them; null where it had none.
    feature_names: list[str] | None = None
    #: ``[C, T]`` where the inputs are signals, channels by time (each sample two axes:
    #: a Conv1d stack's ``(N, C, T)`` batch): the pages draw them as lines. Null else.
    signal: list[int] | None = None
    #: The name of each channel of such signals (EEG electrodes), from the dataset's
    #: ``channel_names`` as the probe stored them; null where it had none.
    channel_names: list[str] | None = None
    #: The signals' sampling rate in Hz, from the dataset's ``sample_rate`` as the probe
    #: stored it: the pages give times in seconds beside samples. Null where it had none.
    sample_rate: float | None = None
    #: Each channel of such signals' least and greatest finite value over the dataset and
    #: its count of finite values (``{min, max, finite}``, lists of ``C``; min/max null
    #: for a channel with none), as the probe recorded them: feature visualizations are
    #: bounded to them. Null for other inputs and runs probed before lurker recorded them.
    channel_range: dict[str, list[Any]] | None = None


class ModelCheck(BaseModel):
    """Where the check of a run's model against its recorded fingerprint stands (the Home
    page polls it while the summary said ``checking``)."""

    state: Literal["checking", "ok", "refused"] | None = None
    #: ``holds.live`` and ``holds.live_reason`` of the run's summary, now.
    live: bool
    live_reason: str | None = None


class ProbeInfo(BaseModel):
    k: int | None = None
    hist_bins: int | None = None
    created: str | None = None
    lurker_version: str | None = None
    store_version: int
    status: str | None = None


class Holds(BaseModel):
    graph: bool
    #: A model is attached or loadable (the live endpoints work).
    live: bool
    #: Why ``live`` is false (what to pass to get a model); null when it is true.
    live_reason: str | None = None
    #: The attached model's check against the run's recorded fingerprint: ``checking``
    #: (under way in the background: ``live`` is false until it passes; ask
    #: ``/runs/{run}/model-check``), ``ok``, ``refused`` (``live_reason`` says why); null
    #: where there is nothing to check (no model, a run that records no fingerprint).
    model_check: Literal["checking", "ok", "refused"] | None = None
    #: The run's dataset can be loaded (sample images without a cached file).
    dataset: bool = False
    #: Why ``dataset`` is false (how to give the run its images); null when it is true.
    dataset_reason: str | None = None
    cached_images: int
    #: layers with stored feature visualizations (``lurker featviz``)
    featviz: list[str] = []
    #: The run holds a dataset map (``lurker map RUN``; the Map page).
    map: bool = False
    #: The units have relevance-max lists (probed with ``relevance=True``).
    relevance: bool = False
    #: Dataset samples with precomputed explanations (``lurker images RUN --explanations``).
    explained: int = 0


class LayerBrief(BaseModel):
    name: str
    module: str | None = None
    op: str | None = None
    kind: str | None = None
    num_units: int
    shape: list[int]
    op_index: int | None = None
    #: What each unit is of its class where the layer's units are the model's output
    #: classes (``"score"``, ``"probability"``, ``"log-probability"``: see
    #: ``lurker.server.classes.class_units``); null for any other layer.
    class_value: str | None = None


class RunSummary(BaseModel):
    id: str
    model: ModelInfo
    dataset: DatasetInfo
    probe: ProbeInfo
    holds: Holds
    #: What this run lacks (older store versions): e.g. "graph", "op_index".
    missing: list[str]
    layers: list[LayerBrief]
    #: A token of the run as probed: its sample and top-k entry image URLs with
    #: ``?v=<token>`` are served ``immutable`` (a run probed again gets another token).
    #: Null while the run is not complete.
    images_version: str | None = None
    #: A token of the run as this summary describes it: another value (``GET
    #: /api/runs/{run}/generation``) means the run was probed again, or its probe went on,
    #: and every document and image a page holds of it may be stale.
    generation: str | None = None
    #: :attr:`RunGeneration.additions` as this summary describes the run.
    additions: dict[str, str | None] = Field(default_factory=dict)
    #: :attr:`RunGeneration.featviz_layers` as this summary describes the run.
    featviz_layers: dict[str, str] = Field(default_factory=dict)


class RunGeneration(BaseModel):
    """What an open page polls to notice that its run changed under it (one stat)."""

    id: str
    generation: str
    status: str | None = None
    #: The run's :attr:`RunSummary.images_version` now: another value with the same
    #: ``generation`` means only its image cache was remade (``cache/`` deleted), so a
    #: page drops its image token and keeps everything else.
    images_version: str | None = None
    #: Tokens of what commands add to the run without probing it again (the same
    #: ``generation``), by kind: ``featviz`` (``lurker featviz``), ``map`` (``lurker
    #: map``) and ``vocab`` (a vocabulary stored by a probe again of the finished run),
    #: null while it holds none. Another value: a page showing them (a unit's
    #: feature visualizations, the Map page) is out of date.
    additions: dict[str, str | None] = Field(default_factory=dict)
    #: The ``featviz`` token of each layer that has feature visualizations, by layer name:
    #: a page of one layer (its unit pages, its images' URLs) looks at its layer's alone,
    #: so ``lurker featviz`` on another layer leaves it alone.
    featviz_layers: dict[str, str] = Field(default_factory=dict)


# -- layers and units ---------------------------------------------------------------------


class Histogram(BaseModel):
    edges: list[float | None]
    counts: list[float | None]


class UnitBrief(BaseModel):
    unit: int
    mean: float | None = None
    max: float | None = None
    top_max: int | None = Field(None, description="sample id at rank 0 of the max list")
    top_mean: int | None = Field(None, description="sample id at rank 0 of the mean list")
    #: ``[y, x]`` of that max sample's peak in the unit's map (as the unit document's
    #: entries: ``[0, token]`` on a layer of tokens), null on a layer without positions;
    #: the layer page marks a peak at a token with no patch (a class token) by it
    top_max_peak: list[int] | None = None
    #: Where the run's inputs are token ids and its dataset is at hand: the tokens of that
    #: max sample around its peak token (3 either side), starting at ``top_max_tokens_start``
    #: (the layer page's tile, in place of an image); null otherwise.
    top_max_tokens: list[int] | None = None
    top_max_tokens_start: int | None = None
    #: The text of each of ``top_max_tokens`` by the run's vocabulary; null without one.
    top_max_token_text: list[str | None] | None = None
    #: The unit holds its ``max`` on every sample at every position (a ReLU that never
    #: fires: 0): its top lists are ties, ranked by sample id alone.
    constant: bool = False
    #: A run of signals: the half-open span ``[t0, t1)`` of samples that max sample's peak
    #: sees (its receptive field, clipped); null on a layer without positions or elsewhere.
    top_max_span: list[int] | None = None


class UnitWeight(BaseModel):
    unit: int
    weight: float


class DirectionBrief(BaseModel):
    """A direction's stored feature visualizations (objective "direction"): images at
    ``.../layers/{layer}/featviz/direction/{index}/{copy}.png``."""

    index: int
    activations: list[float | None] = Field(description="per copy: the objective reached")
    units: int = Field(description="how many weights the direction has (the layer's units)")
    top_units: list[UnitWeight] = Field(
        description="the units of largest |weight|, largest first (at most 5)"
    )


class FeatureValue(BaseModel):
    #: the feature's index in the vector
    index: int
    #: its value as the model is fed it; null where it is not finite
    value: float | None = None


class FeatureTile(BaseModel):
    """A sample's feature vector as a layer tile shows it: binned, not every value (a
    layer of 2,000 units over 500 features would send a million numbers)."""

    #: how many features the vector holds
    count: int
    #: the first feature of each bin (bins of consecutive features, at most 64, in order;
    #: bin ``i`` runs to ``starts[i + 1] - 1``, the last to ``count - 1``)
    starts: list[int]
    #: per bin, the value of largest |value| in it, signed; null where one is not finite
    strip: list[float | None]
    #: the (at most) 3 features of largest |value|, largest first (ties by index; values
    #: that are not finite last)
    top: list[FeatureValue]


class SignalTile(BaseModel):
    """A sample's signal as a tile draws it: per channel, each pixel column's minimum and
    maximum (every extreme kept, none averaged away), not every value (a layer of 2,000
    units over 8 x 4,000 samples would send 64 million numbers)."""

    #: how many samples (time steps) the signal holds
    length: int
    #: how many channels it holds (``lo``/``hi`` carry at most the first 8)
    channels: int
    #: the first sample of each column (consecutive samples, at most 48 columns, in order;
    #: column ``i`` runs to ``starts[i + 1] - 1``, the last to ``length - 1``); one per
    #: sample where the signal is that short
    starts: list[int]
    #: per channel drawn, per column: the least value in it (null where one is not finite)
    lo: list[list[float | None]]
    #: per channel drawn, per column: the greatest value in it (null where one is not finite)
    hi: list[list[float | None]]


class SignalDoc(BaseModel):
    """One sample's signal, channels first (a channels-last run's transposed), as the
    pages draw it: fetched once per sample (the entries of every unit that ranks it
    share it), not embedded in each unit's document. Values are rounded to 7
    significant digits (a relative error up to 5e-7: what a plot needs); a value that
    is not finite is null."""

    #: the sample's id
    id: int
    #: how many samples (time steps) each channel holds
    length: int
    #: how many channels the signal holds
    channels: int
    #: each channel's name (the dataset's ``channel_names``), null where it gave none
    channel_names: list[str] | None = None
    #: without ``columns``: every value, one list of ``length`` per channel; else null
    values: list[list[float | None]] | None = None
    #: with ``columns=N``: the first sample of each of at most N columns of consecutive
    #: samples (numpy's ``array_split``), and per channel (all of them) each column's
    #: least (``lo``) and greatest (``hi``) value, null where one is not finite
    starts: list[int] | None = None
    lo: list[list[float | None]] | None = None
    hi: list[list[float | None]] | None = None


class LayerDetail(BaseModel):
    layer: LayerBrief
    rf: dict[str, Any] | None = None
    #: why ``rf`` is null (the op that broke the chain from the input), where the run says
    rf_reason: str | None = None
    layout: dict[str, Any] | None = None
    histogram: Histogram
    units: list[UnitBrief]
    #: units with a stored feature visualization (objective "channel"), null for none
    featviz_units: list[int] | None = None
    #: per objective ("channel", "neuron"): the units with a stored image of it, null for
    #: none. The grid shows a unit's channel image, else its neuron image. (Direction
    #: images index directions, not units: ``featviz_directions``.)
    featviz_objectives: dict[str, list[int]] | None = None
    #: the directions with stored images (``featviz(..., objective="direction")``), null
    #: for none: a direction mixes the units, so the layer page shows them, not a unit page
    featviz_directions: list[DirectionBrief] | None = None
    #: How many of its units are constant on the dataset (``units[i].constant``).
    constant_units: int = 0
    #: Unit ``i``'s class name, where the units are the model's output classes
    #: (``layer.class_value`` says what of it); null for any other layer.
    class_names: list[str] | None = None
    #: Where the run's inputs are feature vectors and its dataset is at hand: each unit's
    #: ``top_max`` sample's values as its tile shows them in place of an image (binned, and
    #: the largest by |value|), by sample id; null otherwise.
    features: dict[str, FeatureTile] | None = None
    #: Why such a run's tiles have no feature values (no dataset, or one that changed).
    features_error: str | None = None
    #: Where the run's inputs are signals and its dataset is at hand: each unit's
    #: ``top_max`` sample as its tile draws it (per column min..max), by sample id; null
    #: otherwise.
    signals: dict[str, SignalTile] | None = None
    #: Why such a run's tiles have no signals (no dataset, or one that changed).
    signals_error: str | None = None
    #: Where the run's inputs are signals and it holds feature visualizations of the
    #: layer: each unit's (its channel objective's, else its neuron objective's first
    #: copy) as a tile, keyed by unit: the grid's featviz view draws these lines.
    featviz_signals: dict[str, SignalTile] | None = None


class UnitLayer(BaseModel):
    name: str
    module: str | None = None
    op: str | None = None
    kind: str | None = None
    num_units: int
    shape: list[int]
    rf: dict[str, Any] | None = None
    layout: dict[str, Any] | None = None
    op_label: str | None = None
    op_index: int | None = None
    #: why ``rf`` is null (the op that broke the chain from the input), where the run says
    rf_reason: str | None = None


class TopEntryModel(BaseModel):
    rank: int
    sample_id: int
    value: float | None = None
    y: int | None = None
    x: int | None = None
    label: int | None = None
    class_name: str | None = None
    path: str | None = None
    #: Half-open input box ``[y0, y1, x0, x1]`` the peak sees (max list, and mean list where
    #: the run stored its peaks; null when the position has no place in the image or the
    #: run has no receptive field for it).
    box: list[int] | None = None
    #: A video model's layer (peaks over frames, rows, columns): the frame of the clip its
    #: images are cut from and ``box`` is drawn on (``/samples/{id}/frames/{frame}.png``), a
    #: frame inside ``frames``; null for images.
    frame: int | None = None
    #: Half-open ``[t0, t1]``: the frames of the clip the peak sees (its receptive field in
    #: time); null for images, and for a run probed before clip fields were stored.
    frames: list[int] | None = None
    #: Where the run's inputs are token ids and its dataset is at hand: the sample's token
    #: ids (its peak is token ``x``); null otherwise (images, or no dataset).
    tokens: list[int] | None = None
    #: The text of each of ``tokens`` by the run's vocabulary (``lurker.vocab``: stored by
    #: the probe, or given to the server), null for an id it does not name; null without
    #: a vocabulary. The ids stay in ``tokens``.
    token_text: list[str | None] | None = None
    #: Where the run's inputs are feature vectors and its dataset is at hand: the sample's
    #: feature values as the model is fed them (a non-finite one null); null otherwise.
    features: list[float | None] | None = None
    #: On a signal run: the half-open span ``[t0, t1)`` of input samples the peak at ``x``
    #: sees (its receptive field, clipped to the signal); null without one (a layer with
    #: no positions sees the whole signal).
    span: list[int] | None = None


class EntryPeaks(BaseModel):
    """Where a unit peaks on each sample of one of its top lists."""

    which: Literal["max", "mean"]
    #: ``[y, x]`` by rank: the stored peaks (the max list's always, the mean list's in runs
    #: probed since the probe kept them); an older run's mean list's found with the model on
    #: each sample (the place its crop is cut around). On a layer of tokens x is the token
    #: (one with no patch, a class token: the crop is the whole image).
    peaks: list[list[int]]
    #: On a video model's layer, by rank, the clip frame each entry's images are cut from
    #: (its ``input.png``, crop and gradient): the unit document's ``frame``, also for
    #: peaks found with the model. ``None`` elsewhere.
    frames: list[int | None] | None = None


class TopLists(BaseModel):
    max: list[TopEntryModel]
    mean: list[TopEntryModel]
    #: By relevance for the model's prediction; only in runs probed with relevance=True.
    relevance: list[TopEntryModel] | None = None


class FeatVizView(BaseModel):
    """One objective's stored images of the unit."""

    objective: str
    #: what the images maximize, in words ("the unit's mean over its map", "the unit at
    #: position (2, 2) of its map")
    meaning: str
    #: per image (copy): the objective's value the image reached
    activations: list[float | None]
    #: how the images were made (steps, size, parametrization, ...)
    settings: dict[str, Any]
    #: the dataset's counterpart (the channel objective's: the unit's best spatial mean;
    #: none for a neuron, whose value is at one position)
    best_dataset: float | None = None
    best_sample: int | None = None
    #: a run of signals: per copy, the optimized signal ``(C, T)`` in the model's input
    #: units (as ``Run.featviz(layer).signals()`` reads it), null for images
    signals: list[list[list[float]]] | None = None
    #: per copy: the half-open span ``[t0, t1)`` of samples the unit's peak on that signal
    #: sees (its receptive field), null where it sees the whole signal
    spans: list[list[int] | None] | None = None


class FeatVizInfo(BaseModel):
    """The unit's stored feature visualizations (``lurker featviz``); images at
    ``.../units/{unit}/featviz/{objective}/{copy}.png``. The top-level fields are the
    default objective's (channel where present); ``views`` has every objective's."""

    objective: str
    #: every objective the unit has images for
    objectives: list[str]
    #: per image (copy): the objective's value the image reached
    activations: list[float | None]
    #: how the images were made (steps, size, parametrization, ...)
    settings: dict[str, Any]
    #: the channel objective's counterpart in the dataset: the unit's best spatial mean
    best_dataset: float | None = None
    best_sample: int | None = None
    #: a run of signals: per copy, the optimized signal ``(C, T)`` in the model's input
    #: units (as ``Run.featviz(layer).signals()`` reads it), null for images
    signals: list[list[list[float]]] | None = None
    #: per copy: the half-open span ``[t0, t1)`` of samples the unit's peak on that signal
    #: sees (its receptive field), null where it sees the whole signal
    spans: list[list[int] | None] | None = None
    #: every objective the unit has images for, in ``objectives`` order
    views: list[FeatVizView] = []


class OutputClass(BaseModel):
    """The class a unit of the model's output layer stands for."""

    #: class index (the unit's index)
    class_: int = Field(alias="class", serialization_alias="class")
    #: the dataset's class name
    name: str
    #: what the unit is of the class: "score" (logit), "probability", "log-probability"
    value: str

    model_config = {"populate_by_name": True}


class UnitDetail(BaseModel):
    layer: UnitLayer
    unit: int
    mean: float | None = None
    max: float | None = None
    top: TopLists
    class_means: dict[str, float | None]
    histogram: Histogram
    prev: int | None = None
    next: int | None = None
    num_units: int
    #: null when the run holds no feature visualization of this unit
    featviz: FeatVizInfo | None = None
    #: The class the unit stands for where its layer's units are the model's output
    #: classes (``lurker.server.classes.class_units``); null for any other unit.
    output_class: OutputClass | None = None
    #: The unit holds its ``max`` on every sample at every position: its max and mean
    #: lists are ties (ranked by sample id alone), its class means all that value.
    constant: bool = False
    #: Per list (max, mean, relevance): how many entries end it as ties that samples
    #: outside it may share (two or more zeros ending a full list, or the whole of a full
    #: list all of one value, in a run of more samples): the sample pages leave them out,
    #: the unit page dims them (or, the whole list, says so).
    tied_tail: dict[str, int] = {}
    #: A video model's run: the frames of each clip (its entries' ``frames`` count them).
    clip_frames: int | None = None
    #: A run of token ids: the token ids per sample (its entries' ``tokens``); null else.
    token_length: int | None = None
    #: Why such a run's entries carry no ``tokens`` (no dataset, or one that changed).
    tokens_error: str | None = None
    #: Why a feature-vector run's entries carry no ``features`` (no dataset, or one
    #: that changed); null otherwise.
    features_error: str | None = None
    #: A signal run's ``[C, T]``: channels by samples; null else. Its entries carry their
    #: ``sample_id`` and ``span``: each sample's values are its signal document
    #: (``samples/{id}/signal.json``), one per sample however many units rank it.
    signal_shape: list[int] | None = None
    #: Why a signal run's samples cannot be drawn (no dataset).
    signal_error: str | None = None


# -- samples ------------------------------------------------------------------------------


class SampleModel(BaseModel):
    id: int
    path: str | None = None
    label: int | None = None
    class_name: str | None = None
    #: In a page of samples: the top class as the run recorded it (``lurker map``,
    #: ``lurker probe --embed``) and its name, where the model's outputs are the dataset's
    #: classes (so it can be compared with ``label``); None otherwise.
    pred: int | None = None
    pred_name: str | None = None


class ListedSample(SampleModel):
    """A sample in a page of samples: on a run with no picture (token ids, feature
    vectors), what its tile shows in place of one, read from the dataset for this page."""

    #: A run of token ids: the sample's first ids (at most 16; the run's ``token_length``
    #: says how many it holds), null otherwise or without the dataset.
    tokens: list[int] | None = None
    #: Their text by the run's vocabulary (null for an id it does not name); null without
    #: a vocabulary.
    token_text: list[str | None] | None = None
    #: A run of feature vectors: the sample's values as a layer tile bins them; null
    #: otherwise or without the dataset.
    features: FeatureTile | None = None
    #: A run of signals: the sample as a tile draws it (per column min..max); null
    #: otherwise or without the dataset.
    signal: SignalTile | None = None


class SamplePage(BaseModel):
    total: int
    offset: int
    limit: int
    samples: list[ListedSample]
    #: Why a run of token ids lists its samples without ``tokens`` (no dataset, or one
    #: that changed); null otherwise.
    tokens_error: str | None = None
    #: Why a run of feature vectors lists its samples without ``features``; null otherwise.
    features_error: str | None = None
    #: Why a run of signals lists its samples without ``signal``; null otherwise.
    signal_error: str | None = None


class Prediction(BaseModel):
    #: class index
    class_: int = Field(alias="class", serialization_alias="class")
    #: the dataset's class name; null when the model's outputs are not the dataset's
    #: classes (a 1000-class head over a 3-folder dataset)
    name: str | None
    prob: float
    #: The position whose scores these are where the model scores every position of a
    #: sequence of token ids, ``(1, L, V)``: a language model's next token after the
    #: last, ``L - 1`` (in Live, the last typed token's where the server padded the
    #: input after it: ``padded_from - 1``), named by the run's vocabulary; null for one
    #: score per class.
    position: int | None = None
    #: Where ``position`` is set, this next token as the Explain page's target: its score
    #: at that position, a unit of the layer that makes the scores,
    #: ``LAYER:CLASS:0:POSITION`` (``lurker.explain(model, ids, (LAYER, CLASS, 0,
    #: POSITION))``); null else.
    target: str | None = None

    model_config = {"populate_by_name": True}


class Appearance(BaseModel):
    layer: str
    unit: int
    #: max, mean, or relevance (runs probed with relevance=True)
    list: str
    rank: int
    value: float | None = None


class LayerCount(BaseModel):
    layer: str
    #: Entries of the sample in this layer's top lists (both lists, all units).
    count: int


class SampleDetail(BaseModel):
    sample: SampleModel
    prediction: list[Prediction] | None = None
    #: Why there is no prediction although a model is attached (null otherwise).
    prediction_error: str | None = None
    #: The model's top class for the sample as the run recorded it (``lurker probe
    #: --embed``, ``lurker map``): shown where no model runs (a static export); null when
    #: the run holds none. ``name`` is null when the outputs are not the dataset's classes.
    stored_prediction: Prediction | None = None
    #: The sample's token ids where the run's inputs are token ids and its dataset is at
    #: hand (its picture); null otherwise.
    tokens: list[int] | None = None
    #: The text of each of ``tokens`` by the run's vocabulary (``lurker.vocab``: stored by
    #: the probe, or given to the server), null for an id it does not name; null without
    #: a vocabulary. The ids stay in ``tokens``.
    token_text: list[str | None] | None = None
    #: Why a token sample's ids cannot be shown (no dataset); null otherwise.
    tokens_error: str | None = None
    #: The sample's feature values as the model is fed them, where the run's inputs are
    #: feature vectors and its dataset is at hand (a non-finite one null); null otherwise.
    features: list[float | None] | None = None
    #: Why a feature-vector sample's values cannot be shown (no dataset, or it changed).
    features_error: str | None = None
    #: Why a signal sample's values cannot be shown (no dataset); the values themselves
    #: are the sample's signal document (``samples/{id}/signal.json``), fetched once.
    signal_error: str | None = None
    #: All the top-list entries that hold the sample (``appearances`` is one page of them).
    total: int
    offset: int
    limit: int
    #: The sample's entries per layer, in layer order (every layer that holds it).
    layers: list[LayerCount]
    #: Entries ``offset`` to ``offset + limit``, by layer order, then rank, then list
    #: (max first), then unit.
    appearances: list[Appearance]
    #: Entries that are ties, left out of all the above: in the lists of units constant on
    #: the dataset (ranked by sample id alone: a ReLU that never fires lists the first k
    #: samples), or in a list's tail of two or more entries sharing its last value (a
    #: relevance of 0 where the unit carried nothing), which more samples may share; they
    #: say nothing about the sample.
    left_out: int = 0
    #: Those entries per layer, in layer order.
    left_out_layers: list[LayerCount] = []


# -- live ---------------------------------------------------------------------------------


class LiveImage(BaseModel):
    image: str
    #: The uploaded file's name (the pages' title for it); null for a dataset sample or
    #: an upload sent without one.
    name: str | None = None
    predictions: list[Prediction]
    width: int
    height: int
    #: Why ``predictions`` is empty (the model's output is not one score per class).
    predictions_note: str | None = None
    #: How an upload was changed to prepare it as the dataset loader would (its
    #: transparency dropped); None when it was not.
    input_note: str | None = None
    #: What preparing an upload did to it, in one sentence: its size and colours as sent
    #: and the model's input they became; None for a dataset sample.
    prepared: str | None = None


class LiveInputBody(BaseModel):
    """An input typed in the live view of a run with no picture: one of ``text`` (words
    looked up in the run's vocabulary, split at whitespace), ``ids`` (token ids) or
    ``features`` (one number per feature). Values are checked by the server, which names
    the bad one (a word not in the vocabulary, an id out of range, a value that is not a
    number), so they are taken loosely here."""

    text: str | None = None
    ids: list[Any] | None = None
    features: list[Any] | None = None


class LiveLayerUnits(BaseModel):
    """One probed layer's units on a typed input."""

    layer: str
    op: str | None = None
    num_units: int
    #: positions each unit has on this input (its tokens); 1 for a vector
    positions: int
    #: each unit's mean over its positions (the probe's mean lists), null where not finite
    mean: list[float | None]
    #: each unit's largest value over its positions (the probe's max lists)
    max: list[float | None]
    #: the position of each unit's max (the first where it ties; a token's index where
    #: ``positions`` is the sequence's length), null where the max is not finite or the
    #: unit is equal at every position (a dead ReLU's zeros: it peaks nowhere); null for a
    #: layer with no positions
    peak: list[int | None] | None = None
    #: the 10 units of largest ``max`` (finite values only), highest first
    top: list[int]


class LiveInput(BaseModel):
    """A typed input's document: what the model was fed, its prediction and every probed
    layer's units."""

    #: its id for the other live endpoints (16 hex digits of its content)
    input: str
    #: the token ids fed (a run of token ids), null else
    ids: list[int] | None = None
    #: the vocabulary's word for each id, null where it has none (or no vocabulary)
    words: list[str | None] | None = None
    #: how the typed sequence was made the run's length for a model that takes no other
    #: (padded with the run's padding id, or truncated), null where it was fed as typed
    fitted: str | None = None
    #: the first padding position where the sequence was padded (positions from there to
    #: the end are the padding id), null where nothing was padded
    padded_from: int | None = None
    #: the feature values fed (a run of feature vectors), null else
    features: list[float] | None = None
    feature_names: list[str] | None = None
    predictions: list[Prediction]
    predictions_note: str | None = None
    layers: list[LiveLayerUnits]


class PatchlessToken(BaseModel):
    """A token that stands for no patch of the image (a ViT's class token), which the
    maps of a patch grid leave out: its own value at every unit."""

    #: its index on the tensor's token axis (0: the class token of torchvision's and
    #: timm's ViTs)
    token: int
    #: its value at unit i (map i), in the maps' order; null where not finite
    values: list[float | None]


class FeatureSide(BaseModel):
    #: The op's whole tensor, batch axis included.
    shape: list[int]
    channels: int
    #: ``[height, width]`` of one channel's map (see docs/explorer.md for how tensors
    #: of other ranks are laid out as maps).
    map_shape: list[int]
    #: The axis of ``shape`` whose indices the maps are (the units); null where the
    #: maps are not one per unit (one map of every unit's value) or lurker cannot tell.
    unit_axis: int | None = None
    #: How the maps are laid out where it is not plain: tokens on their patch grid, the
    #: units side by side, or why lurker cannot tell the unit axis.
    note: str | None = None
    #: The maps have one value each (a global pool's ``(1, C, 1, 1)``) and are shown as one
    #: ``1 x C`` map: its position i is channel i (a kernel's input or output index).
    one_value_maps: bool = False
    #: The maps whose values are all equal (a ReLU that did not fire on this image), by
    #: channel: that value (null: no finite value). Their PNGs are flat mid-grey (there
    #: is no range to scale); the page writes the value on them. Empty for
    #: ``one_value_maps`` (each map is one value, shown as a vector).
    constant: dict[int, float | None] = {}
    #: The maps holding values that are not finite (NaN, +inf, -inf), by channel: how
    #: many. Their PNGs mark those positions magenta; their min and max leave them out.
    nonfinite: dict[int, int] = {}
    #: Maps of tokens on their patch grid: the tokens with no patch (a class token), left
    #: out of the maps, each with its value at every unit. Empty on other tensors.
    patchless: list[PatchlessToken] = []


class KernelInfo(BaseModel):
    #: The weight's shape: ``[out, in / groups, *kernel]``; a transposed convolution's
    #: ``[in, out / groups, *kernel]``.
    shape: list[int]
    param: str
    #: The convolution's groups: input ``i`` feeds output ``o`` only in the same group.
    groups: int = 1
    transposed: bool = False
    in_channels: int | None = None
    out_channels: int | None = None


class FilterUnit(BaseModel):
    unit: int
    #: the unit's smallest and largest finite weight (null: none is finite)
    min: float | None = None
    max: float | None = None
    #: how many of its weights are not finite (drawn magenta)
    nonfinite: int = 0


class FilterLayers(BaseModel):
    #: the probed layers whose kernels are drawn as pictures, in the run's order
    layers: list[str]
    #: every other probed layer: why it has none
    reasons: dict[str, str]


class LayerFilters(BaseModel):
    """A first convolution's kernels as pictures (``.../filters.png``, ``.../filter.png``)."""

    layer: str
    op: str
    param: str
    #: the weight's shape, ``[units, channels, kh, kw]``
    shape: list[int]
    channels: int
    colour: Literal["grey", "rgb"]
    #: the layer's largest finite ``|w|``: every unit's kernel is scaled by it
    max_abs: float
    scaling: str
    #: how the run normalised its images (the run's recorded ``normalize``), null if unknown
    normalize: str | None = None
    columns: int
    rows: int
    #: a grid cell's ``[height, width]`` in pixels, and the white gap around cells
    cell: list[int]
    gap: int
    units: list[FilterUnit]


class SignalTime(BaseModel):
    """Where a side of an op lies along a signal run's time (see docs/explorer.md)."""

    #: The side is the model's input itself: its maps are the signal's channels.
    model_input: bool = False
    #: The side's maps are the model input's channels, in order, sample by sample: the
    #: input itself or elementwise ops on it that keep its shape (a dropout, ``x * 0.5``,
    #: an activation); the explorer names them by the dataset's ``channel_names``.
    channels: bool = False
    #: Samples of the input per step of this side, where the receptive field tells it
    #: exactly (every op on the way has a known footprint); null where it does not.
    stride: float | None = None
    #: The input sample step 0's field starts at (may be negative: padding); null with
    #: ``stride``.
    start: float | None = None


class OtherInput(BaseModel):
    """A tensor argument of an op besides the one its live view shows as its input."""

    #: the op whose output it is (its label); null for a parameter
    op: str | None = None
    #: the model parameter it is (its name); null for an op's output
    param: str | None = None
    shape: list[int]


class LiveOp(BaseModel):
    op: str
    index: int
    name: str
    #: The node's kind: ``op``, ``input`` (a model input), ``output`` (what it returns), ...
    kind: str = "op"
    input: FeatureSide | None = None
    #: Label of the op whose output is this op's input (null for model inputs too).
    input_op: str | None = None
    #: The op's other tensor arguments, in argument order, which ``input`` does not show
    #: (a residual ``add``'s branch, a ``cat``'s other parts, attention's keys and values,
    #: a position embedding added): without them, ``input`` reads as the whole input.
    other_inputs: list[OtherInput] = Field(default_factory=list)
    output: FeatureSide
    kernel: KernelInfo | None = None
    #: On a run of signals ``(C, T)``: the input's and output's place along time (null
    #: on other runs, and for a side that is not over time).
    input_time: SignalTime | None = None
    output_time: SignalTime | None = None
    #: The op is an attention call (``scaled_dot_product_attention``): its weights per
    #: head are at ``.../ops/{op}/attention`` (which says why where they cannot be had).
    attention: bool = False


class AttentionPatches(BaseModel):
    """Where an attention op's tokens lie on the image: the patch grid of a ViT, read off
    the trace (the patch embedding's tokens carried to the op's query and key axes)."""

    rows: int
    cols: int
    #: ``[height, width]`` of the image as the model sees it: the frame of ``boxes``
    image_size: list[int]
    #: per key token: its ``[row, col]`` on the grid; null for a token with no patch (a
    #: class token)
    keys: list[list[int] | None]
    #: per query token: its ``[row, col]`` on the grid (null: no patch)
    queries: list[list[int] | None]
    #: per key token: its patch ``[y0, y1, x0, x1]`` in the image (half-open); null: none
    boxes: list[list[int] | None]
    #: the tokens are one window's (windows folded into the batch axis, Swin): ``rows``
    #: x ``cols`` is the stage's whole patch grid, ``boxes`` the window's patches
    window: bool = False


class LiveAttention(BaseModel):
    """An attention op's weights on one image: ``softmax(q kᵀ · scale + mask)`` per head,
    from the op's own query and key on that image (its arguments bound by name), without
    dropout (as in eval mode); on a softmax of attention written out by hand, that
    softmax's output on the image, as the model computed it."""

    op: str
    name: str
    heads: int
    #: the query tokens (L) and key tokens (S)
    queries: int
    keys: int
    #: the query token whose weights ``rows`` and ``mean`` are (default: the first token
    #: with no patch, the class token, where the tokens are patches; else the last of a
    #: causal call; else 0)
    query: int
    #: the head ``matrix`` is of; null: the mean over heads
    head: int | None = None
    #: the scale the scores were multiplied by (the call's ``scale``, else 1/sqrt(E));
    #: null on a softmax op, whose weights are its output as the model computed it
    scale: float | None = None
    #: the call's ``is_causal``: query i sees keys 0..i only
    causal: bool = False
    #: the call's ``attn_mask`` in words (null: none)
    mask: str | None = None
    #: what else the reader should know: dropout the call applies and these weights do
    #: not, a module in train mode, keys shared by query heads (grouped-query attention)
    notes: list[str] = []
    #: per head, the query's weight on each key token (heads x keys; each row sums to 1)
    rows: list[list[float | None]]
    #: the mean of ``rows`` over the heads
    mean: list[float | None]
    #: every query's weights on every key (queries x keys) of ``head`` (or the mean);
    #: null where it is too large to send (``matrix_note`` says so)
    matrix: list[list[float | None]] | None = None
    matrix_min: float | None = None
    matrix_max: float | None = None
    matrix_note: str | None = None
    #: the tokens on the image's patch grid; null where they are not patches
    #: (``patches_note`` says why)
    patches: AttentionPatches | None = None
    patches_note: str | None = None
    #: query tokens whose every key is masked out in some head: their weights are null
    #: there (no softmax)
    masked: list[int] = []
    #: the sequences this one input's weights hold on their batch axis (a Swin's windows
    #: folded into it), and the one shown (null: there is one)
    windows: int = 1
    window: int | None = None
    #: on a softmax op: the op that made its scores (q kᵀ) and the one that takes the
    #: weighted sum of the values with its output (null on a scaled_dot_product_attention)
    scores_op: str | None = None
    values_op: str | None = None
    #: on a softmax of cross-attention (its keys made from other model inputs than its
    #: queries): where each side comes from, in words; null for self-attention
    cross: str | None = None
    #: what each of ``windows`` is: "window" (a window of the image, the trace says) or
    #: "sequence" (lurker cannot tell what the model folded into the batch axis)
    sequence: str = "window"


class MapValues(BaseModel):
    shape: list[int]
    #: Over the finite values (null: none is finite).
    min: float | None = None
    max: float | None = None
    #: Non-finite values are null.
    values: list[list[float | None]]
    #: How many values are not finite, by kind (``nan``, ``+inf``, ``-inf``); empty when
    #: every value is finite.
    nonfinite: dict[str, int] = {}


class KernelValues(MapValues):
    """A kernel's weights as a map's values (non-finite weights null and counted)."""

    #: The weight and the index into it these values are (``weight[index]``).
    param: str | None = None
    index: list[int] | None = None
    groups: int = 1
    transposed: bool = False


class ExplainMethod(BaseModel):
    name: str
    #: one line: what it computes and where it comes from
    summary: str
    #: whether it explains at a layer (Grad-CAM): the ``layer`` query picks it
    needs_layer: bool
    #: whether its values have a sign that matters (diverging colours) or are >= 0
    signed: bool
    #: why the run's model cannot give it (an op it has no rule for, no layer making a
    #: map), found from the model's trace; null: it can, or no model tells (precomputed)
    unavailable: str | None = None


class ExplainMethods(BaseModel):
    methods: list[ExplainMethod]
    #: the layer a layer method uses when none is given; null: the method's own default
    #: (``lurker.explain``'s, found per image: a ViT's last block's first norm), which is
    #: what the server uses for a class target (each result names the layer it used)
    default_layer: str | None = None
    #: concept relevance's default layer: the run's last probed layer whose units make a
    #: map (before the last attention where a class-token head reads one token after it)
    concept_layer: str | None = None
    #: the run's probed layers with a spatial output (the page's layer chooser)
    layers: list[str]
    #: whether concept relevance (``.../explain/concepts.json``) is available
    concepts: bool
    #: why not, when lurker has it but the run's model cannot give it (LRP has no rule
    #: for one of its layers): the page shows this instead of the section
    concepts_reason: str | None = None


class ExplainedSample(BaseModel):
    image: str
    sample: int
    #: the methods whose explanation of the top class the run's cache holds
    methods: list[str]
    #: the layer whose concept relevance for the top class the cache holds (the Explain
    #: page's default layer, top 8 units with their heatmaps), or null
    concepts: str | None = None
    #: the run's model's top prediction for the sample (null when it made none)
    top: Prediction | None
    #: the target the explanations were made for and are asked by: ``"top"`` (the top
    #: class), or on a language model the top next token's score at the last position,
    #: ``LAYER:CLASS:0:L-1`` (``top.target``), as the Explain page defaults to it
    target: str = "top"


class ExplainedIndex(BaseModel):
    """The dataset samples whose explanations the run's ``cache/`` holds (``lurker images
    RUN --explanations``): what a server without the model, or a static export, can show."""

    #: the target they explain (the top predicted class; a language model's samples name
    #: theirs, the next token at the last position, in their own ``target``)
    target: str
    samples: list[ExplainedSample]


class ExplainResult(BaseModel):
    image: str
    method: str
    #: the target as resolved: a class index ("3") or a unit ("features.4:5")
    target: str
    #: the class explained (null for a unit target) and its name
    target_class: int | None
    target_name: str | None
    #: the layer a layer method used, as asked (a run layer name, module path or trace
    #: label), or the trace label of the method's own default when none was asked; null
    #: for input methods
    layer: str | None
    #: the module that ran ``layer``'s op (from the run's graph), where it is known
    layer_module: str | None = None
    signed: bool
    #: ``[height, width]`` of the heatmap (the input's spatial size)
    shape: list[int]
    #: of the heatmap (``Explanation.heatmap``: the attribution summed over the input's
    #: channels, or the one value each holds where it is repeated, as Grad-CAM's)
    min: float
    max: float
    sum: float
    #: integrated gradients' convergence delta (sum of attributions - (f(x) - f(baseline)))
    delta: float | None
    #: the method's options as used (defaults filled in)
    options: dict[str, Any]
    #: the PNGs' nearest-neighbour upscale factor
    scale: int
    #: seconds the attribution took (0 when it came from the cache)
    seconds: float
    cached: bool
    #: what the method warned of, for a person: a Grad-CAM map the target does not reach
    #: (all zeros), guided backprop or deconvnet on a network with no ReLU (the plain
    #: gradient), relevance LRP did not conserve
    notes: list[str] = []
    #: on a run of token ids (null elsewhere): each token's score (``shape`` is ``[1, L]``),
    #: the sample's ids and their words by the run's vocabulary (null without one)
    scores: list[float | None] | None = None
    tokens: list[int] | None = None
    token_text: list[str | None] | None = None
    #: on a run of signals (null elsewhere): the attribution along time, one list per
    #: channel (``shape`` ``[C, T]``), or one list (``[1, T]``) where the method gives each
    #: position one value whatever the channel (Grad-CAM's map along time, occlusion's
    #: windows across all channels); null where not finite
    signal_scores: list[list[float | None]] | None = None


class ConceptUnit(BaseModel):
    unit: int
    #: the unit's relevance at the layer (signed: positive supports the target)
    relevance: float
    #: its signed share of the relevance that passed the layer: relevance / the sum of
    #: every unit's |relevance| (the units' |share| sum to 1; null when no relevance passed)
    share: float | None
    #: the sum of its conditional heatmap (equals ``relevance`` where the rules below
    #: the layer conserve)
    heatmap_sum: float
    #: on a run of signals, the conditional heatmap itself: one list per input channel
    #: along time (null where not finite); null on images (their heatmap is the unit's PNG)
    signal_scores: list[list[float | None]] | None = None


class ConceptRanking(BaseModel):
    image: str
    #: the layer as asked (a run layer name, module path or trace label)
    layer: str
    #: whether the layer is a probed layer of the run (each unit has a unit page)
    probed: bool
    target: str
    target_class: int | None
    target_name: str | None
    composite: str
    #: the layer's number of units and its total relevance (the sum over all units)
    channels: int
    total: float
    #: the top units by relevance, most relevant first
    units: list[ConceptUnit]
    scale: int
    seconds: float
    cached: bool


# -- dataset map ---------------------------------------------------------------------------


class MapDoc(BaseModel):
    """The dataset map, column-wise (one array per field, all of ``count`` entries, in
    sample-id order): 50,000 points stay a couple of MB before gzip."""

    layer: str | None
    #: What the layer is where its name does not say (an op label that picks one entry
    #: of axis 1: ``the class token (token 0) of the output of vit.encoder.ln (op
    #: layer_norm_5)``, ``time step 39 of 40 (the last) of ...``, ``entry 0 of axis 1 (8
    #: long) of ...``); null else.
    layer_said: str | None = None
    method: str
    engine: str | None = None
    seconds: float | None = None
    count: int
    classes: list[str]
    #: Bounds of x and y: [xmin, xmax, ymin, ymax].
    extent: list[float]
    ids: list[int]
    x: list[float]
    y: list[float]
    #: True class index, -1: unlabelled.
    label: list[int]
    #: Predicted class index, -1: no prediction.
    pred: list[int]
    #: The prediction's probability (lurker.models.probabilities; null: none).
    conf: list[float | None]
    #: The model's number of outputs (class scores), when the run's graph tells.
    outputs: int | None = None
    #: Whether predictions are the dataset's classes (one output per class), so that a
    #: prediction can be called right or wrong; false for, e.g., a 1000-class head over
    #: a 3-folder dataset.
    comparable: bool = True
