"""Sample quality: Frechet distance, KID, precision / recall, in the feature space of a pluggable
extractor, and class accuracy of class-conditional samples.

Extractors: the project's MNIST classifier (trained here, shipped in diffusekit/assets) and
Inception-v3 when its FID weights exist locally (pytorch-fid's InceptionV3 with a local .pth, read weights-only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import defaults
from .bundled import MNIST_CLASSIFIER
from .checkpoints import CheckpointError, from_pretrained, read_state_dict, save_pretrained
from .data import BACKGROUND, COLOURS, MNIST, ImageFolder, collate, place
from .images import save_grid
from .models.classifier import MNISTClassifier, MNISTClassifierConfig
from .pipelines import generate

Features = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------- metrics

def _sqrtm_psd(m: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (float64)."""
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), with tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2)."""
    mu1, sigma1, mu2, sigma2 = (v.double() for v in (mu1, sigma1, mu2, sigma2))
    r1 = _sqrtm_psd(sigma1)
    cross = torch.linalg.eigvalsh(r1 @ sigma2 @ r1).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross).item()


def moments(f: Tensor) -> tuple[Tensor, Tensor]:
    f = f.double()
    return f.mean(0), torch.cov(f.T)


def kid(f1: Tensor, f2: Tensor, subsets: int = 20, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with the kernel (x.y / d + 1)^3,
    mean and std over random subsets."""
    g = torch.Generator().manual_seed(seed)
    m = min(subset_size, len(f1), len(f2))
    values = []
    for _ in range(subsets):
        x = f1[torch.randperm(len(f1), generator=g)[:m]]
        y = f2[torch.randperm(len(f2), generator=g)[:m]]
        values.append(off_diagonal_mean(cubic_kernel(x, x)) + off_diagonal_mean(cubic_kernel(y, y))
                      - 2 * cubic_kernel(x, y).mean())
    v = torch.stack(values)
    return v.mean().item(), v.std().item()


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): the share of fake samples inside the
    real k-NN manifold, and of real samples inside the fake one (distances `chunk` rows at a time)."""

    def inside(ref: Tensor, query: Tensor) -> float:
        radii = torch.cat([torch.cdist(r, ref).kthvalue(k + 1, dim=1).values  # k-th neighbour, self excluded
                           for r in ref.split(chunk)])
        return torch.cat([(torch.cdist(q, ref) <= radii[None]).any(1) for q in query.split(chunk)]).double().mean().item()

    real, fake = real.double(), fake.double()
    return inside(real, fake), inside(fake, real)


@dataclass
class Report:
    frechet: float
    kid: float
    kid_std: float
    precision: float
    recall: float

    def __str__(self) -> str:
        return (f"Frechet distance {self.frechet:.3f}, KID {self.kid:.4f} +- {self.kid_std:.4f}, "
                f"precision {self.precision:.3f}, recall {self.recall:.3f}")


def compare(real: Tensor, fake: Tensor) -> Report:
    """All distribution metrics between two feature sets [N, d]."""
    fd = frechet_distance(*moments(real), *moments(fake))
    return Report(fd, *kid(real, fake), *precision_recall(real, fake))


@torch.no_grad()
def extract(features: Features, images: Tensor, batch: int = 500) -> Tensor:
    return torch.cat([features(images[i:i + batch]) for i in range(0, len(images), batch)])


# ----------------------------------------------------------------------------- MNIST classifier

def train_mnist_classifier(steps: int = 3000, batch: int = 128, holdout: int = 1000, seed: int = 0,
                           progress: bool = True, config: MNISTClassifierConfig | None = None
                           ) -> tuple[MNISTClassifier, float]:
    """Train on the first 9,000 bundled digits (random shifts of up to 2 pixels), return the model and its
    accuracy on the held-out last 1,000 (another seed and `config` give an independent judge)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train, test = MNIST(indices=slice(0, 10_000 - holdout)), MNIST(indices=slice(10_000 - holdout, None))
    model = MNISTClassifier(config or MNISTClassifierConfig())
    opt = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    for _ in tqdm(range(steps), disable=not progress, desc="training the MNIST classifier"):
        idx = torch.randint(0, len(train), (batch,), generator=g)
        x = F.pad(train.images[idx], (2, 2, 2, 2), value=-1)
        dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
        x = x[..., dy:dy + 28, dx:dx + 28]
        loss = F.cross_entropy(model(x), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model, class_accuracy(model, test.images, test.labels)


@torch.no_grad()
def class_accuracy(classifier: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Fraction of images the classifier assigns to the given labels."""
    preds = torch.cat([classifier(images[i:i + 500]).argmax(1) for i in range(0, len(images), 500)])
    return (preds == labels.to(preds.device)).double().mean().item()


def load_mnist_classifier(path: str | Path = MNIST_CLASSIFIER) -> MNISTClassifier:
    """The shipped MNIST classifier (train one with `diffusekit eval --train-classifier`)."""
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"no MNIST classifier at {path}; train one with: diffusekit eval --train-classifier")
    return from_pretrained(path).eval()


def save_mnist_classifier(model: MNISTClassifier, accuracy: float, path: str | Path = MNIST_CLASSIFIER) -> Path:
    return save_pretrained(model, path, extra={"heldout_accuracy": accuracy})


# ----------------------------------------------------------------------------- Inception

def inception_features(weights: str | Path, device: str = "cpu") -> Features:
    """FID's Inception-v3 pool features (2048-d) from a local pytorch-fid weights file
    (pt_inception-2015-12-05-*.pth, read weights-only so that no pickled code runs, or a .safetensors of it);
    needs the pytorch-fid package (and torchvision), and downloads nothing."""
    weights = Path(weights)
    if not weights.is_file():
        raise ValueError(f"no Inception weights at {weights} (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    state = read_state_dict(weights)  # checked before pytorch-fid is even imported
    try:
        from pytorch_fid import inception as fid
    except ImportError as e:
        raise ValueError("Inception features need the pytorch-fid package (and torchvision)") from e
    model = fid_inception(fid, state, str(weights))
    model = model.to(device).eval()

    @torch.no_grad()
    def features(x: Tensor) -> Tensor:
        x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
        x = F.interpolate(x.to(device), size=(299, 299), mode="bilinear", align_corners=False)
        return model(x).flatten(1).cpu()  # (inputs in [-1, 1]: pytorch-fid's normalisation of [0, 1] images)

    return features


def fid_inception(fid, state: dict[str, Tensor], source: str) -> nn.Module:
    """pytorch-fid's FID Inception-v3 up to its 2048-d pool features (its fid_inception_v3 with the FID blocks,
    built from pytorch-fid's modules, with the checked `state` instead of the weights it would download)."""
    net = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    blocks = {"Mixed_5b": fid.FIDInceptionA(192, pool_features=32),
              "Mixed_5c": fid.FIDInceptionA(256, pool_features=64),
              "Mixed_5d": fid.FIDInceptionA(288, pool_features=64),
              "Mixed_6b": fid.FIDInceptionC(768, channels_7x7=128),
              "Mixed_6c": fid.FIDInceptionC(768, channels_7x7=160),
              "Mixed_6d": fid.FIDInceptionC(768, channels_7x7=160),
              "Mixed_6e": fid.FIDInceptionC(768, channels_7x7=192),
              "Mixed_7b": fid.FIDInceptionE_1(1280),
              "Mixed_7c": fid.FIDInceptionE_2(2048)}
    for name, block in blocks.items():
        setattr(net, name, block)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:  # missing / unexpected keys, wrong shapes
        raise CheckpointError(f"{source} does not hold FID Inception-v3 weights: {e}") from e
    pool = nn.MaxPool2d(kernel_size=3, stride=2)
    return nn.Sequential(net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, pool, net.Conv2d_3b_1x1,
                         net.Conv2d_4a_3x3, pool, *(getattr(net, f"Mixed_{k}") for k in
                                                    ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c")),
                         nn.AdaptiveAvgPool2d((1, 1)))


# ----------------------------------------------------------------------------- images and models

def load_images(source: str | Path, resolution: int | None = None, channels: int = 1) -> tuple[Tensor, Tensor | None]:
    """'mnist' (the bundled digits) or a folder of images (sorted, resized to `resolution`) -> [N, C, H, W]
    in [-1, 1], and the labels if known."""
    if str(source) == "mnist":
        data = MNIST(resolution or 28)
        return data.images, data.labels
    folder = ImageFolder(source, resolution or 28, channels)
    batch = collate([folder[i] for i in range(len(folder))])
    return batch["image"], batch.get("label")


@torch.no_grad()
def sample_classes(pipe, per_class: int, batch: int = 200, seed: int = 0, progress: bool = False,
                   **generate_kw) -> tuple[Tensor, Tensor]:
    """per_class samples of every class of a class-conditional pipeline -> (images, labels), in batches, with
    one progress bar over all of their sampling steps."""
    labels = torch.arange(pipe.num_classes).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(seed)
    chunks = labels.split(batch)
    with tqdm(total=len(chunks) * generate_kw.get("steps", defaults.STEPS), desc=f"sampling {len(labels)} images",
              disable=not progress) as bar:
        images = [generate(pipe, len(chunk), labels=chunk, generator=g, callback=lambda *a: bar.update(), **generate_kw)
                  for chunk in chunks]
    return torch.cat(images), labels


def save_class_grid(images: Tensor, per_class: int, path: str | Path, columns: int = 8) -> Path:
    """The first `columns` of sample_classes' images of every class as a grid PNG, one labelled row per class."""
    k, classes = min(columns, per_class), len(images) // per_class
    return save_grid(images.view(classes, per_class, *images.shape[1:])[:, :k].flatten(0, 1), path, nrow=k,
                     row_labels=[str(c) for c in range(classes)], scale=2)


def evaluate_samples(images: Tensor, real: Tensor, labels: Tensor | None = None,
                     classifier: MNISTClassifier | None = None, features: Features | None = None) -> dict[str, float]:
    """Distribution metrics of `images` against `real` in a feature space (the MNIST classifier's by
    default), plus the share classified as the requested label when labels are given."""
    classifier = classifier or load_mnist_classifier()
    features = features or classifier.features
    report = compare(extract(features, real), extract(features, images))
    out = {"frechet": report.frechet, "kid": report.kid, "kid_std": report.kid_std,
           "precision": report.precision, "recall": report.recall}
    if labels is not None:
        out["class_accuracy"] = class_accuracy(classifier, images, labels)
    return out


def shape_components(colour: Tensor) -> Tensor:
    """Ids of the 4-connected regions of equal non-zero value in integer maps [N, H, W] (0 stays 0): each pixel
    takes the largest id in its region, found by propagating ids between equal neighbours until they settle."""
    n, h, w = colour.shape
    ids = torch.arange(1, n * h * w + 1).view(n, h, w) * (colour > 0)
    while True:
        grown = ids.clone()
        for dim, step in ((1, 1), (1, -1), (2, 1), (2, -1)):
            neighbour, same = ids.roll(step, dim), colour == colour.roll(step, dim)
            edge = torch.zeros_like(same)  # roll wraps around: the wrapped row / column is no neighbour
            edge.select(dim, 0 if step == 1 else -1).fill_(True)
            grown = torch.where(same & ~edge & (colour > 0), torch.maximum(grown, neighbour), grown)
        if torch.equal(grown, ids):
            return ids
        ids = grown


def segment_shapes(images: Tensor, min_area: int = 4, square_fill: float = 0.89, circle_fill: float = 0.64) -> Tensor:
    """A segmentation of shape scenes [N, 3, H, W] in [-1, 1] into ShapeMaps class maps [N, H, W]: each pixel
    takes the nearest of the background and shape colours; each connected region of one colour is a square,
    circle or triangle by the share of its bounding box it fills (1, pi/4, 1/2 for exact shapes; split at
    `square_fill` and `circle_fill`); regions under `min_area` pixels count as background."""
    palette = torch.tensor([BACKGROUND, *COLOURS.values()], dtype=torch.float32) / 127.5 - 1  # [5, 3]
    x = images.float().permute(0, 2, 3, 1)
    colour = torch.cdist(x.reshape(-1, 1, 3), palette[None].expand(len(x.reshape(-1, 3)), -1, -1)).squeeze(1)
    colour = colour.argmin(-1).view(x.shape[:3])
    ids = shape_components(colour)
    region, inverse = torch.unique(ids, return_inverse=True)
    n, h, w = colour.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    flat, k = inverse.flatten(), len(region)

    def reduce(values: Tensor, how: str) -> Tensor:
        start = torch.full((k,), 0 if how == "sum" else (10**9 if how == "amin" else -1), dtype=torch.long)
        return start.scatter_reduce(0, flat, values.expand(n, h, w).flatten(), how, include_self=how != "sum")

    area = reduce(torch.ones(1, 1, 1, dtype=torch.long), "sum")
    box = (reduce(xs, "amax") - reduce(xs, "amin") + 1) * (reduce(ys, "amax") - reduce(ys, "amin") + 1)
    fill = area / box
    shape = torch.where(fill >= square_fill, 1, torch.where(fill >= circle_fill, 0, 2))  # SHAPES index
    region_colour = reduce(colour, "amax")  # one colour per region
    cls = torch.where((region > 0) & (area >= min_area), 1 + shape * len(COLOURS) + region_colour - 1, 0)
    return cls[inverse]


def iou_counts(pred: Tensor, target: Tensor, classes: int) -> Tensor:
    """Per map of class maps [N, H, W]: its pixel counts [N, 3, classes] of each class in both (intersection),
    in the prediction, and in the target; they add up over maps, so a set's mIoU can be bootstrapped."""
    n = len(pred)
    offset = torch.arange(n, device=pred.device).view(n, *[1] * (pred.ndim - 1)) * classes

    def count(m: Tensor) -> Tensor:
        return torch.bincount(m.flatten(), minlength=n * classes).view(n, classes)

    return torch.stack([count((target + offset)[pred == target]), count(pred + offset), count(target + offset)], 1)


def iou_of_counts(counts: Tensor) -> tuple[float, Tensor]:
    """mIoU over the classes present in prediction or target, and the per-class IoU (NaN where absent), of
    summed iou_counts [3, classes]."""
    inter, predicted, target = counts.double()
    union = predicted + target - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.nan)
    return iou.nanmean().item(), iou


def mean_iou(pred: Tensor, target: Tensor, classes: int) -> tuple[float, Tensor]:
    """Mean intersection over union of class maps over a whole set (pixels of all maps pooled per class), over the
    classes present in either; and the per-class IoU [classes] (NaN where absent)."""
    return iou_of_counts(iou_counts(pred, target, classes).sum(0))


def interval(values: Tensor) -> list[float]:
    """The 95% interval (2.5% and 97.5% quantiles) of bootstrap values."""
    return values.quantile(values.new_tensor([0.025, 0.975])).tolist()


def centred_interval(estimate: float, values: Tensor) -> list[float]:
    """The 95% spread of bootstrap values (2.5% to 97.5% quantiles) placed around the estimate: a resample's repeats
    inflate a Frechet distance, so the plain percentile interval can miss the estimate itself."""
    lo, hi = interval(values - values.mean())
    return [estimate + lo, estimate + hi]


def bootstrap(f: Callable[[Tensor], float], n: int, rounds: int = 200, seed: int = 0) -> tuple[float, float]:
    """The 95% bootstrap interval (2.5% and 97.5% quantiles) of a statistic f(indices) over `rounds` resamples
    of range(n) with replacement."""
    g = torch.Generator().manual_seed(seed)
    values = [f(torch.randint(0, n, (n,), generator=g)) for _ in range(rounds)]
    lo, hi = interval(torch.tensor(values, dtype=torch.float64))
    return lo, hi


class ClassScores(NamedTuple):
    """Class accuracy and Frechet distance of class-conditional samples, each with its 95% bootstrap interval."""
    accuracy: float
    accuracy_ci: tuple[float, float]
    frechet: float
    frechet_ci: tuple[float, float]

    def __str__(self) -> str:  # two cells of a Markdown table
        (a0, a1), (f0, f1) = self.accuracy_ci, self.frechet_ci
        return f"{self.accuracy:.1%} ({a0:.1%}-{a1:.1%}) | {self.frechet:.1f} ({f0:.1f}-{f1:.1f})"


def score_classes(judge: MNISTClassifier, images: Tensor, labels: Tensor, real: Tensor,
                  rounds: int = 200) -> ClassScores:
    """The share of `images` that `judge` classifies as their `labels` and their Frechet distance to the `real`
    features (judge's feature space), with bootstrap intervals over the samples."""
    right = torch.cat([judge(images[i:i + 500]).argmax(1) for i in range(0, len(images), 500)]) == labels
    right, feats, target = right.double(), extract(judge.features, images), moments(real)
    return ClassScores(right.mean().item(), bootstrap(lambda i: right[i].mean().item(), len(images), rounds),
                       frechet_distance(*moments(feats), *target),
                       bootstrap(lambda i: frechet_distance(*moments(feats[i]), *target), len(images), rounds))


def real_floor(real: Tensor, n: int, seed: int = 1) -> float:
    """The real-vs-real Frechet floor at n samples: n real features drawn without replacement against all."""
    idx = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))[:n]
    return frechet_distance(*moments(real[idx]), *moments(real))


