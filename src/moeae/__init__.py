"""moeae: Mixture-of-Experts autoencoders that learn an atlas of charts of a manifold."""

__version__ = "0.1.0"

from . import datasets  # noqa: E402

# Imported now, not lazily: a submodule imported later would replace the function of the same
# name in this package. The module imports torch only when a sweep runs.
from .sweep import sweep  # noqa: E402

__all__ = ["MoEAutoencoder", "datasets", "sweep", "__version__"]


def __getattr__(name):
    # The estimator pulls in scikit-learn (~1.7 s); load it when first asked for, so the
    # command line and the training loop start fast.
    if name == "MoEAutoencoder":
        from .estimator import MoEAutoencoder

        return MoEAutoencoder
    raise AttributeError(f"module 'moeae' has no attribute {name!r}")
