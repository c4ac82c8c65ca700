"""Re-run a traced model on new inputs and hand the outputs of chosen ops to hooks.

The graph is not re-derived: a light mode counts recorded calls exactly as the recorder
does and passes the outputs of the hooked ones to their hooks (which may replace them),
checking that the same callables run in the same order (otherwise the input took another
branch, or the model's hooks changed, and we say which). ``Trace.run`` is built on it,
and through it the probe's sweep and unit images.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import GraphChangedError, LurkerError, MemoryLimitError, first_three
from ..ops import torch_funcs as _funcs
from . import _context, _hooks, _state
from ._hooks import Resolved
from ._memory import AUTO_FRACTION, TRACED, Budget, OverLimit, fmt_bytes, parse_max_memory
from ._mode import OpMode, produced
from ._policy import check_classes, check_patterns, make_policy
from ._recorder import apply_transform, outside_storages, param_names
from ._tree import call_tensors, paths, tensors

if TYPE_CHECKING:
    from ..graph.nodes import Op
    from .trace import Activations, Trace


class Replayer(OpMode):
    """Calls each hooked op's hooks with its live output; what they return replaces it."""

    def __init__(self, trace: Trace, hooks: Resolved, user: Any = None):
        """``user``: the op indices whose hooks are the caller's (default: all of them);
        the others only keep values, and never change what an op computes."""
        super().__init__()
        cached = trace.__dict__.get("_replay_calls")
        if cached is None:  # a trace's ops never change: sorted once, not per run
            calls = sorted((op for op in trace.ops if op.seq >= 0), key=lambda op: op.seq)
            # readouts of a truth value (bool(t), t.item() of a bool): the branches taken
            decisions = {
                op.seq: op for op in calls if op.kind == "readout" and type(op.value) is bool
            }
            params = [frozenset(p.name for p in op.params) for op in calls]
            cached = ([op._func for op in calls], [op.label for op in calls], decisions, params)
            trace.__dict__["_replay_calls"] = cached
        self.funcs, self.labels, self.decisions, self.params = cached
        # a truth value read otherwise than in the trace (op, value), while the ops after
        # it are checked: None while the forward follows the traced path
        self.diverged: tuple[Op, Any] | None = None
        self._param_names: dict[int, str] | None = None
        ops = trace.ops
        self.hooks = {ops[i].seq: (ops[i], fns) for i, fns in hooks.items() if ops[i].seq >= 0}
        chosen = hooks if user is None else user
        self.replacing = frozenset(ops[i].seq for i in chosen if ops[i].seq >= 0)
        self.seq = 0
        self.trace = trace
        self.call: tuple[tuple, dict] = ((), {})  # the inputs of the forward being run
        # called before each call at a position in `writes` (see _Keeper); None: no one asks
        self.before_write: Callable[[Any, list[Tensor], tuple, dict], None] | None = None
        self.writes: frozenset[int] = frozenset()
        # hooks' replacements of another shape, dtype or device than the op's output, one
        # line each: if the forward then fails, the error names them, not torch's kernel
        self.reshaped: list[str] = []
        self.intervened = False  # whether the caller's hooks ran yet in this forward

    def _op(self, func: Any, info: _funcs.FuncInfo, args: tuple, kwargs: dict) -> Any:
        """Count one call that may be an op (:class:`OpMode` routed it here, as it does
        for the recorder) and hand its output to its hooks, if it has any."""
        ins = call_tensors(args, kwargs)
        versions = [t._version for t in ins]
        if self.before_write is not None and self.seq in self.writes:
            self.before_write(func, ins, args, kwargs)
        swapped = copy = None
        if (
            self.seq in self.replacing
            and ins
            and ins[0].requires_grad
            and torch.is_grad_enabled()
            and (info.inplace_first or kwargs.get("inplace") is True)
        ):
            # a hooked op that writes its input in place (x.relu_()): it runs on a copy,
            # and the hooks' result is written into the input afterwards. Written into
            # the op's own output instead, it would change a tensor the op's backward
            # needs (a ReLU's result), and the backward would fail
            swapped = ins[0]
            args, kwargs, copy = _swap_first(args, kwargs, swapped)
            ins = call_tensors(args, kwargs)
            versions = [t._version for t in ins]
        out = func(*args, **kwargs) if kwargs else func(*args)
        made = produced(func, info, out, ins, versions)  # the recorder asks the same
        if made is None:
            return out
        outs = made[0]
        seq = self._count(func)
        if not outs:  # a readout: a value, nothing to hook
            decision = self.decisions.get(seq)
            if decision is not None and out != decision.value and self.diverged is None:
                self.diverged = (decision, out)  # the other branch, if the ops say so
            return out
        if self.diverged is not None:
            self._check_branch(seq, ins)
        hooked = self.hooks.get(seq)
        if hooked is None:
            return out
        if seq in self.replacing:
            self.intervened = True
        # in place: the output is an input the call modified (returned, or not: x[i] = v)
        inplace = any(outs[0] is t and t._version != v for t, v in zip(ins, versions))
        if swapped is not None:
            if inplace:  # the copy holds the op's result: the hooks' value goes into the
                # real input, which the model goes on using and the call returns
                return _hooks.call(hooked[0], hooked[1], out, outs, True, into=swapped)
            # it wrote nothing (dropout in eval mode): the model gets its own tensor back
            out = swapped if out is copy else out
            outs = [swapped if o is copy else o for o in outs]
        new = _hooks.call(hooked[0], hooked[1], out, outs, inplace)
        if new is not out:
            self._note_reshaped(hooked[0], hooked[1], outs, new)
        return new

    def _note_reshaped(self, op: Op, fns: list[Any], outs: list[Tensor], new: Any) -> None:
        got = [new] if isinstance(new, Tensor) else tensors(new, [])
        for k, (a, b) in enumerate(zip(outs, got)):
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                which = f" (output {k})" if len(outs) > 1 else ""
                keys = [f"hooks[{f.key!r}]" for f in fns if type(f) is _hooks.Keyed]
                by = f" (from {' or '.join(dict.fromkeys(keys))})" if keys else ""
                self.reshaped.append(
                    f"{op.label}{which} was {_meta(a)}, the hook's replacement {_meta(b)}{by}"
                )

    def _count(self, func: Any) -> int:
        seq = self.seq
        self.seq += 1
        if seq >= len(self.funcs) or not _same(self.funcs[seq], func):
            expected = self.labels[seq] if seq < len(self.labels) else "the end of the forward"
            call = f"call #{seq + 1} was {_funcs.op_name(func)} where the trace recorded {expected}"
            if self.diverged is not None:  # the branch that led there
                said = f"{self._branch_taken(*self.diverged)[:-1]}, then {call}."
            else:
                said = f"This input takes another path through the model: {call}."
            raise GraphChangedError(f"{said} {self._why()}")
        return seq

    def _check_branch(self, seq: int, ins: list[Tensor]) -> None:
        """After a truth value read otherwise than in the trace, each op must use the
        parameters its traced op used: the other branch may run the same callables
        (``self.a(x)`` or ``self.b(x)``), whose outputs the trace's labels and hooks would
        misname. A branch that runs no ops (a warning, a print) passes."""
        names = self._param_names
        if names is None:
            model = self.trace.model
            names = self._param_names = param_names(model) if model is not None else {}
        used = frozenset(names[id(t)] for t in ins if id(t) in names)
        if used != self.params[seq]:
            assert self.diverged is not None
            op, value = self.diverged
            raise GraphChangedError(f"{self._branch_taken(op, value)} {self._why()}")

    def _branch_taken(self, op: Op, value: Any) -> str:
        at = f" at {op.source}" if op.source else ""
        return (
            f"This input takes another path through the model: {op.label} ({op.name}{at}) "
            f"read {value!r} where the trace read {op.value!r}."
        )

    def _why(self) -> str:
        """Why the path changed: the model's hooks, its own state, or the data."""
        hooks = _hooks.hook_changes(self.trace)
        if hooks:
            listed = first_three(hooks, "; ")
            return (
                f"The model's hooks changed since the trace: {listed}. A forward runs the "
                "ops of the model's hooks, so it no longer runs the traced ones. Trace the "
                "model again with the hooks it will run with (lurker.trace(model, x)), or "
                "undo the change."
            )
        grad = torch.is_grad_enabled()
        traced = self.trace._rng
        if traced is not None and grad != traced.grad and _hooks.has_backward_hooks(self.trace):
            return (
                "The model has backward hooks, whose forward ops run only while autograd "
                f"records: the trace ran with grad {'on' if traced.grad else 'off'}, this "
                f"forward with grad {'on' if grad else 'off'}. Run it in the trace's grad "
                "mode (torch.no_grad() / torch.enable_grad()), or trace it in this one."
            )
        changed = _changed_arguments(self.trace, self.call)
        if changed:  # (the tensors may be the traced ones: not the model's state)
            return (
                f"Arguments that are not tensors differ from the traced ones: "
                f"{first_three(changed, '; ')}. The model's control flow depends on them (a "
                "loop over a count, a branch on a flag), and a trace records one path: pass "
                "the values it was traced with, or trace the model with these "
                "(lurker.trace(model, x, ...))."
            )
        changes = self.trace._state.lines
        if changes:
            listed = first_three(changes, ", ")
            return (
                f"The model changed its own state while it was traced ({listed}), so later "
                "forwards run other ops than the traced one: the graph depends on the model's "
                "state, not on the data. Trace the model again now that its state has settled "
                "(lurker.trace(model, x)): that trace records the ops its forwards now run."
            )
        if self.intervened:
            return (
                "The model's control flow depends on the values it computes: here on what "
                "your hooks returned (they ran before this point), or on the data. A trace "
                "records one path; change values that do not steer the model's branches, or "
                "trace the model on an input that takes the path you want."
            )
        if _same_inputs(self.call, self.trace._inputs):
            return (
                "This is the input the trace was made with, so the path depends on the model's "
                "state (attributes or caches changed since the trace, e.g. by train()/eval() or "
                "another forward) or on random numbers, not on the data. Trace the model again "
                "in the state you will run it in."
            )
        kind = _unlike(self.trace, *self.call)[0]
        if kind:  # not the data: inputs the trace was not recorded with
            return (
                f"The inputs are not like the traced ones: {first_three(kind, '; ')}. Pass "
                "each input the trace was recorded with, with its dtype and device (only the "
                "batch dimension may differ), or trace the model on these inputs with "
                "lurker.trace()."
            )
        shapes = _shape_change(self.call, self.trace._inputs)
        if shapes and self.diverged is not None:  # the data decided, whatever the shapes
            return (
                f"The model's control flow depends on the data (the input's shapes also "
                f"differ: {shapes}); trace this input with lurker.trace() instead."
            )
        if shapes:
            return (
                f"The input's shapes differ from the traced ones ({shapes}), and the model's "
                "control flow depends on them or on the data (a loop over x.shape[0], a "
                "branch on a size); trace an input of these shapes with lurker.trace()."
            )
        return (
            "The model's control flow depends on the data; trace this input with "
            "lurker.trace() instead."
        )

    def run(self, model: Any, args: tuple, kwargs: dict) -> Any:
        """One forward of ``model`` under this mode."""
        self.seq = 0
        self.call = (args, kwargs)
        self.diverged = None
        self.reshaped = []
        self.intervened = False
        try:
            with self:
                output = model(*args, **kwargs)
        except Exception as e:
            if isinstance(e, (LurkerError, OverLimit)):  # (OverLimit: the replay reports it)
                raise
            guard = export_guard_failure(model, e)
            if guard is not None:
                raise LurkerError(f"Trace.run could not run {guard}") from e
            unlike = input_mismatch(self.trace, args, kwargs, e)
            if unlike is not None:
                raise LurkerError(unlike) from e
            if not self.reshaped:
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            raise LurkerError(
                f"The forward failed after a hook replaced an op's output with a tensor of "
                f"another shape, dtype or device: {first_three(self.reshaped, '; ')}. The "
                "model's later ops take it as the op's own output; return a replacement like "
                f"it (or None). The model raised {type(e).__name__}: {first}"
            ) from e
        self.finish()
        return output

    def finish(self) -> None:
        try:
            if self.seq != len(self.funcs):
                raise GraphChangedError(
                    f"This input ran {self.seq} ops where the trace recorded "
                    f"{len(self.funcs)}. {self._why()}"
                )
        finally:
            self.call = ((), {})  # (kept for the messages only: not the batch after it ran)


