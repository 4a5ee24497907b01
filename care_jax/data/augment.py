"""Device side of the views: colour jitter, grayscale, blur, solarisation, normalisation.

These run inside the jitted train step (as in DeepMind's BYOL), on the uint8 crops the
host made, one example at a time under vmap with its own key split from one key: the
arrays may be batch-sharded global arrays. Imports only jax, numpy and dm-pix.

Probabilities and ranges are the release's (spec "Augmentations"):
  both views: colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a
      random order) with p=0.8, then grayscale with p=0.2;
  view 1: Gaussian blur with p=1.0, sigma ~ U(0.1, 2.0); no solarisation;
  view 2: Gaussian blur with p=0.1; solarisation (threshold 128 of 255) with p=0.2;
then normalisation with the ImageNet mean and std. Flips and crops were done on the host.
"""
import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

_JITTER_PROB, _GRAYSCALE_PROB = 0.8, 0.2
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0.4, 0.4, 0.2, 0.1
_SIGMA_RANGE = (0.1, 2.0)
_VIEW1 = dict(blur_prob=1.0, solarize_prob=0.0)
_VIEW2 = dict(blur_prob=0.1, solarize_prob=0.2)


def _brightness(image, factor):
  # torchvision's brightness scales the pixels (dm-pix's adds a delta): the release's op.
  return image * factor


def _contrast(image, factor):
  return pix.adjust_contrast(image, factor)


def _saturation(image, factor):
  return pix.adjust_saturation(image, factor)


def _hue(image, delta):
  return pix.adjust_hue(image, delta)


def _colour_jitter(key, image):
  """The four adjustments with random strengths, applied in a random order."""
  order_key, *strength_keys = jax.random.split(key, 5)
  strengths = jnp.stack([
      jax.random.uniform(strength_keys[0], minval=1 - _BRIGHTNESS, maxval=1 + _BRIGHTNESS),
      jax.random.uniform(strength_keys[1], minval=1 - _CONTRAST, maxval=1 + _CONTRAST),
      jax.random.uniform(strength_keys[2], minval=1 - _SATURATION, maxval=1 + _SATURATION),
      jax.random.uniform(strength_keys[3], minval=-_HUE, maxval=_HUE)])
  order = jax.random.permutation(order_key, 4)
  branches = [lambda x, op=op, j=j: jnp.clip(op(x, strengths[j]), 0., 1.)
              for j, op in enumerate((_brightness, _contrast, _saturation, _hue))]
  return jax.lax.fori_loop(0, 4, lambda i, x: jax.lax.switch(order[i], branches, x), image)


def _blur_kernel_size(image_size: int) -> int:
  """About 10% of the image side, odd (23 at 224 px: the release's kernel)."""
  return 2 * (image_size // 20) + 1


def _gaussian_blur(image, sigma, kernel_size: int):
  """pix.gaussian_blur (separable, zero "SAME" padding) as two products with banded
  matrices. Under vmap, pix's depthwise convolutions become a per-example convolution,
  which XLA:CPU runs slowly (~45 ms of the demo's 680 ms step); batched products are cheap
  on every backend."""
  radius = kernel_size // 2
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.exp(-taps**2 / (2. * sigma**2))
  weights = weights / jnp.sum(weights)

  def band(n):  # band[i, j] = weights[j - i + radius] within the radius, else 0
    offset = jnp.arange(n)[None, :] - jnp.arange(n)[:, None] + radius
    inside = (offset >= 0) & (offset <= 2 * radius)
    return jnp.where(inside, weights[jnp.clip(offset, 0, 2 * radius)], 0.)

  return jnp.einsum("ij,jkc,lk->ilc", band(image.shape[0]), image, band(image.shape[1]))


def _colour_augment(key, image, blur_prob, solarize_prob):
  """One example: float32 HWC in [0, 1] -> augmented, still in [0, 1].

  The probabilities may be traced values: every op is computed and selected, as on an
  accelerator a branch per example would cost as much as computing both.
  """
  keys = jax.random.split(key, 6)
  coin = jax.random.bernoulli
  image = jnp.where(coin(keys[0], _JITTER_PROB), _colour_jitter(keys[1], image), image)
  grey = jnp.broadcast_to(pix.rgb_to_grayscale(image, keep_dims=True), image.shape)
  image = jnp.where(coin(keys[2], _GRAYSCALE_PROB), grey, image)
  sigma = jax.random.uniform(keys[3], minval=_SIGMA_RANGE[0], maxval=_SIGMA_RANGE[1])
  blurred = _gaussian_blur(image, sigma, _blur_kernel_size(image.shape[0]))
  image = jnp.where(coin(keys[4], blur_prob), blurred, image)
  return jnp.where(coin(keys[5], solarize_prob), pix.solarize(image, 0.5), image)


def normalize(images):
  """uint8 (or [0, 255] float) NHWC -> float32 normalised with the ImageNet mean and std."""
  return (jnp.asarray(images, jnp.float32) / 255. - IMAGENET_MEAN) / IMAGENET_STD


def colour_views(key, images, blur_prob, solarize_prob):
  """Augments a batch (uint8 NHWC), one independent key per example; normalised out."""
  keys = jax.random.split(key, images.shape[0])
  augmented = jax.vmap(_colour_augment, in_axes=(0, 0, None, None))(
      keys, jnp.asarray(images, jnp.float32) / 255., blur_prob, solarize_prob)
  return (augmented - IMAGENET_MEAN) / IMAGENET_STD


def pretrain_views(key, view1, view2):
  """The two asymmetric CARE views of a batch of host crops (uint8 NHWC each)."""
  key1, key2 = jax.random.split(key)
  return (colour_views(key1, view1, **_VIEW1), colour_views(key2, view2, **_VIEW2))
