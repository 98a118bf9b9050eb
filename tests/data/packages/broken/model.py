"""A model whose loading fails every time: what a replica with a missing weight file does."""


def load() -> None:
    raise RuntimeError("weights.bin: no such file (this package was built without its weights)")


def predict(payload: dict) -> dict:
    return payload
