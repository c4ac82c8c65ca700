"""Attributions for a model whose input is token ids: one score per token.

Integers have no gradient, so a text model's decision is attributed at the output of the
``nn.Embedding`` that looks the ids up (as Captum's ``LayerIntegratedGradients`` on the
embedding): the method runs on the embedded sequence ``e`` (``(B, L, D)``), the model
running on the ids with that embedding's output replaced by ``e``, so everything else the
ids drive (padding masks, positions) stays the ids' own. Each token's score folds its
``D`` values into one:

- ``input_x_gradient``, ``integrated_gradients``: the sum over the embedding dimension
  (signed; the tokens' scores then sum to the whole attribution, so integrated gradients'
  completeness, ``sum = f(x) - f(baseline)``, holds per sequence);
- ``saliency``, ``smoothgrad``: the L2 norm of the (mean) gradient over the embedding
  dimension (unsigned: a gradient's components have no common sign to add).

Integrated gradients' baseline on tokens: None (default) the zero vector at every
position; an int, the embedding of that id at every position (a pad id; ``0`` is Captum's
default on ids); an integer tensor of ids (``(L,)`` or ``(B, L)``), their embedding; a
floating tensor, the embedded baseline itself.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LurkerError

__all__ = ["TOKEN_METHODS", "Embedded", "is_ids", "reading_embedding", "token_baseline"]

#: methods that apply to token ids, attributed at the embedding's output
TOKEN_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad")
#: methods that fold a token's embedding attribution by summing (the rest: L2 norm)
SUMMED = ("input_x_gradient", "integrated_gradients")

_WHY_NOT = {
    "gradcam": "Grad-CAM weighs a layer's spatial maps, and a sequence of tokens has none",
    "gradcam_plus_plus": "Grad-CAM++ weighs a layer's spatial maps, and a sequence of tokens "
    "has none",
    "occlusion": "occlusion slides windows of pixels over an image",
    "guided_backprop": "guided backprop's ReLU rule is made for images' pixel gradients",
    "deconvnet": "deconvnet's ReLU rule is made for images' pixel gradients",
    "lrp": "LRP's rules start from pixel values, and an id is no value",
}


def is_ids(x: Any) -> bool:
    """Whether ``x`` is a tensor of integers (token ids), not values."""
    return isinstance(x, Tensor) and not (
        x.is_floating_point() or x.is_complex() or x.dtype == torch.bool
    )


def not_for_tokens(method: str) -> LurkerError:
    """Why ``method`` does not apply to token ids, and which methods do."""
    why = _WHY_NOT.get(method, f"method {method!r} differentiates with respect to the input")
    return LurkerError(
        f"method {method!r} does not apply to token ids: {why}. For a model that reads "
        f"token ids lurker attributes at the embedding's output, one score per token, with: "
        f"{', '.join(TOKEN_METHODS)}"
    )


def reading_embedding(model: nn.Module, ids: Tensor) -> tuple[str, nn.Embedding, Tensor]:
    """The ``nn.Embedding`` that looks up ``ids`` (found by one forward: the one whose input
    is ``ids``), its module path and its output on them; a clear error where none, or
    several, read them."""
    if ids.dim() != 2:
        raise LurkerError(
            f"token ids are explained as a batch (B, L) of sequences; got shape "
            f"{tuple(ids.shape)}" + ("; add a batch axis with ids[None]" if ids.dim() == 1 else "")
        )
    embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    seen: dict[str, Tensor] = {}
    handles = []

    def hook(name: str) -> Any:
        def grab(mod: nn.Module, inp: Any, out: Any) -> None:
            if _looks_up(inp, ids):
                if name in seen:
                    raise LurkerError(
                        f"the embedding {name!r} looks the ids up more than once in a forward; "
                        "lurker attributes at one lookup"
                    )
                seen[name] = out.detach()

        return grab

    try:
        for name, m in embeddings:
            handles.append(m.register_forward_hook(hook(name)))
        with torch.no_grad():
            try:
                model(ids)
            except IndexError:  # torch's "index out of range in self": say which id
                check_ids(model, ids)
                raise
    finally:
        for h in handles:
            h.remove()
    if not seen:
        names = ", ".join(n for n, _ in embeddings) or "none"
        raise LurkerError(
            f"the input is integers (token ids, {ids.dtype}), and no nn.Embedding of "
            f"{type(model).__name__} looks them up (its nn.Embedding modules: {names}): lurker "
            "attributes token ids at the embedding that reads them. For a model that reads "
            "integers as numbers, pass x.float()"
        )
    if len(seen) > 1:
        raise LurkerError(
            f"several embeddings look the ids up ({', '.join(seen)}); lurker attributes at "
            "one: wrap the model so that one nn.Embedding reads the ids"
        )
    name, out = next(iter(seen.items()))
    module = dict(model.named_modules())[name]
    assert isinstance(module, nn.Embedding)
    return name, module, out


def _looks_up(inp: Any, ids: Tensor) -> bool:
    """Whether an embedding's call (its positional ``inp``) looks up ``ids`` themselves,
    not other ids (a class token's, a shifted copy's, positions)."""
    got = inp[0] if inp else None
    return (
        isinstance(got, Tensor)
        and got.shape == ids.shape
        and (got is ids or torch.equal(got.to(ids.device), ids))
    )


def check_ids(model: nn.Module, ids: Tensor) -> None:
    """Refuse ids that no embedding of ``model`` can look up, where a forward failed on
    them inside torch (an index error that would otherwise read as a dtype problem)."""
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    if not sizes or not ids.numel():
        return
    n = max(sizes)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise LurkerError(
            f"token id {bad} is outside the ids the model's embeddings look up (0 to "
            f"{n - 1}): give ids of the model's vocabulary (if the input is numbers, not "
            "ids, pass x.float())"
        )


def token_baseline(baseline: Any, emb: nn.Embedding, ids: Tensor, e: Tensor) -> Tensor:
    """Integrated gradients' baseline in embedding space (see the module's docstring)."""
    from .integrated_gradients import as_baseline  # (it imports this module's importers)

    if isinstance(baseline, bool):
        raise LurkerError(f"baseline must be None, an id or a tensor; got {baseline!r}")
    if isinstance(baseline, numbers.Integral) or is_ids(baseline):
        b = torch.as_tensor(baseline, device=ids.device).long()
        n = emb.num_embeddings
        if b.numel() and (int(b.min()) < 0 or int(b.max()) >= n):
            raise LurkerError(
                f"baseline id {int(b.max()) if int(b.max()) >= n else int(b.min())} is "
                f"outside the embedding's {n} ids (0 to {n - 1})"
            )
        try:
            b = b.expand_as(ids)
        except RuntimeError as err:
            raise LurkerError(
                f"baseline ids of shape {tuple(b.shape)} do not broadcast to the input "
                f"{tuple(ids.shape)}"
            ) from err
        with torch.no_grad():
            return emb(b).to(e.dtype)
    if isinstance(baseline, float):
        raise LurkerError(
            f"baseline {baseline!r} on token ids: give an id (an int, such as the pad id), "
            "None (the zero vector) or a tensor"
        )
    if baseline is not None and not isinstance(baseline, Tensor):
        raise LurkerError(
            f"baseline must be None, an id or a tensor; got {type(baseline).__name__}"
        )
    return as_baseline(baseline, e)  # None: the zero vector; a tensor: the embedded one


class Embedded(nn.Module):
    """``model`` as a function of its embedding's output: ``forward(e)`` runs the model on
    the ids with the embedding's output replaced by ``e``. ``rows`` (set by
    :class:`~.targets.Forward` before each call) says which row of the ids each row of
    ``e`` stands for (None: ``e`` has the ids' own rows)."""

    def __init__(self, model: nn.Module, embedding: nn.Embedding, ids: Tensor) -> None:
        super().__init__()
        # kept out of the module tree: untouched() guards the model itself
        self.__dict__["inner"] = model
        self.__dict__["embedding"] = embedding
        self.ids = ids
        self.rows: Tensor | None = None

    def forward(self, e: Tensor) -> Any:
        return self.run(e, self.inner)

    def run(self, e: Tensor, call: Callable[[Tensor], Any]) -> Any:
        """:meth:`forward` with ``call(ids)`` running the model (a replay of its trace, whose
        hooks tap trace labels: a functional op, one call of a module run several times)."""
        ids = self.ids if self.rows is None else self.ids[self.rows.to(self.ids.device)]
        if ids.shape[0] != e.shape[0]:  # a method that did not say which rows it runs
            raise LurkerError(
                f"internal: {e.shape[0]} embedded rows for {ids.shape[0]} rows of ids, and no "
                "rows given to pair them"
            )

        replaced = []

        def replace(mod: nn.Module, inp: Any, out: Tensor) -> Tensor:
            if not _looks_up(inp, ids):
                return out  # another lookup (a class token's id, shifted ids): the model's
            if out.shape != e.shape:
                raise LurkerError(
                    f"the embedding's output {tuple(out.shape)} does not match the embedded "
                    f"input {tuple(e.shape)}"
                )
            replaced.append(True)
            return e

        handle = self.embedding.register_forward_hook(replace)
        try:
            out = call(ids)
        finally:
            handle.remove()
        if not replaced:  # the attributed values never reached the model: all zeros
            raise LurkerError(
                f"the embedding did not look up these {ids.shape[0]} rows of ids as it looked "
                "up the whole batch (the model changes its ids by batch, e.g. trims the "
                "padding to the longest row): explain the rows one batch at a time without "
                "internal_batch_size"
            )
        return out


def fold(attr: Tensor, method: str) -> Tensor:
    """One score per token from the ``(B, L, D)`` attribution at the embedding."""
    return attr.sum(-1) if method in SUMMED else attr.norm(dim=-1)
