"""Drift: are these films like the ones a version learned from?

A batch's 140-feature rows (and the version's scores of them, and the padding its transform
trimmed from each film) are compared with the version's reference (pneumo.reference: the
training films' per-feature quantiles, mean and shrunk precision and trimmed padding, the val
films' distances and scores). Six questions, each with a p-value:

- ``features``: does any single feature's distribution differ? A Kolmogorov-Smirnov test per
  feature against the reference's quantiles (the CDF interpolated between them), corrected
  for 140 tests by Benjamini-Hochberg: the figure is the smallest adjusted p-value.
- ``joint``: has the mean of the 140 features moved? Hotelling's statistic with the training
  films' shrunk precision, chi-square with 140 degrees of freedom. The most powerful of the
  feature tests on the shift suite (blur, gamma: benchmarks/drift.py). Measured while choosing: the precision
  of the films and their renditions together caught blur in 10 % of 200-film batches (the
  renditions vary along just the directions blur and gamma move), a few principal components
  of the films' in 30-50 % (the shift lives in the small components), the films' own in 100 %.
- ``distance``: are the films as far from the training mean as held-out films are? A KS test
  of the batch's Mahalanobis distances against the val films' (spread, blur, resolution).
- ``scores``: a KS test of the version's PNEUMONIA probabilities against the val films'
  (a change of case mix moves it even when each film looks familiar).
- ``ood``: the share of films past the out-of-distribution cut-off, against the val films'
  share (a binomial test).
- ``borders``: with a recipe that trims padding, a barred film's features are the film's own,
  so the four tests above cannot see a scanner's letterbox or pillarbox bars. The transform
  says how much it trimmed (``Resampler.borders``: the share of rows and of columns); the
  share of films with rows trimmed, and with columns trimmed, are each compared with the
  training films' by Fisher's exact test, the smaller p-value doubled (Bonferroni over the two).
  Not run (``not_run`` says why) when the reference has no border figures (built before the
  test, or a recipe that trims nothing) or the films' figures are not given.

Each test treats the reference as a sample of its own (KS and Hotelling on the effective
size n*m/(n+m)). The verdict comes from each p-value times its Bonferroni factor (the number
of tests; with the border test, weighted: ``bonferroni_factors``): ``drift`` when one is under
DRIFT_ALPHA, ``warn`` under WARN_ALPHA, else ``none``. Below
MIN_FILMS films there is no verdict. The checks are analytic, so the same films give the
same figures on every run. Power and false alarms: benchmarks/drift.py.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

import numpy as np
from pydantic import BaseModel

if TYPE_CHECKING:
    from pneumo.config import TransformConfig
    from pneumo.reference import Reference

# Below this, no verdict. The per-feature KS and the score KS need the reference's 5 % steps to
# hold about 5 films each, and at 100 films the benchmark's power on the shift suite is already
# high; under it a single odd film moves the OOD share by more than 1 %.
MIN_FILMS = 100
DRIFT_ALPHA = 0.01  # family-wise, over the tests run (up to six): a same-period batch raises drift at most 1 time in 100
WARN_ALPHA = 0.05
TOP_FEATURES = 5  # the most-moved features named in the figures
# The border test's share of the family's alpha (weighted Bonferroni, ``bonferroni_factors``): with an
# equal share (a factor of 6 for every test) the other tests lost 1-6 points of power at 100 films.
BORDER_SHARE = 0.05

Verdict = Literal["none", "warn", "drift", "too few films"]
TESTS = ("features", "joint", "distance", "scores", "ood", "borders")
AXES = ("rows", "columns")  # the two figures of a film's trimmed padding


class FeatureDrift(BaseModel):
    name: str
    ks: float  # the KS distance to the reference
    p_adjusted: float  # Benjamini-Hochberg


class DriftReport(BaseModel):
    """A check's verdict and the figures behind it (``p_values`` per test, before the Bonferroni factors)."""

    verdict: Verdict
    n_films: int
    min_films: int = MIN_FILMS
    reference_films: int = 0
    p_values: dict[str, Optional[float]] = {}
    fired: list[str] = []  # the tests under the verdict's level
    features_drifted: int = 0  # features whose adjusted p-value is under DRIFT_ALPHA
    top_features: list[FeatureDrift] = []
    feature_ks: list[float] = []  # per feature, in the featurizer's order (for the picture)
    hotelling: Optional[float] = None
    distance_median: Optional[float] = None
    reference_distance_median: Optional[float] = None
    score_mean: Optional[float] = None
    reference_score_median: Optional[float] = None
    ood_share: Optional[float] = None
    reference_ood_share: Optional[float] = None
    border_shares: Optional[tuple[float, float]] = None  # films with rows, and with columns, trimmed as padding
    reference_border_shares: Optional[tuple[float, float]] = None
    not_run: dict[str, str] = {}  # a test left out, and why

    def lines(self) -> list[str]:
        """The verdict first, then the figures: what ``pneumo drift`` prints."""
        out = [f"verdict: {self.verdict}"]
        if self.verdict == "too few films":
            return out + [f"{self.n_films} film(s): a verdict needs at least {self.min_films}"]
        out.append(f"films: {self.n_films} (reference: {self.reference_films} training films)")
        for name in TESTS:
            p = self.p_values.get(name)
            why = f"  (not run: {self.not_run[name]})" if name in self.not_run else ""
            out.append(f"{name:<9} p = {'n/a' if p is None else f'{p:.3g}'}{'  <- fired' if name in self.fired else ''}{why}")
        out.append(f"features drifted (BH-adjusted p < {DRIFT_ALPHA}): {self.features_drifted} of {len(self.feature_ks)}")
        for feature in self.top_features:
            out.append(f"  {feature.name}: KS {feature.ks:.3f}, adjusted p {feature.p_adjusted:.3g}")
        if self.hotelling is not None:
            out.append(f"joint (Hotelling statistic): {self.hotelling:.1f}")
        if self.distance_median is not None:
            out.append(f"Mahalanobis distance, median: {self.distance_median:.2f} (val films: {_num(self.reference_distance_median)})")
        if self.score_mean is not None:
            out.append(f"PNEUMONIA probability, mean: {self.score_mean:.3f} (val films' median: {_num(self.reference_score_median)})")
        if self.ood_share is not None:
            out.append(f"past the OOD cut-off: {self.ood_share:.1%} (val films: {_num(self.reference_ood_share, '.1%')})")
        if self.border_shares is not None and self.reference_border_shares is not None:
            mine, theirs = self.border_shares, self.reference_border_shares
            out.append(f"padding trimmed: rows of {mine[0]:.1%}, columns of {mine[1]:.1%} of the films "
                       f"(training films: {theirs[0]:.1%}, {theirs[1]:.1%})")
        return out


