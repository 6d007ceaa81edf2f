"""Forge in the browser: the web export (:mod:`forge.web.export`) and ``forge web``'s static server
(:mod:`forge.web.serve`).

The runtime the folder carries (``assets/forge-web.js``) runs the ONNX export on onnxruntime-web, WebGPU when the
browser has an adapter and WASM otherwise.
"""

from __future__ import annotations

from forge.web.export import (
    ORT_ENV,
    ORT_VERSION,
    OnnxruntimeWeb,
    default_web_dtype,
    export_web,
    find_onnxruntime_web,
    is_web_folder,
)

__all__ = [
    "ORT_ENV",
    "ORT_VERSION",
    "OnnxruntimeWeb",
    "default_web_dtype",
    "export_web",
    "find_onnxruntime_web",
    "is_web_folder",
]
