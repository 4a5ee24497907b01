"""Weights in other projects' layouts: the CARE release, torchvision and Detectron2.

`state_dict` maps a care_jax parameter tree to and from PyTorch-style `{name: array}`
dicts, given a naming; the other modules are those namings. Nothing here imports torch:
the arrays are numpy, and only reading or writing `.pth` files (in `release` and
`care_jax.convert`) needs it.
"""
from care_jax.interop.state_dict import ConversionError

__all__ = ["ConversionError"]
