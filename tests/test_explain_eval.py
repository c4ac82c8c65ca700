"""lurker.explain.evaluate: deletion / insertion curves against their analytic value on a
linear model and a brute-force one-step-at-a-time loop, the true importance order against
a random one, randomization against a hand-made cascade, scipy, scikit-image and
Quantus; the model left as it was; bad input; the CLI flag."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from scipy import ndimage, stats
from torch import nn

import lurker
from lurker.errors import LurkerError
from lurker.explain.evaluate import gaussian_blur, spearman, ssim
from models_zoo import digits_net_float64


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


@pytest.fixture(scope="module")
def linear() -> nn.Module:
    """Two classes, logits w x + b: the probability of class 1 is sigmoid(sum_i c_i + b')
    with c_i = x_i (w1_i - w0_i), so every point of a curve is known in closed form."""
    torch.manual_seed(0)
    m = nn.Linear(12, 2).double().eval()
    return m


@pytest.fixture(scope="module")
def digits() -> nn.Module:
    return digits_net_float64()


def _analytic(m: nn.Module, x: torch.Tensor, order: np.ndarray, kind: str) -> np.ndarray:
    """p(class 1) after k = 0..N features of ``order`` were removed (deletion, to 0) or
    inserted (insertion, from 0): the sum of the contributions still present."""
    w = m.weight.detach().numpy()
    b = m.bias.detach().numpy()
    c = x.numpy() * (w[1] - w[0])
    out = []
    for k in range(len(order) + 1):
        present = np.ones(len(order), bool)
        present[order[:k]] = False
        if kind == "insertion":
            present = ~present
        out.append(sigmoid(c[present].sum() + b[1] - b[0]))
    return np.array(out)


@pytest.mark.parametrize("kind", ["deletion", "insertion"])
def test_linear_curves_equal_the_closed_form(linear, kind) -> None:
    other = {"deletion": "insertion", "insertion": "deletion"}
    torch.manual_seed(1)
    x = torch.randn(3, 12, dtype=torch.float64)
    a = torch.randn(3, 12, dtype=torch.float64)  # any order: the curve follows it
    e = lurker.explain(linear, x, target=1, method="saliency", abs=False)
    e.attribution = a
    ev = lurker.explain.evaluate(
        linear, x, e, metrics=[kind], step=1, insertion_baseline="zeros", batch_size=5
    )
    curve = getattr(ev, kind)
    assert ev.randomization is None and getattr(ev, other[kind]) is None  # not asked for
    assert torch.equal(curve.fraction, torch.arange(13, dtype=torch.float64) / 12)
    for r in range(3):
        want = _analytic(linear, x[r], np.argsort(-a[r].numpy(), kind="stable"), kind)
        np.testing.assert_allclose(curve.scores[r].numpy(), want, rtol=1e-12)
        np.testing.assert_allclose(
            float(curve.auc[r]), np.trapezoid(want, np.arange(13) / 12), rtol=1e-12
        )


def test_curves_of_a_model_that_ends_in_a_softmax_follow_its_own_probabilities(linear) -> None:
    """A model whose last op is a softmax gives probabilities: the curves follow them as
    they are, the same as for its logits alone (a second softmax flattened them)."""
    torch.manual_seed(1)
    x = torch.randn(3, 12, dtype=torch.float64)
    a = torch.randn(3, 12, dtype=torch.float64)
    with_softmax = nn.Sequential(linear, nn.Softmax(-1)).eval()
    for kind in ("deletion", "insertion"):
        curves = []
        for m in (linear, with_softmax):
            e = lurker.explain(m, x, target=1, method="saliency", abs=False)
            e.attribution = a
            ev = lurker.explain.evaluate(
                m, x, e, metrics=[kind], step=1, insertion_baseline="zeros"
            )
            curves.append(getattr(ev, kind).scores)
        torch.testing.assert_close(curves[1], curves[0], rtol=1e-12, atol=1e-12)
        for r in range(3):  # the oracle: the closed form of the logits' softmax
            want = _analytic(linear, x[r], np.argsort(-a[r].numpy(), kind="stable"), kind)
            np.testing.assert_allclose(curves[1][r].numpy(), want, rtol=1e-12)


def test_true_importance_order_beats_random(linear) -> None:
    """Removing the largest contributions first leaves, at every step, the smallest sum
    any k features can leave: the deletion curve lies under every other order's, and the
    insertion curve over it."""
    torch.manual_seed(2)
    x = torch.randn(4, 12, dtype=torch.float64)
    truth = lurker.explain(linear, x, target=1, method="input_x_gradient")
    w = linear.weight.detach()
    truth.attribution = x * (w[1] - w[0])  # each feature's share of logit 1 - logit 0
    good = lurker.explain.evaluate(
        linear, x, truth, metrics=("deletion", "insertion"), step=1, insertion_baseline="zeros"
    )
    for seed in range(5):
        shuffled = copy.copy(truth)
        shuffled.attribution = torch.randn(
            4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
        )
        rand = lurker.explain.evaluate(
            linear,
            x,
            shuffled,
            metrics=("deletion", "insertion"),
            step=1,
            insertion_baseline="zeros",
        )
        assert (good.deletion.scores <= rand.deletion.scores + 1e-15).all()
        assert (good.insertion.scores >= rand.insertion.scores - 1e-15).all()
        assert (good.deletion.auc < rand.deletion.auc).all()
        assert (good.insertion.auc > rand.insertion.auc).all()


def _brute_force(m, x, a, kind, base, step, patch):
    """One forward per step, masks built with numpy: pixels ranked by their channel sum,
    patches by their mean (edge patches clipped)."""
    B, _, H, W = x.shape
    out = []
    for r in range(B):
        s = a[r].sum(0).numpy()
        ph, pw = -(-H // patch), -(-W // patch)
        score = np.array(
            [
                [
                    s[i * patch : (i + 1) * patch, j * patch : (j + 1) * patch].mean()
                    for j in range(pw)
                ]
                for i in range(ph)
            ]
        ).ravel()
        order = np.argsort(-score, kind="stable")
        n = len(order)
        row = []
        for k in range(0, -(-n // step) + 1):
            mask = np.zeros((ph, pw), bool).ravel()
            mask[order[: min(k * step, n)]] = True
            mask = np.kron(mask.reshape(ph, pw), np.ones((patch, patch), bool))[:H, :W]
            mt = torch.from_numpy(mask)[None]
            xr = (
                torch.where(mt, base[r], x[r])
                if kind == "deletion"
                else torch.where(mt, x[r], base[r])
            )
            with torch.no_grad():
                p = torch.softmax(m(xr[None]), 1)[0, 3]
            row.append(float(p))
        out.append(row)
    return np.array(out)


@pytest.mark.parametrize(
    ("kind", "baseline", "step", "patch"),
    [("deletion", "zeros", 7, 1), ("deletion", "mean", 2, 3), ("insertion", "blur", 3, 2)],
)
def test_digits_curves_equal_a_step_by_step_loop(digits, kind, baseline, step, patch) -> None:
    torch.manual_seed(3)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    e = lurker.explain(digits, x, target=3, method="integrated_gradients", n_steps=8)
    key = f"{kind}_baseline"
    ev = lurker.explain.evaluate(
        digits, x, e, metrics=[kind], step=step, patch=patch, batch_size=13, **{key: baseline}
    )
    if baseline == "zeros":
        base = torch.zeros_like(x)
    elif baseline == "mean":
        base = x.mean((2, 3), keepdim=True).expand_as(x)
    else:  # scipy's Gaussian, edges replicated ('nearest'), radius 5 = RISE's 11 x 11 kernel
        base = torch.from_numpy(
            ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 5, 5), mode="nearest", truncate=1.0)
        )
    want = _brute_force(digits, x, e.attribution, kind, base, step, patch)
    curve = getattr(ev, kind)
    np.testing.assert_allclose(curve.scores.numpy(), want, rtol=1e-10, atol=1e-12)
    # the batch size only changes how many rows go per forward
    again = lurker.explain.evaluate(
        digits, x, e, metrics=[kind], step=step, patch=patch, batch_size=1000, **{key: baseline}
    )
    torch.testing.assert_close(getattr(again, kind).scores, curve.scores, rtol=1e-12, atol=0)


def test_blur_equals_scipy() -> None:
    x = torch.rand(2, 3, 9, 13, dtype=torch.float64)
    want = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 1.5, 1.5), mode="nearest", truncate=2)
    np.testing.assert_allclose(gaussian_blur(x, 7, 1.5).numpy(), want, rtol=1e-12)


# ---------------------------------------------------------------------- randomization
class ScaledHead(nn.Module):
    """An MLP whose logits go through an eval-mode BatchNorm with positive scales:
    re-initialising that BatchNorm scales and shifts each logit, which leaves the ranks of
    |d logit / d x| exactly as they were (correlation 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 32)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(32, 4)
        self.norm = nn.BatchNorm1d(4)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 2)
            self.norm.bias.uniform_(-1, 1)
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(self.act(self.fc1(x))))