def _num(value: Optional[float], spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def feature_names(config: TransformConfig) -> list[str]:
    """``max r2 c7``: the pooling part, then the cell's row and column, in the featurizer's order."""
    rows, cols = config.grid
    return [f"{part} r{r} c{c}" for part in config.pooling for r in range(rows) for c in range(cols)]


def _levels(quantiles: np.ndarray) -> np.ndarray:
    return np.linspace(0.0, 1.0, quantiles.shape[-1])


def _reference_cdf(values: np.ndarray, quantiles: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """The reference CDF at ``values``, linear between its quantiles (ties keep the CDF's upper step)."""
    return np.interp(values, quantiles, levels)


def ks_distance(values: np.ndarray, quantiles: np.ndarray, levels: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between ``values`` and the distribution with those quantiles."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = len(x)
    cdf = _reference_cdf(x, np.asarray(quantiles, dtype=np.float64), levels)
    steps = np.arange(1, n + 1) / n
    return float(max(np.max(steps - cdf), np.max(cdf - (steps - 1 / n))))


def ks_p_value(distance: float | np.ndarray, n: int, m: int) -> np.ndarray:
    """Two-sample KS p-value for samples of n and m (Stephens' correction on the effective size)."""
    from scipy.stats import kstwobign  # here: importing scipy.stats takes a second the module's users may not need

    effective = n * m / (n + m) if m else n
    root = np.sqrt(effective)
    return kstwobign.sf(np.asarray(distance) * (root + 0.12 + 0.11 / root))


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Adjusted p-values (step-up, monotone): reject at q where adjusted <= q."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty_like(p)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def feature_tests(reference: Reference, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(KS distance, BH-adjusted p-value) of every feature."""
    quantiles = np.asarray(reference.feature_quantiles, dtype=np.float64).T  # (features, levels)
    levels = np.asarray(reference.quantile_levels, dtype=np.float64) / 100
    ks = np.array([ks_distance(features[:, j], quantiles[j], levels) for j in range(features.shape[1])])
    return ks, benjamini_hochberg(ks_p_value(ks, len(features), reference.n_rows))


def hotelling(reference: Reference, features: np.ndarray) -> tuple[Optional[float], Optional[float]]:
    """(statistic, p-value): the batch mean's squared Mahalanobis distance from the training films' mean, under
    their shrunk precision, on chi-square with one degree per feature."""
    from scipy.stats import chi2

    n, m = len(features), reference.n_rows
    gap = features.mean(axis=0) - np.asarray(reference.mean)
    statistic = float(gap @ np.asarray(reference.precision) @ gap) / (1 / n + 1 / m)
    return statistic, float(chi2.sf(statistic, df=features.shape[1]))


def _ood_test(share_past: float, n: int, reference_share: float, m: int) -> float:
    from scipy.stats import binom

    expected = max(reference_share, 0.5 / max(m, 1))  # a val share of 0 still allows the odd film
    return float(binom.sf(round(share_past * n) - 1, n, expected))


def bonferroni_factors(tests: list[str]) -> dict[str, float]:
    """Each test's factor in the weighted Bonferroni correction: 1 / its share of the family's alpha.

    Without the border test every test gets an equal share (the factor is the number of tests).
    The border test gets BORDER_SHARE of alpha and the others split the rest: bars move its
    share of films from about 11 % to 100 %, far past any level, so it needs little alpha, and the
    other tests keep nearly their power (measured: benchmarks/README.md, "Drift"). The shares sum
    to 1, so the family-wise false-alarm rate stays under the level.
    """
    if "borders" not in tests or len(tests) == 1:
        return {name: float(len(tests)) for name in tests}
    others = (1 - BORDER_SHARE) / (len(tests) - 1)
    return {name: 1 / BORDER_SHARE if name == "borders" else 1 / others for name in tests}


def border_test(reference: Reference, borders: Optional[np.ndarray], n: int) -> tuple[Optional[float], dict]:
    """(p-value, figures) of the border test; (None, {"not_run": why}) when it cannot be run."""
    from scipy.stats import fisher_exact

    if reference.border_shares is None or not reference.n_border_films:
        return None, {"not_run": {"borders": "the reference has no padding figures (built before the border test, "
                                             "or by a recipe that trims no padding)"}}
    if borders is None:
        return None, {"not_run": {"borders": "the films' padding figures were not given"}}
    borders = np.asarray(borders, dtype=np.float64)
    if borders.shape != (n, 2) or not np.isfinite(borders).all():
        raise ValueError(f"borders of shape {borders.shape}: expected ({n}, 2), one pair of shares per film")
    shares = (borders > 0).mean(axis=0)
    m = reference.n_border_films
    p = []
    for share, theirs in zip(shares, reference.border_shares):
        mine_k, theirs_k = int(round(share * n)), int(round(theirs * m))
        p.append(float(fisher_exact([[mine_k, n - mine_k], [theirs_k, m - theirs_k]])[1]))
    figures = {"border_shares": tuple(float(v) for v in shares), "reference_border_shares": reference.border_shares}
    return min(1.0, len(AXES) * min(p)), figures


def check(
    reference: Reference,
    features: np.ndarray,
    scores: Optional[np.ndarray] = None,
    names: Optional[list[str]] = None,
    borders: Optional[np.ndarray] = None,
) -> DriftReport:
    """The verdict on a batch: ``features`` (n, n_features) from the version's own transform, ``scores``
    its PNEUMONIA probabilities of them (None: the score test is left out), ``borders`` (n, 2) the
    share of each film's rows and columns its transform trimmed as padding (None: no border test)."""
    from pneumo import reference as references

    features = np.asarray(features, dtype=np.float64)
    n = len(features)
    if features.ndim != 2 or features.shape[1] != len(reference.mean):
        raise ValueError(f"features of shape {features.shape}: the reference has {len(reference.mean)} features")
    if n < MIN_FILMS:
        return DriftReport(verdict="too few films", n_films=n, reference_films=reference.n_rows)
    names = names or [f"feature {j}" for j in range(features.shape[1])]
    ks, adjusted = feature_tests(reference, features)
    statistic, p_joint = hotelling(reference, features)
    p_values: dict[str, Optional[float]] = {"features": float(adjusted.min()), "joint": p_joint}
    distances = references.distances(reference, features)
    figures: dict = {"distance_median": float(np.median(distances))}
    if reference.distance_quantiles is not None and reference.n_val:
        dq = np.asarray(reference.distance_quantiles)
        p_values["distance"] = float(ks_p_value(ks_distance(distances, dq, _levels(dq)), n, reference.n_val))
        figures["reference_distance_median"] = float(np.interp(0.5, _levels(dq), dq))
    if scores is not None and reference.score_quantiles is not None and reference.n_val:
        sq = np.asarray(reference.score_quantiles)
        scores = np.asarray(scores, dtype=np.float64)
        p_values["scores"] = float(ks_p_value(ks_distance(scores, sq, _levels(sq)), n, reference.n_val))
        figures.update(score_mean=float(scores.mean()), reference_score_median=float(np.interp(0.5, _levels(sq), sq)))
    if reference.ood_share is not None and reference.n_val:
        past = float(np.mean(distances > reference.ood_cutoff))
        p_values["ood"] = _ood_test(past, n, reference.ood_share, reference.n_val)
        figures.update(ood_share=past, reference_ood_share=reference.ood_share)
    p_values["borders"], border_figures = border_test(reference, borders, n)
    figures.update(border_figures)
    tests = {name: p for name, p in p_values.items() if p is not None}
    factors = bonferroni_factors(list(tests))
    fired_drift = [name for name, p in tests.items() if p * factors[name] < DRIFT_ALPHA]
    fired_warn = [name for name, p in tests.items() if p * factors[name] < WARN_ALPHA]
    verdict: Verdict = "drift" if fired_drift else "warn" if fired_warn else "none"
    top = np.argsort(-ks)[:TOP_FEATURES]
    return DriftReport(
        verdict=verdict, n_films=n, reference_films=reference.n_rows,
        p_values={name: p_values.get(name) for name in TESTS}, fired=fired_drift or fired_warn,
        features_drifted=int((adjusted < DRIFT_ALPHA).sum()),
        top_features=[FeatureDrift(name=names[j], ks=float(ks[j]), p_adjusted=float(adjusted[j])) for j in top],
        feature_ks=[round(float(v), 4) for v in ks], hotelling=statistic, **figures,
    )


def event_payload(report: DriftReport) -> dict:
    """The statistics an event carries: small, no per-feature list."""
    return report.model_dump(mode="json", exclude={"feature_ks"})


# --- Against a registered version (the batch flow, the retrain, `pneumo drift`) ------------------

# Transform fields that change no film's features: training augmentation, the shift suite, test-time views.
_NOT_FEATURES = {"renditions", "augment", "augment_seed", "shift_suite", "shift_seed", "views", "max_pixels", "accept_lateral"}


@dataclass
class Outcome:
    """A check against ``model`` ``version``: its report, or the one line saying why there is none."""

    model: str
    version: str
    report: Optional[DriftReport] = None
    message: Optional[str] = None  # no verdict: why
    picture: Optional[bytes] = None

    @property
    def verdict(self) -> Optional[str]:
        return self.report.verdict if self.report else None

    def lines(self) -> list[str]:
        return self.report.lines() if self.report else [self.message or "no drift check"]

    def record(self) -> dict:
        """What a card, a run summary and an event keep: the verdict and the figures, without the per-feature list."""
        base = {"against": f"{self.model} {self.version}", "verdict": self.verdict}
        return {**base, **event_payload(self.report)} if self.report else {**base, "message": self.message}

    def markdown(self, source: str) -> str:
        """The Prefect artifact: the verdict, the figures, the picture."""
        out = [f"# Drift: {source} against {self.model} {self.version}", "", *[f"    {line}" for line in self.lines()], ""]
        if self.picture:
            out += [f"![drift](data:image/png;base64,{base64.b64encode(self.picture).decode('ascii')})", ""]
        out.append(f"`drift` when a test's p-value times its Bonferroni factor (the number of tests; the border test "
                   f"weighted at {BORDER_SHARE:.0%} of the level) is under {DRIFT_ALPHA}, `warn` under "
                   f"{WARN_ALPHA}; no verdict under {MIN_FILMS} films. Tests: pneumo/drift.py.")
        return "\n".join(out)


def comparable(theirs: TransformConfig, ours: TransformConfig) -> bool:
    """Whether two transforms give the same features for the same film (training-only settings aside)."""
    return theirs.model_dump(exclude=_NOT_FEATURES) == ours.model_dump(exclude=_NOT_FEATURES)


def check_version(
    registry: str, model_name: str, version: str, features: np.ndarray, scores: Optional[np.ndarray] = None,
    transform: Optional[TransformConfig] = None, picture: bool = True, borders: Optional[np.ndarray] = None,
) -> Outcome:
    """``features`` (and ``scores``, the version's own) checked against the version's reference.

    ``transform`` is the one that made ``features`` when it is not the version's own (a retrain's
    new data): the check needs the same features. ``borders``: the films' trimmed padding (``check``).
    No reference, or another transform: an Outcome
    with the one line that says so."""
    from pneumo import plots, registry as reg
    from pneumo.reference import load_reference

    card = reg.load_card(registry, model_name, version)
    outcome = Outcome(model_name, version)
    try:
        reference = load_reference(registry, model_name, version, card)
    except reg.CorruptModel as error:  # the check advises: a bad reference.json stops neither scoring nor training
        outcome.message = f"no drift check: {error}"
        return outcome
    own = card.config.transform if card.config else None
    if reference is None or own is None:
        outcome.message = _no_reference(registry, model_name, version) or f"{model_name} {version} has no transform"
    elif transform is not None and not comparable(own, transform):
        outcome.message = f"{model_name} {version} was trained on other features (another transform): not comparable"
    else:
        outcome.report = check(reference, features, scores, names=feature_names(own), borders=borders)
        if picture and outcome.report.verdict != "too few films":
            outcome.picture = plots.drift_picture(outcome.report.feature_ks, own.grid, reference.score_quantiles, scores)
    return outcome


def check_source(source: str, registry: str, model_name: str, version: Optional[str], workdir: str) -> Outcome:
    """`pneumo drift`: every film of a folder (read recursively, class subfolders or not), a .zip or an
    s3:// prefix, scored by ``version`` (default: the champion) and checked against its reference.
    Files that are not usable images are left out of the check (the batch flow reports them)."""
    from pneumo import download, predict, workdir as layout

    version = predict.resolve_version(registry, model_name, None, version)
    if (message := _no_reference(registry, model_name, version)) is not None:
        return Outcome(model_name, version, message=message)
    root = download.fetch(source, layout.downloads(layout.absolute(workdir)))
    paths = [image.path for image in predict.list_inputs(root) if image.refused is None]
    if not paths:
        raise ValueError(f"no files found in {source}")
    predictor = predict.Predictor.from_registry(registry, model_name, version=version)
    predictions, features, borders = predictor.predict_with_features(paths)
    scores = np.array([p.probability for p in predictions if p.ok])
    return check_version(registry, model_name, version, features, scores, borders=borders)


def _no_reference(registry: str, model_name: str, version: str) -> Optional[str]:
    from pneumo import registry as reg
    from pneumo.reference import REFERENCE_NAME

    card = reg.load_card(registry, model_name, version)
    if REFERENCE_NAME in (card.files or {}):
        return None
    return f"{model_name} {version} has no reference (registered before drift checks): nothing to compare with"
