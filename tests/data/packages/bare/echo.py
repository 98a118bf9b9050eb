"""A model with no requirements: echoes its input with where it runs."""

import sys


def predict(payload: dict) -> dict:
    return {**payload, "prefix": sys.prefix}