_same = _funcs.same_callable


def _meta(t: Tensor) -> str:
    """``(2, 8) float32 on cpu``: what a hook's replacement is compared by."""
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"


def _meta_of(m: Any) -> str:
    """``(2, 8) float32 on cpu`` for a recorded input's :class:`TensorMeta`."""
    return f"{tuple(m.shape)} {m.dtype} on {m.device}"


def _unlike(trace: Trace, args: tuple, kwargs: dict) -> tuple[list[str], list[str]]:
    """How the inputs ``args, kwargs`` differ from the traced ones, one line per input:
    (missing, extra, or of another dtype or device; of another shape beyond the batch
    dimension). Another batch size is no difference (the probe replays every batch on a
    trace of one sample), nor is another shape of an item of a list of inputs (a detection
    model's images, each its own size)."""
    from .trace import _name_inputs, bind_call  # (trace imports this module)

    traced = {op.name: op.outputs[0] for op in trace.inputs if op.outputs}
    given = dict(_name_inputs(trace.model, args, kwargs)) if trace.model is not None else {}
    bound: tuple[inspect.Signature, dict] | None = None  # read once for all the lines below
    with contextlib.suppress(TypeError, ValueError):  # (no signature, or an argument twice)
        sig, items = bind_call(trace.model.forward, args, kwargs)
        bound = sig, dict(items)
    kind: list[str] = []
    shapes: list[str] = []
    for name, m in traced.items():
        t = given.get(name)
        if t is None:
            kind.append(_absent(bound, name, m))
            continue
        shape, dtype = tuple(t.shape), str(t.dtype).removeprefix("torch.")
        said = f"input '{name}' is {_meta(t)} where the trace was recorded with {_meta_of(m)}"
        if dtype != m.dtype or str(t.device) != m.device:
            kind.append(said)
        elif len(shape) != len(m.shape) or ("[" not in name and shape[1:] != tuple(m.shape[1:])):
            shapes.append(said)  # (a list item may be of another size, not of another rank)
    extra = [f"'{n}' ({_meta(t)})" for n, t in given.items() if n not in traced]
    if extra:
        with_ = [f"'{n}' {_meta_of(m)}" for n, m in traced.items()]
        kind.append(
            f"{first_three(extra)} {'is' if len(extra) == 1 else 'are'} passed, which the "
            f"trace was not recorded with (it was with {first_three(with_) or 'none'})"
        )
    return kind + _other_arguments(trace, args, kwargs, bound), shapes


