"""Models for the Open Inference Protocol interop test: one scikit-learn classifier served two ways
(MLServer with its scikit-learn runtime, and our runtime SDK), and the JSON stages around it."""

from __future__ import annotations

from typing import Any

LABELS = ("small", "medium", "large")
_model: dict[str, Any] = {}


def train() -> Any:
    """The same deterministic classifier on any machine: 4 features, 3 classes by the features' sum."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    x = rng.uniform(0, 3, size=(600, 4))
    y = np.digitize(x.sum(axis=1), [4.0, 8.0])
    return LogisticRegression(max_iter=500).fit(x, y)


def save(path: str) -> None:
    """Run with MLServer's own Python: the model file its scikit-learn runtime loads."""
    import joblib

    joblib.dump(train(), path)


def load() -> None:
    _model["clf"] = train()


def predict(payload: dict[str, Any]) -> dict[str, Any]:
    """What MLServer's scikit-learn runtime answers, from our SDK: {"predict": class}."""
    return {"predict": int(_model["clf"].predict(payload["x"])[0])}


def prepare(payload: dict[str, Any]) -> dict[str, Any]:
    return {"x": [[float(v) for v in payload["features"]]]}


def name(payload: dict[str, Any]) -> dict[str, Any]:
    return {"size": LABELS[payload["predict"]], "class": payload["predict"]}
