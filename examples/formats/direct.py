"""Each saved model called with its own library in one process, one row at a time: the floor a runtime adds to.

Run in the training environment: `python direct.py OUT SECONDS` prints, per format, calls/s and the
p50/p99 of one call (the same work the runtime does for a one-row request: scikit-learn's predict and
predict_proba, the ONNX graph, the booster's predict on a one-row matrix, MLflow's pyfunc on a DataFrame).
"""

import json
import sys
import time
import warnings
from pathlib import Path

import joblib
import lightgbm
import mlflow.pyfunc
import numpy as np
import onnxruntime
import pandas as pd
import xgboost

warnings.filterwarnings("ignore", message="X does not have valid feature names")
out, seconds = Path(sys.argv[1]), float(sys.argv[2])
row = pd.DataFrame({k: [v[0]] for k, v in json.loads((out / "sklearn.expected.json").read_text())["rows"].items()})
matrix = row.to_numpy()
sk = joblib.load(out / "sklearn" / "model.joblib")
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = 1
session = onnxruntime.InferenceSession(str(out / "onnx" / "model.onnx"), options)
proba = sk.predict_proba(row).astype(np.float32)
booster = xgboost.Booster()
booster.load_model(out / "xgboost" / "model.json")
names = list(row.columns)
gbm = lightgbm.Booster(model_file=str(out / "lightgbm" / "model.txt"))
pyfunc = mlflow.pyfunc.load_model(str(out / "mlflow"))
calls = {
    # as the runtime calls it: a matrix (its environment has no pandas, so no DataFrame)
    "sklearn": lambda: (sk.predict(matrix), sk.predict_proba(matrix)),
    "onnx": lambda: session.run(None, {"predict_proba": proba}),
    "xgboost": lambda: booster.predict(xgboost.DMatrix(matrix, feature_names=names)),
    "lightgbm": lambda: gbm.predict(matrix),
    "mlflow": lambda: pyfunc.predict(row),
}
found = {}
for name, call in calls.items():
    for _ in range(50):
        call()
    took = []
    ends = time.perf_counter() + seconds
    while time.perf_counter() < ends:
        started = time.perf_counter()
        call()
        took.append(time.perf_counter() - started)
    took.sort()
    found[name] = {
        "rps": len(took) / sum(took),
        "p50": took[len(took) // 2] * 1000,
        "p99": took[int(len(took) * 0.99)] * 1000,
    }
print(json.dumps(found))