def _absent(bound: tuple[inspect.Signature, dict] | None, name: str, m: Any) -> str:
    """Why traced input ``name`` holds no tensor in this call (``bound``: the forward's
    signature and this call bound to it loosely, as in :func:`_unlike`): missing, or
    passed as something else (a numpy array of stimuli, a list, None), which "missing"
    would misname."""
    missing = f"input '{name}' is missing (traced as {_meta_of(m)})"
    if bound is None:
        return missing
    now = bound[1]
    root = name.split("[", 1)[0].split(".", 1)[0]
    if root not in now or tensors(now[root], []):  # absent, or a container missing this item
        return missing
    value = now[root]
    if value is None:
        return f"input '{name}' is None (traced as {_meta_of(m)})"
    kind = type(value)
    shown = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return (
        f"input '{name}' is a {shown}, not a tensor: pass "
        f"torch.as_tensor({name}, dtype=torch.{m.dtype}) (traced as {_meta_of(m)})"
    )


def _other_arguments(
    trace: Trace, args: tuple, kwargs: dict, bound: tuple[inspect.Signature, dict] | None
) -> list[str]:
    """``argument 'steps' is missing (traced as 3)`` for each argument of the traced call
    that holds no tensor and is not in this call, and one line for those this call passes
    that the traced one did not: the tensor inputs alone all matched in a ``tr.run(x)`` of
    a trace of ``model(x, steps=3)``, which left torch's TypeError unexplained. ``bound``:
    this call bound loosely, as in :func:`_unlike`."""
    from .trace import bind_call, keyword_only_note  # (trace imports this module)

    if bound is None:  # no signature, or an argument given twice
        return []
    sig, now = bound[0], dict(bound[1])  # (a copy: defaults are filled in below)
    try:
        then = dict(bind_call(trace.model.forward, *trace._inputs, strict=True)[1])
    except TypeError:
        return []
    note = keyword_only_note(sig, args, kwargs)
    if note is not None:  # the one cause of the lines below it would give
        return [note]
    for p in sig.parameters.values():  # an argument left at its default is given: it
        if p.default is not p.empty:  # holds that value (compared where a path diverges)
            then.setdefault(p.name, p.default)
            now.setdefault(p.name, p.default)
    out = [
        f"argument '{name}' is missing (traced as {_shown(value)})"
        for name, value in then.items()
        if name not in now and not tensors(value, [])  # (a tensor's: named above)
    ]
    extra = [
        f"'{name}' ({_shown(value)})"
        for name, value in now.items()
        if name not in then and not tensors(value, [])
    ]
    if extra:
        out.append(
            f"argument {first_three(extra)} {'is' if len(extra) == 1 else 'are'} passed, "
            "which the trace was not recorded with"
        )
    return out


