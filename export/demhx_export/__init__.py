"""demhx-export: the paper's 3D U-net in PyTorch, its checkpoints, and its ONNX export for demhx.

Modules, one per stage:

- :mod:`demhx_export.network` — ``UNet3D``, ``count_parameters``, ``flops_per_cube``;
- :mod:`demhx_export.checkpoint` — ``save_checkpoint`` / ``load_checkpoint``
  (safetensors + JSON);
- :mod:`demhx_export.onnx_export` — ``export_onnx`` (verified fp32 file plus fp16 twin);
- :mod:`demhx_export.keras_import` — ``convert_keras`` (Keras ``.h5`` files, read by
  :mod:`~demhx_export.keras_reader`, converted layer by layer by
  :mod:`~demhx_export.keras_layers` on :mod:`~demhx_export.keras_graph`);
- :mod:`demhx_export.onnx_io` — what both write through: names, metadata, fp16 twin and
  the verification run with ONNX Runtime;
- :mod:`demhx_export.cli` — the ``demhx-export`` command.

Nothing is imported here, so that ``import demhx_export`` stays cheap (torch is heavy).
"""

__version__ = "0.1.0"
