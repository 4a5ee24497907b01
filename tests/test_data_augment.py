"""Device-side views: shapes, per-example randomness, the asymmetry, jit and sharding."""
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import PIL.ImageFilter

from care_jax.data import augment, fashion_mnist, synthetic
from care_jax.data.sources import FASHION_MNIST_DEBIAN_DIR

N, SIZE = 64, 32


@functools.cache
def images():
  """N copies of one natural image: any difference between outputs is the augmentation's."""
  image = synthetic.natural_image(np.random.default_rng(0), SIZE, SIZE)
  return np.broadcast_to(image, (N, SIZE, SIZE, 3)).copy()


pretrain_views = jax.jit(augment.pretrain_views)


@functools.cache
def views(seed=0):
  return pretrain_views(jax.random.key(seed), images(), images())


def test_shapes_dtypes_and_normalisation():
  x1, x2 = views()
  assert x1.shape == x2.shape == (N, SIZE, SIZE, 3)
  assert x1.dtype == x2.dtype == jnp.float32
  low, high = (0 - augment.IMAGENET_MEAN) / augment.IMAGENET_STD, (
      1 - augment.IMAGENET_MEAN) / augment.IMAGENET_STD
  for x in (x1, x2):
    assert (x >= low - 1e-5).all() and (x <= high + 1e-5).all()


def distinct(x):
  return len({row.tobytes() for row in np.asarray(x).reshape(N, -1)})


def test_every_example_gets_its_own_randomness():
  x1, x2 = views()
  assert distinct(x1) == N  # Always jittered or blurred with its own strengths.
  # View 2 leaves ~12% of examples untouched (no jitter, grey, blur or solarisation).
  assert distinct(x2) > N * 0.6


def test_deterministic_given_the_key():
  again = pretrain_views(jax.random.key(0), images(), images())
  other = views(seed=1)
  for a, b, c in zip(views(), again, other):
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


colour_views = jax.jit(augment.colour_views)


def changed_share(key, setting, without):
  """Share of examples where (blur_prob, solarize_prob) `setting` differs from `without`."""
  on = colour_views(key, images(), *setting)
  off = colour_views(key, images(), *without)
  changed = np.abs(np.asarray(on) - np.asarray(off)).reshape(N, -1).max(1) > 1e-4
  return changed.mean(), on


def test_view1_always_blurred_view2_rarely():
  key1, key2 = jax.random.split(jax.random.key(0))
  share1, view1 = changed_share(key1, (1.0, 0.0), without=(0.0, 0.0))
  share2, view2 = changed_share(key2, (0.1, 0.2), without=(0.0, 0.2))
  # sigma ~ U(0.1, 2): at the low end the blur barely moves a pixel, so "always" shows
  # as > 85%.
  assert share1 > 0.85
  assert 0 < share2 < 0.25  # p = 0.1
  x1, x2 = views()  # pretrain_views is exactly these two settings with these keys.
  np.testing.assert_allclose(x1, view1, atol=1e-5)
  np.testing.assert_allclose(x2, view2, atol=1e-5)


def test_blur_scale_scales_sigma():
  key1 = jax.random.split(jax.random.key(0))[0]
  unblurred = colour_views(key1, images(), 0.0, 0.0)
  blur = lambda scale: np.abs(np.asarray(colour_views(key1, images(), 1.0, 0.0, scale))
                              - np.asarray(unblurred)).mean()
  # The same draws of sigma, eight times smaller: a far weaker blur, but still a blur.
  assert 0 < blur(28 / 224) < 0.5 * blur(1.0)
  np.testing.assert_array_equal(colour_views(key1, images(), 1.0, 0.0, 1.0),
                                colour_views(key1, images(), 1.0, 0.0))


def test_view2_is_sometimes_solarised():
  key2 = jax.random.split(jax.random.key(0))[1]
  assert 0.05 < changed_share(key2, (0.1, 0.2), without=(0.1, 0.0))[0] < 0.4  # p = 0.2
  assert changed_share(key2, (0.1, 1.0), without=(0.1, 0.0))[0] > 0.9  # Visible when on.


