"""Embedded datasets (nothing is ever downloaded) and their fixed, seeded splits."""

from normlab.data.datasets import (
    FASHION_DIR,
    SPLIT_SEED,
    Dataset,
    available_datasets,
    load_dataset,
)
from normlab.data.digits import Split, load_digits_split

__all__ = [
    "FASHION_DIR",
    "SPLIT_SEED",
    "Dataset",
    "Split",
    "available_datasets",
    "load_dataset",
    "load_digits_split",
]
