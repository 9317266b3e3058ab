"""How well the monitor's tests work on real photos, and how the drift libraries compare.

A measurement, not part of a monitor run (monitor.py never imports it). Two stages, because the
libraries compared cannot share the project's environment (frouros 0.9 pins numpy<2.2 and
scipy<1.15; evidently brings 60-odd packages):

  embed    (project environment) real ABID photos through the serving code: inference.input_fn,
           photos.statistics and predict_and_embed of EfficientNet-Lite0 with its ImageNet
           weights, the local profile's frozen network (its embedding is the frozen backbone's
           output whatever the head learnt). The photos are split 40% train (a linear counting
           head is fitted on their embeddings, as the local profile's head is), 20% baseline (the
           "test split"), 40% held out. Shifted copies of the held-out photos: low light and blur
           (Evaluate's corruptions), a camera change (the centre 75% cropped and scaled back up),
           a fill-level shift (only the 4 and 5 item bins) and synthetic bins (pipeline.data.synth
           photos, made beforehand). Writes one .npz.
  compare  (any environment with numpy and scipy; frouros and evidently where importable) draws
           windows of --window photos: --windows from the held-out photos (no drift) and
           --windows / 2 from each shift, and runs each detector on each window against the
           baseline. Prints the false-alarm rate, each shift's detection rate and the seconds a
           window takes, as a Markdown table.

    python benchmarks/drift_libraries.py embed --photos ../shared/data/abid-sample \
        --synthetic build/drift-measure/synth --out build/drift-measure/embeddings.npz
    PYTHONPATH=scripts/monitor build/drift-libs-venv/bin/python benchmarks/drift_libraries.py compare \
        --embeddings build/drift-measure/embeddings.npz
"""
from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np

from drift_shifts import SHIFTS, labelled_photos, shifted

# --------------------------------------------------------------------------- embed


