"""mlx-starflow: Apple's STARFlow normalizing flow on Apple Silicon with MLX."""

from .config import FlowConfig, LabelConfig, T5Config, VAEConfig
from .errors import ConfigError, ModelNotFound, StarFlowError, WeightsError
from .flow import SampleProgress, StarFlow, load_flow

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "FlowConfig", "LabelConfig", "ModelNotFound", "SampleProgress", "StarFlow", "StarFlowError",
    "T5Config", "VAEConfig", "WeightsError", "load_flow", "__version__",
]
