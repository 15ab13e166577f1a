"""``mmfeatures train``: fusion classifiers trained and evaluated from a feature table alone.

Every classifier is scikit-learn's ``LogisticRegression`` behind a ``StandardScaler``, with a fixed
``random_state``, so the methods differ only in what they see and how they combine it:

- ``unimodal:<modality>``: one classifier per modality, trained on the training records that have
  that modality. The baselines.
- ``early_fusion``: one classifier on the ``fused`` vector, which every record has (a missing
  modality is whatever the table's fusion made of it).
- ``late_fusion_mean``: the per-modality class probabilities averaged over the modalities the record
  has, P = 1/m sum P_i.
- ``late_fusion_weighted``: the same with a weight per modality, renormalised over the modalities
  the record has; the weights are the point of a 0.1-step grid over the simplex that scores best on
  the validation split.
- ``stacking``: a classifier over the per-modality probabilities and presence masks, fitted on
  out-of-fold predictions for the training split (``fit_stacking`` says why).

A record that none of a method's classifiers can speak for (a unimodal baseline on a record without
its modality) gets the training split's class prior, so every method is scored on the whole test
split; each is also scored on the test records that have every modality. Records without a label
are left out and counted. The models are saved as safetensors arrays plus a JSON description, and
``load_models`` rebuilds them without unpickling anything.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import sklearn
from fsspec.core import url_to_fs
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, log_loss, recall_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from mmfeatures.records import MODALITY_COLUMNS
from mmfeatures.redaction import redact, redact_all
from mmfeatures.schema import METADATA_KEY, embedding_dimension, read_features, read_run_metadata

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "dev": "validation",
    "test": "test",
}
SEEDED_SPLIT_SHARES = {"train": 0.70, "validation": 0.15}  # the test split takes the rest
WEIGHT_GRID_STEPS = 10  # late-fusion weights in steps of 1/10
STACKING_FOLDS = 5
MAX_ITER = 5000
MODELS_FILE = "models.json"
METRICS_FILE = "metrics.json"
MODELS_FORMAT = "mmfeatures.train/1"


class TrainingError(ValueError):
    """The table or the options cannot give a sound evaluation; ``main`` exits with status 2."""


# -- the table as arrays ------------------------------------------------------------------------


@dataclass(frozen=True)
class Features:
    """One row per record: each modality's embeddings (zeros where absent), where each is present,
    and the fused vector."""

    embeddings: Mapping[str, np.ndarray]
    present: Mapping[str, np.ndarray]
    fused: np.ndarray

    @classmethod
    def from_table(cls, table: pa.Table) -> Features:
        """From a feature table, read by ``read_features`` or by any Parquet reader."""
        matrices = {m: _embedding_matrix(table, f"{m}_embedding") for m in MODALITY_COLUMNS}
        fused, _ = _embedding_matrix(table, "fused")
        return cls(
            {m: matrix for m, (matrix, _) in matrices.items()},
            {m: present for m, (_, present) in matrices.items()},
            fused,
        )

    def rows(self, selection: np.ndarray) -> Features:
        return Features(
            {m: x[selection] for m, x in self.embeddings.items()},
            {m: p[selection] for m, p in self.present.items()},
            self.fused[selection],
        )

    @property
    def has_every_modality(self) -> np.ndarray:
        return np.logical_and.reduce([self.present[m] for m in MODALITY_COLUMNS])


def _embedding_matrix(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """An embedding column as a float64 [rows, dimension] matrix, zero where null, and its
    validity. ``flatten`` skips null slots, whose child values are undefined."""
    array = table.column(column).combine_chunks()
    dimension = embedding_dimension(table.schema.field(column))
    if dimension is None:
        raise TrainingError(f"column {column!r} has no embedding dimension in its metadata: not a feature table")
    present = array.is_valid().to_numpy(zero_copy_only=False)
    matrix = np.zeros((len(array), dimension))
    matrix[present] = array.flatten().to_numpy(zero_copy_only=False).reshape(-1, dimension)
    return matrix, present


def _optional_strings(table: pa.Table, column: str) -> list[str | None]:
    """The column's values as strings; null and empty values are None."""
    return [None if value is None or value == "" else str(value) for value in table.column(column).to_pylist()]


