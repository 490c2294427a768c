"""LeGrad in Captum Insights (captum 0.8.0): registration and the Flask app's endpoints."""

from __future__ import annotations

import base64
import io
from typing import Any, Dict, Iterator

import numpy as np
import pytest
import torch
from captum.insights.attr_vis import config, server
from matplotlib.image import imread

from captum_legrad import ImageTextSimilarity, LeGrad, insights

from . import app_factory

ALL = {"layers": "all", "pooling": "mean", "interpolate_mode": "bilinear"}
LAST_TWO = {"layers": "-2,-1", "pooling": "model", "interpolate_mode": "nearest"}

# Insights batches its examples through a helper that warns when inputs do not require grad;
# LeGrad takes its own gradients, so that warning is expected.
pytestmark = pytest.mark.filterwarnings("ignore:It looks like that the attribution:UserWarning")


def fetch_body(arguments: Dict[str, str]) -> Dict[str, Any]:
    return {
        "prediction": "all",
        "classes": [],
        "attribution_method": "LeGrad",
        "arguments": dict(arguments),
    }


@pytest.fixture(params=[False, True], ids=["classifier", "open_vocabulary"])
def app(request: pytest.FixtureRequest) -> Iterator[Any]:
    vis = app_factory.build(open_vocab=request.param)
    server.visualizer = vis
    yield server.app.test_client(), vis
    server.visualizer = None


def decode_png(data: str) -> np.ndarray:
    raw = base64.b64decode(data)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(io.BytesIO(raw), format="png")


def test_register_is_idempotent_and_in_place() -> None:
    names, method_config = config.ATTRIBUTION_NAMES_TO_METHODS, config.ATTRIBUTION_METHOD_CONFIG
    assert insights.register() == "LeGrad"
    entry = method_config["LeGrad"]
    assert insights.register() == "LeGrad"
    # the very same dictionaries (Insights' modules hold references to them) and entry
    assert config.ATTRIBUTION_NAMES_TO_METHODS is names
    assert config.ATTRIBUTION_METHOD_CONFIG is method_config
    assert method_config["LeGrad"] is entry
    assert list(names).count("LeGrad") == 1
    assert names["LeGrad"] is insights.InsightsLeGrad
    assert set(entry.params) == {"layers", "pooling", "interpolate_mode"}
    assert entry.params["layers"].type == "string" and entry.params["layers"].value == "all"
    assert entry.params["pooling"].limit == ["mean", "model"]
    # post_process converters are re-applied by Insights: they must be idempotent
    assert entry.post_process is not None
    for raw in ("all", "-2,-1", "0 2", (1, 2)):
        once = entry.post_process["layers"](raw)
        assert entry.post_process["layers"](once) == once
    insights.unregister()
    assert "LeGrad" not in names and "LeGrad" not in method_config
    insights.register()


def test_attribution_equals_legrad() -> None:
    """What Insights computes for an example is LeGrad's map in the input's shape."""
    vis = app_factory.build()
    model = vis.models[0]
    x = app_factory.batches(len(app_factory.CLASSES))[0].inputs[:1]
    arguments = dict(LAST_TWO)
    attrs = vis.attribution_calculation.calculate_attribution(
        None, (app_factory.normalize(x),), None, torch.tensor(2), "LeGrad", arguments, model
    )
    expected = LeGrad(model, layers=[-2, -1], pooling="model").attribute(
        app_factory.normalize(x), target=2, interpolate_mode="nearest"
    )
    assert isinstance(attrs, tuple) and len(attrs) == 1
    assert attrs[0].shape == x.shape
    torch.testing.assert_close(attrs[0], expected, rtol=0, atol=0)
    assert arguments["layers"] == (-2, -1)  # converted in place, and again without harm:
    again = vis.attribution_calculation.calculate_attribution(
        None, (app_factory.normalize(x),), None, torch.tensor(2), "LeGrad", arguments, model
    )
    torch.testing.assert_close(again[0], expected, rtol=0, atol=0)


def test_init_lists_legrad(app: Any) -> None:
    client, vis = app
    response = client.get("/init")
    assert response.status_code == 200
    body = response.get_json()
    assert "LeGrad" in body["methods"]
    assert body["classes"] == vis.classes
    assert body["method_arguments"]["LeGrad"] == {
        "layers": {"type": "string", "value": "all"},
        "pooling": {"type": "enum", "value": "mean", "limit": ["mean", "model"]},
        "interpolate_mode": {
            "type": "enum",
            "value": "bilinear",
            "limit": ["bilinear", "nearest", "bicubic"],
        },
    }


def test_fetch_renders_heat_maps_twice(app: Any) -> None:
    client, vis = app
    for arguments in (ALL, LAST_TWO):
        response = client.post("/fetch", json=fetch_body(arguments))
        assert response.status_code == 200, response.data[:500]
        outputs = response.get_json()
        assert len(outputs) == 4  # two batches of two labelled examples, one model
        for per_model in outputs:
            (output,) = per_model
            (feature,) = output["feature_outputs"]
            assert feature["type"] == "image" and feature["name"] == "Photo"
            assert feature["contribution"] == pytest.approx(1.0)
            heat = decode_png(feature["modified"])
            base = decode_png(feature["base"])
            assert heat.ndim == 3 and base.ndim == 3
            assert float(heat[..., :3].std()) > 0.01  # a drawn map, not a blank canvas
            assert output["predicted"][0]["label"] in vis.classes
            assert output["active_index"] == output["predicted"][0]["index"]
    # The last arguments were post-processed in place; /attribute re-applies the converters.
    assert vis._config.attribution_arguments["layers"] == (-2, -1)
    response = client.post("/attribute", json={"inputIndex": 1, "modelIndex": 0, "labelIndex": 2})
    assert response.status_code == 200
    assert response.get_json()["active_index"] == 2


def test_open_vocabulary_model_is_image_text_similarity() -> None:
    vis = app_factory.build(open_vocab=True)
    assert isinstance(vis.models[0], ImageTextSimilarity)
    assert vis.classes == app_factory.PROMPTS


def test_select_preselects_legrad() -> None:
    vis = app_factory.build(preselect=True)
    assert vis.get_insights_config()["selected_method"] == "LeGrad"
    assert vis._config.attribution_arguments == {
        "layers": "all",
        "pooling": "mean",
        "interpolate_mode": "bilinear",
    }
    with pytest.raises(ValueError, match="unknown LeGrad argument"):
        insights.select(vis, steps=3)
