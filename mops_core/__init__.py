"""mops-fl core: Mixture of Prompts over a frozen, compressed LLaMA-family model.

No Flower imports here: the Flower apps in `server/` and `client/` build on this package.
The package itself imports nothing heavy, so that checking settings takes a fraction of a second.
"""

import logging

__all__ = ["DataConfig", "ModelConfig", "MoPsConfig", "MoPsModel", "MoPsOutput", "Settings", "TrainConfig", "log_through"]


def log_through(logger: logging.Logger) -> None:
    """Print this package's log lines from INFO up (what start-up costs: dequantising, compressing,
    compiling; caches; fallbacks) with `logger`'s handlers too, in a process that configured no
    logging of its own (the Flower apps' processes): without it those lines would be lost there.
    Where logging is configured (the root logger has handlers: the CLI, pytest) that choice stands."""
    if logging.getLogger().handlers:
        return
    own = logging.getLogger(__name__)
    own.setLevel(logging.INFO)
    for handler in logger.handlers:
        if handler not in own.handlers:
            own.addHandler(handler)


def __getattr__(name: str):
    if name in ("MoPsModel", "MoPsOutput"):
        from . import model

        return getattr(model, name)
    if name in __all__:
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'mops_core' has no attribute {name!r}")
