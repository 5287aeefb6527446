import numpy as np
import pytest
import torch

from diffusekit import evaluation as ev

from .conftest import gen

scipy_linalg = pytest.importorskip("scipy.linalg")


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The reference formula (pytorch-fid): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_scipy_sqrtm():
    g = gen(0)
    for d in (3, 16, 64):
        a = torch.randn(500, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
        b = torch.randn(400, d, generator=g, dtype=torch.float64) * 1.3 + 0.5
        ma, sa = ev.moments(a)
        mb, sb = ev.moments(b)
        ref = scipy_frechet(ma.numpy(), sa.numpy(), mb.numpy(), sb.numpy())
        assert ev.frechet_distance(ma, sa, mb, sb) == pytest.approx(ref, rel=1e-6, abs=1e-8)
    assert ev.frechet_distance(ma, sa, ma, sa) == pytest.approx(0, abs=1e-8)


def test_kid_and_precision_recall_on_known_distributions():
    g = gen(1)
    x, y = torch.randn(2, 800, 8, generator=g, dtype=torch.float64)
    far = torch.randn(800, 8, generator=g, dtype=torch.float64) + 3
    same, _ = ev.kid(x, y, subsets=10, subset_size=400)
    shifted, _ = ev.kid(x, far, subsets=10, subset_size=400)
    assert abs(same) < 0.01 and shifted > 0.5
    p, r = ev.precision_recall(x, y)
    assert p > 0.8 and r > 0.8
    p, r = ev.precision_recall(x, far)
    assert p < 0.05 and r < 0.05
    p, r = ev.precision_recall(x, x[:, :] * 0.1)  # collapsed samples: precise but no recall
    assert p > 0.9 and r < 0.3


@pytest.fixture(scope="module")
def classifier():
    try:
        return ev.load_mnist_classifier()
    except ValueError:
        pytest.skip("no shipped MNIST classifier")


def test_shipped_classifier_accuracy_and_feature_space_metrics(classifier):
    from diffusekit.data import MNIST

    data = MNIST()
    held_out = slice(9000, None)
    acc = ev.class_accuracy(classifier, data.images[held_out], data.labels[held_out])
    assert acc >= 0.98
    half_a, half_b = data.images[:2000], data.images[2000:4000]
    noise = torch.rand(2000, 1, 28, 28, generator=gen(2)) * 2 - 1
    real_real = ev.evaluate_samples(half_b, half_a, data.labels[2000:4000], classifier)
    real_noise = ev.evaluate_samples(noise, half_a, classifier=classifier)
    assert real_real["frechet"] < 0.05 * real_noise["frechet"] and real_real["class_accuracy"] > 0.98
    assert real_real["precision"] > 0.7 and real_noise["precision"] < 0.05


def test_precision_recall_in_chunks_equals_the_whole_distance_matrix():
    from diffusekit.evaluation import precision_recall

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(300, 8, generator=g), torch.randn(200, 8, generator=g) + 0.3

    def whole(ref, query, k=3):
        radii = torch.cdist(ref, ref).kthvalue(k + 1, dim=1).values
        return (torch.cdist(query, ref) <= radii[None]).any(1).double().mean().item()

    assert precision_recall(real, fake, chunk=64) == (whole(real.double(), fake.double()),
                                                      whole(fake.double(), real.double()))


def test_bootstrap_interval_covers_the_mean_with_the_normal_width():
    x = (torch.rand(2000, generator=torch.Generator().manual_seed(0)) < 0.3).double()
    lo, hi = ev.bootstrap(lambda i: x[i].mean().item(), len(x), rounds=400)
    half = 1.96 * (x.mean() * (1 - x.mean()) / len(x)).sqrt().item()  # the normal approximation's half-width
    assert lo < x.mean().item() < hi and abs((hi - lo) / 2 - half) < 0.2 * half
    lo4, hi4 = ev.bootstrap(lambda i: x[i[:500]].mean().item(), len(x), rounds=400)  # 4x fewer samples: 2x wider
    assert 1.6 < (hi4 - lo4) / (hi - lo) < 2.4
