"""Concept Eraser: erase concepts from Stable Diffusion checkpoints by editing their weights.

Host-agnostic solver (torch only). Hosts and the command line call `erase` with an
`EditableModel` (e.g. `CheckpointModel`), a `Concepts` list and a method name from `METHODS`.
"""

__version__ = "0.1.0"

from .api import ErasureResult, erase
from .checkpoint import CheckpointModel, load_patch, save_artifacts, save_checkpoint, save_lora, save_patch
from .concepts import TOKEN_POLICIES, Concepts
from .errors import (Cancelled, ConvergenceWarning, EraserError, InvalidParameterError, NonFiniteResultError,
                     UnsafeFileError, UnsupportedModelError)
from .methods import METHODS, get_method
from .patch import DenseEdit, ErasurePatch, LowRankEdit, SparseEdit

__all__ = [
    "CheckpointModel", "Cancelled", "Concepts", "ConvergenceWarning", "DenseEdit", "EraserError", "ErasurePatch",
    "ErasureResult", "InvalidParameterError", "LowRankEdit", "METHODS", "NonFiniteResultError", "SparseEdit",
    "TOKEN_POLICIES", "UnsafeFileError",
    "UnsupportedModelError", "erase", "get_method", "load_patch", "save_artifacts", "save_checkpoint", "save_lora",
    "save_patch",
]
