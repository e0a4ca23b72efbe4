"""The MLflow pyfunc that serves a Pose2Seg checkpoint: image + COCO keypoints in, COCO RLE masks out.

Loaded with ``mlflow.pyfunc.load_model("models:/pose2seg@champion")``. Input: a pandas
DataFrame with one row per image and the columns

- ``image``: the encoded image file (PNG/JPEG bytes);
- ``keypoints``: JSON text, a list of people, each 51 numbers (COCO ``keypoints``: x, y, v
  repeated 17 times) or a 17 x 3 list, in the image's pixel coordinates;
- ``image_id``: an integer copied into the results.

Output: a DataFrame with one row per person that has a usable keypoint: ``image_id``,
``person_index`` (position in the input list), ``score``, ``segmentation`` (JSON text of the
COCO RLE ``{"size", "counts"}``), ``fallback`` (true when the person's keypoints could not
define the affine and the keypoint-only fallback RoI was used).
``unwrap_python_model().predictor`` gives the underlying :class:`pose2seg.inference.Predictor`,
the one prediction path that evaluate.py and training-time validation use too.

Bad input (a missing column, undecodable image bytes, malformed keypoints, a person with a
labelled keypoint farther outside the image than the model's ``data.keypoint_margin_fraction``)
raises ``MlflowException`` with ``INVALID_PARAMETER_VALUE`` and a one-line message naming the
image id: ``mlflow models serve`` passes that message through as a 400 response, where any
other exception becomes a generic error.
"""

from __future__ import annotations

import json

import mlflow.pyfunc
import numpy as np

INPUT_COLUMNS = ("image", "keypoints", "image_id")
OUTPUT_COLUMNS = ("image_id", "person_index", "score", "segmentation", "fallback")


def pyfunc_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema(
            [
                ColSpec("binary", "image"),
                ColSpec("string", "keypoints"),
                ColSpec("long", "image_id"),
            ]
        ),
        outputs=Schema(
            [
                ColSpec("long", "image_id"),
                ColSpec("long", "person_index"),
                ColSpec("double", "score"),
                ColSpec("string", "segmentation"),
                ColSpec("boolean", "fallback"),
            ]
        ),
    )


def parse_keypoints(text: str, *, image_id: int) -> np.ndarray:
    """JSON people list -> (N, 17, 3) float32; raises ValueError naming the image id."""
    from pose2seg.keypoint_checks import people_keypoints

    try:
        people = json.loads(text) if isinstance(text, str) else text
    except ValueError as exc:
        raise ValueError(f"image_id {image_id}: keypoints are not JSON: {exc}") from None
    try:
        return people_keypoints(people)
    except ValueError as exc:
        raise ValueError(f"image_id {image_id}: keypoints: {exc}") from None


def decode_image(data: bytes, *, image_id: int, max_pixels: int = 0) -> np.ndarray:
    """The ``image`` column's bytes -> (H, W, 3) uint8; raises ValueError naming the image id
    with the Serve application's reason (:func:`workflows.serve_request.decode_image_field`)."""
    from workflows.serve_request import RequestError, decode_image_field

    if not isinstance(data, bytes | bytearray):
        raise ValueError(f"image_id {image_id}: image: expected the bytes of a PNG/JPEG file")
    try:
        return decode_image_field(bytes(data), "image", max_pixels)
    except RequestError as exc:
        raise ValueError(f"image_id {image_id}: {exc}") from None


class Pose2SegPyfunc(mlflow.pyfunc.PythonModel):
    """Serves a checkpoint folder logged as the ``checkpoint`` artifact."""

    def load_context(self, context) -> None:
        import torch

        from pose2seg.arch import load_predictor

        device = "cuda" if torch.cuda.is_available() else "cpu"
        # The checkpoint's own serve.mixed_precision (auto unless the training config set it).
        self.predictor = load_predictor(
            context.artifacts["checkpoint"], device=device, precision="from_checkpoint"
        )
        self.config = self.predictor.training_config

    def predict(self, context, model_input, params=None):
        from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

        try:
            return self._predict(model_input)
        except ValueError as exc:  # bad input: the scoring server answers 400 with this line
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None

    def _predict(self, model_input):
        import pandas as pd

        from pose2seg.keypoint_checks import outside_image_rejects

        if not hasattr(model_input, "columns"):
            raise ValueError(
                f"model input must be a DataFrame with columns {list(INPUT_COLUMNS)}, "
                f"got {type(model_input).__name__}"
            )
        missing = [c for c in INPUT_COLUMNS if c not in model_input.columns]
        if missing:
            raise ValueError(
                f"model input is missing columns {missing}; expected {list(INPUT_COLUMNS)}"
            )
        rows = []
        for record in model_input.itertuples(index=False):
            try:
                image_id = int(record.image_id)
            except (TypeError, ValueError):
                raise ValueError(f"image_id must be an integer, got {record.image_id!r}") from None
            pixels = decode_image(
                record.image, image_id=image_id, max_pixels=self.config.serve.max_image_pixels
            )
            keypoints = parse_keypoints(record.keypoints, image_id=image_id)
            margin = self.config.data.keypoint_margin_fraction
            for index, why in outside_image_rejects(
                keypoints, height=pixels.shape[0], width=pixels.shape[1], margin_fraction=margin
            ):
                raise ValueError(f"image_id {image_id}, person {index}: {why}")
            results = self.predictor.predict(pixels, keypoints, image_id=image_id)
            for res in results:
                rows.append(
                    {
                        "image_id": image_id,
                        "person_index": int(res["person_index"]),
                        "score": float(res["score"]),
                        "segmentation": json.dumps(res["segmentation"]),
                        "fallback": bool(res["fallback"]),
                    }
                )
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
