"""Vocabularies: the words a text model's token ids stand for.

A run of token ids shows its samples as ids unless it knows its vocabulary. The probe
stores one in the run (meta key ``vocab``: a JSON list, entry ``i`` the text of id ``i``,
null for an id the vocabulary does not name), and the explorer shows the words beside
the ids. This module turns what users have (a list, a tokenizer's ``get_vocab()`` dict,
a callable, a file) into that list and checks it against the ids it must name, so a
vocabulary that would show the wrong word, or none, is refused before any work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import LurkerError, warn

#: What a vocabulary may be given as: the texts by id, ``{text: id}`` (a Hugging Face
#: tokenizer's ``get_vocab()``), or a callable from an id to its text.
VocabLike = Sequence[str] | Mapping[str, int] | Callable[[int], str]

#: Ops that read integer inputs as ids: what makes a run's 1-D integer inputs token ids.
LOOKUPS = frozenset({"embedding", "embedding_bag", "one_hot", "index_select", "take", "gather"})


def reads_ids(graph: Any) -> bool:
    """Whether the graph's (first) input is looked up (an embedding reads it): its
    integers are ids, not numbers (a waveform's samples are read as numbers)."""
    if not graph.inputs:
        return False
    return any(graph.ops[c].name in LOOKUPS for c in graph.inputs[0].children)


def embedding_reads_ids(graph: Any) -> bool:
    """Whether an ``nn.Embedding`` lookup (``embedding``, not ``embedding_bag`` or
    ``one_hot``) reads the graph's input: where ``lurker.explain`` attributes token ids."""
    if not graph.inputs:
        return False
    return any(graph.ops[c].name == "embedding" for c in graph.inputs[0].children)


def id_space(graph: Any) -> int | None:
    """How many ids the model can look up: the rows of the embedding that reads the input
    (the smallest, where several do); None when no embedding with a recorded table reads
    it."""
    sizes = [
        int(p.shape[0])
        for c in (graph.inputs[0].children if graph.inputs else [])
        if graph.ops[c].name in ("embedding", "embedding_bag")
        for p in graph.ops[c].params[:1]
        if p.shape
    ]
    return min(sizes) if sizes else None


def as_vocab(vocab: VocabLike, size: int | None = None) -> list[str | None]:
    """``vocab`` as the list the run stores: entry ``i`` the text of id ``i`` (None for an
    id a ``{text: id}`` mapping leaves out). A callable is asked for ids ``0..size-1``
    (``size``: the ids the model can look up), so it needs ``size``."""
    if isinstance(vocab, (str, bytes, os.PathLike)):
        raise LurkerError(
            f"vocab must be the tokens (a list of strings by id, a {{token: id}} dict or a "
            f"callable id -> token), got {type(vocab).__name__} {str(vocab)[:60]!r}: to read "
            "a file, pass lurker.vocab.read_vocab(path)"
        )
    if isinstance(vocab, Mapping):
        return _from_mapping(vocab)
    if callable(vocab):
        if size is None:
            raise LurkerError(
                "vocab is a callable, and the number of ids to ask it for is unknown (no "
                "embedding reads the model's input): pass the tokens as a list instead"
            )
        words = [_ask(vocab, i) for i in range(size)]
    else:
        words = list(vocab)
    for i, w in enumerate(words):
        if w is not None and not isinstance(w, str):
            raise LurkerError(
                f"vocab entry {i} is {type(w).__name__} {w!r}, not a string: a vocabulary "
                "gives each token id its text"
            )
    return list(words)


def _ask(vocab: Callable[[int], Any], i: int) -> Any:
    """The callable's text of id ``i``: None where it has none (an IndexError or KeyError,
    as a list's ``__getitem__`` or a dict's raise for a padded embedding's extra rows)."""
    try:
        return vocab(i)
    except (IndexError, KeyError):
        return None
    except Exception as e:  # a tokenizer failing: say which id, not a deep traceback
        raise LurkerError(
            f"the vocabulary callable failed on id {i}: {type(e).__name__}: {e}; give the "
            "tokens as a list (None for an id without text) instead"
        ) from None


def _from_mapping(vocab: Mapping[Any, Any]) -> list[str | None]:
    ids: dict[int, str] = {}
    for text, i in vocab.items():
        if not isinstance(text, str) or isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise LurkerError(
                f"vocab as a dict maps each token's text to its id ({{'hello': 7}}, as a "
                f"tokenizer's get_vocab() does), got {text!r}: {i!r}"
            )
        if i in ids:
            raise LurkerError(f"vocab gives id {i} to two tokens, {ids[i]!r} and {text!r}")
        ids[i] = text
    return [ids.get(i) for i in range(max(ids) + 1)] if ids else []


def read_vocab(path: str | os.PathLike[str]) -> list[str | None]:
    """A vocabulary file: a JSON list of tokens, a JSON ``{token: id}`` object (a
    tokenizer's ``vocab.json``), or else one token per line, line ``i`` the text of id
    ``i`` (the line's end dropped, nothing else: its spaces are the token's). A file that
    starts with ``[`` or ``{`` but is not JSON is read as lines (BERT's ``vocab.txt``
    starts ``[PAD]``), unless it is named ``.json``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LurkerError(f"cannot read the vocabulary file {p}: {e}") from None
    if text.lstrip()[:1] in ("[", "{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            # BERT's vocab.txt starts "[PAD]": a file of lines may start as JSON does
            if p.suffix.lower() == ".json":
                raise LurkerError(
                    f"the vocabulary file {p} is not valid JSON ({e}): give a JSON list of "
                    "tokens or a JSON {token: id} object (or one token per line, in a file "
                    "not named .json)"
                ) from None
            parsed = None
        if isinstance(parsed, (list, dict)):
            return as_vocab(parsed)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's last newline ends the last token, it adds none
    return [line.removesuffix("\r") for line in lines]


def dataset_vocab(dataset: Any) -> list[str | None] | None:
    """The vocabulary a dataset carries as an attribute, where it has an obvious one: a
    ``vocab`` (list or ``{token: id}`` dict) or an ``itos`` list; None otherwise."""
    for name in ("vocab", "itos"):
        found = getattr(dataset, name, None)
        if isinstance(found, (list, tuple, dict)) and found:
            try:
                return as_vocab(found)
            except LurkerError:
                return None  # not a vocabulary after all: say nothing, guess nothing
    return None


#: Dataset attributes that name a run's padding id (a tokenizer's ``pad_token_id``), read
#: as the vocabulary is: the explorer pads a short typed sequence with it.
PAD_ATTRS = ("pad_id", "pad_token_id", "pad_index")


def dataset_pad_id(dataset: Any, rows: int | None) -> int | None:
    """The padding id a dataset names (its first ``pad_id``, ``pad_token_id`` or
    ``pad_index`` that is set), checked against the ``rows`` of the embedding that reads
    the ids (None: unknown); None where it names none. One that is not an id of the
    embedding (a negative, a float, past its rows) is warned about and not used: padding
    with it would feed the model the wrong token, or fail it."""
    for name in PAD_ATTRS:
        found = getattr(dataset, name, None)
        if found is None:
            continue
        if isinstance(found, bool) or not isinstance(found, int) or found < 0:
            why = "not an id (a whole number from 0)"
        elif rows is not None and found >= rows:
            why = f"past the embedding's {rows} rows (ids 0..{rows - 1})"
        else:
            return int(found)
        warn(
            f"probe: the dataset's {name} is {found!r}, {why}: it is not stored as the run's "
            "padding id (set it to the id the model pads with, or leave it None)"
        )
        return None
    return None


def check_vocab(words: Sequence[str | None], needed: int, where: str) -> None:
    """Refuse a vocabulary that does not name every id up to ``needed - 1`` (``where``
    says what needs them: "the samples use")."""
    if len(words) < needed:
        raise LurkerError(
            f"the vocabulary holds {len(words)} tokens, and {where} {needed} ids (0.."
            f"{needed - 1}): give the model's full vocabulary, one token per id"
        )


def fit_vocab(
    words: Sequence[str | None], rows: int | None, used: int | None, where: str
) -> list[str | None]:
    """``words`` checked for a model whose embedding has ``rows`` rows and data whose
    largest id is ``used - 1`` (None: unknown): refused when it leaves an id the data uses
    unnamed, padded with None up to ``rows`` (an embedding padded past the tokenizer's
    vocabulary, as nanoGPT's 50304 rows for GPT-2's 50257 tokens: an id without a word
    shows as its id). A vocabulary much shorter than the rows (over 10%) is likely not
    this model's: a warning says so."""
    if used is not None:
        check_vocab(words, used, where)
    out = list(words)
    if rows is not None and len(out) < rows:
        if len(out) < 0.9 * rows:
            warn(
                f"the vocabulary holds {len(out)} tokens, and the model's embedding looks up "
                f"{rows} ids: is it this model's? ids {len(out)}..{rows - 1} show without "
                "words"
            )
        out += [None] * (rows - len(out))
    return out


def words_of(ids: Sequence[int], words: Sequence[str | None]) -> list[str | None]:
    """The text of each id (None for an id the vocabulary does not name: the page shows
    the id)."""
    n = len(words)
    return [words[i] if 0 <= i < n else None for i in ids]


def per_character(words: Sequence[str | None] | None) -> bool:
    """Whether a vocabulary is a character-level one (minGPT's and nanoGPT's char models):
    every entry that names a token is one character, space and newline included. Typed
    text is then read one character per token, as such a model was trained, since
    splitting it at spaces would leave words no entry spells (and drop the spaces)."""
    named = [w for w in words or () if w is not None]
    return len(named) > 1 and all(len(w) == 1 for w in named)
