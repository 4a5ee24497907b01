"""The CARE networks: ResNet trunk, T-stream and MLP heads (no data, no I/O)."""
from care_jax.models.care import CareNetwork, create_networks
from care_jax.models.resnet import ResNet

__all__ = ["CareNetwork", "ResNet", "create_networks"]
