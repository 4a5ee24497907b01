"""Device side of the views: colour jitter, blur, grayscale, solarisation, normalisation.

These run inside the jitted train step (as in DeepMind's BYOL), on the uint8 crops the
host made, one example at a time under vmap with its own key split from one key: the
arrays may be batch-sharded global arrays. Imports only jax, numpy and dm-pix.

The ops are public, with torchvision's names, so a recipe of one's own is a few lines:
each takes one float32 HWC RGB image in [0, 1] and returns it clipped to [0, 1]. Each
computes what the release computes (torchvision on PIL images, i.e. PIL itself), in float:
PIL rounds to uint8 after every op and these do not, so they agree with it to within its
rounding (tests/test_views_match_release.py measures each against PIL on real photos).

  adjust_brightness(image, factor)   adjust_contrast(image, factor)
  adjust_saturation(image, factor)   adjust_hue(image, delta)
  to_grayscale(image)                gaussian_blur(image, sigma)
  solarize(image)

The release's recipe (spec "Augmentations"), in its order:
  both views: colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a
      random order) with p=0.8; view 1: Gaussian blur with p=1.0, sigma ~ U(0.1, 2.0) x
      blur_scale; view 2: the blur with p=0.1; both: grayscale with p=0.2; view 2:
      solarisation with p=0.2;
then normalisation with the ImageNet mean and std. Crops and flips were made on the host.
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

# PIL's convert("L"): ITU-R 601-2 luma, the grey of PIL's grayscale, contrast and colour.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)

JITTER_PROB, GRAYSCALE_PROB = 0.8, 0.2
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1
SIGMA_RANGE = (0.1, 2.0)
VIEW1 = dict(blur_prob=1.0, solarize_prob=0.0)
VIEW2 = dict(blur_prob=0.1, solarize_prob=0.2)


def _clip(image):
  return jnp.clip(image, 0., 1.)


def _luma(image):
  return image @ _LUMA_WEIGHTS


def adjust_brightness(image, factor):
  """PIL's ImageEnhance.Brightness: the pixels scaled (dm-pix adds a delta instead)."""
  return _clip(image * factor)


def adjust_contrast(image, factor):
  """PIL's ImageEnhance.Contrast: every channel blends with ONE grey, the image's mean
  luma rounded to a level of 255, so a colour cast fades with the contrast.

  Written here because dm-pix (like tf.image) blends each channel with its own mean, which
  moves the colours: 3.7 levels of 255 from the release on average.
  """
  grey = jnp.floor(jnp.mean(_luma(image)) * 255. + 0.5) / 255.
  return _clip(grey + factor * (image - grey))


def adjust_saturation(image, factor):
  """PIL's ImageEnhance.Color: each pixel blends with its own luma, which keeps the luma.

  Written here because dm-pix scales the HSV saturation, which brightens as it saturates:
  3.8 levels of 255 from the release on average.
  """
  grey = _luma(image)[..., None]
  return _clip(grey + factor * (image - grey))


def adjust_hue(image, delta):
  """The hue turned by `delta` of a full turn, in HSV, as torchvision's adjust_hue on a
  PIL image: that shifts PIL's uint8 hue (255 levels a turn) by int(delta * 255) levels,
  so the turn is truncated to whole levels here too (float HSV otherwise, via dm-pix)."""
  turn = jnp.trunc(delta * 255.) / 255.
  return _clip(pix.adjust_hue(image, turn))


def to_grayscale(image):
  """PIL's convert("L"), repeated in three channels (torchvision's Grayscale(3))."""
  return jnp.broadcast_to(_luma(image)[..., None], image.shape)


def solarize(image):
  """PIL's ImageOps.solarize(threshold=128): levels of 128 and above are inverted."""
  return jnp.where(image >= 128. / 255., 1. - image, image)


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


