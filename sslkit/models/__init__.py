"""Building blocks the methods are assembled from."""

from sslkit.models.autoencoders import create_autoencoder
from sslkit.models.backbones import create_backbone
from sslkit.models.heads import MLPHead
from sslkit.models.momentum import MomentumEncoder
from sslkit.models.queue import KeyQueue

__all__ = ["create_autoencoder", "create_backbone", "MLPHead", "MomentumEncoder", "KeyQueue"]