def test_normalize_uses_imagenet_statistics():
  x = augment.normalize(np.full((1, 2, 2, 3), 255, np.uint8))
  np.testing.assert_allclose(x[0, 0, 0], (1 - augment.IMAGENET_MEAN) / augment.IMAGENET_STD,
                             rtol=1e-6)


def test_works_on_a_batch_sharded_global_array():
  """Two CPU devices in a subprocess: sharded output equals the single-device output."""
  script = textwrap.dedent("""
      import jax, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from care_jax.data import augment
      assert jax.device_count() == 2
      images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), np.uint8)
      mesh = Mesh(np.array(jax.devices()), ("data",))
      sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
      f = jax.jit(augment.pretrain_views)
      key = jax.random.key(0)
      out = f(key, sharded, sharded)
      assert out[0].sharding.spec == P("data"), out[0].sharding
      ref = f(key, images, images)
      for a, b in zip(out, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
      print("OK")
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.stdout.strip().endswith("OK"), result.stderr[-3000:]


@functools.cache
def blur_test_images():
  """Real photographs' statistics at two sizes: 100 Fashion-MNIST test images (28 px,
  often bright up to the border) and 4 synthetic natural images at the release's 224 px."""
  fmnist = fashion_mnist.read_idx(os.path.join(FASHION_MNIST_DEBIAN_DIR,
                                               "t10k-images-idx3-ubyte.gz"))[:100, :, :, None]
  natural = np.stack([synthetic.natural_image(np.random.default_rng(seed), 224, 224)
                      for seed in range(4)])
  return fmnist, natural


blur_batch = jax.jit(jax.vmap(augment.gaussian_blur, in_axes=(0, None)))


def pil_blur(image, sigma):
  """The release's blur: PIL's GaussianBlur on a uint8 image (HW1 as mode L, HW3 as RGB)."""
  pil_image = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  blurred = np.asarray(pil_image.filter(PIL.ImageFilter.GaussianBlur(radius=sigma)))
  return blurred.reshape(image.shape).astype(np.float32)


def test_gaussian_blur_is_pil_gaussian_blur():
  """The device blur computes PIL's GaussianBlur (three box blurs per axis, edge pixels
  repeated), borders included, up to PIL's rounding.

  PIL rounds to uint8 after each of its 6 passes; every pass averages with non-negative
  weights summing to 1, so the rounding errors add up to at most 6 x 0.5 = 3 units of 255
  (PIL's 24-bit fixed-point weights add < 0.01). Measured here: max 2.9 / mean 0.26-0.37
  on Fashion-MNIST, max 2.5 / mean 0.26-0.56 on the 224 px images, over the sigmas below.
  The zero-padded blur this replaced was off by up to 163 at sigma 2 (a dark frame).
  """
  for images in blur_test_images():
    for sigma in (0.1, 0.5, 1.0, 1.5, 2.0, 20.0):  # 20: the boxes are wider than the image
      ours = np.asarray(blur_batch(images.astype(np.float32) / 255., sigma)) * 255.
      difference = np.abs(ours - np.stack([pil_blur(image, sigma) for image in images]))
      assert difference.max() <= 3.01, (images.shape, sigma, difference.max())
      assert difference.mean() <= 0.75, (images.shape, sigma, difference.mean())


def test_blur_keeps_the_border_bright():
  """Edge pixels are repeated beyond the border: a constant image stays constant, so no
  blurred view gets a dark frame (zero padding kept ~60% of the edge rows at sigma 2)."""
  constant = np.full((3, 28, 20, 3), 0.7, np.float32)
  for sigma in (0.1, 1.0, 2.0, 20.0):
    np.testing.assert_allclose(blur_batch(constant, sigma), constant, atol=1e-6)