def _snapshot(model: nn.Module) -> tuple:
    from lurker.capture._hooks import model_hooks

    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        model_hooks(dict(model.named_modules())),
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
    )


def _same(a: tuple, b: tuple) -> None:
    assert a[0].keys() == b[0].keys()
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1:] == b[1:]


def test_randomization_cascade_equals_a_hand_made_one() -> None:
    torch.manual_seed(4)
    m = ScaledHead().double().eval()
    x = torch.randn(5, 10, dtype=torch.float64)
    keep = m.fc1.register_forward_hook(lambda *a: None)  # the user's own hook stays
    before = _snapshot(m)
    rng = torch.get_rng_state()
    ev = lurker.explain.evaluate(
        m, x, 2, "saliency", metrics=["randomization"], randomization_seed=7
    )
    _same(before, _snapshot(m))
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG is not consumed
    r = ev.randomization
    assert r.layers == ["norm", "fc2", "fc1"]  # from the output down, as they run
    # the oracle: the same re-initialisations by hand, saliency by autograd, scipy's Spearman
    twin = copy.deepcopy(m)
    keep.remove()

    def grads(model: nn.Module) -> np.ndarray:
        xi = x.clone().requires_grad_(True)
        model(xi)[:, 2].sum().backward()
        return xi.grad.abs().numpy()

    original = grads(twin)
    for i, name in enumerate(["norm", "fc2", "fc1"]):
        torch.manual_seed(7)
        getattr(twin, name).reset_parameters()
        now = grads(twin)
        for b in range(5):
            want = stats.spearmanr(original[b], now[b])[0]
            assert abs(float(r.similarity[i, b]) - want) < 1e-12
    assert torch.allclose(r.similarity[0], torch.ones(5, dtype=torch.float64), atol=1e-12)
    assert (r.similarity[1:].abs() < 0.9).all()  # weights that matter: another map