def _shown(value: Any) -> str:
    """A plain argument as its repr (``3``, ``'greedy'``), anything else by its type."""
    if _plain(value) and len(repr(value)) <= 40:
        return repr(value)
    return f"a {type(value).__name__}"


def export_guard_failure(model: Any, error: BaseException) -> str | None:
    """Why an exported program's module refused an input, if its shape guards did:
    ``torch.export`` fixes every dimension it was not told is dynamic (the batch too), and
    the module asserts its inputs have those sizes. The message names the fix rather than
    torch's ``Guard failed: x.size()[0] == 2``; None for any other error."""
    if not isinstance(model, torch.fx.GraphModule) or not isinstance(
        error, (AssertionError, RuntimeError)
    ):
        return None
    first = (str(error).strip().splitlines() or [""])[0]
    # (torch 2.5 to 2.8 check inputs in a pre-hook: "Expected input at *args[0].shape[0]")
    if not first.startswith(("Guard failed", "Expected input at")):
        return None
    return (
        f"{type(model).__name__}: it is an exported program's module "
        "(torch.export.export(...).module()), exported for fixed input shapes, and it refuses "
        f"others ({type(error).__name__}: {first}). Export the model with its batch dimension "
        "dynamic, torch.export.export(model, (x,), dynamic_shapes=({0: "
        "torch.export.Dim.DYNAMIC},)), or pass the eager model it was exported from."
    )


def input_mismatch(trace: Trace, args: tuple, kwargs: dict, error: BaseException) -> str | None:
    """Why a replay on these inputs failed, if they are not like the traced ones: one
    paragraph naming each input that differs (missing, extra, or of another shape past the
    batch dimension, dtype or device), what the trace was recorded with and what to do.
    None when the inputs are like the traced ones (another batch size included): the
    model's own error stands. Only called once the forward has failed (nothing per run)."""
    kind_of = type(error)
    if (
        trace.model is None
        or _in_hook(error)  # a hook's own error is the caller's to read as it is
        or not (kind_of.__module__ == "builtins" or kind_of.__module__.startswith("torch"))
        or isinstance(error, (MemoryError, torch.OutOfMemoryError))  # (a bigger batch's:
        or "out of memory" in str(error).lower()  # not the input's fault; CPU's say so)
    ):
        return None  # (the model's own exception type says what it means)
    kind, shapes = _unlike(trace, args, kwargs)
    lines = kind + shapes
    first = (str(error).strip().splitlines() or [""])[0]
    raised = f"The model raised {type(error).__name__}: {first}"
    name = trace.model_name
    if lines:
        return (
            f"Trace.run could not run {name} on these inputs, which are not like the ones "
            f"it was traced with: {first_three(lines, '; ')}. A trace replays the ops it "
            "recorded: pass each input the trace was recorded with, with its dtype and device "
            "(x.to(dtype), x.to(device)) and its shape, whose batch dimension (dim 0) may "
            "differ. If the model's graph depends on the input's shape, trace it again on an "
            f"input like this one (lurker.trace(model, x)). {raised}"
        )
    return None


def _in_hook(error: BaseException) -> bool:
    """Whether ``error`` was raised inside a hook function (its traceback passes through
    the call of the hooks)."""
    code = _hooks.call.__code__
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is code:
            return True
        tb = tb.tb_next
    return False


_PLAIN = (bool, int, float, complex, str, bytes, type(None))


def _plain(value: Any) -> bool:
    """Whether ``value`` is a number, string, None or a tuple/list of them: what ``==``
    compares safely (unlike arrays, or objects whose ``__eq__`` may raise)."""
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _changed_arguments(trace: Trace, call: tuple[tuple, dict]) -> list[str]:
    """``argument 'steps' is 5 where the trace was recorded with 3`` for each argument of
    the forward, by name, that holds a plain value (a count, a flag, a string) differing
    from the traced call's: a path that depends on it is not the data's nor the state's
    doing. Empty where the calls do not bind to the forward's signature."""
    from .trace import bind_call  # (trace imports this module)

    if trace.model is None:
        return []
    try:
        sig, given = bind_call(trace.model.forward, *call, strict=True)
        traced = bind_call(trace.model.forward, *trace._inputs, strict=True)[1]
    except (TypeError, ValueError):
        return []
    now, then = inspect.BoundArguments(sig, dict(given)), inspect.BoundArguments(sig, dict(traced))
    now.apply_defaults()
    then.apply_defaults()
    out = []
    for name, old in then.arguments.items():
        new = now.arguments.get(name)
        if _plain(old) and _plain(new) and old is not new and old != new:
            out.append(f"argument {name!r} is {new!r} where the trace was recorded with {old!r}")
    return out


def _same_inputs(a: tuple[tuple, dict], b: tuple[tuple, dict]) -> bool:
    """Whether two calls' arguments hold equal tensors in the same places."""
    ta, tb = tensors(a, []), tensors(b, [])
    if len(ta) != len(tb) or not ta:
        return False
    for x, y in zip(ta, tb):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if not torch.equal(x.detach(), y.detach().to(x.device)):
            return False
    return True


