"""`canvasrt_backbone` on Triton's Python backend: the exported backbone graph run by ONNX Runtime.

For servers without Triton's onnxruntime backend that still want the steps as a separate model (`--step-backend
python`). Requests that Triton's dynamic batcher delivers together run as one batch when their non-batch shapes
agree (every denoise call agrees), which is where serving the steps separately pays off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.backends.onnxruntime import create_session


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb_utils = pb_utils
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        graph = Path(args["model_repository"]) / args["model_version"] / parameters["graph"]
        self.session = create_session(graph, "cpu", int(parameters.get("threads", "0")) or None)
        self.inputs = [spec["name"] for spec in config["input"]]
        self.outputs = [spec["name"] for spec in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        pb_utils = self.pb_utils
        feeds = [
            {name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs} for r in requests
        ]
        groups: dict[tuple, list[int]] = {}
        for index, feed in enumerate(feeds):
            groups.setdefault(tuple(feed[name].shape[1:] for name in self.inputs), []).append(index)
        replies: list[Any] = [None] * len(requests)
        for members in groups.values():
            rows = [feeds[i][self.inputs[0]].shape[0] for i in members]
            # A lone request (the usual case) is fed as it came: no copy of its K/V buffers
            batch = {
                name: feeds[members[0]][name]
                if len(members) == 1
                else np.concatenate([feeds[i][name] for i in members])
                for name in self.inputs
            }
            parts = [np.split(array, np.cumsum(rows)[:-1]) for array in self.session.run(self.outputs, batch)]
            for position, index in enumerate(members):
                tensors = [pb_utils.Tensor(name, part[position]) for name, part in zip(self.outputs, parts)]
                replies[index] = pb_utils.InferenceResponse(tensors)
        return replies
