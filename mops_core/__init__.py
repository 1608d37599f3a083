"""mops-fl core: Mixture of Prompts over a frozen, compressed LLaMA-family model.

No Flower imports here: the Flower apps in `server/` and `client/` build on this package.
The package itself imports nothing heavy, so that checking settings takes a fraction of a second.
"""

__all__ = ["DataConfig", "ModelConfig", "MoPsConfig", "MoPsModel", "MoPsOutput", "Settings", "TrainConfig"]


def __getattr__(name: str):
    if name in ("MoPsModel", "MoPsOutput"):
        from . import model

        return getattr(model, name)
    if name in __all__:
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'mops_core' has no attribute {name!r}")