def _shape_change(a: tuple[tuple, dict], b: tuple[tuple, dict]) -> str:
    """``(3, 3) where the trace had (2, 3)`` for the first input tensor of the call ``a``
    whose shape differs from the traced call ``b``'s; empty if none does."""
    ta, tb = tensors(a, []), tensors(b, [])
    if len(ta) != len(tb):
        return f"{len(ta)} input tensors where the trace had {len(tb)}"
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            return f"{tuple(x.shape)} where the trace had {tuple(y.shape)}"
    return ""


def chosen_ops(trace: Trace, save: Any) -> list[Op]:
    """The ops ``save=`` selects (default: those this trace saved)."""
    if save is False or save == "none":
        return []
    calls = [op for op in trace.ops if op.seq >= 0]
    if save is None:
        return [op for op in calls if op.activation is not None]
    policy = make_policy(save)
    if policy.everything:
        return calls
    # a name that matches nothing would save nothing, silently: refused, as trace() does
    check_patterns(
        policy, trace.ops, trace.modules, trace.model, stacklevel=5
    )  # Trace.run's caller
    if trace.model is not None:
        check_classes(policy, trace.model)
    modules = (
        dict(trace.model.named_modules())
        if trace.model is not None and policy.saves_modules
        else {}
    )

    def wanted_module(name: str) -> bool:
        path = name.split(":")[0]
        return path in modules and policy.wants_module(path, modules[path])

    return [
        op
        for op in calls
        if policy.wants_op(op) or any(wanted_module(m) for m in op.module_outputs)
    ]


def chosen_inputs(trace: Trace, save: Any, args: tuple, kwargs: dict) -> list[tuple[Op, Tensor]]:
    """The model inputs ``save=`` selects (default: those this trace saved), each with the
    tensor given for it now (matched by the name the trace gave it: ``x``, ``mask[0]``)."""
    if save is False or save == "none":
        return []
    ins = [op for op in trace.ops if op.kind == "input"]
    if save is None:
        ins = [op for op in ins if op.activation is not None]
    else:
        policy = make_policy(save)
        if not policy.everything:
            ins = [op for op in ins if policy.wants_op(op)]
    if not ins:
        return []
    from .trace import _name_inputs

    given = dict(_name_inputs(trace.model, args, kwargs))
    return [(op, given[op.name]) for op in ins if op.name in given]