# -- labels and splits --------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """The labelled records with a split: their features, class indices and split names, and where
    the splits came from."""

    features: Features
    targets: np.ndarray
    splits: np.ndarray
    classes: list[str]
    split_source: str

    def select(self, split: str) -> Dataset:
        rows = self.splits == split
        return Dataset(self.features.rows(rows), self.targets[rows], self.splits[rows], self.classes, self.split_source)


def prepare_dataset(table: pa.Table, label_column: str, split_column: str, seed: int) -> tuple[Dataset, dict[str, int]]:
    """The labelled records with their splits, and how many records were left out and why."""
    _check_columns(table, label_column)
    labels = _optional_strings(table, label_column)
    labelled = np.array([label is not None for label in labels], dtype=bool)
    classes = sorted({label for label in labels if label is not None})
    if len(classes) < 2:
        raise TrainingError(
            f"label column {label_column!r} holds {len(classes)} class(es) over "
            f"{int(labelled.sum())} labelled records; a classifier needs at least 2"
        )
    class_index = {name: index for index, name in enumerate(classes)}
    targets = np.array([class_index[label] for label in labels if label is not None], dtype=np.int64)
    given: list[str | None] = []
    if split_column in table.column_names:
        given = [value for value, keep in zip(_optional_strings(table, split_column), labelled, strict=True) if keep]
    if any(given):
        splits, split_source = _splits_from_column(given, split_column), f"column {split_column!r}"
    else:
        splits, split_source = _seeded_stratified_split(targets, seed), "seeded stratified 70/15/15"
    kept = splits != ""
    features = Features.from_table(table.filter(pa.array(labelled))).rows(kept)
    dataset = Dataset(features, targets[kept], splits[kept], classes, split_source)
    _check_splits(dataset)
    left_out = {"records": table.num_rows, "without_label": int((~labelled).sum()), "without_split": int((~kept).sum())}
    return dataset, left_out


def _check_columns(table: pa.Table, label_column: str) -> None:
    if label_column not in table.column_names:
        raise TrainingError(
            f"the feature table has no label column {label_column!r}; its columns: {', '.join(table.column_names)}"
        )
    missing = [c for c in (*(f"{m}_embedding" for m in MODALITY_COLUMNS), "fused") if c not in table.column_names]
    if missing:
        raise TrainingError(f"not a feature table: no column {', '.join(map(repr, missing))}")


def _splits_from_column(values: list[str | None], split_column: str) -> np.ndarray:
    """Each record's split named in the column; "" where it is null, so the record is left out."""
    unknown = sorted({value for value in values if value is not None and value.lower() not in SPLIT_ALIASES})
    if unknown:
        raise TrainingError(
            f"split column {split_column!r} holds {', '.join(map(repr, unknown))}; "
            f"expected one of {', '.join(SPLIT_ALIASES)}"
        )
    return np.array([SPLIT_ALIASES[value.lower()] if value else "" for value in values], dtype="<U10")


def _seeded_stratified_split(targets: np.ndarray, seed: int) -> np.ndarray:
    """70/15/15 within every class, from a seeded permutation, so each split keeps the class
    balance; unlike ``train_test_split(stratify=...)`` it copes with classes of one or two records."""
    rng = np.random.default_rng(seed)
    splits = np.full(len(targets), "test", dtype="<U10")
    for target in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == target))
        n_train = round(SEEDED_SPLIT_SHARES["train"] * len(members))
        n_validation = round(SEEDED_SPLIT_SHARES["validation"] * len(members))
        splits[members[:n_train]] = "train"
        splits[members[n_train : n_train + n_validation]] = "validation"
    return splits


