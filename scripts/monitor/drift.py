"""The three drift tests: a window of served requests against the model's baseline.

- embeddings: maximum mean discrepancy (MMD, Gretton et al. 2012) between the baseline's
  reference sample and the window, both projected by the baseline's PCA; a Gaussian kernel whose
  width is the median distance of the pooled points; the p-value from permutations (all drawn at
  once: the kernel matrix times a matrix of permuted memberships);
- predicted counts: a chi-square test of homogeneity on the 2 x K table of baseline and window
  counts (adjacent counts merged while an expected cell is under 5, so the test holds);
- image statistics: a two-sample Kolmogorov-Smirnov test for each.

Each result: statistic, p-value, threshold (the p-value under which drift is called), the
statistic's critical value at that threshold, verdict and sizes. numpy and scipy only.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

DRIFT, NO_DRIFT, NO_DATA = "drift", "no_drift", "no_data"


def verdict(p_value: float, threshold: float) -> str:
    return DRIFT if p_value < threshold else NO_DRIFT


def mmd_test(reference: np.ndarray, window: np.ndarray, threshold: float, permutations: int = 1000,
             seed: int = 0) -> dict:
    """Unbiased MMD^2 with a Gaussian kernel; p = (1 + #{permuted >= observed}) / (1 + permutations)."""
    x, y = np.asarray(reference, np.float64), np.asarray(window, np.float64)
    m, n = len(x), len(y)
    pooled = np.concatenate([x, y])
    squared = np.maximum(np.sum(pooled ** 2, 1)[:, None] + np.sum(pooled ** 2, 1)[None, :]
                         - 2.0 * pooled @ pooled.T, 0.0)
    off_diagonal = squared[np.triu_indices(len(pooled), 1)]
    bandwidth = float(np.sqrt(np.median(off_diagonal))) or 1.0
    kernel = np.exp(-squared / (2.0 * bandwidth ** 2))
    np.fill_diagonal(kernel, 0.0)  # the unbiased estimate leaves out k(x_i, x_i)

    # Column 0: the real split; the rest: random splits of the same m + n points.
    rng = np.random.default_rng(seed)
    member = np.zeros((m + n, permutations + 1))
    member[:m, 0] = 1.0
    for b in range(1, permutations + 1):
        member[rng.permutation(m + n)[:m], b] = 1.0
    within_x = np.einsum("ib,ib->b", member, kernel @ member)
    total = kernel.sum()
    row_sums = kernel.sum(1)
    within_y = total - 2.0 * (row_sums @ member) + within_x
    between = (total - within_x - within_y) / 2.0
    mmd2 = within_x / (m * (m - 1)) + within_y / (n * (n - 1)) - 2.0 * between / (m * n)
    observed, null = float(mmd2[0]), mmd2[1:]
    p_value = float((1 + np.sum(null >= observed)) / (1 + permutations))
    critical = float(np.quantile(null, 1.0 - threshold)) if permutations else float("nan")
    return {"statistic": round(observed, 8), "p_value": round(p_value, 6), "threshold": threshold,
            "critical_statistic": round(critical, 8), "verdict": verdict(p_value, threshold),
            "reference_size": m, "window_size": n,
            "detail": {"kernel": "gaussian", "bandwidth": round(bandwidth, 6), "permutations": permutations,
                       "dimensions": int(x.shape[1])},
            "null": null}


def counts_test(reference: dict[str, int], window: list[int], threshold: float) -> dict:
    """Chi-square test of homogeneity of the answered counts (baseline histogram vs window)."""
    labels = sorted(set(reference) | {str(c) for c in window}, key=lambda v: float(v))
    table = np.array([[reference.get(label, 0) for label in labels],
                      [sum(1 for c in window if str(c) == label) for label in labels]], dtype=np.float64)
    merged = [[label] for label in labels]
    while table.shape[1] > 1:  # merge the sparsest column into its smaller neighbour
        expected = table.sum(1)[:, None] * table.sum(0)[None, :] / table.sum()
        worst = int(np.argmin(expected.min(0)))
        if expected[:, worst].min() >= 5:
            break
        if worst == 0:
            other = 1
        elif worst == table.shape[1] - 1:
            other = worst - 1
        else:
            other = worst - 1 if table[:, worst - 1].sum() <= table[:, worst + 1].sum() else worst + 1
        keep, drop = sorted((worst, other))
        table[:, keep] += table[:, drop]
        merged[keep] += merged[drop]
        table = np.delete(table, drop, axis=1)
        del merged[drop]
    result = {"reference_size": int(table[0].sum()), "window_size": int(table[1].sum()), "threshold": threshold,
              "detail": {"reference": {label: reference.get(label, 0) for label in labels},
                         "window": {label: sum(1 for c in window if str(c) == label) for label in labels},
                         "bins": ["+".join(group) for group in merged]}}
    if table.shape[1] < 2:  # one bin left: nothing to compare
        return {**result, "statistic": 0.0, "p_value": 1.0, "critical_statistic": None, "verdict": NO_DRIFT}
    statistic, p_value, dof, _ = stats.chi2_contingency(table, correction=False)
    return {**result, "statistic": round(float(statistic), 6), "p_value": round(float(p_value), 8),
            "critical_statistic": round(float(stats.chi2.ppf(1.0 - threshold, dof)), 6),
            "verdict": verdict(float(p_value), threshold), "detail": {**result["detail"], "dof": int(dof)}}


def ks_test(reference: list[float], window: list[float], threshold: float) -> dict:
    """Two-sample Kolmogorov-Smirnov test of one image statistic."""
    x, y = np.asarray(reference, np.float64), np.asarray(window, np.float64)
    result = stats.ks_2samp(x, y)
    m, n = len(x), len(y)
    # The asymptotic critical distance at this threshold (the p-value itself is scipy's exact or
    # asymptotic one, whichever it chose).
    critical = float(np.sqrt(-np.log(threshold / 2.0) / 2.0) * np.sqrt((m + n) / (m * n)))
    return {"statistic": round(float(result.statistic), 6), "p_value": round(float(result.pvalue), 8),
            "threshold": threshold, "critical_statistic": round(critical, 6),
            "verdict": verdict(float(result.pvalue), threshold), "reference_size": m, "window_size": n,
            "detail": {"reference_median": round(float(np.median(x)), 6),
                       "window_median": round(float(np.median(y)), 6)}}


def no_data(reason: str, threshold: float, window: int = 0, reference: int = 0) -> dict:
    return {"statistic": None, "p_value": None, "threshold": threshold, "critical_statistic": None,
            "verdict": NO_DATA, "reference_size": reference, "window_size": window, "detail": {"reason": reason}}
