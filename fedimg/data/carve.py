"""A test split carved from a dataset that has none, and the checks every split must pass.

:func:`carve_test` picks ``test_fraction`` of the samples for testing,
stratified by label: class ``c`` with ``n`` samples gives
``round(test_fraction * n)`` of them (at least 1 when ``n >= 2``, never all), so
10 images per class at 0.2 give 2 per class. With ``groups`` (``data.group_column``,
e.g. a patient id) whole groups are drawn instead: each group is stratified on its
majority label (ties: the lower label) and ``round(test_fraction * g)`` of the
``g`` groups of each stratum go to test, so no group straddles train and test.

The draw depends only on the data and the fixed :data:`CARVE_SEED`, never on the
run's seed: runs over several seeds share one test split, as a published split
would be shared.
"""

from __future__ import annotations

import numpy as np

from fedimg.errors import DataError

CARVE_SEED = 15


def share(n: int, fraction: float) -> int:
    """Test items out of ``n``: round(fraction * n), at least 1 when n >= 2, at most n - 1."""
    if n < 2:
        return 0
    return min(n - 1, max(1, int(np.floor(n * fraction + 0.5))))


def _pick(members: np.ndarray, count: int, stream: int) -> np.ndarray:
    rng = np.random.default_rng([CARVE_SEED, stream])
    return rng.permutation(members)[:count]


def _stratified(labels: np.ndarray, fraction: float) -> np.ndarray:
    chosen = [_pick(np.flatnonzero(labels == c), share(int((labels == c).sum()), fraction),
                    int(c)) for c in np.unique(labels)]
    return np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)


def majority_labels(labels: np.ndarray, group_ids: np.ndarray, num_groups: int) -> np.ndarray:
    """Each group's most frequent label (ties: the lower label), as (num_groups,)."""
    counts = np.zeros((num_groups, int(labels.max()) + 1), dtype=np.int64)
    np.add.at(counts, (group_ids, labels), 1)
    return counts.argmax(axis=1)


def _grouped(labels: np.ndarray, groups: np.ndarray, fraction: float) -> np.ndarray:
    names, group_ids = np.unique(groups, return_inverse=True)
    majority = majority_labels(labels, group_ids, len(names))
    test_groups = [_pick(np.flatnonzero(majority == c), share(int((majority == c).sum()),
                                                                  fraction), int(c))
                   for c in np.unique(majority)]
    return np.flatnonzero(np.isin(group_ids, np.concatenate(test_groups)))


def carve_test(labels: np.ndarray, *, test_fraction: float,
               groups: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask over the samples: True for the carved test split (see the module doc)."""
    labels = np.asarray(labels, dtype=np.int64)
    if groups is None:
        picked = _stratified(labels, test_fraction)
    else:
        picked = _grouped(labels, np.asarray(groups).astype(str), test_fraction)
    mask = np.zeros(len(labels), dtype=bool)
    mask[picked] = True
    return mask


def group_values(metadata: dict[str, np.ndarray], column: str, *, where: str) -> np.ndarray:
    """The ``column`` values that group samples (``data.group_column``), all non-empty."""
    if column not in metadata:
        raise DataError(f"data.group_column='{column}' is not a column of {where}; columns "
                        f"there: {sorted(metadata) or 'none'}. Fix: choose one of those, or "
                        "drop data.group_column.")
    values = np.asarray(metadata[column]).astype(str)
    empty = int((np.char.strip(values) == "").sum())
    if empty:
        raise DataError(f"data.group_column='{column}' is empty for {empty} of {len(values)} "
                        f"images of {where}. Fix: fill the column (e.g. one patient id per "
                        "image), or drop data.group_column.")
    return values


def check_classes(classes: tuple[str, ...], train: np.ndarray, test: np.ndarray, *,
                  where: str, carved: bool) -> None:
    """Refuse one class only, and a class that the train or the test split lacks."""
    present = np.union1d(train, test)
    if len(present) < 2:
        name = classes[int(present[0])] if len(present) else "none"
        raise DataError(f"{where} holds one class only ('{name}'); classification needs at "
                        "least 2. Fix: add images of a second class (another class folder "
                        "or label value).")
    for label in present:
        for split, labels, other in (("test", test, train), ("train", train, test)):
            if label not in labels:
                _missing_class(classes[int(label)], split, int((other == label).sum()),
                               where=where, carved=carved)


def _missing_class(name: str, split: str, count: int, *, where: str, carved: bool) -> None:
    if carved:
        raise DataError(f"class '{name}' of {where} has only {count} image(s), too few to "
                        f"carve a test image from (data.test_fraction). Fix: add images of "
                        f"'{name}', or remove the class.")
    raise DataError(f"the {split} split of {where} has no image of class '{name}' (the other "
                    f"split has {count}); every class needs train and test images. Fix: add "
                    f"{split} images of '{name}', move some over, or remove the class.")


def leaked_groups(train: np.ndarray, test: np.ndarray) -> list[str]:
    """Group values found in both ``train`` and ``test`` (sorted)."""
    return sorted(set(np.asarray(train).astype(str)) & set(np.asarray(test).astype(str)))