def _check_splits(dataset: Dataset) -> None:
    """Every split is needed: training fits, validation chooses late-fusion weights, test scores."""
    for split in SPLITS:
        if not np.any(dataset.splits == split):
            raise TrainingError(
                f"the {split} split has no labelled records; training fits the classifiers, "
                "validation chooses the late-fusion weights, test scores them"
            )
    if len(np.unique(dataset.select("train").targets)) < 2:
        raise TrainingError("the training split holds fewer than 2 classes")


# -- classifiers --------------------------------------------------------------------------------


def new_classifier(seed: int) -> Pipeline:
    """The one classifier every method uses; standardising keeps lbfgs well conditioned."""
    return Pipeline(
        [("scaler", StandardScaler()), ("logistic", LogisticRegression(max_iter=MAX_ITER, random_state=seed))]
    )


def class_probabilities(model: Pipeline, inputs: np.ndarray, n_classes: int) -> np.ndarray:
    """``predict_proba`` over every class: a model that never saw a class gives it probability 0."""
    probabilities = np.zeros((len(inputs), n_classes))
    if len(inputs):
        probabilities[:, model["logistic"].classes_] = model.predict_proba(inputs)
    return probabilities


def late_fusion(
    per_modality: Mapping[str, np.ndarray],
    present: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    prior: np.ndarray,
) -> np.ndarray:
    """sum w_i P_i / sum w_i over the modalities each record has; the plain mean where all of those
    weigh 0 (a modality still speaks when it is all there is), and the prior where there is none."""
    modalities = list(per_modality)
    presence = np.stack([present[m] for m in modalities])  # [modality, record]
    probabilities = np.stack([per_modality[m] for m in modalities])  # [modality, record, class]
    record_weights = np.array([weights[m] for m in modalities])[:, None] * presence  # w_i where the record has i
    weighted = (record_weights[:, :, None] * probabilities).sum(axis=0)
    weight_total = record_weights.sum(axis=0)
    summed = (presence[:, :, None] * probabilities).sum(axis=0)
    count = presence.sum(axis=0)
    fused = np.tile(prior, (len(count), 1))
    weighed = weight_total > 0
    unweighed = ~weighed & (count > 0)
    fused[weighed] = weighted[weighed] / weight_total[weighed, None]
    fused[unweighed] = summed[unweighed] / count[unweighed, None]
    return fused


