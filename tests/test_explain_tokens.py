"""Attributions on token ids: one score per token, attributed at the embedding's output,
checked against Captum's LayerIntegratedGradients and autograd by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lurker
from lurker.errors import LurkerError

VOCAB, DIM, CLASSES = 30, 8, 4


class ConvText(nn.Module):
    """embedding -> conv1d -> relu -> mean over tokens -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.conv = nn.Conv1d(DIM, 6, 3, padding=1)
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embedding(ids).transpose(1, 2)
        return self.fc(torch.relu(self.conv(h)).mean(-1))


class TransformerText(nn.Module):
    """embedding + learned positions -> TransformerEncoder (pad id 0 masked) -> mean -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.position = nn.Embedding(16, DIM)
        layer = nn.TransformerEncoderLayer(DIM, 2, 16, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(DIM, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.embedding(ids) + self.position(pos)[None]
        h = self.encoder(h, src_key_padding_mask=ids == 0)
        return self.fc(h.mean(1))


def _model(kind: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return kind().double().eval()


def _ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    ids[1, -3:] = 0  # padding: the transformer masks it, read off the ids
    return ids


def _embedding_grad(model: nn.Module, ids: torch.Tensor, target: list[int]):
    """The embedding's output and the gradient of the target scores with respect to it,
    by autograd with a hook (the oracle)."""
    kept = {}

    def hook(mod, inp, out):
        out.retain_grad()
        kept["e"] = out

    h = model.embedding.register_forward_hook(hook)
    try:
        out = model(ids)
        out.gather(1, torch.tensor(target)[:, None]).sum().backward()
    finally:
        h.remove()
    model.zero_grad(set_to_none=True)
    return kept["e"].detach(), kept["e"].grad.detach()


MODELS = [ConvText, TransformerText]


@pytest.mark.parametrize("kind", MODELS)
def test_integrated_gradients_equal_captum_layer_ig(kind: type[nn.Module]) -> None:
    from captum.attr import LayerIntegratedGradients

    model, ids = _model(kind), _ids()
    # a baseline of id 5 everywhere (not the pad id 0: the transformer would mask every token)
    ours = lurker.explain(model, ids, method="integrated_gradients", baseline=5, n_steps=32)
    assert ours.attribution.shape == ids.shape
    lig = LayerIntegratedGradients(model, model.embedding)
    theirs, delta = lig.attribute(
        ids,
        baselines=torch.full_like(ids, 5),
        target=ours.target,
        n_steps=32,
        return_convergence_delta=True,
    )
    torch.testing.assert_close(ours.attribution, theirs.sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.layer_attribution, theirs, atol=1e-5, rtol=0)
    if kind is ConvText:
        # (Captum's delta runs the baseline ids through the model: the transformer's padding
        # mask is then the baseline's, not the one its integral ran under, as ours keeps)
        torch.testing.assert_close(ours.delta, delta, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", MODELS)
def test_input_x_gradient_and_saliency_equal_autograd_on_the_embedding(
    kind: type[nn.Module],
) -> None:
    model, ids = _model(kind), _ids()
    target = [0, 2, 3]
    e, g = _embedding_grad(model, ids, target)
    ixg = lurker.explain(model, ids, target, method="input_x_gradient")
    torch.testing.assert_close(ixg.attribution, (e * g).sum(-1), atol=1e-10, rtol=0)
    assert ixg.signed and ixg.options["per_token"] == "sum"
    sal = lurker.explain(model, ids, target, method="saliency")
    torch.testing.assert_close(sal.attribution, g.norm(dim=-1), atol=1e-10, rtol=0)
    assert not sal.signed and (sal.attribution >= 0).all()
    # every position gets a score, padded ones too (the conv model reads them)
    assert ixg.attribution.shape == sal.attribution.shape == ids.shape


@pytest.mark.parametrize("kind", MODELS)
def test_integrated_gradients_are_complete_from_the_zero_vector(kind: type[nn.Module]) -> None:
    model, ids = _model(kind), _ids()
    ig = lurker.explain(model, ids, method="integrated_gradients", n_steps=400)
    # f(baseline) by hand: the model with its embedding's output replaced by zeros
    h = model.embedding.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    try:
        with torch.no_grad():
            f0 = model(ids).gather(1, torch.tensor(ig.target)[:, None])[:, 0]
    finally:
        h.remove()
    with torch.no_grad():
        fx = model(ids).gather(1, torch.tensor(ig.target)[:, None])[:, 0]
    torch.testing.assert_close(ig.delta, ig.attribution.sum(1) - (fx - f0), atol=1e-10, rtol=0)
    assert ig.delta.abs().max() < 1e-3 * (fx - f0).abs().max()
    assert ig.options["baseline"] is None


def test_smoothgrad_is_the_norm_of_the_mean_noisy_gradient() -> None:
    model, ids = _model(ConvText), _ids()
    noise = torch.randn(
        5, 3, 9, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    sg = lurker.explain(model, ids, [1, 1, 1], method="smoothgrad", noise=noise)
    e, _ = _embedding_grad(model, ids, [1, 1, 1])
    total = torch.zeros_like(e)
    for n in noise:
        h = model.embedding.register_forward_hook(lambda m, i, o, n=n: (e + n).requires_grad_())
        try:
            kept: dict[str, torch.Tensor] = {}
            h2 = model.embedding.register_forward_hook(
                lambda m, i, o, kept=kept: kept.setdefault("e", o)
            )
            out = model(ids)
            (g,) = torch.autograd.grad(out[:, 1].sum(), kept["e"])
        finally:
            h.remove()
            h2.remove()
        total += g
    torch.testing.assert_close(sg.attribution, (total / 5).norm(dim=-1), atol=1e-10, rtol=0)


def test_the_model_is_left_untouched() -> None:
    model, ids = _model(TransformerText), _ids()
    flags = [p.requires_grad for p in model.parameters()]
    for method in ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad"):
        lurker.explain(model, ids, method=method)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    "method", ["gradcam", "gradcam_plus_plus", "occlusion", "guided_backprop", "deconvnet", "lrp"]
)
def test_methods_that_do_not_apply_say_which_do(method: str) -> None:
    model, ids = _model(ConvText), _ids()
    with pytest.raises(LurkerError, match="does not apply to token ids") as err:
        lurker.explain(model, ids, method=method)
    assert "integrated_gradients" in str(err.value) and "input_x_gradient" in str(err.value)


def test_token_input_errors_name_the_fix() -> None:
    model, ids = _model(ConvText), _ids()

    class Numbers(nn.Module):  # reads the integers as numbers
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(9, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.float())

    with pytest.raises(LurkerError, match=r"floating point.*Numbers has none"):
        lurker.explain(Numbers(), ids)
    numbers = Numbers()
    numbers.position = nn.Embedding(9, 2)  # an embedding that does not read the input
    with pytest.raises(LurkerError, match=r"no nn\.Embedding .*position.*x\.float\(\)"):
        lurker.explain(numbers, ids)
    with pytest.raises(LurkerError, match="batch"):
        lurker.explain(model, ids[0])
    with pytest.raises(LurkerError, match="outside the embedding"):
        lurker.explain(model, ids, method="integrated_gradients", baseline=VOCAB)
    with pytest.raises(LurkerError, match="abs=False"):
        lurker.explain(model, ids, method="saliency", abs=False)
    with pytest.raises(LurkerError, match="unit target conv:9: channel 9 is out of range"):
        lurker.explain(model, ids, ("conv", 9))  # (units: tests/test_explain_unit_pictureless.py)
    for method in ("saliency", "integrated_gradients"):  # (these failed on options, or not)
        with pytest.raises(LurkerError, match=r"empty batch: x has shape \(0, 9\)"):
            lurker.explain(model, ids[:0], method=method)


def test_inside_inference_mode_the_scores_are_the_same() -> None:
    """Under torch.inference_mode autograd records nothing: the scores were all 0."""
    model, ids = _model(TransformerText), _ids()
    e = lurker.explain(model, ids, [0, 1, 2], method="input_x_gradient")
    with torch.inference_mode():
        inner = lurker.explain(model, ids.clone(), [0, 1, 2], method="input_x_gradient")
    assert e.attribution.abs().min() > 0
    torch.testing.assert_close(inner.attribution, e.attribution, rtol=1e-9, atol=1e-12)


def test_baseline_ids_are_embedded() -> None:
    model, ids = _model(ConvText), _ids()
    by_id = lurker.explain(model, ids, method="integrated_gradients", baseline=5)
    row = model.embedding.weight[5].detach()
    by_vector = lurker.explain(model, ids, method="integrated_gradients", baseline=row)
    torch.testing.assert_close(by_id.attribution, by_vector.attribution, atol=1e-12, rtol=0)
    assert by_id.options["baseline"] == 5


class TwoLookups(nn.Module):
    """Looks the embedding up twice: the ids, and a class token's id prepended (BERT's
    [CLS]) or the ids shifted by one: only the ids' own lookup is what is attributed."""

    def __init__(self, shifted: bool) -> None:
        super().__init__()
        self.shifted = shifted
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.fc = nn.Linear(DIM, CLASSES)

    def mix(self, e: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.shifted:
            h = e * self.embedding(ids.roll(1, 1))
        else:
            cls = self.embedding(torch.full_like(ids[:, :1], VOCAB - 1))
            h = torch.cat([cls, e], 1)
        return self.fc(torch.tanh(h).mean(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mix(self.embedding(ids), ids)


@pytest.mark.parametrize("shifted", [True, False])
def test_only_the_ids_own_lookup_is_attributed(shifted: bool) -> None:
    """Was: every call of the embedding returned the attributed values, so a second lookup
    (a shifted copy: same shape) made the scores another function's, with a delta near 0;
    a class token's lookup (another shape) was refused."""
    torch.manual_seed(0)
    model, ids = TwoLookups(shifted).double().eval(), _ids()
    target = [0, 2, 1]
    e = model.embedding(ids).detach().requires_grad_(True)
    model.mix(e, ids).gather(1, torch.tensor(target)[:, None]).sum().backward()
    want = e.grad.detach()
    sal = lurker.explain(model, ids, target, method="saliency")
    torch.testing.assert_close(sal.attribution, want.norm(dim=-1), atol=1e-10, rtol=0)
    ixg = lurker.explain(model, ids, target, method="input_x_gradient")
    torch.testing.assert_close(ixg.attribution, (want * e.detach()).sum(-1), atol=1e-10, rtol=0)
    ig = lurker.explain(model, ids, target, method="integrated_gradients", n_steps=64)
    with torch.no_grad():  # completeness from the zero vector, by hand
        rows = torch.arange(3)
        full = model.mix(e.detach(), ids)[rows, target]
        zero = model.mix(torch.zeros_like(e), ids)[rows, target]
    torch.testing.assert_close(ig.attribution.sum(-1), full - zero, atol=1e-3, rtol=0)


def test_ids_outside_the_vocabulary_and_integer_images_say_what_to_do() -> None:
    model = _model(ConvText)
    bad = _ids().clone()
    bad[0, 0] = VOCAB + 5
    with pytest.raises(LurkerError, match=f"token id {VOCAB + 5} is outside .*0 to {VOCAB - 1}"):
        lurker.explain(model, bad)

    class Conditional(nn.Module):  # an image model with a class embedding
        def __init__(self) -> None:
            super().__init__()
            self.cls = nn.Embedding(3, 4)
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x.float()).mean((2, 3)) + self.cls.weight[0]
            return h

    img = torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8)
    for method in ("saliency", "gradcam"):
        with pytest.raises(LurkerError, match=r"floating point.*pass x\.float\(\)"):
            lurker.explain(Conditional(), img, method=method)


def test_the_model_is_left_untouched_when_a_method_raises() -> None:
    model, ids = _model(TransformerText), _ids()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(LurkerError):
        lurker.explain(model, ids, method="smoothgrad", noise=torch.zeros(2, 2))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not model.training


def test_a_numpy_integer_baseline_is_an_id() -> None:
    import numpy as np

    model, ids = _model(ConvText), _ids()
    a = lurker.explain(model, ids, method="integrated_gradients", baseline=np.int64(5))
    b = lurker.explain(model, ids, method="integrated_gradients", baseline=5)
    torch.testing.assert_close(a.attribution, b.attribution, atol=0, rtol=0)


def test_a_model_that_trims_its_ids_by_batch_is_refused_not_zeroed() -> None:
    """A model that trims padding to the batch's longest row looks up other ids when the
    method runs rows in smaller batches (internal_batch_size): the attributed values never
    reach it, so its scores would be zeros. Refused, saying why."""

    class Trims(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            ids = ids[:, : int((ids != 0).sum(1).max())]
            return self.fc(self.embedding(ids)).mean(1)

    torch.manual_seed(0)
    model, ids = Trims().double().eval(), torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    whole = lurker.explain(model, ids, method="integrated_gradients", n_steps=4)
    assert bool((whole.attribution[1, :2] != 0).all())
    with pytest.raises(LurkerError, match=r"did not look up .*internal_batch_size"):
        lurker.explain(model, ids, method="integrated_gradients", n_steps=4, internal_batch_size=1)


class CharLM(nn.Module):
    """A one-block causal language model (minGPT's attention written out by hand):
    logits ``(B, L, VOCAB)``, a score per class at every position."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Embedding(16, DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(t))
        q, k, v = self.qkv(x).split(DIM, dim=2)
        att = (q @ k.transpose(-2, -1)) / DIM**0.5
        att = att.masked_fill(torch.ones(t, t).tril() == 0, float("-inf")).softmax(-1)
        return self.head(x + att @ v)


def test_a_language_models_class_target_names_the_last_positions_unit() -> None:
    """A language model's logits are ``(B, L, V)``: a class target is refused, and the
    message names the unit target of the last position's score, ``(LAYER, CLASS, 0,
    L-1)``, not ``(LAYER, CLASS)`` alone (which averages the score over the positions: not
    the next token's). The unit it names is the next-token logit's autograd gradient at
    the embedding's output, and differs from the average over positions."""
    torch.manual_seed(0)
    model = CharLM().eval()
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    with pytest.raises(LurkerError, match="a class target needs the model") as err:
        lurker.explain(model, ids, 3, "input_x_gradient")
    said = str(err.value)
    assert "(LAYER, CLASS, 0, 6)" in said and "('head', 3, 0, 6)" in said, said
    assert "averaged over the positions" in said and "('fc', 3)" not in said
    e = lurker.explain(model, ids, ("head", 3, 0, 6), "input_x_gradient")
    emb = model.tok(ids).detach().requires_grad_(True)
    hook = model.tok.register_forward_hook(lambda m, i, o: emb)
    try:
        model(ids)[0, -1, 3].backward()
    finally:
        hook.remove()
    want = (emb * emb.grad).sum(-1)
    torch.testing.assert_close(e.attribution, want.detach(), rtol=1e-5, atol=1e-6)
    mean = lurker.explain(model, ids, ("head", 3), "input_x_gradient").attribution
    assert not torch.allclose(mean, e.attribution, atol=1e-3)


def test_a_3d_output_of_a_model_not_of_token_ids_is_not_read_as_a_language_model() -> None:
    """A 1-D segmentation's output is ``(batch, classes, steps)``: its second axis is the
    classes, not positions. The class target's refusal must not call it a language model's
    logits nor name ``(LAYER, CLASS, 0, classes - 1)`` as "the last position": that unit
    exists (step 4 of 40) and would silently explain another step's score. Oracle:
    autograd's gradient of the last step's score differs from the one at that step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 5, 1)).eval()
    x = torch.randn(2, 2, 40)
    with pytest.raises(LurkerError, match="a class target needs the model") as err:
        lurker.explain(model, x, 3, "saliency")
    said = str(err.value)
    assert "(2, 5, 40)" in said
    assert "language model" not in said and "0, 4)" not in said, said
    xs = x.clone().requires_grad_(True)
    (g4,) = torch.autograd.grad(model(xs)[:, 3, 4].sum(), xs)
    (g39,) = torch.autograd.grad(model(xs)[:, 3, 39].sum(), xs)
    e = lurker.explain(model, x, ("2", 3, 0, 4), "saliency")
    torch.testing.assert_close(e.attribution, g4.abs())
    assert not torch.allclose(g4.abs(), g39.abs())
