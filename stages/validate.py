"""The validate stage: statistics, schema, counts, duplicates and leakage, drift and degenerate images of
the data stage's output, compared with a baseline, before a single training step.

The baseline is the data the production model was trained on (when there is one, and it is other data
than this run's), so a nightly drop is compared with what production learned from. Findings are
anomalies `{kind, severity, message, count, examples}` with stable kinds; any `error` fails the stage
after its report is committed, so the evidence is kept and the run stops before the model stage.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stages.data.layout import SPLITS, image_keys
from stages.data.readers import load_split
from tapeline.cache import files_digest, package_versions, read_manifest
from tapeline.config import PipelineConfig, ValidateConfig
from tapeline.errors import ValidationError
from tapeline.registry import read_production
from tapeline.results import StageInputs, ValidateResult
from tapeline.store import Store

REPORT, REPORT_MD, STATISTICS = "report.json", "report.md", "statistics.parquet"
CLASS_PLOT, PIXEL_PLOT = "class_histogram.png", "pixel_histogram.png"
CROSS_SPLITS = (("train", "test"), ("validation", "test"), ("train", "validation"))
EXAMPLES = 5
HASH_GRID = 7
log = logging.getLogger("tapeline.validate")

Splits = dict[str, tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------- statistics

def class_shares(labels: np.ndarray, classes: int) -> np.ndarray:
    """Share of each class (zeros when there are no labels)."""
    counts = np.bincount(labels, minlength=classes)[:classes].astype(float)
    return counts / counts.sum() if counts.sum() else counts


def pixel_histogram(images: np.ndarray, max_pixels: int = 8_000_000) -> np.ndarray:
    """Normalized histogram of the 256 grey levels; over every k-th image when there are more than
    `max_pixels` pixels (bincount widens each pixel to 8 bytes: all of Fashion-MNIST's costs 0.4 s)."""
    stride = max(1, images.size // max_pixels)
    counts = np.bincount(images[::stride].reshape(-1), minlength=256).astype(float)
    return counts / counts.sum() if counts.sum() else counts


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence in bits (0 = same distribution, 1 = disjoint)."""
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    return (kl(p) + kl(q)) / 2


def _constant_mask(images: np.ndarray) -> np.ndarray:
    """Which images have every pixel equal."""
    flat = images.reshape(len(images), -1)
    return (flat == flat[:, :1]).all(axis=1) if len(flat) else np.zeros(0, bool)


def _statistics_rows(splits: Splits, class_names: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per split and class (and `*` for the whole split): count, pixel mean / std, share of constant images.

    From per-image sums of pixels and of their squares, so no float copy of a split is ever made."""
    rows = []
    for split, (images, labels) in splits.items():
        flat = images.reshape(len(images), -1)
        pixels = flat.shape[1]
        sums = flat.sum(axis=1, dtype=np.int64).astype(np.float64)
        squares = (flat.astype(np.uint16) ** 2).sum(axis=1, dtype=np.int64).astype(np.float64)
        constant = _constant_mask(images)
        for index, name in [(None, "*"), *enumerate(class_names)]:
            mask = np.ones(len(labels), bool) if index is None else labels == index
            count = int(mask.sum())
            mean = sums[mask].sum() / (count * pixels) if count else None
            variance = squares[mask].sum() / (count * pixels) - mean**2 if count else None
            rows.append({"split": split, "class": name, "count": count, "pixel_mean": mean,
                         "pixel_std": float(np.sqrt(max(variance, 0.0))) if count else None,
                         "constant_share": float(constant[mask].mean()) if count else None})
    return rows


# ---------------------------------------------------------------- duplicates

def duplicate_counts(keys: dict[str, np.ndarray], labels: dict[str, np.ndarray]
                     ) -> tuple[dict[str, int], dict[str, list[dict[str, Any]]]]:
    """Exact duplicates by pixel hash: extra copies within each split, records of one split with a copy in
    another, and distinct images seen with more than one label; plus a few examples of each."""
    counts: dict[str, int] = {}
    examples: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        _, first, inverse = np.unique(keys[split], return_index=True, return_inverse=True)
        copies = np.flatnonzero(first[inverse] != np.arange(len(inverse)))
        counts[f"within_{split}"] = len(copies)
        examples[f"within_{split}"] = [{"split": split, "index": int(i), "copy_of": int(first[inverse[i]])}
                                       for i in copies[:EXAMPLES]]
    for older, newer in CROSS_SPLITS:
        hits = np.flatnonzero(np.isin(keys[newer], keys[older]))
        counts[f"{older}_{newer}"] = len(hits)
        examples[f"{older}_{newer}"] = [
            {"split": newer, "index": int(i), "copy_of": {"split": older, "index": int(
                np.flatnonzero(keys[older] == keys[newer][i])[0])}} for i in hits[:EXAMPLES]]
    every_key = np.concatenate([keys[s] for s in SPLITS])
    every_label = np.concatenate([labels[s] for s in SPLITS]).astype(np.int64)
    order = np.argsort(every_key, kind="stable")
    sorted_keys, sorted_labels = every_key[order], every_label[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]) if len(order) else np.zeros(0, int)
    conflicted = starts[np.minimum.reduceat(sorted_labels, starts) != np.maximum.reduceat(sorted_labels, starts)] \
        if len(starts) else starts
    counts["label_conflicts"] = len(conflicted)
    offsets = np.cumsum([0, *(len(keys[s]) for s in SPLITS)])
    examples["label_conflicts"] = []
    for start in conflicted[:EXAMPLES]:
        members = order[start:][sorted_keys[start:] == sorted_keys[start]][:4]
        examples["label_conflicts"].append([
            {"split": SPLITS[k], "index": int(m - offsets[k]), "label": int(every_label[m])}
            for m in members for k in [int(np.searchsorted(offsets, m, side="right") - 1)]])
    return counts, examples


def _block_means(images: np.ndarray) -> np.ndarray:
    """Mean grey level of each cell of a 7×7 grid over each image: [n, 49]."""
    n, height, width = images.shape[:3]
    bh, bw = height // HASH_GRID, width // HASH_GRID
    grey = images[:, : bh * HASH_GRID, : bw * HASH_GRID].mean(axis=-1, dtype=np.float32)
    return grey.reshape(n, HASH_GRID, bh, HASH_GRID, bw).mean(axis=(2, 4)).reshape(n, -1)


def _hash_codes(blocks: np.ndarray) -> np.ndarray:
    """The average hash of block means: which cells are brighter than the image's mean, packed into bytes."""
    return np.packbits(blocks > blocks.mean(axis=1, keepdims=True), axis=1)


def near_duplicates(train: np.ndarray, test: np.ndarray, max_distance: float) -> list[tuple[int, int]]:
    """(test index, train index) pairs that are not exact copies but look alike: the same 7×7 average hash and
    a mean absolute pixel difference below `max_distance` grey levels. Constant images are left out.

    Candidates sharing a hash are narrowed first by two necessary conditions of that distance: the image
    means, then the 7×7 block means, must differ by less than it on average."""
    if min(train.shape[1:3]) < HASH_GRID or not len(train) or not len(test):
        return []
    train_blocks, test_blocks = _block_means(train), _block_means(test)
    train_codes, test_codes = _hash_codes(train_blocks), _hash_codes(test_blocks)
    train_means, test_means = train_blocks.mean(axis=1), test_blocks.mean(axis=1)
    usable = ~_constant_mask(train)
    grouped: dict[bytes, list[int]] = {}
    order = np.argsort(train_means, kind="stable")
    for index in order[usable[order]]:
        grouped.setdefault(train_codes[index].tobytes(), []).append(int(index))
    buckets = {code: np.asarray(members) for code, members in grouped.items()}  # each sorted by image mean
    pairs = []
    for index in np.flatnonzero(~_constant_mask(test)):
        members = buckets.get(test_codes[index].tobytes())
        if members is None:
            continue
        means = train_means[members]
        window = members[np.searchsorted(means, test_means[index] - max_distance):
                         np.searchsorted(means, test_means[index] + max_distance)]
        window = window[np.abs(train_blocks[window] - test_blocks[index]).mean(axis=1) < max_distance]
        if not len(window):
            continue
        distance = np.abs(train[window].astype(np.int16) - test[index].astype(np.int16)).mean(
            axis=tuple(range(1, test.ndim)))
        pairs += [(int(index), int(window[k])) for k in np.flatnonzero((distance > 0) & (distance < max_distance))]
    return sorted(pairs)


# ---------------------------------------------------------------- checks

def anomaly(kind: str, severity: str, message: str, count: int, examples: list[Any] | None = None) -> dict[str, Any]:
    """One finding of the report."""
    return {"kind": kind, "severity": severity, "message": message, "count": int(count), "examples": examples or []}


def _schema_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The schema a data manifest declares: image shape, dtype, channels, label range, class names."""
    shape, names = manifest["input_spec"]["shape"], manifest["input_spec"]["class_names"]
    return {"shape": list(shape), "dtype": manifest.get("encoding", "uint8"), "channels": shape[-1],
            "label_range": [0, len(names) - 1], "class_names": list(names)}


def schema_anomalies(ours: dict[str, Any], baseline: dict[str, Any] | None, config: ValidateConfig
                     ) -> list[dict[str, Any]]:
    """A schema that differs from the baseline's: an error unless validate.allow_schema_change."""
    if baseline is None:
        return []
    changed = [key for key in ours if ours[key] != baseline.get(key)]
    if not changed:
        return []
    severity = "warning" if config.allow_schema_change else "error"
    details = "; ".join(f"{k}: {baseline.get(k)} -> {ours[k]}" for k in changed)
    return [anomaly("schema_change", severity, f"the schema changed since the baseline ({details}); set "
                    "validate.allow_schema_change=true if this is intended", len(changed), changed)]


def count_anomalies(splits: Splits, class_names: tuple[str, ...], config: ValidateConfig) -> list[dict[str, Any]]:
    """Missing classes (an error in train or test, a warning in validation) and classes under min_per_class."""
    found = []
    for split, (_, labels) in splits.items():
        counts = np.bincount(labels, minlength=len(class_names))
        missing = [class_names[c] for c in np.flatnonzero(counts == 0)]
        if missing:
            severity = "warning" if split == "validation" else "error"
            found.append(anomaly("missing_class", severity, f"{split} has no examples of {missing}", len(missing),
                                 [{"split": split, "class": name} for name in missing[:EXAMPLES]]))
        few = [(class_names[c], int(counts[c])) for c in np.flatnonzero((counts > 0) & (counts < config.min_per_class))]
        if few:
            found.append(anomaly("few_examples", "warning", f"{split} has fewer than validate.min_per_class="
                                 f"{config.min_per_class} examples of {[n for n, _ in few]}", len(few),
                                 [{"split": split, "class": n, "count": c} for n, c in few[:EXAMPLES]]))
    return found


def duplicate_anomalies(counts: dict[str, int], examples: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Copies across splits leak (error); copies within a split (warning); one image, two labels (error)."""
    found = []
    within = {k: v for k, v in counts.items() if k.startswith("within_") and v}
    if within:
        found.append(anomaly("duplicates", "warning", f"exact duplicate images within splits: {within}",
                             sum(within.values()), [e for k in within for e in examples[k]][:EXAMPLES]))
    across = {f"{a}_{b}": counts[f"{a}_{b}"] for a, b in CROSS_SPLITS if counts[f"{a}_{b}"]}
    if across:
        found.append(anomaly("leakage", "error", f"images copied across splits: {across}; the test score would "
                             "be inflated (keep data.drop_test_duplicates=true, or remove the copies)",
                             sum(across.values()), [e for k in across for e in examples[k]][:EXAMPLES]))
    if counts["label_conflicts"]:
        found.append(anomaly("label_conflict", "error", f"{counts['label_conflicts']} images appear with more than "
                             "one label: a labelling bug; fix the labels of those records", counts["label_conflicts"],
                             examples["label_conflicts"]))
    return found


def drift_anomalies(ours: dict[str, np.ndarray], baseline: dict[str, np.ndarray] | None, config: ValidateConfig
                    ) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
    """Label drift (L∞ of class shares) and pixel drift (Jensen–Shannon of grey levels) of the training split."""
    if baseline is None or config.drift == "off" or len(ours["class_shares"]) != len(baseline["class_shares"]):
        return [], {"label": None, "pixel": None}
    label = float(np.abs(ours["class_shares"] - baseline["class_shares"]).max())
    pixel = js_divergence(ours["pixel_histogram"], baseline["pixel_histogram"])
    severity = "error" if config.drift == "error" else "warning"
    found = []
    if label > config.max_label_drift:
        found.append(anomaly("label_drift", severity, f"class shares moved by up to {label:.3f} from the baseline "
                             f"(validate.max_label_drift {config.max_label_drift})", 1, [round(label, 4)]))
    if pixel > config.max_pixel_drift:
        found.append(anomaly("pixel_drift", severity, f"the grey-level histogram moved by Jensen–Shannon {pixel:.4f} "
                             f"bits from the baseline (validate.max_pixel_drift {config.max_pixel_drift})", 1,
                             [round(pixel, 5)]))
    return found, {"label": label, "pixel": pixel}


def _unreadable_anomalies(manifest: dict[str, Any], config: ValidateConfig) -> list[dict[str, Any]]:
    """Image files the data stage skipped: an error past validate.max_unreadable_share of the files, else a
    warning; folders it did not walk: a warning of their own."""
    skipped, tried = manifest.get("skipped") or [], int(manifest.get("image_files") or 0)
    unwalked = manifest.get("unwalked") or []
    found = []
    if skipped:
        share = len(skipped) / max(tried, 1)
        severity = "error" if share > config.max_unreadable_share else "warning"
        found.append(anomaly("unreadable_images", severity, f"{len(skipped)} of {tried} image files ({share:.1%}) "
                             f"could not be read and were skipped (validate.max_unreadable_share "
                             f"{config.max_unreadable_share:.1%}); see `skipped` in the data manifest", len(skipped),
                             skipped[:EXAMPLES]))
    if unwalked:  # not images: they count toward no share, and the user learns of each
        found.append(anomaly("unwalked_folders", "warning", f"{len(unwalked)} folder(s) or link(s) were not walked "
                             "(link loops, second links to one folder, unreadable directories); see `unwalked` in the "
                             "data manifest", len(unwalked), unwalked[:EXAMPLES]))
    return found


def constant_anomalies(splits: Splits, config: ValidateConfig) -> list[dict[str, Any]]:
    """Splits whose share of constant images (all pixels equal) exceeds validate.max_constant_share."""
    found = []
    for split, (images, _) in splits.items():
        constant = _constant_mask(images)
        if len(constant) and constant.mean() > config.max_constant_share:
            found.append(anomaly("constant_images", "error", f"{constant.mean():.1%} of {split} images are constant "
                                 f"(validate.max_constant_share {config.max_constant_share:.1%}): a broken export?",
                                 int(constant.sum()), [{"split": split, "index": int(i)}
                                                       for i in np.flatnonzero(constant)[:EXAMPLES]]))
    return found


def _near_duplicate_anomalies(splits: Splits, config: ValidateConfig) -> list[dict[str, Any]]:
    """Test images that look like a training or validation image (a warning: they may inflate the score)."""
    train_size = len(splits["train"][0])
    seen = np.concatenate([splits["train"][0], splits["validation"][0]])
    pairs = near_duplicates(seen, splits["test"][0], config.near_duplicate_distance)
    if not pairs:
        return []
    examples = [{"test": t, "split": "train" if j < train_size else "validation",
                 "index": j if j < train_size else j - train_size} for t, j in pairs[:EXAMPLES]]
    return [anomaly("near_duplicates", "warning", f"{len(pairs)} test/training pairs ({len({t for t, _ in pairs})} "
                    f"test images) look alike (same 7x7 average hash, mean difference < "
                    f"{config.near_duplicate_distance} grey levels)", len(pairs), examples)]


# ---------------------------------------------------------------- pictures

def _plot_class_histogram(splits: Splits, baseline: dict[str, np.ndarray] | None, class_names: tuple[str, ...],
                         path: Path) -> None:
    """Class shares per split, with the baseline's training split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {split: class_shares(labels, len(class_names)) for split, (_, labels) in splits.items()}
    if baseline is not None and len(baseline["class_shares"]) == len(class_names):
        series["baseline train"] = baseline["class_shares"]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.7 * len(class_names) + 2), 4))
    width = 0.8 / len(series)
    for i, (name, shares) in enumerate(series.items()):
        axis.bar(np.arange(len(class_names)) + i * width, shares, width, label=name)
    axis.set_xticks(np.arange(len(class_names)) + 0.4 - width / 2, class_names, rotation=45, ha="right")
    axis.set_ylabel("share of split")
    axis.set_title("class histogram")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _plot_pixel_histogram(train: np.ndarray, baseline: dict[str, np.ndarray] | None, path: Path) -> None:
    """The training split's grey-level histogram, with the baseline's (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(np.arange(256), pixel_histogram(train), label="train")
    if baseline is not None:
        axis.plot(np.arange(256), baseline["pixel_histogram"], label="baseline train", linestyle="--")
    axis.set_yscale("log")
    axis.set_xlabel("grey level")
    axis.set_ylabel("share of pixels")
    axis.set_title("pixel intensity histogram")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


# ---------------------------------------------------------------- the stage

def _load_splits(data_path: Path) -> Splits:
    """Every split of a data output as uint8 arrays."""
    return {split: load_split(data_path, split) for split in SPLITS}


def baseline_summary(data_path: Path) -> dict[str, Any]:
    """What drift and schema checks compare with: the baseline's schema, class shares and grey levels."""
    manifest = read_manifest(data_path)
    images, labels = load_split(data_path, "train")
    names = manifest["input_spec"]["class_names"]
    return {"fingerprint": manifest["fingerprint"], "schema": _schema_of(manifest),
            "class_shares": class_shares(labels, len(names)), "pixel_histogram": pixel_histogram(images)}