def test_randomization_named_layers_ssim_and_a_failing_method_leave_the_model(digits) -> None:
    torch.manual_seed(5)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    before = _snapshot(digits)
    ev = lurker.explain.evaluate(
        digits,
        x,
        1,
        "gradcam",
        metrics=["randomization"],
        layers=["classifier.3"],
        ssim=True,
        layer="features.8",
    )
    _same(before, _snapshot(digits))
    assert ev.randomization.layers == ["classifier.3"] and ev.randomization.ssim.shape == (1, 2)
    with pytest.raises(
        LurkerError, match=re.escape("layer 'features.88' is not a module of the model")
    ):
        lurker.explain.evaluate(digits, x, 1, metrics="randomization", layers=["features.88"])
    with pytest.raises(LurkerError, match=r"'features.2' \(ReLU\) has no reset_parameters"):
        lurker.explain.evaluate(digits, x, 1, metrics="randomization", layers=["features.2"])
    _same(before, _snapshot(digits))


def test_spearman_and_ssim_equal_scipy_and_skimage() -> None:
    skm = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(6)
    a = torch.randint(0, 5, (3, 40), generator=g).double()  # ties: average ranks
    b = torch.randn(3, 40, generator=g, dtype=torch.float64)
    for r in range(3):
        assert abs(float(spearman(a, b)[r]) - stats.spearmanr(a[r], b[r])[0]) < 1e-12
    assert torch.isnan(spearman(torch.ones(1, 5), torch.rand(1, 5))).all()
    u = torch.rand(2, 3, 12, 10, generator=g, dtype=torch.float64)
    v = u + 0.3 * torch.rand(2, 3, 12, 10, generator=g, dtype=torch.float64)
    got = ssim(u, v)
    for r in range(2):
        hu, hv = u[r].sum(0), v[r].sum(0)
        want = skm.structural_similarity(
            (hu / hu.max()).numpy(), (hv / hv.max()).numpy(), data_range=1.0
        )
        assert abs(float(got[r]) - want) < 1e-12


