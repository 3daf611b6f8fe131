"""m3tfed: federated multi-modal, multi-task mixture-of-experts models for education.

The core knows no concrete plugin: it asks the plugin manager (``get_catalogue``).
"""

from .errors import (
    CheckpointError,
    ConfigError,
    ContractError,
    FederationError,
    M3TError,
    RegistryError,
    UnknownPluginError,
)
from .hookspecs import hookimpl
from .modules import ModalityEncoder, Router, TaskHead, active_mask, masked_mean
from .plugin_manager import get_catalogue
from .specs import (
    REFERENCE_D_MODEL,
    AggregatorSpec,
    BackendSpec,
    DataSourceSpec,
    EncoderSpec,
    ExpertSpec,
    RouterSpec,
    Routing,
    TaskSpec,
    Tokens,
    UpdateStageSpec,
)

__version__ = "0.1.0"

__all__ = [
    "REFERENCE_D_MODEL",
    "AggregatorSpec",
    "BackendSpec",
    "CheckpointError",
    "ConfigError",
    "ContractError",
    "DataSourceSpec",
    "EncoderSpec",
    "ExpertSpec",
    "FederationError",
    "M3TError",
    "ModalityEncoder",
    "RegistryError",
    "Router",
    "RouterSpec",
    "Routing",
    "TaskHead",
    "TaskSpec",
    "Tokens",
    "UnknownPluginError",
    "UpdateStageSpec",
    "get_catalogue",
    "hookimpl",
    "active_mask",
    "masked_mean",
]