def embed(args) -> None:
    import torch

    import inference
    import photos
    from trainer.model import load_pretrained

    torch.set_num_threads(args.threads)
    arch, side = "efficientnet_lite0", args.image_size
    network = inference.build_model(arch, 5, image_size=side)
    load_pretrained(network, arch, "auto", print)
    mean, std = inference.normalization(arch)
    model = {"model": network.eval(), "config": {"arch": arch, "labels": [1, 2, 3, 4, 5], "image_size": side,
                                                 "mean": list(mean), "std": list(std)},
             "device": torch.device("cpu"), "cuts": None}

    def describe(bodies: list[tuple[bytes, str]]) -> tuple[np.ndarray, np.ndarray]:
        vectors, stats = [], []
        for start in range(0, len(bodies), 32):
            images = [inference.input_fn(b, ct) for b, ct in bodies[start:start + 32]]
            stats += [[photos.statistics(image, side)[name] for name in photos.STATISTICS] for image in images]
            vectors.append(inference.predict_and_embed(images, model)[1])
            print(f"  {min(start + 32, len(bodies))}/{len(bodies)}", flush=True)
        return np.concatenate(vectors), np.array(stats)

    def png(image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "PNG", compress_level=1)
        return buffer.getvalue()

    real = labelled_photos(Path(args.photos))
    order = np.random.default_rng(args.seed).permutation(len(real))
    cut1, cut2 = int(0.4 * len(real)), int(0.6 * len(real))
    parts = {"train": order[:cut1], "baseline": order[cut1:cut2], "held_out": order[cut2:]}
    out: dict[str, np.ndarray] = {"statistics_names": np.array(photos.STATISTICS)}
    started = time.perf_counter()
    for name, index in parts.items():
        print(f"{name}: {len(index)} photos", flush=True)
        vectors, stats = describe([(real[i][0].read_bytes(), "image/jpeg") for i in index])
        out[f"{name}_embeddings"], out[f"{name}_stats"] = vectors, stats
        out[f"{name}_labels"] = np.array([real[i][1] for i in index])
    for kind in ("low_light", "blur", "camera"):
        print(f"{kind}: {len(parts['held_out'])} photos", flush=True)
        bodies = [(png(shifted(photos.decode(real[i][0].read_bytes()), kind)), "image/png") for i in parts["held_out"]]
        out[f"{kind}_embeddings"], out[f"{kind}_stats"] = describe(bodies)
    fill = out["held_out_labels"] >= 4
    out["fill_level_embeddings"], out["fill_level_stats"] = out["held_out_embeddings"][fill], out["held_out_stats"][fill]
    synthetic = labelled_photos(Path(args.synthetic))
    print(f"synthetic: {len(synthetic)} photos", flush=True)
    out["synthetic_embeddings"], out["synthetic_stats"] = describe([(p.read_bytes(), "image/jpeg") for p, _ in synthetic])

    # The counting head, fitted on the train part's embeddings: softmax regression.
    x = torch.tensor(out["train_embeddings"], dtype=torch.float32)
    y = torch.tensor(out["train_labels"] - 1)
    head = torch.nn.Linear(x.shape[1], 5)
    optimiser = torch.optim.LBFGS(head.parameters(), max_iter=200)

    def loss():
        optimiser.zero_grad()
        value = torch.nn.functional.cross_entropy(head(x), y) + 1e-3 * head.weight.pow(2).sum()
        value.backward()
        return value

    optimiser.step(loss)
    with torch.no_grad():
        for key in [k for k in out if k.endswith("_embeddings")]:
            out[key.replace("_embeddings", "_counts")] = head(torch.tensor(out[key], dtype=torch.float32)).argmax(1).numpy() + 1
    accuracy = float(np.mean(out["baseline_counts"] == out["baseline_labels"]))
    out["meta"] = np.array(json.dumps({"photos": len(real), "image_size": side, "arch": arch,
                                       "baseline_accuracy": accuracy, "seconds": time.perf_counter() - started}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}; the head's accuracy on the baseline photos {accuracy:.3f}")


# --------------------------------------------------------------------------- compare


def detectors(alpha: float, permutations: int, seed: int) -> dict:
    """name -> function(reference projected, window projected, reference raw, window raw) -> drift?"""
    import drift

    found = {"ours: MMD, permutations (scipy/numpy)":
             lambda rp, wp, rr, wr: drift.mmd_test(rp, wp, alpha, permutations, seed)["p_value"] < alpha}
    try:
        from frouros.callbacks import PermutationTestDistanceBased
        from frouros.detectors.data_drift import MMD

        def frouros_mmd(rp, wp, rr, wr):
            detector = MMD(callbacks=[PermutationTestDistanceBased(num_permutations=permutations, random_state=seed,
                                                                   num_jobs=1, method="conservative")])
            detector.fit(X=rp)
            _, logs = detector.compare(X=wp)
            return logs["PermutationTestDistanceBased"]["p_value"] < alpha

        def frouros_median(rp, wp, rr, wr):  # the same test with the kernel width ours uses
            from functools import partial

            from frouros.utils.kernels import rbf_kernel

            pooled = np.concatenate([rp, wp])
            sigma = float(np.sqrt(np.median(np.sum((pooled[:, None] - pooled[None]) ** 2, -1)[np.triu_indices(len(pooled), 1)])))
            detector = MMD(kernel=partial(rbf_kernel, sigma=sigma),
                           callbacks=[PermutationTestDistanceBased(num_permutations=permutations, random_state=seed,
                                                                   num_jobs=1, method="conservative")])
            detector.fit(X=rp)
            _, logs = detector.compare(X=wp)
            return logs["PermutationTestDistanceBased"]["p_value"] < alpha

        found["frouros 0.9.0: MMD (default kernel, sigma 1) + PermutationTestDistanceBased"] = frouros_mmd
        found["frouros 0.9.0: the same, sigma = median distance"] = frouros_median
    except ImportError:
        pass
    try:
        import pandas as pd
        from evidently.legacy.metrics.data_drift.embedding_drift_methods import mmd, model

        def frame(values):
            return pd.DataFrame(values, columns=[f"e{i}" for i in range(values.shape[1])])

        found["evidently 0.7.23: model (default, ROC AUC > 0.55)"] = \
            lambda rp, wp, rr, wr: bool(model()(frame(wr), frame(rr))[1])
        found["evidently 0.7.23: mmd(bootstrap=True)"] = \
            lambda rp, wp, rr, wr: bool(mmd(bootstrap=True)(frame(wp), frame(rp))[1])
    except ImportError:
        pass
    return found


def compare(args) -> None:
    import drift

    data = np.load(args.embeddings)
    meta = json.loads(str(data["meta"]))
    # baseline.py's split and projection: half the baseline photos are the reference, a PCA of
    # 32 components is fitted on the other half.
    order = np.random.default_rng(args.seed).permutation(len(data["baseline_embeddings"]))
    half = min(1000, len(order) // 2)
    reference = data["baseline_embeddings"][np.sort(order[:half])]
    fit = data["baseline_embeddings"][np.sort(order[half:])]
    centre = fit.mean(0)
    _, _, vt = np.linalg.svd(fit - centre, full_matrices=False)
    directions = vt[:32]

    def project(values):
        return (values - centre) @ directions.T

    rng = np.random.default_rng(args.seed)
    windows = [("no drift", i, rng.choice(len(data["held_out_embeddings"]), args.window, replace=False), "held_out")
               for i in range(args.windows)]
    for shift in SHIFTS:
        pool = len(data[f"{shift}_embeddings"])
        windows += [(shift, i, rng.choice(pool, min(args.window, pool), replace=False), shift)
                    for i in range(args.windows // 2)]
    ref_projected = project(reference)
    names = [str(n) for n in data["statistics_names"]]
    # The answered counts and image statistics of every baseline photo, as baseline.py keeps them.
    reference_counts = {str(c): int(np.sum(data["baseline_counts"] == c)) for c in range(1, 6)}
    rows = {}
    methods = detectors(args.alpha, args.permutations, args.seed)
    methods["ours: the whole monitor (7 tests, alpha / 7 each)"] = None
    for method, detect in methods.items():
        calls, seconds = {}, 0.0
        for kind, _, index, source in windows:
            raw = data[f"{source}_embeddings"][index]
            started = time.perf_counter()
            if detect is None:  # every test of monitor.py, Bonferroni as there
                threshold = args.alpha / (2 + len(names))
                stats = data[f"{source}_stats"][index]
                p = [drift.mmd_test(ref_projected, project(raw), threshold, args.permutations, args.seed)["p_value"],
                     drift.counts_test(reference_counts, list(data[f"{source}_counts"][index]), threshold)["p_value"]]
                p += [drift.ks_test(data["baseline_stats"][:, j], stats[:, j], threshold)["p_value"]
                      for j in range(len(names))]
                called = min(p) < threshold
            else:
                called = detect(ref_projected, project(raw), reference, raw)
            seconds += time.perf_counter() - started
            calls.setdefault(kind, []).append(bool(called))
        rows[method] = ({kind: float(np.mean(v)) for kind, v in calls.items()}, seconds / len(windows))
        print(f"{method}: {rows[method]}", flush=True)
    kinds = ["no drift", *SHIFTS]
    print(f"\n{len(data['baseline_embeddings'])} baseline photos ({len(reference)} the embeddings' reference), windows of {args.window}: {args.windows} without drift, "
          f"{args.windows // 2} per shift; alpha {args.alpha}, {args.permutations} permutations "
          f"({meta['arch']} at {meta['image_size']} px, head accuracy {meta['baseline_accuracy']:.3f})\n")
    print("| detector | false alarms | " + " | ".join(kinds[1:]) + " | s / window |")
    print("|---" * (len(kinds) + 2) + "|")
    for method, (rates, per_window) in rows.items():
        print(f"| {method} | " + " | ".join(f"{rates[k]:.0%}" for k in kinds) + f" | {per_window:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    e = sub.add_parser("embed")
    e.add_argument("--photos", required=True, help="real photos in 1/ ... 5/ folders")
    e.add_argument("--synthetic", required=True, help="python -m pipeline.data.synth's output")
    e.add_argument("--out", required=True)
    e.add_argument("--image-size", type=int, default=224)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("compare")
    c.add_argument("--embeddings", required=True)
    c.add_argument("--window", type=int, default=200)
    c.add_argument("--windows", type=int, default=60)
    c.add_argument("--alpha", type=float, default=0.05)
    c.add_argument("--permutations", type=int, default=1000)
    c.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    embed(args) if args.stage == "embed" else compare(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
