"""The NLP classifier on a simulated accelerator, for the autoscaling test.

One request at a time holds the device for DEVICE_SECONDS (as a GPU-bound model
does), so a replica serves at most 1 / DEVICE_SECONDS requests a second and
only more replicas serve more; the machine's two cores are not the limit.
"""

from __future__ import annotations

import threading
import time

from examples.nlp import models
from examples.nlp.models import Payload

DEVICE_SECONDS = 0.025
_device = threading.Lock()


def classify_on_device(payload: Payload) -> Payload:
    with _device:
        time.sleep(DEVICE_SECONDS)
        return models.classify(payload)
