"""Embedded datasets (nothing is ever downloaded) and their fixed, seeded splits."""

from normlab.data.digits import Split, load_digits_split

__all__ = ["Split", "load_digits_split"]