def gaussian_blur(image, sigma):
  """PIL's ImageFilter.GaussianBlur(radius=sigma), the release's blur (spec
  "Augmentations"): three box blurs along each axis, composed into one matrix per axis and
  applied as two matrix products.

  Under vmap, a convolution per example is slow on XLA:CPU (a sizeable part of the demo's
  step); batched matrix products are cheap on every backend.
  """
  radius = _box_radius(sigma)

  def blur_matrix(n):
    box = _box_blur_matrix(n, radius)
    return box @ box @ box

  return _clip(jnp.einsum("ij,jkc,lk->ilc", blur_matrix(image.shape[0]), image,
                          blur_matrix(image.shape[1])))


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def sample_view_params(key, blur_prob, solarize_prob, blur_scale=1.0) -> dict:
  """The random part of one example's view, as the release draws it: which ops apply (the
  coins), the jitter's order (one of 24) and strengths, the blur's sigma."""
  keys = jax.random.split(key, 10)
  coin = jax.random.bernoulli
  uniform = jax.random.uniform
  return {
      "jitter": coin(keys[0], JITTER_PROB),
      "order": jax.random.permutation(keys[1], len(_JITTER_OPS)),
      # brightness, contrast, saturation factors; hue delta (torchvision's ColorJitter)
      "strengths": jnp.stack([
          uniform(keys[2], minval=1 - BRIGHTNESS, maxval=1 + BRIGHTNESS),
          uniform(keys[3], minval=1 - CONTRAST, maxval=1 + CONTRAST),
          uniform(keys[4], minval=1 - SATURATION, maxval=1 + SATURATION),
          uniform(keys[5], minval=-HUE, maxval=HUE)]),
      "blur": coin(keys[6], blur_prob),
      "sigma": blur_scale * uniform(keys[7], minval=SIGMA_RANGE[0], maxval=SIGMA_RANGE[1]),
      "grayscale": coin(keys[8], GRAYSCALE_PROB),
      "solarize": coin(keys[9], solarize_prob),
  }


def _colour_jitter(image, order, strengths):
  branches = [lambda x, op=op, j=j: op(x, strengths[j]) for j, op in enumerate(_JITTER_OPS)]
  return jax.lax.fori_loop(0, len(_JITTER_OPS),
                           lambda i, x: jax.lax.switch(order[i], branches, x), image)


def apply_view(image, params: dict):
  """One example's view with its drawn parameters (sample_view_params), in the release's
  order: jitter, blur, grayscale, solarisation.

  Every op is computed and selected: on an accelerator a branch per example would cost as
  much as computing both.
  """
  image = jnp.where(params["jitter"],
                    _colour_jitter(image, params["order"], params["strengths"]), image)
  image = jnp.where(params["blur"], gaussian_blur(image, params["sigma"]), image)
  image = jnp.where(params["grayscale"], to_grayscale(image), image)
  return jnp.where(params["solarize"], solarize(image), image)


def normalize(images):
  """uint8 (or [0, 255] float) NHWC -> float32 normalised with the ImageNet mean and std."""
  return (jnp.asarray(images, jnp.float32) / 255. - IMAGENET_MEAN) / IMAGENET_STD


def colour_views(key, images, blur_prob, solarize_prob, blur_scale=1.0):
  """Augments a batch (uint8 NHWC), one independent key per example; normalised out."""
  keys = jax.random.split(key, images.shape[0])
  params = jax.vmap(sample_view_params, in_axes=(0, None, None, None))(
      keys, blur_prob, solarize_prob, blur_scale)
  augmented = jax.vmap(apply_view)(jnp.asarray(images, jnp.float32) / 255., params)
  return (augmented - IMAGENET_MEAN) / IMAGENET_STD


def pretrain_views(key, view1, view2, blur_scale=1.0):
  """The two asymmetric CARE views of a batch of host crops (uint8 NHWC each)."""
  key1, key2 = jax.random.split(key)
  return (colour_views(key1, view1, **VIEW1, blur_scale=blur_scale),
          colour_views(key2, view2, **VIEW2, blur_scale=blur_scale))
