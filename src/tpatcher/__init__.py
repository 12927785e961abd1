"""tpatcher: Transformer-Patcher for Hugging Face models.

Fix a deployed model's mistakes one after another by adding a few trained neurons to its
last feed-forward layer (Huang et al., ICLR 2023, arXiv 2301.09785).
"""

from .config import PatcherConfig
from .errors import (
    InvalidEditError,
    ModelNotFoundError,
    PatchDirectoryError,
    TPatcherError,
    TrainingError,
    UnknownEditError,
    UnsupportedModelError,
)
from .ledger import PatcherCheckpoint
from .patcher import EditRecord, EditResult, Patcher
from .subject_guess import guess_subject

__version__ = "0.1.0"

__all__ = [
    "EditRecord",
    "EditResult",
    "InvalidEditError",
    "ModelNotFoundError",
    "PatchDirectoryError",
    "Patcher",
    "PatcherCheckpoint",
    "PatcherConfig",
    "TPatcherError",
    "TrainingError",
    "UnknownEditError",
    "UnsupportedModelError",
    "guess_subject",
    "load_model",
]


def __getattr__(name: str):
    if name == "load_model":  # imported lazily: it pulls in the model registry
        from .models import load_model

        return load_model
    raise AttributeError(name)