# ---------------------------------------------------------------------- entry point
def test_evaluate_by_method_equals_evaluate_of_its_explanation(digits) -> None:
    torch.manual_seed(8)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    before = _snapshot(digits)
    ev = lurker.explain.evaluate(digits, x, "top", "smoothgrad", n_samples=4, seed=1, patch=2)
    _same(before, _snapshot(digits))
    e = lurker.explain(digits, x, "top", "smoothgrad", n_samples=4, seed=1)
    ev2 = lurker.explain.evaluate(digits, x, e, patch=2)
    for kind in ("deletion", "insertion"):
        torch.testing.assert_close(getattr(ev, kind).scores, getattr(ev2, kind).scores)
    torch.testing.assert_close(ev.randomization.similarity, ev2.randomization.similarity)
    assert ev.explanation.target == e.target
    assert ev.deletion.baseline == "zeros" and ev.insertion.baseline.startswith("blur")
    assert ev.deletion.scores.shape == (2, 1 + 64) and ev.deletion.fraction[-1] == 1
    # the first deletion point is the model's own probability of the class
    p = torch.softmax(digits(x), 1)[range(2), e.target]
    torch.testing.assert_close(ev.deletion.scores[:, 0], p)
    text = ev.summary()
    assert "deletion AUC" in text and "insertion AUC" in text and "classifier.3" in text


def test_bad_input_errors(digits) -> None:
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    ev = lurker.explain.evaluate
    cases = [
        (dict(metrics=["fidelity"]), "unknown metric 'fidelity'; supported: deletion, insertion"),
        (dict(method="lime"), "unknown explanation method 'lime'"),
        (dict(target=("features.8", 3)), "deletion and insertion follow a class's probability"),
        (dict(deletion_baseline="noise"), "unknown baseline 'noise'; supported: zeros, blur"),
        (dict(step=0), "step (features changed per step) must be an int >= 1"),
        (dict(patch=0), "patch must be an int >= 1"),
        (dict(rank_by="size"), "rank_by is 'value' or 'magnitude'"),
        (dict(n_stepz=3), "method 'saliency' has no option 'n_stepz'"),
        # checked before the curves run (the seed was read only after them), and -1 was
        # taken silently as 2**64 - 1 by torch's generator
        *(
            (
                dict(metrics=["deletion", "randomization"], randomization_seed=seed),
                f"randomization_seed must be an integer from 0 to 2**64 - 1, got {seed!r}",
            )
            for seed in (-1, None, 1.5, True, 2**64)
        ),
        (dict(target=11), "target class 11 is out of range"),
    ]
    calls: list[int] = []
    h = digits.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for kwargs, message in cases:
            kwargs = {"target": 1, **kwargs}
            with pytest.raises(LurkerError, match=re.escape(message)):
                ev(digits, x, **kwargs)
            if "target class 11" not in message:  # found before the model runs
                assert not calls, message
    finally:
        h.remove()
    e = lurker.explain(digits, x, 1)
    with pytest.raises(LurkerError, match="the explanation given was made by 'saliency'"):
        ev(digits, x, e, "gradcam")
    with pytest.raises(LurkerError, match="the metrics go by keyword"):
        ev(digits, x, e, ("deletion",))
    with pytest.raises(LurkerError, match="does not match the input"):
        ev(digits, x[:1], lurker.explain(digits, x, 1))
    with pytest.raises(LurkerError, match="patch needs image inputs"):
        ev(nn.Linear(4, 2), torch.rand(2, 4), 1, metrics="deletion", patch=2)
    # the default insertion baseline, which the user did not set, is named with the fix
    with pytest.raises(LurkerError, match=r"insertion_baseline='blur' \(the default\)") as err:
        ev(nn.Linear(4, 2), torch.rand(2, 4), 1, metrics="insertion")
    assert "pass insertion_baseline='zeros'" in str(err.value)
    with pytest.raises(LurkerError, match=r"deletion_baseline=.blur.*pass deletion_baseline"):
        ev(nn.Linear(4, 2), torch.rand(2, 4), 1, metrics="deletion", deletion_baseline="blur")
    # a unit target is fine for the sanity check
    r = ev(digits, x, ("features.8", 3), metrics="randomization", layers="features.8")
    assert r.randomization.similarity.shape == (1, 2)


