"""GNN encoders over relation graphs, built from torch-geometric convolutions.

``relkd.gnn.create("tag", in_dim, hidden_dim, out_dim, num_layers)`` builds an encoder,
``relkd.gnn.available()`` lists the convolutions. Encoders are trainable modules: a loss that owns one
exposes its weights through ``loss.parameters()``, which the optimiser must include.
"""

from relkd.gnn import convs as _convs  # noqa: F401  (registers the convolutions)
from relkd.gnn.encoder import GNNEncoder, create
from relkd.gnn.registry import CONVS, available, register

__all__ = ["GNNEncoder", "create", "available", "register", "CONVS"]
