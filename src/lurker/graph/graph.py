""":class:`Graph`: a traced forward pass as data, readable without torch or the model.

``lurker.trace`` returns a :class:`~lurker.capture.Trace`, which is a Graph plus what
only a live trace has (the model, saved activations, ``run``, ``backward``); a graph read
back with :meth:`Graph.from_json` is the same data without those.
"""

from __future__ import annotations

import fnmatch
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import close_names
from .edges import Edge
from .nodes import ModuleInfo, Op
from .schema import SCHEMA_VERSION


class Graph:
    """The ops of one forward pass in execution order, the model's module tree, and lookups.

    Index it by op label (``g["conv2d_3"]``), module path (``g["features.3"]``, the op that
    produced that module's output; ``"cell:2"`` for a later pass), input or output name,
    or position. Iterating yields the ops in execution order.
    """

    SCHEMA_VERSION = SCHEMA_VERSION  # of ``to_json()``: see docs/trace-schema.md

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.modules: dict[str, ModuleInfo] = {}  # path -> module, the model itself ("") first
        self.model_name = ""
        self.complete = True  # False for the partial graph of a forward that raised
        self.failed_op: str | None = None
        self.time = 0.0  # wall time of the traced forward, seconds
        self._index: dict[str, int] = {}  # label / name / module output -> op index

    # ------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return len(self.ops)

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def __getitem__(self, key: str | int) -> Op:
        if isinstance(key, int):
            return self.ops[key]
        i = self._index.get(key)
        if i is not None:
            return self.ops[i]
        info = self.modules.get(key)
        if info is not None and info.num_passes > 1:
            raise KeyError(
                f"module '{key}' ran {info.num_passes} times; name a pass: "
                + ", ".join(f"'{key}:{p}'" for p in range(1, min(info.num_passes, 5) + 1))
                + (" ..." if info.num_passes > 5 else "")
            )
        if info is not None:
            inside = [op.label for op in self.ops if any(p == key for p, _ in op.modules)]
            if not inside:
                raise KeyError(
                    f"module '{key}' ({info.type}) ran no op in this forward pass: it was not "
                    "called, or it returned a tensor made before its call (an nn.Identity "
                    "returns its input), so no op stands for its output; name the layer whose "
                    "output it passed on"
                )
            raise KeyError(
                f"module '{key}' produced no tensor output in this forward pass: no value made "
                "in its call was used outside it (the caller discarded its result, or it "
                "returned a tensor made before the call), so no op stands for it; name an op "
                f"inside it: {', '.join(inside[-5:])}"
            )
        rolled = [op for op in self.ops if op.rolled == key]
        if rolled:
            raise KeyError(
                f"'{key}' ran {len(rolled)} times; name a pass: '{rolled[0].label}' .. "
                f"'{rolled[-1].label}' (or use trace.passes('{key}'))"
            )
        close = close_names(str(key), [*self._index, *self.modules])
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"no op or module named {key!r} in this trace.{hint}")

    def passes(self, rolled: str) -> list[Op]:
        """All passes of an op that ran several times (``trace.passes('linear_1')``)."""
        return [op for op in self.ops if op.rolled == rolled]

    def rolled(self) -> dict[str, list[Op]]:
        """The rolled view: each ``rolled`` label (in order of first appearance) to its
        passes in order; an op in a loop has several, every other node one."""
        groups: dict[str, list[Op]] = {}
        for op in self.ops:
            g = groups.get(op.rolled)
            if g is None:
                groups[op.rolled] = [op]
            else:
                g.append(op)
        return groups

    def keys(self) -> list[str]:
        """Every name ``graph[name]`` looks up: op labels, input, output and buffer names,
        and module outputs (``'features.3'``, ``'cell:2'``)."""
        return list(self._index)

    def find(self, pattern: str) -> list[Op]:
        """Ops whose label, name or module path matches a glob pattern."""
        return [
            op
            for op in self.ops
            if fnmatch.fnmatchcase(op.label, pattern)
            or fnmatch.fnmatchcase(op.name, pattern)
            or any(fnmatch.fnmatchcase(m, pattern) for m in op.module_outputs)
        ]

    def edges(self) -> list[Edge]:
        """Data edges, then branch edges (readout -> the op that ran next), in node order."""
        from .edges import edges

        return edges(self.ops)

    @property
    def inputs(self) -> list[Op]:
        return [op for op in self.ops if op.kind == "input"]

    @property
    def outputs(self) -> list[Op]:
        return [op for op in self.ops if op.kind == "output"]

    @property
    def compute_ops(self) -> list[Op]:
        """The operations proper (no inputs, outputs, buffers or constants)."""
        return [op for op in self.ops if op.kind in ("op", "generated")]

    @property
    def layers(self) -> list[Op]:
        """Deprecated alias of :attr:`compute_ops` ("layer" now means a probed layer)."""
        warnings.warn(
            "Trace.layers is deprecated: use Trace.compute_ops (the same ops)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.compute_ops

    # ------------------------------------------------------------------ model facts
    @property
    def num_ops(self) -> int:
        return len(self.compute_ops)

    @property
    def num_params(self) -> int:
        return self.modules[""].num_params if "" in self.modules else 0

    @property
    def activation_bytes(self) -> int:
        """Bytes of every op's output (what saving all activations costs)."""
        return sum(op.nbytes for op in self.compute_ops)

    @property
    def flops(self) -> int:
        """The ops' known FLOPs, summed: a lower bound where :attr:`flops_unknown` is not 0."""
        return sum(op.flops or 0 for op in self.ops)

    @property
    def flops_unknown(self) -> int:
        """How many ops of a kind whose FLOPs are counted (conv, linear, matmul-like,
        attention, recurrent) have no count (arguments lurker cannot read): :attr:`flops`
        leaves them out."""
        from .build import flops_unknown

        ops = self.ops
        return sum(flops_unknown(op, ops) for op in ops)

    @property
    def is_recurrent(self) -> bool:
        """Whether the model feeds a result back into the code that made it: an op that
        ran several times whose later pass depends on an earlier pass's output (an RNN's
        step loop, a block applied to its own output), or torch's own recurrent kernel
        (``nn.LSTM``'s ``lstm``). Several passes that do not feed one another, a
        generator over ``(q, k, v)`` reshaping each once, are one step, not a loop."""
        from ..ops.catalogue import RECURRENT

        ops = self.ops
        if any(op.kind == "op" and op.name in RECURRENT for op in ops):
            return True
        bits: dict[str, int] = {}  # each op place that ran several passes: a bit
        for op in ops:
            if op.num_passes > 1 and op.rolled:
                bits.setdefault(op.rolled, 1 << len(bits))
        if not bits:
            return False
        # the places upstream of each op, in index (topological) order
        upstream: list[int] = [0] * len(ops)
        for op in ops:
            seen = 0
            for p in op.parents:
                seen |= upstream[p] | bits.get(ops[p].rolled, 0) * (ops[p].num_passes > 1)
            upstream[op.index] = seen
            own = bits.get(op.rolled, 0) if op.num_passes > 1 else 0
            if seen & own:
                return True
        return False

    @property
    def has_branching(self) -> bool:
        return any(op.kind == "readout" for op in self.ops)

    @property
    def branches(self) -> list[Op]:
        """Readouts (``bool(t)``, ``t.item()``) whose values steered the Python code."""
        return [op for op in self.ops if op.kind == "readout"]

    # ------------------------------------------------------------------ views
    def summary(self, depth: int | None = None) -> str:
        """A torchinfo-like table of modules (down to ``depth``) with shapes, params, FLOPs."""
        from ..render.summary import summary

        return summary(self, depth=depth)  # type: ignore[arg-type]

    def render(
        self,
        path: str | Path,
        *,
        depth: int | None = None,
        rolled: bool = False,
        direction: str = "TB",
        buffers: bool = False,
        auto_roll: bool = True,
        timeout: float | None = 600.0,
    ) -> Path:
        """Draw the graph with graphviz to ``.svg``, ``.pdf``, ``.png`` or ``.dot``.

        Modules nest as clusters down to ``depth`` (all by default); deeper modules are
        drawn as one box with their op and parameter counts. ``rolled=True`` draws one
        node per op of a loop, with pass counts on nodes and ``xN`` on repeated edges.
        A graph too big for ``dot`` to lay out in reasonable time (long loops) has its
        longest loops rolled, with a note in the title and a warning, unless
        ``auto_roll=False``. ``dot`` gets ``timeout`` seconds (None: no limit); when it
        fails, the error says why (its message, exit status or signal).
        """
        from ..render.graphviz import render

        return render(
            self,  # type: ignore[arg-type]
            path,
            depth=depth,
            rolled=rolled,
            direction=direction,
            buffers=buffers,
            auto_roll=auto_roll,
            timeout=timeout,
        )

    # ------------------------------------------------------------------ JSON
    def to_json(self, path: str | Path | None = None) -> dict[str, Any]:
        """The graph as a versioned JSON document (schema ``lurker.trace/2``, no
        activations); also written to ``path`` if given."""
        from .schema import to_json

        doc = to_json(self)
        if path is not None:
            Path(path).write_text(json.dumps(doc, indent=1))
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any] | str | Path) -> Graph:
        """The graph of a :meth:`to_json` document (the dict, or a path to the file); a
        :class:`Graph` also when called on a subclass (nothing live is in the document).

        Raises :class:`~lurker.errors.GraphDocumentError` (a ``ValueError``) for anything
        else, a file that is not JSON, or a document this lurker does not read."""
        from ..errors import GraphDocumentError
        from .schema import from_json

        text = isinstance(doc, str) and doc.lstrip().startswith(("{", "["))
        if isinstance(doc, (str, os.PathLike)):
            path = Path(doc)
            try:
                doc = json.loads(path.read_text("utf-8"))
            except OSError:  # (a path such as '[run 1]/t.json' is read as one)
                if not text:
                    raise
                raise GraphDocumentError(
                    "Graph.from_json got the text of a JSON document, where it takes the "
                    "document (a dict) or a path to its file: pass json.loads(text)."
                ) from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise GraphDocumentError(
                    f"{path} is not a JSON document ({e}): a file cut short, or not one "
                    "written by to_json. Write it again: tr.to_json(path) or lurker trace "
                    "... --json PATH."
                ) from None
        elif not isinstance(doc, dict):
            raise GraphDocumentError(
                f"Graph.from_json got an object of type {type(doc).__name__}; it takes a trace document (the "
                "dict tr.to_json() returns) or a path to the file tr.to_json(path) wrote."
            )
        return from_json(doc)

    # ------------------------------------------------------------------ equality
    def __eq__(self, other: object) -> bool:
        """Same graph: every op's graph fields, the modules and the model facts (not
        activations, nor anything else only a live trace has)."""
        if not isinstance(other, Graph):
            return NotImplemented
        return (
            self.model_name == other.model_name
            and self.complete == other.complete
            and self.failed_op == other.failed_op
            and self.time == other.time
            and self.modules == other.modules
            and list(self.modules) == list(other.modules)
            and self.ops == other.ops
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        state = "" if self.complete else f", failed at {self.failed_op}"
        return (
            f"<{type(self).__name__} {self.model_name}: {self.num_ops} ops, "
            f"{self.num_params:,} params{state}>"
        )
