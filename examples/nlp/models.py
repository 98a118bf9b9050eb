"""The seed's NLP example: text -> features -> category -> the network for that category.

Trained on first start from data/reviews.tsv (shipped here) and cached under
.cache/nlp/ (ignored by git). Each runtime loads only what it serves.
  features      TF-IDF vector of the text
  classify      logistic regression: category (sports, tech, food)
  <cat>_mlp     per-category MLP on TF-IDF: sentiment            (pipeline v1)
  <cat>_w2v     per-category MLP whose first layer is a Word2Vec
                embedding trained here with gensim: sentiment    (pipeline v2, 10%)
"""

from __future__ import annotations

import csv
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import __version__ as sklearn_version

from runtime_sdk import Rejected

DATA = Path(__file__).parent / "data" / "reviews.tsv"
# Trained models are pickles: kept per scikit-learn release, as a pickle of one may not load in another.
CACHE = (
    Path(os.environ.get("MLLAMBDA_CACHE_DIR") or Path(__file__).parents[2] / ".cache")
    / "nlp"
    / f"sklearn-{sklearn_version}"
)
CATEGORIES = ("sports", "tech", "food")
_loaded: dict[str, Any] = {}
Payload = dict[str, Any]


def tokens(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def dataset() -> list[tuple[str, str, str]]:
    with DATA.open() as f:
        return [(row["category"], row["sentiment"], row["text"]) for row in csv.DictReader(f, delimiter="\t")]


def cached(name: str, train: Callable[[], Any]) -> Any:
    """Train once; later starts (and other replicas) read the pickle."""
    path = CACHE / f"{name}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    model = train()
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=CACHE, delete=False) as tmp:  # atomic: replicas race here
        tmp.write(pickle.dumps(model))
    os.replace(tmp.name, path)
    return model


def _train_tfidf() -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(tokenizer=tokens, token_pattern=None).fit([t for _, _, t in dataset()])


def _train_classifier() -> Any:
    from sklearn.linear_model import LogisticRegression

    vectorizer, rows = cached("tfidf", _train_tfidf), dataset()
    features = vectorizer.transform([t for _, _, t in rows]).toarray()
    return LogisticRegression(max_iter=1000, C=10.0).fit(features, [c for c, _, _ in rows])


def _train_word2vec() -> Any:
    from gensim.models import Word2Vec

    sentences = [tokens(t) for _, _, t in dataset()]
    return Word2Vec(sentences, vector_size=32, window=4, min_count=1, epochs=300, seed=7, workers=1)


def _embed(word_vectors: Any, text: str) -> np.ndarray:
    known = [word_vectors[w] for w in tokens(text) if w in word_vectors]
    return np.mean(known, axis=0) if known else np.zeros(word_vectors.vector_size)


def _train_network(category: str, kind: str) -> Any:
    from sklearn.neural_network import MLPClassifier

    rows = [(s, t) for c, s, t in dataset() if c == category]
    if kind == "mlp":
        inputs = cached("tfidf", _train_tfidf).transform([t for _, t in rows]).toarray()
    else:
        word_vectors = cached("word2vec", _train_word2vec).wv
        inputs = np.array([_embed(word_vectors, t) for _, t in rows])
    network = MLPClassifier(hidden_layer_sizes=(16,), max_iter=3000, random_state=0)
    return network.fit(inputs, [s for s, _ in rows])


# Stage 1: features
def load_features() -> None:
    _loaded["tfidf"] = cached("tfidf", _train_tfidf)


def features(payload: Payload) -> Payload:
    text = payload.get("text")
    if not isinstance(text, str) or not text.strip():
        raise Rejected("expected {'text': '<some words>'}")
    if len(text) > 10_000:
        raise Rejected("text longer than 10000 characters")
    vector = _loaded["tfidf"].transform([text]).toarray()[0]
    return {"text": text, "features": [round(float(x), 6) for x in vector]}


# Stage 2: classifier
def load_classifier() -> None:
    _loaded["classifier"] = cached("classifier", _train_classifier)


def classify(payload: Payload) -> Payload:
    classifier = _loaded["classifier"]
    row = payload.get("features")
    if not isinstance(row, list) or len(row) != classifier.n_features_in_:
        raise Rejected(f"expected 'features': a list of {classifier.n_features_in_} numbers")
    probabilities = classifier.predict_proba([row])[0]
    best = int(np.argmax(probabilities))
    return {
        "text": payload.get("text", ""),
        "features": row,
        "category": str(classifier.classes_[best]),
        "category_confidence": round(float(probabilities[best]), 3),
    }


# Stage 3: one network per category (a branching stage), two kinds of network
def _network(category: str, kind: str) -> tuple[Callable[[], None], Callable[[Payload], Payload]]:
    key = f"{category}-{kind}"

    def load() -> None:
        _loaded[key] = cached(f"network-{key}", lambda: _train_network(category, kind))
        if kind == "w2v":
            _loaded["word2vec"] = cached("word2vec", _train_word2vec).wv

    def predict(payload: Payload) -> Payload:
        network = _loaded[key]
        if kind == "mlp":
            inputs = np.array([payload.get("features") or []])
            if inputs.shape != (1, network.n_features_in_):
                raise Rejected(f"expected 'features': a list of {network.n_features_in_} numbers")
        else:
            inputs = np.array([_embed(_loaded["word2vec"], str(payload.get("text", "")))])
        probabilities = network.predict_proba(inputs)[0]
        best = int(np.argmax(probabilities))
        return {
            "category": category,
            "category_confidence": payload.get("category_confidence"),
            "sentiment": str(network.classes_[best]),
            "sentiment_confidence": round(float(probabilities[best]), 3),
            "network": "word2vec+mlp" if kind == "w2v" else "tfidf+mlp",
        }

    return load, predict


load_sports_mlp, sports_mlp = _network("sports", "mlp")
load_tech_mlp, tech_mlp = _network("tech", "mlp")
load_food_mlp, food_mlp = _network("food", "mlp")
load_sports_w2v, sports_w2v = _network("sports", "w2v")
load_tech_w2v, tech_w2v = _network("tech", "w2v")
load_food_w2v, food_w2v = _network("food", "w2v")