def _render_report(report: dict[str, Any]) -> str:
    """report.md: the verdict, the anomalies and the duplicate counts."""
    lines = [f"# Data validation: {'passed' if report['passed'] else 'FAILED'}", "",
             f"- Data: `{report['data_fingerprint']}`; baseline: "
             + (f"`{report['baseline']}` (the data production was trained on)" if report["baseline"] else
                "none (no production model, or it was trained on this data)"),
             f"- Records: {report['records']}",
             f"- Test duplicates dropped from training by the data stage: {report['dropped_test_duplicates']}",
             f"- Drift: label {report['drift']['label']}, pixel {report['drift']['pixel']}", "",
             "| kind | severity | count | message |", "|---|---|---|---|",
             *(f"| {a['kind']} | {a['severity']} | {a['count']} | {a['message']} |" for a in report["anomalies"]),
             "", "## Exact duplicates", "", "| pair | count |", "|---|---|",
             *(f"| {k} | {v} |" for k, v in report["duplicates"].items()), "",
             f"![class histogram]({CLASS_PLOT})", "", f"![pixel histogram]({PIXEL_PLOT})", ""]
    return "\n".join(lines)


def build_validate(staging: Path, inputs: StageInputs) -> dict[str, Any]:
    """Check the data stage's output; write report.json / .md, statistics.parquet and the pictures."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    config, data = inputs.config.validate, inputs.data
    manifest = read_manifest(data.path)
    names = data.input_spec.class_names
    splits = _load_splits(data.path)
    baseline = baseline_summary(inputs.fetch("data", inputs.external["data"])) if inputs.external else None
    keys = {split: image_keys(images) for split, (images, _) in splits.items()}
    counts, examples = duplicate_counts(keys, {s: labels for s, (_, labels) in splits.items()})
    ours = {"class_shares": class_shares(splits["train"][1], len(names)),
            "pixel_histogram": pixel_histogram(splits["train"][0])}
    drift_found, drift = drift_anomalies(ours, baseline, config)
    anomalies = [*schema_anomalies(_schema_of(manifest), baseline and baseline["schema"], config),
                 *count_anomalies(splits, names, config), *duplicate_anomalies(counts, examples), *drift_found,
                 *constant_anomalies(splits, config)]
    anomalies += _unreadable_anomalies(manifest, config)
    dropped = int(manifest.get("dropped_test_duplicates", 0))
    if dropped:
        anomalies.append(anomaly("dropped_test_duplicates", "warning", f"the data stage dropped {dropped} training "
                                 "copies of test images (data.drop_test_duplicates)", dropped))
    if config.near_duplicates:
        anomalies += _near_duplicate_anomalies(splits, config)
    passed = not any(a["severity"] == "error" for a in anomalies)
    report = {"passed": passed, "anomalies": anomalies, "duplicates": counts, "drift": drift,
              "data_fingerprint": data.fingerprint, "baseline": baseline and baseline["fingerprint"],
              "records": {s: int(len(labels)) for s, (_, labels) in splits.items()},
              "dropped_test_duplicates": dropped, "schema": _schema_of(manifest)}
    (staging / REPORT).write_text(json.dumps(report, indent=2))
    (staging / REPORT_MD).write_text(_render_report(report))
    pq.write_table(pa.Table.from_pylist(_statistics_rows(splits, names)), staging / STATISTICS)
    _plot_class_histogram(splits, baseline, names, staging / CLASS_PLOT)
    _plot_pixel_histogram(splits["train"][0], baseline, staging / PIXEL_PLOT)
    for item in anomalies:
        (log.warning if item["severity"] == "warning" else log.error)("%s: %s", item["kind"], item["message"])
    return {"stage": "validate", "config": config.model_dump(mode="json"), "upstream": {"data": data.fingerprint},
            "baseline": report["baseline"], "passed": passed, "versions": package_versions(),
            "errors": {a["kind"]: a["count"] for a in anomalies if a["severity"] == "error"},
            "warnings": {a["kind"]: a["count"] for a in anomalies if a["severity"] == "warning"}}


def validate_result(path: Path, manifest: dict[str, Any], cached: bool, seconds: float) -> ValidateResult:
    """A ValidateResult from a validate manifest."""
    return ValidateResult(stage="validate", fingerprint=manifest["fingerprint"], path=path, cached=cached,
                          seconds=seconds, passed=manifest["passed"], errors=manifest["errors"],
                          warnings=manifest["warnings"])


def ensure_passed(result: ValidateResult) -> None:
    """The gate after the stage: errors stop the run here (the report is committed and kept)."""
    if not result.passed:
        found = ", ".join(f"{kind} ({count})" for kind, count in result.errors.items())
        raise ValidationError(f"data validation failed: {found}; see {result.location or result.path}/{REPORT_MD}",
                              result)


def baseline_identity(_config: PipelineConfig, store: Store, upstream: Mapping[str, str]) -> dict[str, str] | None:
    """The data production was trained on, when it is other, still valid data: {"data": fingerprint}."""
    pointer, _ = read_production(store)
    if pointer is None:
        return None
    train = store.manifest("train", pointer["train_fingerprint"])
    data_fp = (train or {}).get("upstream", {}).get("data")
    if data_fp is None or data_fp == upstream["data"]:
        return None
    baseline = store.manifest("data", data_fp)
    if baseline is None:
        log.warning("the data production %s was trained on (%s) is gone: no baseline", pointer["version"], data_fp)
        return None
    current = store.manifest("data", upstream["data"])
    if current is not None and files_digest(current) == files_digest(baseline):
        return None  # the same records, rebuilt (a new data fingerprint, byte-identical output): no baseline
    return {"data": data_fp}
