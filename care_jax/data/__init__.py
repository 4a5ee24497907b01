"""Input data for care_jax: dataset sources, host-side views and on-device augmentation.

Modules, from the files up:
  errors          the errors a trainer catches and prints as one line.
  sources         where datasets live, their sizes, and random access to encoded examples.
  fashion_mnist   Fashion-MNIST prepared from Debian's files, with no internet.
  prepare         command line that prepares ImageNet / its subsets / Fashion-MNIST.
  views           host side: decode, random resized crop, resize, flip (uint8 out).
  input_pipeline  deterministic, sharded, resumable batch streams for the trainer.
  augment         device side: colour jitter, grayscale, blur, solarisation, normalise.

Nothing here is imported eagerly: `augment` must stay free of TensorFlow because it runs
inside the jitted train step.
"""
