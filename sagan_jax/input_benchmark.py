"""Times the training input pipeline alone: the real training iterator of a config, no model.

  python -m sagan_jax.benchmark --config=configs/imagenet.py --input_only \
      --config.data.tfds_data_dir=DATA_DIR [--steps=200 --warmup=20] [--resume_at=0,0.5,0.99]

It reports the images/s one process's iterator delivers after warm-up (decode, crop, resize, flip,
batch: everything up to the host batch the loop hands to the devices), per host core, and the time
from creating an iterator to its first batch, fresh and resumed at a share of the epoch
(`--resume_at`). tools/input_bench.py runs it on generated JPEG folders, tfds mock data and
Fashion-MNIST.
"""

import time
from typing import Any, Dict, Sequence


def _first_batch_seconds(config, position: int) -> float:
  from sagan_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  iterator = input_pipeline.create_train_iterator(config, seed=config.seed, position=position)
  next(iterator)
  return time.perf_counter() - start


def run_input_benchmark(config, steps: int = 100, warmup: int = 10,
                        resume_at: Sequence[float] = ()) -> Dict[str, Any]:
  """Times `steps` host batches of the training iterator after `warmup`; returns the numbers."""
  from sagan_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  iterator = input_pipeline.create_train_iterator(config, seed=config.seed)
  batch = next(iterator)
  first_s = time.perf_counter() - start
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(iterator)
  seconds = time.perf_counter() - start
  images = steps * batch['label'].size
  cores = input_pipeline.host_cores()
  epoch = iterator.epoch_size
  resumed = {f'{share:g}': _first_batch_seconds(config, int(share * epoch)) for share in resume_at}
  return {
      'data': config.data.name, 'resolution': config.data.resolution,
      'images_per_batch': int(batch['label'].size), 'steps': steps, 'warmup': warmup,
      'images_per_s': images / seconds, 'host_cores': cores,
      'images_per_s_per_core': images / seconds / cores, 'epoch_size': epoch,
      'first_batch_s': first_s, 'first_batch_s_resumed_at': resumed}


def format_report(results: Dict[str, Any]) -> str:
  lines = [f"{results['data']} at {results['resolution']} px, "
           f"{results['images_per_batch']} images per host batch, {results['host_cores']} cores:",
           f"  {results['images_per_s']:.0f} images/s ({results['images_per_s_per_core']:.0f} "
           f"per core) over {results['steps']} batches after {results['warmup']}",
           f"  first batch: {results['first_batch_s']:.2f} s fresh"]
  for share, seconds in results['first_batch_s_resumed_at'].items():
    lines.append(f'  first batch resumed at {float(share):.0%} of the epoch '
                 f"({results['epoch_size']} images): {seconds:.2f} s")
  return '\n'.join(lines)