# ---------------------------------------------------------------------- Quantus
def test_deletion_equals_quantus_pixel_flipping(digits) -> None:
    quantus = pytest.importorskip("quantus")
    torch.manual_seed(9)
    m = copy.deepcopy(digits).float()
    x = torch.rand(3, 1, 16, 16)
    y = np.array([1, 4, 7])
    a = torch.rand(3, 1, 16, 16)  # continuous: no ties, so both sorts agree
    e = lurker.explain(m, x, y.tolist())
    e.attribution = a
    ours = lurker.explain.evaluate(m, x, e, metrics="deletion", step=4, deletion_baseline=0.0)
    metric = quantus.PixelFlipping(
        features_in_step=4, perturb_baseline=0.0, abs=False, normalise=False, disable_warnings=True
    )
    theirs = np.array(
        metric(model=m, x_batch=x.numpy(), y_batch=y, a_batch=a.numpy(), device="cpu", softmax=True)
    )
    # Quantus's curve starts after the first step; ours at the input itself
    np.testing.assert_allclose(ours.deletion.scores[:, 1:].numpy(), theirs, rtol=1e-5, atol=1e-6)


def test_randomization_equals_quantus_mprt(digits) -> None:
    quantus = pytest.importorskip("quantus")
    torch.manual_seed(10)
    m = copy.deepcopy(digits).float()
    x = torch.rand(3, 1, 16, 16)
    y = np.array([2, 5, 8])

    def explain_func(model, inputs, targets, **kwargs):
        t = torch.as_tensor(inputs).float()
        return lurker.explain(model, t, [int(v) for v in targets], "saliency").attribution.numpy()

    metric = quantus.MPRT(seed=42, disable_warnings=True)
    theirs = metric(
        model=m,
        x_batch=x.numpy(),
        y_batch=y,
        a_batch=None,
        explain_func=explain_func,
        device="cpu",
    )
    ours = lurker.explain.evaluate(
        m,
        x,
        y.tolist(),
        "saliency",
        metrics="randomization",
        randomization_seed=43,  # Quantus: seed + 1
    ).randomization
    assert ours.layers == [k for k in theirs if k != "original"]
    want = np.array([theirs[k] for k in ours.layers])
    np.testing.assert_allclose(ours.similarity.numpy(), want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- CLI
def test_cli_evaluate_prints_the_aucs(tmp_path) -> None:
    from click.testing import CliRunner
    from PIL import Image

    from lurker.cli import main
    from lurker.explain.cli import load_image
    from lurker.models import load_model

    img = tmp_path / "digit.png"
    Image.fromarray((torch.rand(16, 16) * 255).byte().numpy(), "L").save(img)
    args = ["explain", "lurker.examples:DigitsNet", "--image", str(img), "--image-size", "16"]
    r = CliRunner().invoke(main, [*args, "-t", "3", "-o", str(tmp_path / "h.png"), "--evaluate"])
    assert r.exit_code == 0, r.output
    x, _ = load_image(img, 16, 1)
    net = load_model("lurker.examples:DigitsNet")
    ev = lurker.explain.evaluate(net, x, 3, metrics=("deletion", "insertion"))
    assert (
        f"deletion AUC {float(ev.deletion.auc[0]):.4f} (lower is better), "
        f"insertion AUC {float(ev.insertion.auc[0]):.4f} (higher is better)"
    ) in r.output
    r = CliRunner().invoke(main, [*args, "-t", "features.8:1", "--evaluate"])
    assert r.exit_code == 2 and "--evaluate needs a class --target" in r.output, r.output
