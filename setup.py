"""The one compiled part: care_jax.data._resample, Pillow's bilinear resize made fast.

Everything else is in pyproject.toml. Without a C compiler the build goes on without it
(optional) and views.resize falls back to Pillow itself: the same pixels, slower.
-fno-wrapv undoes Python's -fwrapv, which kept the compiler from vectorising the portable
vertical pass well (2.4x slower); the C relies on no signed overflow.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("care_jax.data._resample", ["care_jax/data/_resample.c"],
                             extra_compile_args=["-O3", "-fno-wrapv"], optional=True)])