class _Keeper:
    """Keeps the wanted outputs of one replay, copying only those that need it.

    A copy of every output (what a caller needs: values that later ops, the model or the
    caller cannot change) costs as much as the ops of a small model. An output that the op
    made fresh, or a view of one kept already, is kept as it is; it is copied only if a
    later call may write into its storage (an op the trace recorded as in place, or a
    normalisation updating running statistics), just before that call. An output that
    is, or views, a tensor from outside the forward (an input, a parameter, a buffer, a
    constant) is copied at once, since the caller or an optimizer may change that later.
    """

    def __init__(self, trace: Trace, args: tuple, kwargs: dict, budget: Budget | None = None):
        self.values: dict[int, Any] = {}
        self.transform = trace._transform
        self.labels = trace.ops  # (an op's label, for a transform's error)
        self.budget = budget  # max_memory=: None, or counts the bytes of each new value
        self.writes, mods, consts = _keep_cache(trace)
        # ids of tensors from outside the forward: inputs, constants the trace holds, and
        # the parameters and buffers the model holds now (they may have been replaced)
        outside = set(consts)
        outside.update(map(id, tensors((args, kwargs), [])))
        for m in mods:
            outside.update(map(id, m._parameters.values()))
            outside.update(map(id, m._buffers.values()))
        self.outside = outside
        # transform= is handed a copy of a value on their storages (see apply_transform)
        self.storages = _outside_storages(trace, args, kwargs) if self.transform else None
        self.inputs = (args, kwargs)  # keeps the input ids above valid while it runs
        self.made: dict[int, Tensor] = {}  # id -> each output kept as is (holds it)
        # storage pointer -> indices of kept values on it; only if some call may write
        self.aliases: dict[int, list[int]] | None = {} if self.writes else None

    def keep(self, idx: int, value: Any) -> None:
        if self.transform is not None:
            transform = self.transform
            what = f"the output of {self.labels[idx].label}"
            where = self.storages
            kept = (
                tuple(apply_transform(transform, t.detach(), what, where) for t in value)
                if isinstance(value, tuple)
                else apply_transform(transform, value.detach(), what, where)
            )
            if self.budget is not None:  # the reduced values are what is kept
                _count(self.budget, idx, kept)
            self.values[idx] = kept
            return
        if isinstance(value, tuple):
            self.values[idx] = tuple(self._one(idx, t) for t in value)
        else:
            self.values[idx] = self._one(idx, value)

    def keep_input(self, idx: int, t: Tensor) -> None:
        """Keep a model input as given, as ``lurker.trace`` does (a copy of a large input
        would cost more than a small model's ops): copied only if a call of the forward
        may write into it (see :meth:`before_write`)."""
        if self.transform is not None:  # a copy: a transform that writes into the caller's
            self.keep(idx, t.detach().clone())  # stimuli is refused, not left changing them
            return
        if self.aliases is not None:
            try:
                ptr = t.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):  # no plain storage (sparse, ...)
                copy = t.detach().clone()
                if self.budget is not None:
                    _count(self.budget, idx, copy)
                self.values[idx] = copy
                return
            self.aliases.setdefault(ptr, []).append(idx)
        self.values[idx] = t.detach()  # (the caller's tensor: no new memory)

    def _one(self, idx: int, t: Tensor) -> Tensor:
        i = id(t)
        base = t._base
        budget = self.budget
        if i in self.outside or (base is not None and id(base) not in self.made):
            copy = t.detach().clone()  # (a view of) a tensor from outside the forward
            if budget is not None:
                budget.saved += copy.nbytes
                if budget.saved > budget.check:
                    budget.over(idx, copy.nbytes, copy.device)
            return copy
        if self.aliases is not None:
            try:
                ptr = t.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):  # no plain storage (sparse, ...)
                copy = t.detach().clone()
                if budget is not None:
                    _count(budget, idx, copy)
                return copy
            self.aliases.setdefault(ptr, []).append(idx)
        if budget is not None:
            # new memory unless its storage was counted already: a kept output again (an
            # in-place op's), a view of one, or a detach() of one, which has no _base;
            # checked either way (before_write may have copied what this op wrote)
            if base is None and i not in self.made:
                _count_storage(budget, t)
            if budget.saved > budget.check:
                budget.over(idx, t.nbytes, t.device)
        self.made[i] = t
        return t.detach()

    def before_write(self, func: Any, ins: list[Tensor], args: tuple, kwargs: dict) -> None:
        """Copy the kept values that share storage with what this call may write into."""
        aliases = self.aliases
        if not aliases:
            return
        values = self.values
        for t in _write_targets(func, ins, args, kwargs):
            try:
                ptr = t.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):
                continue  # no plain storage: no kept value was left sharing it
            for i in aliases.pop(ptr, ()):
                v = values.get(i)
                if isinstance(v, tuple):
                    values[i] = tuple(x.clone() for x in v)
                elif v is not None:
                    values[i] = v.clone()
                if v is not None and self.budget is not None:  # copies: counted, checked
                    self.budget.saved += _nbytes(v)  # at the next value kept


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``, the trace's ``save_to=``: ``t`` itself where it is there
    already (no copy), else a new tensor. Every value a run keeps passes here once."""
    return t.to(device)


class _MovingKeeper(_Keeper):
    """A :class:`_Keeper` for a trace made with ``save_to=``: every value is kept on that
    device, after the trace's ``transform=``, as the recorder keeps it. A value already
    there is kept as :class:`_Keeper` keeps it (copied only where something may change
    it); one moved is a new tensor of its own (counted, never shared with the model)."""

    def __init__(
        self, trace: Trace, args: tuple, kwargs: dict, budget: Budget | None, device: torch.device
    ):
        super().__init__(trace, args, kwargs, budget)
        self.device = device

    def keep(self, idx: int, value: Any) -> None:
        if self.transform is None:
            super().keep(idx, value)  # each tensor through _one, below
            return
        transform, device, where = self.transform, self.device, self.storages
        what = f"the output of {self.labels[idx].label}"

        def one(t: Tensor) -> Tensor:  # a value of its own
            return to_device(apply_transform(transform, t.detach(), what, where), device)

        kept = tuple(one(t) for t in value) if isinstance(value, tuple) else one(value)
        if self.budget is not None:  # the reduced values, where they are kept
            _count(self.budget, idx, kept)
        self.values[idx] = kept

    def keep_input(self, idx: int, t: Tensor) -> None:
        if self.transform is not None:  # a copy, as the base class's
            self.keep(idx, t.detach().clone())
            return
        d = t.detach()
        moved = to_device(d, self.device)
        if moved is d:  # on the device already: the caller's tensor, as without save_to=
            super().keep_input(idx, t)
            return
        if self.budget is not None:
            _count(self.budget, idx, moved)
        self.values[idx] = moved

    def _one(self, idx: int, t: Tensor) -> Tensor:
        d = t.detach()
        moved = to_device(d, self.device)
        if moved is d:
            return super()._one(idx, t)
        if self.budget is not None:
            _count(self.budget, idx, moved)
        return moved


def _write_targets(func: Any, ins: list[Tensor], args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors a call recorded as writing may write into: its ``out=``, its first
    argument (an in-place op), the running statistics it updates (in training mode), or,
    by no rule known beforehand, any of its tensor arguments."""
    info = _funcs.func_info(func)
    out = kwargs.get("out")
    if out is not None:
        return tensors(out, [])
    if info.inplace_first and ins:
        return ins[:1]
    if info.mutates_buffers:
        return _funcs.mutated_buffers(info, args, kwargs)
    return ins


def _swap_first(args: tuple, kwargs: dict, first: Tensor) -> tuple[tuple, dict, Tensor]:
    """The call's arguments with ``first`` (the tensor it writes in place) replaced by a
    copy of it, wherever it is passed; and the copy."""
    copy = first.clone()
    return (
        tuple(copy if a is first else a for a in args),
        {k: copy if v is first else v for k, v in kwargs.items()},
        copy,
    )


def _keep_cache(trace: Trace) -> tuple[frozenset[int], list[Any], list[int]]:
    """Per trace (cached): the positions of calls that may write into a tensor (an op
    recorded as in place, a normalisation updating running statistics), the model's
    modules, and the ids of the constants the trace holds."""
    cached = trace.__dict__.get("_replay_keep")
    if cached is None:
        writes = frozenset(
            op.seq
            for op in trace.ops
            if op.seq >= 0 and (op.inplace or op.name in ("batch_norm", "instance_norm"))
        )
        mods = list(trace.model.modules()) if trace.model is not None else []
        consts = [op._key for op in trace.ops if op.kind == "constant"]
        cached = (writes, mods, [id(t) for t in consts if isinstance(t, Tensor)])
        trace.__dict__["_replay_keep"] = cached
    return cached


