"""Scoring generators, as big_vision's evaluators/: one package, one module per part.

  registry.py           the metrics, one entry each: network, inputs, scores (which way better),
                        the function computing them. A new metric is one entry there.
  evaluator.py          Settings, the Evaluator (compiled once, called repeatedly), compute_scores
  features.py           feature networks (FeatureNet), sharded sampling and features, FeatureSet,
                        standing statistics
  metrics.py            FID, IS, KID, precision/recall: the math, float64 on the host; reference
                        statistics files
  inception.py          pytorch-fid's FID Inception-v3 in Flax
  inception_weights.py  its weights: torch names, the converted .npz, where the file is found
  pth.py                torch .pth files without torch
  per_class.py          per-class figures: class_accuracy's table, intra-class FD, their reports
  classifier.py         the small classifier network and its .npz (trained by sagan_jax.classifier)

The command-line tools over it (sagan_jax.evaluate, .reference_stats, .classifier, .inception)
live outside it: this package imports no tool, no absl flags and no TensorFlow. Its public API,
below, is what the training loop and the tools use; importing the package loads none of its
modules until a name is used (jax and flax load with most of them).
"""

import importlib

# Name -> the module of this package that defines it.
_EXPORTS = {
    'Settings': 'evaluator',
    'settings_from_config': 'evaluator',
    'check_settings': 'evaluator',
    'create_evaluator': 'evaluator',
    'format_scores': 'evaluator',
    'metric_of_score': 'registry',
    'worst_class_summary': 'per_class',
    'class_accuracy_scalars': 'per_class',
}
__all__ = tuple(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
