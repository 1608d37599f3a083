"""mops-fl core: Mixture of Prompts over a frozen, compressed LLaMA-family model.

No Flower imports here: the Flower apps in `server/` and `client/` build on this package.
"""

from .config import DataConfig, ModelConfig, MoPsConfig, Settings, TrainConfig
from .model import MoPsModel, MoPsOutput

__all__ = ["DataConfig", "ModelConfig", "MoPsConfig", "MoPsModel", "MoPsOutput", "Settings", "TrainConfig"]
