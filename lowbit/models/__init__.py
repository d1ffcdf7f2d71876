"""Architecture knowledge (:mod:`.arch`) and model loading (:mod:`.loading`, :mod:`.smollm2`).

Importing this package does not import transformers; :func:`load_float_model` and the SmolLM2
conversion import it when they run.
"""

from lowbit.models.arch import ARCH_TABLES, LLAMA, ArchTable, arch_table
from lowbit.models.loading import (
    check_model_dir,
    get_module,
    load_float_model,
    resolve_model_dir,
    set_module,
)
from lowbit.models.smollm2 import SMOLLM2_ALIAS, default_cache_dir, materialize_smollm2

__all__ = [
    "ARCH_TABLES",
    "LLAMA",
    "SMOLLM2_ALIAS",
    "ArchTable",
    "arch_table",
    "check_model_dir",
    "default_cache_dir",
    "get_module",
    "load_float_model",
    "materialize_smollm2",
    "resolve_model_dir",
    "set_module",
]
