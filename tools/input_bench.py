"""Measures the training input pipeline on generated and real data (README's input table).

  .venv/bin/python tools/input_bench.py [--images=3000] [--steps=100] [--resume_at=0,0.5,0.99]

Cases (each the real training iterator of a config, no model; sagan_jax.input_benchmark):
- folder-128, folder-256: a folder of `--images` JPEGs of 500x375 px at quality 90 (ImageNet-like
  sizes and file weights: smooth random shapes and noise, about 60-90 KB each), in a temp dir;
- imagenet2012-128: a prepared tfds `imagenet2012` (TFRecord files, 16 shards, as
  launch/prepare_tfds.sh writes them) of `--records` examples whose images are those JPEGs;
- fashion_mnist: the demo's data (/usr/share/datasets/fashion-mnist), when installed.
Run it on an idle machine: the pipeline uses every core.
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_jpeg_folder(root: str, count: int, classes: int = 10, seed: int = 0) -> None:
  """`count` 500x375 JPEGs (quality 90) in `classes` subfolders: smooth colour fields + noise."""
  rng = np.random.default_rng(seed)
  for i in range(count):
    folder = os.path.join(root, f'class_{i % classes:02d}')
    os.makedirs(folder, exist_ok=True)
    coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.BICUBIC), np.float32)
    image += rng.normal(0, 12, image.shape)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
        os.path.join(folder, f'{i:06d}.jpg'), quality=90)


def make_tfds_imagenet(data_dir: str, jpegs, count: int, shards: int = 16) -> None:
  """A prepared tfds imagenet2012 'train' split of `count` records cycling through `jpegs`."""
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  import tensorflow_datasets as tfds
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  template = tfds.core.ShardedFileTemplate(data_dir=builder.data_path, dataset_name='imagenet2012',
                                           split='train', filetype_suffix='tfrecord')
  builder.data_path.mkdir(parents=True)
  features, per_shard, encoded = builder.info.features, count // shards, {}
  for shard in range(shards):
    path = template.sharded_filepath(shard_index=shard, num_shards=shards)
    with tf.io.TFRecordWriter(os.fspath(path)) as writer:
      for k in range(shard * per_shard, (shard + 1) * per_shard):
        jpeg = jpegs[k % len(jpegs)]
        if jpeg not in encoded:
          with open(jpeg, 'rb') as f:
            encoded[jpeg] = f.read()
        writer.write(features.serialize_example({
            'image': encoded[jpeg], 'label': k % 1000, 'file_name': f'{k:08d}.JPEG'}))
  builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name='train', shard_lengths=[per_shard] * shards, num_bytes=0, filename_template=template)]))
  builder.info.write_to_directory(builder.data_path)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--images', type=int, default=3000)
  parser.add_argument('--records', type=int, default=20000)
  parser.add_argument('--steps', type=int, default=100)
  parser.add_argument('--warmup', type=int, default=10)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--resume_at', default='0,0.5,0.99')
  parser.add_argument('--cases',
                      default='folder-128,folder-256,imagenet2012-128,fashion_mnist')
  parser.add_argument('--jpeg_downscale', type=int, default=1, help='data.jpeg_downscale')
  parser.add_argument('--json_out', default=None)
  args = parser.parse_args()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # pylint: disable=g-import-not-at-top
  from configs import fashion_mnist
  from configs import imagenet
  from sagan_jax import input_benchmark
  shares = [float(x) for x in args.resume_at.split(',') if x]
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for case in args.cases.split(','):
      config = fashion_mnist.get_config() if case == 'fashion_mnist' else imagenet.get_config()
      config.train.batch_size, config.train.d_steps = args.batch_size, 1
      config.data.jpeg_downscale = bool(args.jpeg_downscale)
      folder = os.path.join(tmp, 'jpegs')
      if case != 'fashion_mnist' and not os.path.isdir(folder):
        make_jpeg_folder(folder, args.images)
      if case.startswith('folder'):
        config.data.name, config.data.folder_dir, config.data.num_classes = 'folder', folder, 10
      elif case.startswith('imagenet2012'):
        data_dir = os.path.join(tmp, 'tfds')
        if not os.path.isdir(data_dir):
          jpegs = sorted(os.path.join(r, n) for r, _, names in os.walk(folder) for n in names)
          make_tfds_imagenet(data_dir, jpegs, args.records)
        config.data.tfds_data_dir = data_dir
      if case != 'fashion_mnist':
        config.data.resolution = int(case.split('-')[1])
      results[case] = input_benchmark.run_input_benchmark(config, args.steps, args.warmup, shares)
      print(input_benchmark.format_report(results[case]), flush=True)
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