def stacking_inputs(per_modality: Mapping[str, np.ndarray], present: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per modality its class probabilities (0 where absent) and its presence bit: with the bit, a
    linear meta-classifier can learn what an absent modality means instead of reading zeros as
    evidence."""
    return np.hstack([np.hstack([per_modality[m] * present[m][:, None], present[m][:, None]]) for m in per_modality])


@dataclass
class TrainedModels:
    """Everything needed to give each method's class probabilities for new records."""

    classes: list[str]
    prior: np.ndarray
    unimodal: dict[str, Pipeline]  # in MODALITY_COLUMNS order: the stacking inputs follow it
    early_fusion: Pipeline
    late_fusion_weights: dict[str, float]
    stacking: Pipeline

    def predict_proba(self, features: Features) -> dict[str, np.ndarray]:
        """Every method's class probabilities for every record."""
        per_modality = modality_probabilities(self.unimodal, features, len(self.classes))
        present = {m: features.present[m] for m in self.unimodal}
        anything = np.logical_or.reduce(list(present.values()))
        uniform = {m: 1.0 for m in self.unimodal}
        methods = {f"unimodal:{m}": np.where(present[m][:, None], per_modality[m], self.prior) for m in self.unimodal}
        methods["early_fusion"] = class_probabilities(self.early_fusion, features.fused, len(self.classes))
        methods["late_fusion_mean"] = late_fusion(per_modality, present, uniform, self.prior)
        methods["late_fusion_weighted"] = late_fusion(per_modality, present, self.late_fusion_weights, self.prior)
        stacked = class_probabilities(self.stacking, stacking_inputs(per_modality, present), len(self.classes))
        methods["stacking"] = np.where(anything[:, None], stacked, self.prior)
        return methods


def modality_probabilities(
    unimodal: Mapping[str, Pipeline], features: Features, n_classes: int
) -> dict[str, np.ndarray]:
    """Each modality's class probabilities, zero rows where the record lacks it."""
    probabilities = {}
    for modality, model in unimodal.items():
        present = features.present[modality]
        probabilities[modality] = np.zeros((len(present), n_classes))
        probabilities[modality][present] = class_probabilities(model, features.embeddings[modality][present], n_classes)
    return probabilities


# -- fitting ------------------------------------------------------------------------------------


def fit_unimodal(train: Dataset, seed: int) -> tuple[dict[str, Pipeline], dict[str, str]]:
    """One classifier per modality on the training records that have it; a modality whose records
    hold fewer than 2 classes cannot be learned and is skipped, with the reason."""
    models: dict[str, Pipeline] = {}
    skipped: dict[str, str] = {}
    for modality in MODALITY_COLUMNS:
        rows = train.features.present[modality]
        n_classes = len(np.unique(train.targets[rows]))
        if n_classes < 2:
            skipped[modality] = f"its {int(rows.sum())} training records hold {n_classes} class(es)"
            continue
        models[modality] = new_classifier(seed).fit(train.features.embeddings[modality][rows], train.targets[rows])
    if not models:
        raise TrainingError(f"no modality can be learned: {'; '.join(f'{m}: {why}' for m, why in skipped.items())}")
    return models, skipped


def fit_stacking(train: Dataset, modalities: list[str], seed: int) -> tuple[Pipeline, dict[str, int]]:
    """The meta-classifier, fitted on out-of-fold predictions for the training split.

    It must learn from predictions like those it will combine at test time: made by classifiers
    that never saw the record. In-sample training predictions are not (they are overconfident, so
    the meta-classifier would learn to trust them too much). Out-of-fold predictions are, for every
    training record, so the meta-classifier learns from the whole training split (including what
    each pattern of missing modalities means) while the validation split stays untouched for
    choosing the late-fusion weights. Fitting on validation predictions would also be honest, but
    the meta-classifier's k x m(k+1) coefficients would then be learned from 15% of the data.
    """
    per_modality: dict[str, np.ndarray] = {}
    folds: dict[str, int] = {}
    for modality in modalities:
        per_modality[modality], folds[modality] = _out_of_fold_probabilities(train, modality, seed)
    present = {m: train.features.present[m] for m in modalities}
    meta = new_classifier(seed).fit(stacking_inputs(per_modality, present), train.targets)
    return meta, folds


def _out_of_fold_probabilities(train: Dataset, modality: str, seed: int) -> tuple[np.ndarray, int]:
    """Each training record's probabilities from a classifier fitted on the other folds (zero rows
    where the record lacks the modality), and the number of folds."""
    rows = train.features.present[modality]
    targets = train.targets[rows]
    seen, counts = np.unique(targets, return_counts=True)
    n_folds = max(2, min(STACKING_FOLDS, int(counts.min())))
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    probabilities = np.zeros((len(rows), len(train.classes)))
    probabilities[np.ix_(rows, seen)] = cross_val_predict(
        new_classifier(seed), train.features.embeddings[modality][rows], targets, cv=folds, method="predict_proba"
    )
    return probabilities, n_folds


def weight_grid(modalities: list[str]) -> list[dict[str, float]]:
    """Every weighting of ``modalities`` on the simplex in steps of 1/WEIGHT_GRID_STEPS."""
    return [
        {m: units / WEIGHT_GRID_STEPS for m, units in zip(modalities, point, strict=True)}
        for point in itertools.product(range(WEIGHT_GRID_STEPS + 1), repeat=len(modalities))
        if sum(point) == WEIGHT_GRID_STEPS
    ]


def choose_late_fusion_weights(
    unimodal: Mapping[str, Pipeline], prior: np.ndarray, validation: Dataset
) -> dict[str, float]:
    """The grid point with the best validation macro F1; ties go to the lower log loss (a proper
    score, so the better calibrated choice), then to the earlier point."""
    labels = list(range(len(prior)))
    per_modality = modality_probabilities(unimodal, validation.features, len(prior))
    present = {m: validation.features.present[m] for m in unimodal}

    def validation_score(weights: dict[str, float]) -> tuple[float, float]:
        probabilities = late_fusion(per_modality, present, weights, prior)
        predictions = probabilities.argmax(axis=1)
        return (
            f1_score(validation.targets, predictions, average="macro", zero_division=0),
            -log_loss(validation.targets, probabilities, labels=labels),
        )

    return max(weight_grid(list(unimodal)), key=validation_score)


def fit_models(dataset: Dataset, seed: int) -> tuple[TrainedModels, dict[str, Any]]:
    """Every method's models from the training split (the weights from the validation split), and
    what was decided on the way."""
    train = dataset.select("train")
    n_classes = len(dataset.classes)
    prior = np.bincount(train.targets, minlength=n_classes) / len(train.targets)
    unimodal, skipped = fit_unimodal(train, seed)
    early_fusion = new_classifier(seed).fit(train.features.fused, train.targets)
    weights = choose_late_fusion_weights(unimodal, prior, dataset.select("validation"))
    stacking, folds = fit_stacking(train, list(unimodal), seed)
    models = TrainedModels(dataset.classes, prior, unimodal, early_fusion, weights, stacking)
    decisions = {
        "late_fusion_weights": weights,
        "stacking": {"fitted_on": "out-of-fold predictions for the training split", "folds": folds},
        "skipped_modalities": skipped,
    }
    return models, decisions


# -- evaluation ---------------------------------------------------------------------------------


def score(targets: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro recall, macro F1 and per-class F1 of the most probable class. Macro averages
    run over the classes in the targets or the predictions (scikit-learn's default); per-class F1 is
    None for a class in neither."""
    if len(targets) == 0:
        return {
            "n": 0,
            "accuracy": None,
            "macro_recall": None,
            "macro_f1": None,
            "per_class_f1": {name: None for name in classes},
        }
    predictions = probabilities.argmax(axis=1)
    seen = np.union1d(targets, predictions)
    per_class = f1_score(targets, predictions, labels=seen, average=None, zero_division=0)
    scored = {classes[c]: float(f1) for c, f1 in zip(seen, per_class, strict=True)}
    per_class_f1 = {name: None for name in classes} | scored
    return {
        "n": int(len(targets)),
        "accuracy": float(accuracy_score(targets, predictions)),
        "macro_recall": float(recall_score(targets, predictions, labels=seen, average="macro", zero_division=0)),
        "macro_f1": float(f1_score(targets, predictions, labels=seen, average="macro", zero_division=0)),
        "per_class_f1": per_class_f1,
    }


def evaluate(models: TrainedModels, test: Dataset) -> dict[str, dict[str, Any]]:
    """Each method on the whole test split and on its records that have every modality."""
    complete = test.features.has_every_modality
    return {
        method: {
            "test": score(test.targets, probabilities, test.classes),
            "test_all_modalities": score(test.targets[complete], probabilities[complete], test.classes),
        }
        for method, probabilities in models.predict_proba(test.features).items()
    }


def split_counts(dataset: Dataset) -> dict[str, dict[str, Any]]:
    """Per split: records, records per class, per modality, and with every modality."""
    counts = {}
    for split in SPLITS:
        part = dataset.select(split)
        per_class = np.bincount(part.targets, minlength=len(dataset.classes))
        counts[split] = {
            "records": int(len(part.targets)),
            "classes": {name: int(n) for name, n in zip(dataset.classes, per_class, strict=True)},
            **{m: int(part.features.present[m].sum()) for m in MODALITY_COLUMNS},
            "all_modalities": int(part.features.has_every_modality.sum()),
        }
    return counts


@dataclass
class TrainingResult:
    models: TrainedModels
    metrics: dict[str, Any]


def train(
    table: pa.Table, label_column: str = "label", split_column: str = "split", seed: int = 0, source: str | None = None
) -> TrainingResult:
    """Fit and score every method on a feature table; ``source`` names the table in the metrics."""
    dataset, left_out = prepare_dataset(table, label_column, split_column, seed)
    models, decisions = fit_models(dataset, seed)
    metrics = {
        "features": source,
        "label_column": label_column,
        "split_column": split_column,
        "split_source": dataset.split_source,
        "seeds": {
            "split": seed if dataset.split_source.startswith("seeded") else None,
            "classifiers": seed,
            "stacking_folds": seed,
        },
        "classes": dataset.classes,
        "counts": {**left_out, "splits": split_counts(dataset)},
        "classifier": {
            "model": "StandardScaler + LogisticRegression",
            "max_iter": MAX_ITER,
            "scikit_learn": sklearn.__version__,
        },
        **decisions,
        "methods": evaluate(models, dataset.select("test")),
        "feature_table_metadata": _table_metadata(table.schema),
    }
    return TrainingResult(models, metrics)


def _table_metadata(schema: pa.Schema) -> dict[str, Any] | None:
    """The run's models and fusion settings the job stored in the Parquet metadata, if any."""
    if not schema.metadata or METADATA_KEY not in schema.metadata:
        return None
    return redact_all(read_run_metadata(schema))


# -- saving and loading, without pickle ---------------------------------------------------------


def _classifier_arrays(model: Pipeline) -> dict[str, np.ndarray]:
    """What ``predict_proba`` needs, as plain arrays."""
    scaler, logistic = model["scaler"], model["logistic"]
    return {
        "scaler.mean": scaler.mean_,
        "scaler.scale": scaler.scale_,
        "logistic.coef": logistic.coef_,
        "logistic.intercept": logistic.intercept_,
        "logistic.classes": logistic.classes_.astype(np.int64),
    }


def _classifier_from_arrays(arrays: Mapping[str, np.ndarray]) -> Pipeline:
    """A fitted pipeline rebuilt from its arrays: the attributes ``predict_proba`` reads."""
    model = new_classifier(seed=0)  # the seed only matters when fitting
    scaler, logistic = model["scaler"], model["logistic"]
    scaler.mean_, scaler.scale_ = arrays["scaler.mean"], arrays["scaler.scale"]
    scaler.n_features_in_ = logistic.n_features_in_ = len(scaler.mean_)
    logistic.coef_, logistic.intercept_ = arrays["logistic.coef"], arrays["logistic.intercept"]
    logistic.classes_ = arrays["logistic.classes"]
    return model


def _model_files(models: TrainedModels) -> dict[str, tuple[Pipeline, str]]:
    """Each classifier's file name, and what it reads."""
    stacking_reads = "per modality in 'modalities' order: its class probabilities (0 where absent), its presence"
    return {
        **{f"unimodal-{m}.safetensors": (model, f"{m}_embedding") for m, model in models.unimodal.items()},
        "early_fusion.safetensors": (models.early_fusion, "fused"),
        "stacking.safetensors": (models.stacking, stacking_reads),
    }


def save_models(models: TrainedModels, out: str) -> None:
    """Each classifier's arrays as safetensors, and ``models.json`` saying how they fit together."""
    fs, root = url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    for name, (model, _) in _model_files(models).items():
        arrays = {key: np.ascontiguousarray(value) for key, value in _classifier_arrays(model).items()}
        fs.pipe_file(f"{root}/{name}", save_arrays(arrays))
    description = {
        "format": MODELS_FORMAT,
        "classes": models.classes,
        "prior": models.prior.tolist(),
        "modalities": list(models.unimodal),  # the order of the stacking inputs
        "late_fusion_weights": models.late_fusion_weights,
        "files": {name: inputs for name, (_, inputs) in _model_files(models).items()},
        "classifier": "StandardScaler + LogisticRegression",
        "scikit_learn": sklearn.__version__,
    }
    fs.pipe_file(f"{root}/{MODELS_FILE}", json.dumps(description, indent=1).encode())


def load_models(out: str) -> TrainedModels:
    """The models ``save_models`` wrote to ``out``, read from JSON and safetensors only."""
    fs, root = url_to_fs(out)
    description = json.loads(fs.cat_file(f"{root}/{MODELS_FILE}"))
    if description.get("format") != MODELS_FORMAT:
        raise ValueError(f"{redact(out)} does not hold {MODELS_FORMAT} models")

    def classifier(name: str) -> Pipeline:
        return _classifier_from_arrays(load_arrays(fs.cat_file(f"{root}/{name}")))

    return TrainedModels(
        classes=description["classes"],
        prior=np.array(description["prior"]),
        unimodal={m: classifier(f"unimodal-{m}.safetensors") for m in description["modalities"]},
        early_fusion=classifier("early_fusion.safetensors"),
        late_fusion_weights=description["late_fusion_weights"],
        stacking=classifier("stacking.safetensors"),
    )


def write_outputs(result: TrainingResult, out: str) -> None:
    """The models, then ``metrics.json`` with sorted keys, so equal runs write equal bytes."""
    save_models(result.models, out)
    fs, root = url_to_fs(out)
    fs.pipe_file(f"{root}/{METRICS_FILE}", json.dumps(result.metrics, indent=1, sort_keys=True).encode())


# -- command line -------------------------------------------------------------------------------


def format_table(metrics: Mapping[str, Any]) -> str:
    """The methods sorted by test macro F1, best first."""
    header = (
        f"{'method':<22} {'accuracy':>8} {'macro recall':>12} {'macro F1':>8} {'n test':>6}  "
        "all-modalities accuracy (n)"
    )
    rows = sorted(metrics["methods"].items(), key=lambda item: (-item[1]["test"]["macro_f1"], item[0]))
    lines = [header]
    for method, result in rows:
        test, complete = result["test"], result["test_all_modalities"]
        complete_accuracy = "-" if complete["accuracy"] is None else f"{complete['accuracy']:.3f}"
        lines.append(
            f"{method:<22} {test['accuracy']:>8.3f} {test['macro_recall']:>12.3f} "
            f"{test['macro_f1']:>8.3f} {test['n']:>6}  {complete_accuracy} ({complete['n']})"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmfeatures train",
        description="Train and evaluate unimodal, early-, late-fusion and stacking classifiers on a feature table.",
    )
    parser.add_argument("--features", required=True, help="Feature table folder (local or fsspec URL).")
    parser.add_argument("--label", default="label", help="Label column.")
    parser.add_argument(
        "--split-column",
        default="split",
        help="Split column (train/validation/test); absent or null: a seeded stratified 70/15/15 split.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the split, the classifiers and the folds.")
    parser.add_argument("--out", required=True, help=f"Folder for {METRICS_FILE} and the models (local or fsspec URL).")
    return parser


def _read_table(path: str) -> pa.Table:
    try:
        return read_features(path)
    except (FileNotFoundError, pa.ArrowInvalid) as exc:
        raise TrainingError(f"cannot read a feature table at {redact(path)}: {redact(str(exc))}") from None


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        result = train(_read_table(args.features), args.label, args.split_column, args.seed, redact(args.features))
    except TrainingError as exc:
        print(f"mmfeatures train: error: {exc}", file=sys.stderr)
        return 2
    write_outputs(result, args.out)
    counts = result.metrics["counts"]
    print(
        f"records {counts['records']}: {counts['without_label']} without a label, "
        f"{counts['without_split']} without a split; {result.metrics['split_source']}"
    )
    print(format_table(result.metrics))
    print(f"metrics and models: {redact(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
