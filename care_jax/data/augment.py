"""Device side of the views: colour jitter, grayscale, blur, solarisation, normalisation.

These run inside the jitted train step (as in DeepMind's BYOL), on the uint8 crops the
host made, one example at a time under vmap with its own key split from one key: the
arrays may be batch-sharded global arrays. Imports only jax, numpy and dm-pix.

Probabilities and ranges are the release's (spec "Augmentations"):
  both views: colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a
      random order) with p=0.8, then grayscale with p=0.2;
  view 1: Gaussian blur with p=1.0, sigma ~ U(0.1, 2.0) x blur_scale; no solarisation;
  view 2: Gaussian blur with p=0.1; solarisation (threshold 128 of 255) with p=0.2;
then normalisation with the ImageNet mean and std. Flips and crops were done on the host.
The blur's sigma is in pixels of the 224 px views; `blur_scale` (config data.blur_scale,
1 in the paper presets) scales it for other resolutions: at 28 px, 28/224 blurs the image
as much, relative to its content, as the release blurs a 224 px view.
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


_BLUR_PASSES = 3  # PIL's GaussianBlur is three box blurs along each axis


def _box_radius(sigma):
  """The fractional radius of each of PIL's box blurs for a Gaussian of `sigma` (Pillow's
  `_gaussian_blur_radius`, after Gwosdek et al. 2011): whole part l, and a fraction that
  weights the pixels at distance l + 1 so the three passes have variance sigma^2."""
  variance = sigma**2 / _BLUR_PASSES
  whole = jnp.floor((jnp.sqrt(12. * variance + 1.) - 1.) / 2.)
  fraction = ((2. * whole + 1.) * (whole * (whole + 1.) - 3. * variance)
              / (6. * (variance - (whole + 1.)**2)))
  return whole + fraction


def _box_blur_matrix(n: int, radius):
  """[n, n]: one pass of PIL's box blur along an axis of n pixels, out[i] = m[i] . in.

  Weight 1/(2r+1) within distance floor(r), (r - floor(r))/(2r+1) at floor(r) + 1. PIL
  repeats the edge pixel beyond the border, so the taps that fall outside the image are
  folded onto the first and last pixel: every row sums to 1, and there is no dark frame.
  """
  whole = jnp.floor(radius)
  inner, far = 1. / (2. * radius + 1.), (radius - whole) / (2. * radius + 1.)

  def up_to(d):  # the weight of the taps at offsets <= d
    return (far * (d >= -whole - 1) + inner * jnp.clip(d + whole + 1, 0, 2 * whole + 1)
            + far * (d >= whole + 1))

  columns = jnp.arange(n)[None, :]
  offset = columns - jnp.arange(n)[:, None]
  return (jnp.where(columns == n - 1, 1., up_to(offset))
          - jnp.where(columns == 0, 0., up_to(offset - 1)))


def _gaussian_blur(image, sigma):
  """PIL's ImageFilter.GaussianBlur(radius=sigma), the release's blur (spec
  "Augmentations"), on a float HWC image: three box blurs along each axis, composed into
  one matrix per axis and applied as two matrix products. PIL rounds to uint8 after each
  pass; this does not.

  Under vmap, a convolution per example is slow on XLA:CPU (~45 ms of the demo's 680 ms
  step); batched matrix products are cheap on every backend.
  """
  radius = _box_radius(sigma)

  def blur_matrix(n):
    box = _box_blur_matrix(n, radius)
    return box @ box @ box

  return jnp.einsum("ij,jkc,lk->ilc", blur_matrix(image.shape[0]), image,
                    blur_matrix(image.shape[1]))


def _colour_augment(key, image, blur_prob, solarize_prob, blur_scale):
  """One example: float32 HWC in [0, 1] -> augmented, still in [0, 1].

  The probabilities may be traced values: every op is computed and selected, as on an
  accelerator a branch per example would cost as much as computing both.
  """
  keys = jax.random.split(key, 6)
  coin = jax.random.bernoulli
  image = jnp.where(coin(keys[0], _JITTER_PROB), _colour_jitter(keys[1], image), image)
  grey = jnp.broadcast_to(pix.rgb_to_grayscale(image, keep_dims=True), image.shape)
  image = jnp.where(coin(keys[2], _GRAYSCALE_PROB), grey, image)
  sigma = blur_scale * jax.random.uniform(keys[3], minval=_SIGMA_RANGE[0],
                                          maxval=_SIGMA_RANGE[1])
  blurred = _gaussian_blur(image, sigma)
  image = jnp.where(coin(keys[4], blur_prob), blurred, image)
  return jnp.where(coin(keys[5], solarize_prob), pix.solarize(image, 0.5), image)


def normalize(images):
  """uint8 (or [0, 255] float) NHWC -> float32 normalised with the ImageNet mean and std."""
  return (jnp.asarray(images, jnp.float32) / 255. - IMAGENET_MEAN) / IMAGENET_STD


def colour_views(key, images, blur_prob, solarize_prob, blur_scale=1.0):
  """Augments a batch (uint8 NHWC), one independent key per example; normalised out."""
  keys = jax.random.split(key, images.shape[0])
  augmented = jax.vmap(_colour_augment, in_axes=(0, 0, None, None, None))(
      keys, jnp.asarray(images, jnp.float32) / 255., blur_prob, solarize_prob, blur_scale)
  return (augmented - IMAGENET_MEAN) / IMAGENET_STD


def pretrain_views(key, view1, view2, blur_scale=1.0):
  """The two asymmetric CARE views of a batch of host crops (uint8 NHWC each)."""
  key1, key2 = jax.random.split(key)
  return (colour_views(key1, view1, **_VIEW1, blur_scale=blur_scale),
          colour_views(key2, view2, **_VIEW2, blur_scale=blur_scale))