def _outside_storages(trace: Trace, args: tuple, kwargs: dict) -> set[int]:
    """The storages of the run's inputs, the model's parameters and buffers and the
    trace's constants, for ``transform=`` (:func:`apply_transform`)."""
    _, mods, _ = _keep_cache(trace)
    consts = [op._key for op in trace.ops if op.kind == "constant"]
    return outside_storages(mods, [*tensors((args, kwargs), []), *consts])


def _nbytes(value: Any) -> int:
    if isinstance(value, tuple):
        return sum([t.nbytes for t in value if isinstance(t, Tensor)])
    return value.nbytes if isinstance(value, Tensor) else 0


def _count_storage(budget: Budget, t: Tensor) -> None:
    """Add the bytes of the storage ``t`` lies on, unless counted already (the tensors
    kept hold their storages, so a counted pointer is never reused while the run lasts)."""
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # no plain storage (sparse, ...)
        budget.saved += t.nbytes
        return
    ptr = storage.data_ptr()
    if ptr not in budget.storages:
        budget.storages.add(ptr)
        budget.saved += storage.nbytes()


def _count(budget: Budget, idx: int, value: Any) -> None:
    """Add a kept value's bytes to the run's total; stop the run past its limit."""
    n = _nbytes(value)
    budget.saved += n
    if budget.saved > budget.check:
        t = value if isinstance(value, Tensor) else tensors(value, [])[0]
        budget.over(idx, n, t.device)


class _StateKeeper:
    """The values of the model's parameters and buffers that a call of this run is about
    to write into (running statistics in training mode, an EMA update), each kept once,
    and the model's attributes (what a forward reassigns), so that a run stopped by
    ``max_memory=`` leaves the model as it found it. Made only where such writes can
    happen: nothing for a model in eval mode whose traced forward wrote nothing."""

    def __init__(self, trace: Trace, modules: list[Any]) -> None:
        self.state = {
            id(t): t
            for m in modules
            for t in (*m._parameters.values(), *m._buffers.values())
            if t is not None
        }
        self.before: dict[int, tuple[Tensor, Tensor]] = {}
        self.snapshot = (
            _state.snapshot(dict(trace.model.named_modules()))
            if trace._state and trace.model is not None
            else None
        )

    def before_write(self, func: Any, ins: list[Tensor], args: tuple, kwargs: dict) -> None:
        for t in _write_targets(func, ins, args, kwargs):
            held = self.state.get(id(t if t._base is None else t._base))
            if held is not None and id(held) not in self.before:
                self.before[id(held)] = (held, held.detach().clone())

    def restore(self) -> None:
        with torch.no_grad():
            for t, old in self.before.values():
                t.copy_(old)
        self.before.clear()
        if self.snapshot is not None:
            _state.changes(self.snapshot).restored()


def memory_budget(trace: Trace, max_memory: Any) -> Budget | None:
    """A fresh :class:`Budget` for one run: ``max_memory`` as ``lurker.trace`` reads it,
    or (``TRACED``) the value the trace was made with; None for no limit."""
    if max_memory is TRACED:
        # (a trace pickled before max_memory= was kept: "auto", the default)
        limit, fraction, auto = getattr(trace, "_max_memory", (None, AUTO_FRACTION, True))
    else:
        limit, fraction = parse_max_memory(max_memory)
        auto = isinstance(max_memory, str) and max_memory.lower() == "auto"
    if limit is None and fraction is None:
        return None
    return Budget(limit, fraction, auto)


