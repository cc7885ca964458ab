"""mlx-starflow: Apple's STARFlow normalizing flow on Apple Silicon with MLX."""

from .config import FlowConfig, LabelConfig, T5Config, VAEConfig
from .errors import ConfigError, InputError, ModelNotFound, StarFlowError, WeightsError
from .flow import SampleProgress, StarFlow, load_flow
from .pipeline import load
from .text_encoder import TextEncoder, load_text_encoder
from .vae import VAE, load_vae

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "FlowConfig", "InputError", "LabelConfig", "ModelNotFound", "SampleProgress", "StarFlow", "StarFlowError",
    "T5Config", "TextEncoder", "VAE", "VAEConfig", "WeightsError", "load", "load_flow", "load_text_encoder", "load_vae",
    "__version__",
]
