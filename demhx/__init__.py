"""demhx: DeepEMhancer-style local sharpening and masking of cryo-EM maps on ONNX Runtime.

>>> import demhx
>>> enhanced = demhx.enhance(volume, voxel_size=1.06)                # doctest: +SKIP
>>> demhx.enhance_file("half1.mrc", "out.mrc", half2="half2.mrc")    # doctest: +SKIP
>>> runner = demhx.Enhancer("tight-fast")                            # doctest: +SKIP
>>> result = runner.process(volume, 1.06, demhx.EnhanceOptions(tiling="fast", tta=3))
...                                                                  # doctest: +SKIP
>>> runner.process_file("in.mrc", "out.mrc", demhx.EnhanceOptions())  # doctest: +SKIP

The heavy modules (numba, ONNX Runtime, scipy) are imported on first use, so that
``import demhx`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from demhx._version import __version__

__all__ = ["DemhxWarning", "EnhanceOptions", "Enhanced", "Enhancer", "__version__", "enhance",
           "enhance_file", "preview_image", "write_preview"]

if TYPE_CHECKING:
    from demhx.errors import DemhxWarning
    from demhx.options import Enhanced, EnhanceOptions
    from demhx.pipeline import Enhancer, enhance, enhance_file
    from demhx.preview import preview_image, write_preview

_LAZY = {"Enhancer", "enhance", "enhance_file"}
_OPTIONS = {"EnhanceOptions", "Enhanced"}
_PREVIEW = {"preview_image", "write_preview"}


def __getattr__(name: str) -> Any:
    """Import the pipeline (or the preview) on first use of one of its functions, and the
    warning class (``DemhxWarning``, for ``warnings.filterwarnings``) on first use."""
    if name in _LAZY:
        from demhx import pipeline

        return getattr(pipeline, name)
    if name in _OPTIONS:
        from demhx import options

        return getattr(options, name)
    if name in _PREVIEW:
        from demhx import preview

        return getattr(preview, name)
    if name == "DemhxWarning":
        from demhx.errors import DemhxWarning

        return DemhxWarning
    raise AttributeError(f"module 'demhx' has no attribute {name!r}")
