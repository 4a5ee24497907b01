"""Prepares a dataset for care_jax: tfds' own builders, written as array_record.

  python -m care_jax.data.prepare imagenet2012 --manual_dir=DIR [--data_dir=D]
  python -m care_jax.data.prepare imagenet2012_subset/10pct --manual_dir=DIR [--data_dir=D]
  python -m care_jax.data.prepare fashion_mnist [--data_dir=D]
  python -m care_jax.data.prepare NAME --convert [--data_dir=D]   (tfrecord -> array_record)

DIR holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (and, for the subsets
without internet, SimCLR's 1percent.txt / 10percent.txt). array_record is the format
with random access, which the input pipeline needs to read any example by index. The
`tfds build` command line would do the same but needs apache_beam installed; this calls
tfds' Python API. docs/data.md gives disk and time figures.
"""
import argparse
import logging

from care_jax.data import sources


def prepare(name: str, data_dir: str, manual_dir: str | None = None) -> None:
  import tensorflow_datasets as tfds
  if name == "fashion_mnist":
    from care_jax.data import fashion_mnist
    fashion_mnist.prepare(data_dir)
    return
  if not manual_dir:
    raise SystemExit(f"{name} needs --manual_dir, the folder with ILSVRC2012_img_train.tar "
                     f"and ILSVRC2012_img_val.tar.")
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def convert(name: str, data_dir: str) -> None:
  """Rewrites a dataset prepared as tfrecord as array_record, beside the tfrecord files."""
  try:  # tfds' converter module needs apache_beam at import, even when not using Beam.
    from tensorflow_datasets.scripts.cli import convert_format_utils
  except ImportError as e:
    raise SystemExit(f"--convert needs tfds' converter, which imports apache_beam: "
                     f"`pip install apache-beam` first ({e}).") from e
  version_dir = sources.find_version_dir(data_dir, name)
  if version_dir is None:
    raise SystemExit(f"{name} is not prepared in {data_dir}.")
  convert_format_utils.convert_dataset(out_dir=None, out_file_format="array_record",
                                       dataset_version_dir=version_dir)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m care_jax.data.prepare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("name", choices=sources.TFDS_DATASETS)
  parser.add_argument("--data_dir", default=None,
                      help="where to write (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--manual_dir", default=None, help="folder with the ILSVRC2012 tars")
  parser.add_argument("--convert", action="store_true",
                      help="convert an existing tfrecord preparation to array_record")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  data_dir = sources.resolve_data_dir(args.data_dir)
  if args.convert:
    convert(args.name, data_dir)
  else:
    prepare(args.name, data_dir, args.manual_dir)
  print(f"{args.name} is ready in {sources.find_version_dir(data_dir, args.name)}")


if __name__ == "__main__":
  main()
