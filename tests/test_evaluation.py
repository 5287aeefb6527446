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


def test_unbiased_kid_of_a_resample_is_the_mmd_u_statistic():
    g = gen(3)
    f, r = torch.rand(30, 5, generator=g, dtype=torch.float64), torch.rand(40, 5, generator=g, dtype=torch.float64)

    def k(a, b):
        return (a @ b / 5 + 1) ** 3

    idx = torch.tensor([0, 3, 3, 7, 29, 12])  # with a repeat, as a bootstrap resample has
    x = f[idx]
    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    rr = sum(k(r[i], r[j]) for i in range(40) for j in range(40) if i != j) / (40 * 39)
    xr = sum(k(a, b) for a in x for b in r) / (6 * 40)
    j = ev.Judged(f, torch.ones(30), ev.cubic_kernel(f, f), ev.cubic_kernel(f, r).mean(1))
    assert ev.off_diagonal_mean_chunked(r, chunk=7) == pytest.approx(rr.item(), rel=1e-12)
    kid = ev.scores_of(j, idx, ev.moments(r), ev.off_diagonal_mean_chunked(r))[1]
    assert kid == pytest.approx((xx + rr - 2 * xr).item(), rel=1e-9)


def test_judge_sets_are_disjoint_balanced_real_digits():
    reference, floor, labels = ev.judge_sets(per_class=7)
    assert len(floor) == 70 and torch.equal(torch.bincount(labels), torch.full((10,), 7))
    assert len(reference) == 10_000 - 70
    assert not (reference.flatten(1)[:, None] == floor.flatten(1)[None]).all(-1).any()  # no floor digit in the reference


def test_judge_table_tells_apart_only_what_its_intervals_separate(classifier):
    reference, held_out, held_labels = ev.judge_sets(per_class=40)  # two sets of 20 real digits per class
    floor, other = (held_out.view(10, 40, 1, 28, 28)[:, half].flatten(0, 1) for half in (slice(0, 20), slice(20, 40)))
    labels = held_labels.view(10, 40)[:, :20].flatten()
    noisy = (other + 0.8 * torch.randn(other.shape, generator=gen(4))).clamp(-1, 1)
    table = ev.judge_table(classifier.features, {"real": other, "copy": other.clone(), "noisy": noisy}, labels,
                           reference[:3000], floor, floor_labels=labels, classify=classifier.head, rounds=50)
    assert table["_best"]["frechet"] in ("real", "copy")
    assert table["copy"]["frechet_ties_best"] and table["real"]["kid_ties_best"]  # the same samples tie exactly
    assert not table["noisy"]["frechet_ties_best"] and not table["noisy"]["kid_ties_best"]
    lo, hi = table["noisy"]["frechet_ci"]
    assert table["real"]["frechet_ci"][1] < lo <= table["noisy"]["frechet"] <= hi
    floor_fd = table[ev.FLOOR]["frechet"]  # real digits sit at the floor, within its interval
    assert table["real"]["frechet_ci"][0] <= floor_fd <= table["real"]["frechet_ci"][1]
    assert table[ev.FLOOR]["accuracy"] > 0.95 and table["noisy"]["accuracy"] < table["real"]["accuracy"]


def test_eval_reports_intervals_and_the_floor_at_the_same_sample_count(tmp_path, capsys, classifier):
    import json

    from diffusekit.cli import main
    from diffusekit.data import MNIST
    from diffusekit.images import save_image

    real_folder, fake_folder = tmp_path / "real", tmp_path / "fake"
    for k, x in enumerate(MNIST(indices=slice(0, 400)).images):  # 360 real digits, and 40 of them as the "samples"
        save_image(x, (real_folder if k < 360 else fake_folder) / f"{k:03d}.png")
    main(["eval", "--model", "mnist", "--n", "3", "--steps", "1", "--rounds", "20", "--real", str(real_folder)])
    bad = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # one step: far from real digits
    assert bad["n"] == 30 and bad["reference"] == 360 - 30 and len(bad["floor"]["frechet_ci"]) == 2
    lo, hi = bad["samples"]["frechet_ci"]
    assert lo <= bad["samples"]["frechet"] <= hi and not bad["within_floor"]
    assert bad["samples"]["frechet"] > 3 * bad["floor"]["frechet"]
    main(["eval", "--fake", str(fake_folder), "--rounds", "20", "--real", str(real_folder)])
    real = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert real["n"] == 40 and real["within_floor"] and "accuracy" not in real["samples"]
