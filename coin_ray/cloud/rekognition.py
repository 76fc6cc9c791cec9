"""The ``rekognition`` backend: AWS Rekognition DetectLabels through boto3.

Rekognition answers in its own fixed vocabulary ("Car", "Person", ...) whatever the
prompts say, so the prompts are not sent; the category map (cloud.label_map, plus every
category name) turns its labels into categories. Only labels with ``Instances`` carry
boxes; those boxes are ratios of the image size (Left, Top, Width, Height, possibly outside
0..1) and are converted to xyxy pixels here. Credentials come from the standard AWS chain.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from coin_ray.cloud.base import CloudAnswer
from coin_ray.cloud.errors import AuthError, PermanentError, TransientError
from coin_ray.cloud.imageio import upload_bytes

MAX_BYTES = 5_242_880
MAX_SIDE = 4096

_AUTH_CODES = {"AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException",
               "ExpiredTokenException", "InvalidClientTokenId", "AccessDenied"}
_TRANSIENT_CODES = {"ThrottlingException", "ProvisionedThroughputExceededException",
                    "InternalServerError", "ServiceUnavailableException", "LimitExceededException"}


class RekognitionBackend:
    name = "rekognition"

    def __init__(self, client: Any = None, *, threshold: float = 0.25, max_labels: int = 100,
                 region: str | None = None, max_attempts: int = 3) -> None:
        if client is None:
            import boto3
            from botocore.config import Config

            # botocore retries throttling itself; the project's limiter stays in front of it.
            client = boto3.client("rekognition", region_name=region,
                                  config=Config(retries={"mode": "standard",
                                                         "max_attempts": max_attempts}))
        self.client = client
        self.model_name = "detect_labels"
        self.threshold = threshold
        self.max_labels = max_labels

    def detect(self, image_bytes: bytes, image: np.ndarray, prompts: list[str]) -> CloudAnswer:
        """One DetectLabels call; boxes come back in pixels of ``image`` (xyxy)."""
        from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError as BotoConn,
                                         NoCredentialsError, ReadTimeoutError)

        data, _, _ = upload_bytes(image_bytes, image, MAX_SIDE, MAX_BYTES)
        try:
            reply = self.client.detect_labels(Image={"Bytes": data}, MaxLabels=self.max_labels,
                                              MinConfidence=self.threshold * 100.0)
        except NoCredentialsError:
            raise AuthError("no credentials", "no AWS credentials found") from None
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in _AUTH_CODES:
                raise AuthError(code) from None
            if code in _TRANSIENT_CODES:
                raise TransientError(code) from None
            raise PermanentError(code or "client error") from None
        except (ReadTimeoutError, BotoConn):
            raise TransientError("timeout") from None
        except BotoCoreError as err:
            raise TransientError("botocore", type(err).__name__) from None
        height, width = image.shape[:2]
        return labels_to_answer(reply.get("Labels", []), width, height)


def labels_to_answer(labels: list[dict[str, Any]], width: int, height: int) -> CloudAnswer:
    """DetectLabels ``Labels`` -> boxes (N, 4) xyxy pixels clipped to the image, phrases, scores."""
    boxes, phrases, scores = [], [], []
    for label in labels:
        for inst in label.get("Instances") or []:
            bb = inst.get("BoundingBox") or {}
            x1, y1 = bb.get("Left", 0.0) * width, bb.get("Top", 0.0) * height
            x2 = (bb.get("Left", 0.0) + bb.get("Width", 0.0)) * width
            y2 = (bb.get("Top", 0.0) + bb.get("Height", 0.0)) * height
            boxes.append([min(max(x1, 0), width), min(max(y1, 0), height),
                          min(max(x2, 0), width), min(max(y2, 0), height)])
            phrases.append(str(label.get("Name", "")))
            scores.append(float(inst.get("Confidence", label.get("Confidence", 0.0))) / 100.0)
    return CloudAnswer(np.asarray(boxes, np.float32).reshape(-1, 4), phrases,
                       np.asarray(scores, np.float32))
