"""Train one small model per format and save it as its own library does; what each library predicts beside it.

Run in an environment of its own (requirements-train.txt), never ML Lambda's: `python train.py OUT`.
OUT/<format>/ holds the saved model as a user would hand it over, and OUT/<format>.expected.json the rows
asked and the library's own answers for them.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_iris

out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
out.mkdir(parents=True)
X, y = load_iris(return_X_y=True, as_frame=True)
rows = X.iloc[[0, 60, 120, 77]]


def expect(name, asked, **answers):
    (out / f"{name}.expected.json").write_text(json.dumps({"rows": asked, **answers}))


# scikit-learn: a pipeline fitted on a DataFrame (so it knows its column names), saved with joblib
import joblib  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

sk = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y)
(out / "sklearn").mkdir()
joblib.dump(sk, out / "sklearn" / "model.joblib")
expect(
    "sklearn", rows.to_dict("list"), predict=sk.predict(rows).tolist(), predict_proba=sk.predict_proba(rows).tolist()
)

# ONNX: a second stage that takes class probabilities (as stage 1 answers them) and says how sure it is
from skl2onnx import to_onnx  # noqa: E402
from skl2onnx.common.data_types import FloatTensorType  # noqa: E402
from sklearn.tree import DecisionTreeClassifier  # noqa: E402

proba = sk.predict_proba(X).astype(np.float32)
sure = (proba.max(axis=1) > 0.9).astype(np.int64)
tree = DecisionTreeClassifier(max_depth=3, random_state=0).fit(proba, sure)
graph = to_onnx(tree, initial_types=[("predict_proba", FloatTensorType([None, 3]))], options={"zipmap": False})
(out / "onnx").mkdir()
(out / "onnx" / "model.onnx").write_bytes(graph.SerializeToString())
import onnxruntime  # noqa: E402

session = onnxruntime.InferenceSession(str(out / "onnx" / "model.onnx"))
asked = sk.predict_proba(rows).astype(np.float32)
label, probabilities = session.run(None, {"predict_proba": asked})
expect("onnx", asked.tolist(), label=label.tolist(), probabilities=probabilities.tolist())

# XGBoost: a booster saved in its JSON format, with feature names
import xgboost  # noqa: E402

booster = xgboost.train(
    {"objective": "multi:softprob", "num_class": 3, "max_depth": 3}, xgboost.DMatrix(X, label=y), 20
)
(out / "xgboost").mkdir()
booster.save_model(out / "xgboost" / "model.json")
expect("xgboost", rows.to_dict("list"), predict=booster.predict(xgboost.DMatrix(rows)).tolist())

# LightGBM: a regression booster on a bare matrix (no feature names), in its text format
import lightgbm  # noqa: E402

gbm = lightgbm.train(
    {"objective": "regression", "verbose": -1, "num_leaves": 7}, lightgbm.Dataset(X.to_numpy(), y.to_numpy()), 20
)
(out / "lightgbm").mkdir()
gbm.save_model(str(out / "lightgbm" / "model.txt"))
expect("lightgbm", rows.to_numpy().tolist(), predict=gbm.predict(rows.to_numpy()).tolist())

# MLflow: a random forest saved with save_model and a signature inferred from the data
import mlflow.sklearn  # noqa: E402
from mlflow.models import infer_signature  # noqa: E402
from sklearn.ensemble import RandomForestClassifier  # noqa: E402

forest = RandomForestClassifier(n_estimators=10, random_state=0).fit(X, y)
mlflow.sklearn.save_model(
    forest, out / "mlflow", signature=infer_signature(X, forest.predict(X)), serialization_format="cloudpickle"
)
expect("mlflow", rows.to_dict("list"), predictions=forest.predict(rows).tolist())

# For a pipeline of two saved models: a second scikit-learn version for stage 1 and a second ONNX version
# for stage 2; what each of the four chains answers for the first row.
other = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=500)).fit(X, y)
(out / "sklearn-b").mkdir()
joblib.dump(other, out / "sklearn-b" / "model.joblib")
shallow = DecisionTreeClassifier(max_depth=1, random_state=0).fit(proba, sure)
graph_b = to_onnx(shallow, initial_types=[("predict_proba", FloatTensorType([None, 3]))], options={"zipmap": False})
(out / "onnx-b").mkdir()
(out / "onnx-b" / "model.onnx").write_bytes(graph_b.SerializeToString())
session_b = onnxruntime.InferenceSession(str(out / "onnx-b" / "model.onnx"))
chains = {}
for first_name, first in (("v1", sk), ("v2", other)):
    middle = first.predict_proba(rows.iloc[[0]]).astype(np.float32)
    for second_name, second in (("v1", session), ("v2", session_b)):
        label, probabilities = second.run(None, {"predict_proba": middle})
        chains[f"{first_name}>{second_name}"] = {"label": label.tolist()[0], "probabilities": probabilities.tolist()[0]}
(out / "chains.expected.json").write_text(json.dumps({"row": rows.iloc[0].to_dict(), "chains": chains}))
