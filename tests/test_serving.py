"""TF Serving's layout of production: serving/<N>/ with saved_model.pb written last, and models.config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages.pipeline import run_all
from tapeline.config import load_config
from tapeline.serving import files_in_order, model_config_text, publish_remote, serving_number
from tapeline.store import open_store
from tapeline.testing import tiny_overrides


def test_version_numbers_and_file_order() -> None:
    assert serving_number("v0001") == 1 and serving_number("v0123") == 123
    with pytest.raises(ValueError, match="not a registry version"):
        serving_number("production")
    order = files_in_order(["saved_model.pb", "variables/variables.index", "fingerprint.pb",
                            "variables/variables.data-00000-of-00001"])
    assert order[-1] == "saved_model.pb" and sorted(order[:-1]) == order[:-1]


def test_models_config_names_the_base_path() -> None:
    assert model_config_text("s3://b/p/serving") == (
        "model_config_list {\n  config {\n    name: 'tapeline'\n    base_path: 's3://b/p/serving'\n"
        "    model_platform: 'tensorflow'\n  }\n}\n")


def test_bucket_gets_serving_versions_with_the_graph_uploaded_last(s3_url: str, idx_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow as tf

    store = open_store(s3_url)  # the same (cached) store the promotion step opens
    copied: list[str] = []
    original = store.fs.copy

    def recording_copy(source, target, *args, **kwargs):
        copied.append(target)
        return original(source, target, *args, **kwargs)

    monkeypatch.setattr(store.fs, "copy", recording_copy)
    results = run_all(load_config(None, tiny_overrides(f"idx:{idx_dir}")), s3_url)
    assert results["promotion"].promoted
    served = [target for target in copied if "/serving/" in target]
    assert served and served[-1].endswith("/serving/1/saved_model.pb")
    assert store.read_bytes(store.key("serving", "models.config")).decode() == model_config_text(f"{s3_url}/serving")

    local = tmp_path / "serving-1"
    store.fs.get(store.key("serving", "1") + "/", str(local), recursive=True)
    serve = tf.saved_model.load(str(local)).signatures["serving_default"]
    images = np.zeros((3, 28, 28, 1), np.uint8)
    out = serve(images=tf.constant(images))
    assert out["probabilities"].shape == (3, 10)
    np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, atol=1e-5)
    assert publish_remote(store, "v0001") == f"{s3_url}/serving/1"  # publishing again is harmless
