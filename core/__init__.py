"""m3tfed: federated multi-modal, multi-task mixture-of-experts models for education.

The core knows no concrete plugin: it asks the plugin manager (``get_catalogue``).
What a plugin of each kind must build is in :mod:`m3tfed.interfaces`, the records that
cross the wire in :mod:`m3tfed.messages`; both are exported here.
"""

from .aggregation import (
    accumulation_dtype,
    check_updates,
    float_keys,
    stack_deltas,
    weighted_mean_delta,
)
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
from .interfaces import (
    Aggregator,
    Backend,
    DataSource,
    Expert,
    LearningRateMultipliers,
    MessageHandler,
    ModalityEncoder,
    RoundContext,
    RoundSetup,
    Router,
    TaskHead,
    UpdateStage,
    WideFeatures,
)
from .messages import ComponentUpdate, Failure, TrainJob, TrainResult
from .modules import active_mask, masked_mean, text_statistics
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
    "Aggregator",
    "AggregatorSpec",
    "Backend",
    "BackendSpec",
    "CheckpointError",
    "ComponentUpdate",
    "ConfigError",
    "ContractError",
    "DataSource",
    "DataSourceSpec",
    "EncoderSpec",
    "Expert",
    "ExpertSpec",
    "Failure",
    "FederationError",
    "LearningRateMultipliers",
    "M3TError",
    "MessageHandler",
    "ModalityEncoder",
    "RegistryError",
    "RoundContext",
    "RoundSetup",
    "Router",
    "RouterSpec",
    "Routing",
    "TaskHead",
    "TaskSpec",
    "Tokens",
    "TrainJob",
    "TrainResult",
    "UnknownPluginError",
    "UpdateStage",
    "UpdateStageSpec",
    "WideFeatures",
    "accumulation_dtype",
    "active_mask",
    "check_updates",
    "float_keys",
    "get_catalogue",
    "hookimpl",
    "masked_mean",
    "stack_deltas",
    "text_statistics",
    "weighted_mean_delta",
]