def replay(
    trace: Trace,
    args: tuple,
    kwargs: dict,
    save: Any,
    hooks: Resolved,
    max_memory: Any = TRACED,
) -> Activations:
    """Run the traced model on new inputs with ``hooks``; save what ``save`` selects
    (after the hooks: the values the rest of the forward used), within ``max_memory``."""
    from .trace import Activations

    if trace.model is None or not trace.complete:
        raise GraphChangedError("Only a complete trace can be re-run on new inputs.")
    if torch.is_inference_mode_enabled():  # replayed under no_grad instead (see there)
        with _context.no_inference_mode():
            return replay(trace, args, kwargs, save, hooks, max_memory)
    budget = memory_budget(trace, max_memory)  # (a bad value: refused before anything runs)
    args, kwargs = _context.without_inference_tensors(args, kwargs)
    chosen = chosen_ops(trace, save)
    inputs = chosen_inputs(trace, save, args, kwargs)
    if not chosen and not inputs:
        budget = None  # nothing kept: nothing to count
    keeper: _Keeper | None = None
    # save_to=: the device the trace kept its values on, and every run keeps them on
    device: torch.device | None = getattr(trace, "_save_to", None)  # (older pickles: None)
    if hooks:
        # a hook may hand back a tensor it keeps, or write into an output outside any
        # call: every kept value is copied when it is made
        transform = trace._transform
        storages = _outside_storages(trace, args, kwargs) if transform is not None else None
        values: dict[int, Any] = {}

        def keep(op: Op, value: Any) -> None:
            def one(t: Tensor) -> Tensor:
                t = t.detach()
                if transform is None:
                    if device is not None:
                        moved = to_device(t, device)
                        if moved is not t:  # a new tensor already: no second copy
                            return moved
                    return t.clone()
                kept = apply_transform(transform, t, f"the output of {op.label}", storages)
                return kept if device is None else to_device(kept, device)

            kept = tuple(one(t) for t in value) if isinstance(value, tuple) else one(value)
            if budget is not None:
                _count(budget, op.index, kept)
            values[op.index] = kept

    else:
        keeper = (
            _Keeper(trace, args, kwargs, budget)
            if device is None
            else _MovingKeeper(trace, args, kwargs, budget, device)
        )
        values = keeper.values

        def keep(op: Op, value: Any) -> None:
            keeper.keep(op.index, value)  # type: ignore[union-attr]

    user = list(hooks)  # the caller's hooks may replace values; `keep` never does
    if chosen:
        hooks = {i: list(fns) for i, fns in hooks.items()}  # (the caller's stay as they are)
        for op in chosen:
            hooks.setdefault(op.index, []).append(keep)
    replayer = Replayer(trace, hooks, user)
    if keeper is not None:
        replayer.before_write = keeper.before_write
        replayer.writes = keeper.writes
    model = trace.model
    undo: _StateKeeper | None = None
    if budget is not None and (
        model.training
        or getattr(trace, "_state_before", None)
        or getattr(trace, "_param_writes", None)
        or getattr(trace, "_state", None)
        or _any_training(trace)
    ):  # the forward may write into the model: what it writes is kept, to put back
        writes, modules, _ = _keep_cache(trace)
        undo = _StateKeeper(trace, modules)
        replayer.writes = writes
        first = replayer.before_write
        if first is None:
            replayer.before_write = undo.before_write
        else:

            def both(func: Any, ins: list[Tensor], args: tuple, kwargs: dict) -> None:
                undo.before_write(func, ins, args, kwargs)  # type: ignore[union-attr]
                first(func, ins, args, kwargs)

            replayer.before_write = both
    try:
        for op, t in inputs:  # the values going in
            if keeper is not None:
                keeper.keep_input(op.index, t)
            else:  # (a transform gets a copy of the caller's stimuli, as the keepers give)
                keep(op, t.detach().clone() if trace._transform is not None else t)
        output = replayer.run(model, args, kwargs)
        if device is not None:  # the output nodes' values too (.output stays as it is)
            _keep_outputs(trace, output, values, device, budget)
    except Exception:
        if budget is None or budget.over_limit is None:
            raise
        # past max_memory (the model may have gone on and failed otherwise, having caught
        # the signal): reported below, out of this block, so the error chains no frames
        output = None
    if budget is not None and budget.over_limit is not None:
        # (also if the model caught the signal and went on): free what was kept
        values.clear()
        if keeper is not None:
            keeper.made.clear()
            keeper.aliases = None
            keeper.inputs = ((), {})
        replayer.call = ((), {})
        output = None
        if undo is not None:
            undo.restore()
        raise _memory_error(trace, budget.over_limit)
    if device is None:
        named = dict(paths(output, "output", []))
        for op in trace.ops:
            if op.kind == "output" and op.name in named:
                values[op.index] = named[op.name].detach()
    return Activations(trace, values, output)


def _keep_outputs(
    trace: Trace, output: Any, values: dict[int, Any], device: torch.device, budget: Budget | None
) -> None:
    """The output nodes' values on ``device`` (``save_to=``), counted where they are
    copies; the model's output itself (``Activations.output``) stays where the model
    made it: it is the forward's result, not a saved value."""
    named = dict(paths(output, "output", []))
    for op in trace.ops:
        if op.kind == "output" and op.name in named:
            d = named[op.name].detach()
            moved = to_device(d, device)
            values[op.index] = moved
            if budget is not None and moved is not d:
                _count(budget, op.index, moved)


def _any_training(trace: Trace) -> bool:
    """Whether a module of the model is in training mode (a BatchNorm switched back to
    ``train()`` in a model in ``eval()``, whose forward then writes its running
    statistics) where a call may write: read per run (a module's mode may change between
    runs) from the trace's module list; none is read where no call can write."""
    writes, modules, _ = _keep_cache(trace)
    if not writes:  # (the only calls whose writes the state keeper would see)
        return False
    return any(m.training for m in modules)


def _save_to_fix(device: torch.device | None) -> str:
    """The fix of a run whose values are kept on an accelerator: keep them in the
    machine's memory instead, as the trace's ``save_to=`` (which every run follows)."""
    if device is None or device.type == "cpu":
        return ""
    return (
        f"keep them off {device} with save_to='cpu' at trace time (every run keeps its "
        "values where the trace does: lurker.trace(model, x, save_to='cpu')); "
    )


def _memory_error(trace: Trace, over: OverLimit) -> MemoryLimitError:
    """A run passed ``max_memory``: say where, how much, and what to do for the next."""
    op = trace.ops[over.node_index]
    where = f" in module '{op.modules[-1][0]}'" if op.modules else ""
    calls = len(trace.__dict__["_replay_calls"][0])
    ran = f" after {op.seq + 1} of its {calls} calls" if op.seq >= 0 else ""
    text = (
        f"Trace.run of {trace.model_name} stopped before it could run out of memory: the "
        f"values it saved add up to {fmt_bytes(over.saved)}{ran}, past the limit of "
        f"{fmt_bytes(over.limit)} ({over.basis}). It stopped at op {op.label} ({op.name})"
        f"{where}, whose value is {fmt_bytes(over.nbytes)}. Nothing is changed: the values "
        "saved so far are freed, the model's state is as it was, and the trace is ready for "
        "the next run. To save less per run: run a smaller batch (for batch in "
        "x.split(n): tr.run(batch)); save= only the ops you need (tr.run(x, "
        "save=['layer4', 'relu_8']), module paths or op labels); trace with transform= to "
        "keep a reduction, which every run applies (lurker.trace(model, x, save=..., "
        "transform=lambda t: t.mean(tuple(range(2, t.dim()))))); "
        f"{_save_to_fix(over.device)}or set the limit with max_memory= (tr.run(x, "
        "max_memory='8GB'); max_memory=None turns this check off)."
    )
    return MemoryLimitError(
        text, partial=None, failed_op=op.label, saved_bytes=over.saved, limit=over.limit
    )