def hold_out(images: Tensor, labels: Tensor | None, n: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor | None]:
    """Real images split for a ranking: n random ones of each class (of all, without labels) as the real-vs-real
    floor's set, as many and as balanced as class-conditional samples of n per class, and all the others as the
    reference every set is measured against -> reference, floor images, their labels."""
    g = torch.Generator().manual_seed(seed)
    if labels is None:
        picks = torch.randperm(len(images), generator=g)[:n]
    else:
        picks = torch.cat([torch.nonzero(labels == c)[:, 0][torch.randperm(int((labels == c).sum()), generator=g)][:n]
                           for c in labels.unique()])
    if len(picks) >= len(images):
        raise ValueError(f"{len(images)} real images cannot hold out {len(picks)} for the floor and keep a reference")
    rest = torch.ones(len(images), dtype=torch.bool)
    rest[picks] = False
    return images[rest], images[picks], None if labels is None else labels[picks]


def judge_sets(per_class: int = 100, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The bundled digits held out for a ranking of class-conditional MNIST samples (`hold_out`)."""
    data = MNIST(28)
    return hold_out(data.images, data.labels, per_class, seed)


def cubic_kernel(a: Tensor, b: Tensor) -> Tensor:
    """KID's polynomial kernel (a . b / d + 1)^3 between feature rows."""
    return (a.double() @ b.double().T / a.shape[1] + 1) ** 3


def off_diagonal_mean(k: Tensor) -> Tensor:
    """The mean of a square matrix's entries off its diagonal."""
    n = len(k)
    return (k.sum() - k.diagonal().sum()) / (n * (n - 1))


def off_diagonal_mean_chunked(f: Tensor, chunk: int = 1000) -> float:
    """off_diagonal_mean(cubic_kernel(f, f)) without holding the [N, N] kernel."""
    total = sum(cubic_kernel(c, f).sum() for c in f.split(chunk))
    diagonal = (f.double().square().sum(1) / f.shape[1] + 1).pow(3).sum()
    return ((total - diagonal) / (len(f) * (len(f) - 1))).item()


class Judged(NamedTuple):
    """Per-sample pieces of one sample set's scores, from which any resample's scores follow."""
    features: Tensor  # [n, d]
    right: Tensor  # [n] 1 where the judge reads the requested class
    k_self: Tensor  # [n, n] kernel among the samples
    k_ref: Tensor  # [n] mean kernel of each sample to the reference


def judged(features: Features, classify: Features | None, images: Tensor, labels: Tensor | None,
           reference: Tensor) -> Judged:
    """Per-sample pieces of `images` against `reference` features; `classify` maps features to class logits."""
    feats = extract(features, images)
    right = torch.full((len(images),), torch.nan, dtype=torch.float64)
    if labels is not None and classify is not None:
        right = (torch.cat([classify(f).argmax(1) for f in feats.split(500)]) == labels).double()
    k_ref = torch.cat([cubic_kernel(f, reference).mean(1) for f in feats.split(500)])
    return Judged(feats, right, cubic_kernel(feats, feats), k_ref)


def scores_of(j: Judged, idx: Tensor, ref_moments: tuple[Tensor, Tensor], k_ref_ref: float) -> list[float]:
    """Frechet distance, unbiased KID (MMD^2 of the cubic kernel, all pairs) and class accuracy of the
    samples `idx` (a bootstrap resample, or all)."""
    fd = frechet_distance(*moments(j.features[idx]), *ref_moments)
    kid_u = off_diagonal_mean(j.k_self[idx][:, idx]) + k_ref_ref - 2 * j.k_ref[idx].mean()
    return [fd, kid_u.item(), j.right[idx].mean().item()]


FLOOR = "real (floor)"  # judge_table's row of held-out real images
METRICS = ("frechet", "kid", "accuracy")  # judge_table's scores; lower is better for the first two


def judge_table(features: Features, samples: dict[str, Tensor], labels: Tensor | None, reference: Tensor,
                floor_set: Tensor, floor_labels: Tensor | None = None, classify: Features | None = None,
                rounds: int = 200, seed: int = 0) -> dict:
    """A ranking that says what it can tell apart: every sample set (all paired: sample i of each set shares its
    label and seed) and the real floor set scored against `reference` (Frechet distance and unbiased KID in the
    feature space, and, with `classify` (features -> logits), class accuracy), each with a 95% bootstrap interval
    over samples (`centred_interval`; accuracy's plain percentile one), and for every set whether it ties the best
    one: the interval of its paired difference to the best (the same resample of indices for both) holds 0. The
    floor row is `floor_set`, real images as many as each sample set."""
    ref_feats = extract(features, reference)
    ref_moments = moments(ref_feats)
    k_rr = off_diagonal_mean_chunked(ref_feats)
    sets = {FLOOR: judged(features, classify, floor_set, floor_labels, ref_feats),
            **{name: judged(features, classify, x, labels, ref_feats) for name, x in samples.items()}}
    n = {len(j.right) for j in sets.values()}
    if len(n) != 1:
        raise ValueError(f"paired sample sets must be equally large, got sizes {sorted(n)}")
    n, g = n.pop(), torch.Generator().manual_seed(seed)
    full = {name: scores_of(j, torch.arange(n), ref_moments, k_rr) for name, j in sets.items()}
    draws = [torch.randint(0, n, (n,), generator=g) for _ in range(rounds)]
    boot = {name: torch.tensor([scores_of(j, i, ref_moments, k_rr) for i in draws], dtype=torch.float64)
            for name, j in sets.items()}
    table = {}
    methods = [name for name in sets if name in samples]
    for m, metric in enumerate(METRICS):
        if metric == "accuracy" and (classify is None or labels is None):
            continue
        sign = 1 if metric != "accuracy" else -1
        best = min(methods, key=lambda name: sign * full[name][m]) if methods else None
        for name in sets:
            row = table.setdefault(name, {})
            row[metric] = full[name][m]
            values = boot[name][:, m]
            row[f"{metric}_ci"] = interval(values) if metric == "accuracy" else centred_interval(row[metric], values)
            if name in samples:
                lo, hi = centred_interval(full[name][m] - full[best][m], boot[name][:, m] - boot[best][:, m])
                row[f"{metric}_ties_best"] = name == best or lo <= 0 <= hi
        table.setdefault("_best", {})[metric] = best
    return table


def evaluate_against_floor(images: Tensor, labels: Tensor | None, real: Tensor, real_labels: Tensor | None,
                           classifier: MNISTClassifier | None = None, features: Features | None = None,
                           rounds: int = 200) -> dict:
    """`diffusekit eval`'s report: the samples' Frechet distance, KID and class accuracy with 95% bootstrap
    intervals (judge_table), precision / recall, and the same scores of as many held-out real images (per class when
    both sides have labels) against the same reference: the floor at this sample count, and whether the samples'
    Frechet interval reaches it."""
    classifier = classifier or load_mnist_classifier()
    own = features is None
    features = features or classifier.features
    by_class = labels is not None and real_labels is not None
    reference, floor, floor_labels = hold_out(real, real_labels if by_class else None,
                                              len(images) // len(labels.unique()) if by_class else len(images))
    table = judge_table(features, {"samples": images}, labels, reference, floor, floor_labels,
                        classifier.head if own else None, rounds)
    samples = {k: v for k, v in table["samples"].items() if not k.endswith("_ties_best")}
    if labels is not None and not own:
        samples["accuracy"] = class_accuracy(classifier, images, labels)
    samples["precision"], samples["recall"] = precision_recall(extract(features, reference), extract(features, images))
    return {"samples": samples, "floor": table[FLOOR], "n": len(images), "reference": len(reference),
            "within_floor": samples["frechet_ci"][0] <= table[FLOOR]["frechet_ci"][1]}


def colour_classes(maps: Tensor) -> Tensor:
    """ShapeMaps class maps as colour maps (0 background, 1 + COLOURS index), forgetting the shape type."""
    return torch.where(maps > 0, (maps - 1) % len(COLOURS) + 1, 0)


def shape_boxes(maps: Tensor) -> list[Tensor]:
    """The shapes of class maps [N, H, W] (0 background) as boxes: per map [k, 5] rows (class, x0, y0, x1, y1) of
    each connected region of one class, its bounding box in fractions of the width / height (x1, y1 exclusive)."""
    ids, (h, w), out = shape_components(maps), maps.shape[-2:], []
    for m, i in zip(maps, ids):
        rows = []
        for r in i.unique()[i.unique() > 0]:
            ys, xs = (i == r).nonzero(as_tuple=True)
            rows.append([m[ys[0], xs[0]].item(), xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h])
        out.append(torch.tensor(rows, dtype=torch.float32).view(-1, 5))
    return out


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes (x0, y0, x1, y1) [..., 4] against [..., 4], broadcast."""
    lo, hi = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area = (a[..., 2:] - a[..., :2]).prod(-1) + (b[..., 2:] - b[..., :2]).prod(-1)
    return inter / (area - inter).clamp(min=1e-12)


class LayoutHits(NamedTuple):
    """Per requested box (bool): a shape of its class placed right (`box`), one of its colour placed right
    (`colour`), one of its class centred in the cell of a 3 x 3 grid that holds the box's centre (`place`: what a
    caption can say, data.ShapeCaptions)."""

    box: Tensor
    colour: Tensor
    place: Tensor


def layout_hits(maps: Tensor, layouts: Tensor, threshold: float = 0.5, margin: float = 1 / 16) -> LayoutHits:
    """For each requested box of `layouts` [N, B, 5] (class index into data.LAYOUT_CLASSES; -1 none) in segmented
    samples `maps` [N, H, W] (`segment_shapes`): whether a shape of its class (shape type and colour), and whether
    one of its colour, has a bounding box of IoU >= threshold with it, and whether a shape of its class has its
    box centre in the grid cell of the requested box's centre, the cell widened by `margin` (a fraction of the
    image) on each side: a drawn shape's box centre lies up to a pixel from its layout box's (triangles, edges)."""
    hits: list[list[bool]] = [[], [], []]
    for found, layout in zip(shape_boxes(maps), layouts):
        centres = (found[:, 1:3] + found[:, 3:]) / 2
        for cls, *box in layout[layout[:, 0] >= 0].tolist():
            iou = box_iou(found[:, 1:], torch.tensor(box))
            same = found[:, 0] == cls + 1  # map classes count the background first
            colour = colour_classes(found[:, 0].long()) == colour_classes(torch.tensor(int(cls) + 1))
            row, col = divmod(place((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), 3)
            cell = torch.tensor([col / 3 - margin, row / 3 - margin, (col + 1) / 3 + margin, (row + 1) / 3 + margin])
            placed = ((centres >= cell[:2]) & (centres < cell[2:])).all(-1)
            hits[0].append(bool((iou[same] >= threshold).any()))
            hits[1].append(bool((iou[colour] >= threshold).any()))
            hits[2].append(bool((placed & same).any()))
    return LayoutHits(*map(torch.tensor, hits))
