"""dsv4: DeepSeek-V4 in JAX/Flax NNX."""

from dsv4.config import ConfigError, ModelConfig, RuntimeConfig

# dsv4.generate is the function; `from dsv4.generate import ...` still reaches the module
from dsv4.generate import generate
from dsv4.loading import load_hf
from dsv4.model import DeepseekV4, abstract_model, forward, forward_with_mtp, init_model, with_runtime
from dsv4.probes import probe
from dsv4.restore import load
from dsv4.safetensors_io import CheckpointError
from dsv4.speculative import generate_speculative

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DeepseekV4",
    "ModelConfig",
    "RuntimeConfig",
    "abstract_model",
    "forward",
    "forward_with_mtp",
    "generate",
    "generate_speculative",
    "init_model",
    "load",
    "load_hf",
    "probe",
    "with_runtime",
]
