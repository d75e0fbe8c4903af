"""moeae: Mixture-of-Experts autoencoders that learn an atlas of charts of a manifold."""

__version__ = "0.1.0"

from . import datasets  # noqa: E402
from .estimator import MoEAutoencoder  # noqa: E402

__all__ = ["MoEAutoencoder", "datasets", "__version__"]
