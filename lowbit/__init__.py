"""lowbit: post-training quantization of LLMs to compressed-tensors checkpoints.

    import lowbit
    result = lowbit.quantize_model("smollm2-135m", recipe="w4a16", out="out/smollm2-w4a16")
    model = lowbit.load("out/smollm2-w4a16")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["quantize_model", "load", "LowbitError", "__version__"]

from lowbit.errors import LowbitError

if TYPE_CHECKING:
    from lowbit.models.quantized import load
    from lowbit.quantize.pipeline import quantize_model


def __getattr__(name: str) -> Any:
    # Imported lazily so `import lowbit` (and the CLI's --help) stays fast and light.
    if name == "quantize_model":
        from lowbit.quantize.pipeline import quantize_model

        return quantize_model
    if name == "load":
        from lowbit.models.quantized import load

        return load
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
