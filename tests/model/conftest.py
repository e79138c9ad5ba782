"""A model trained for real on the shared X-rays, once per session, for the behavioural tests.

How it is trained (the library's own stages, no Prefect): about 1,500 films of whole patients
(750 per class, chosen by a hash of the patient id) copied from the shared train split; the
manifest; the shard stage (``pneumo.shards.run``) with the default recipe's transform
(``robust4``: flat border bars cut, 48 augmented renditions per train film, aspect jitter
included; its test-time views are the predictor's, not stored in these shards: the fixture
scores no card) and the default
patient-grouped split (val 10 %, test 15 % of the patients); then ``pneumo.train.train`` with
the recipe's training config cut to 15 epochs (patience 5; the weights of epochs 11-15
averaged) to keep the fixture short; the threshold is 0.5; the training rows' reference
(pneumo.reference) gives the predictor its out-of-distribution check. The films scored by the tests
are the carved val and test films: patients the model never trained on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pneumo import reference, shard_files, shards, train
from pneumo.config import SplitConfig
from pneumo.download import build_manifest
from pneumo.manifest import save_manifest
from pneumo.predict import Predictor
from pneumo.recipes import DEFAULT_RECIPE
from pneumo.config import recipe
from tests.helpers import copy_patient_subset
from tests.predict_helpers import card, image_bytes

PER_CLASS = 750
EPOCHS, PATIENCE = 15, 5


@dataclass
class TrainedModel:
    predictor: Predictor  # the registered-model path of pneumo.predict: the card's transform, then TinyNet
    films: list[Path]  # held-out films (carved val and test)
    labels: np.ndarray  # their labels, 1 = PNEUMONIA
    seconds: dict[str, float]  # how long each step of the fixture took

    def probabilities(self, pictures: list[np.ndarray]) -> np.ndarray:
        """PNEUMONIA probabilities of 8-bit gray pictures, sent as lossless PNG files through pneumo.predict."""
        rows = [self.predictor.features(image_bytes(picture))[0] for picture in pictures]
        return self.predictor.probabilities(np.stack(rows))


@pytest.fixture(scope="session")
def trained_model(shared_data, tmp_path_factory) -> TrainedModel:
    seconds = {}
    started = time.perf_counter()
    root = copy_patient_subset(shared_data, tmp_path_factory.mktemp("model-data"), per_class=PER_CLASS)
    manifest = build_manifest(root)
    work = tmp_path_factory.mktemp("model-work")
    manifest_uri = save_manifest(manifest, str(work / "manifests"))
    seconds["copy and manifest"] = time.perf_counter() - started

    transform = recipe(DEFAULT_RECIPE).transform.model_copy(update={"size": (224, 224)})  # the shared films' size percentile
    split = SplitConfig()
    started = time.perf_counter()
    without_views = transform.model_copy(update={"views": transform.views.model_copy(update={"count": 0})})
    index = shards.run(manifest_uri, str(root), split, without_views, 1000, str(work), workers=2)
    seconds["shards"] = time.perf_counter() - started

    data = {name: shard_files.load_split(index.uri, name) for name in ("train", "val", "test")}
    config = recipe(DEFAULT_RECIPE).train.model_copy(update={"epochs": EPOCHS, "patience": PATIENCE})
    started = time.perf_counter()
    result = train.train(data["train"].features, data["train"].labels, data["val"].features, data["val"].labels, config)
    seconds["train"] = time.perf_counter() - started

    started = time.perf_counter()
    ref = reference.build(data["train"].originals().features, grid=transform.grid, slope_part=transform.pooling.index("mean"))
    seconds["reference"] = time.perf_counter() - started
    predictor = Predictor(result.state_dict, card(result.state_dict, config.threshold, transform), model_name="tinynet",
                          version="v0001", reference=ref)
    held_out = [(relpath, label) for name in ("val", "test")
                for relpath, label in zip(data[name].relpaths, data[name].labels.tolist())]
    print(f"\ntests/model fixture: {len(manifest.records)} films, {len(held_out)} held out; "
          + ", ".join(f"{step} {s:.1f} s" for step, s in seconds.items()))
    return TrainedModel(predictor, [root / relpath for relpath, _ in held_out],
                        np.array([label for _, label in held_out]), seconds)
