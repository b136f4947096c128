"""The FID Inception's weights: pytorch-fid's .pth (torch names) or a converted .npz, and where
to find them.

pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` is read without torch (sagan_jax.evaluation.
pth) and its state_dict names and layouts are mapped onto the Flax variables of
sagan_jax.evaluation.inception; `python -m sagan_jax.inception` writes them as an .npz (one array
per variable, named 'params/Mixed_5b/.../kernel'), which loads without the mapping. The path comes
from eval.inception_path, else $SAGAN_INCEPTION_PATH; without a file the Inception metrics are
skipped with one log line that says where to download it.
"""

import functools
import logging
import os
import zipfile
from typing import Mapping, Optional, Tuple

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from sagan_jax.errors import ConfigError
from sagan_jax.evaluation import pth
from sagan_jax.evaluation.inception import FIDInceptionV3
from sagan_jax.evaluation.inception import INPUT_SIZE
from sagan_jax.evaluation.inception import Variables

PTH_NAME = 'pt_inception-2015-12-05-6726825d.pth'
PTH_URL = f'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PTH_NAME}'
ENV_VAR = 'SAGAN_INCEPTION_PATH'


# ----------------------------------------------------------------------------------------------
# Torch state_dict names <-> Flax variables.


def _flax_to_torch(path: Tuple[str, ...]) -> Tuple[str, str]:
  """('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel') -> ('Mixed_5b.branch1x1.conv.weight',
  transpose) where transpose names how the torch array becomes the Flax one."""
  collection, *modules, leaf = path
  if not modules:  # The fc layer's two parameters live at the top.
    return {'fc_kernel': ('fc.weight', 'linear'), 'fc_bias': ('fc.bias', '')}[leaf]
  torch_leaf, transpose = {
      ('params', 'kernel'): ('weight', 'conv'), ('params', 'scale'): ('weight', ''),
      ('params', 'bias'): ('bias', ''), ('batch_stats', 'mean'): ('running_mean', ''),
      ('batch_stats', 'var'): ('running_var', '')}[(collection, leaf)]
  return '.'.join(modules + [torch_leaf]), transpose


def _to_flax(array: np.ndarray, transpose: str) -> np.ndarray:
  if transpose == 'conv':  # OIHW -> HWIO
    return array.transpose(2, 3, 1, 0)
  return array.T if transpose == 'linear' else array


@functools.lru_cache(maxsize=None)
def _variable_specs() -> Tuple[Tuple[Tuple[str, ...], Tuple[int, ...], str, str], ...]:
  """(Flax path, Flax shape, torch key, transpose) of every variable, in torch's state_dict order.

  Flax creates the variables in call order, which is the order torchvision registers the modules
  (tests check it against torch's state_dict); abstract evaluation builds no arrays.
  """
  creation_order = []

  def init_fn():
    variables = FIDInceptionV3().init(jax.random.PRNGKey(0),
                                      jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))
    creation_order.extend(('params',) + path
                          for path in traverse_util.flatten_dict(variables['params']))
    return variables

  shapes = traverse_util.flatten_dict(jax.eval_shape(init_fn))
  specs = []
  for path in creation_order:
    paths = [path]
    if path[-1] == 'bias' and path[-2] == 'bn':  # BN's moving statistics follow its beta.
      paths += [('batch_stats',) + path[1:-1] + (leaf,) for leaf in ('mean', 'var')]
    for p in paths:
      specs.append((p, tuple(shapes[p].shape)) + _flax_to_torch(p))
  return tuple(specs)


def _torch_shape(shape: Tuple[int, ...], transpose: str) -> Tuple[int, ...]:
  if transpose == 'conv':
    return (shape[3], shape[2], shape[0], shape[1])
  return shape[::-1] if transpose == 'linear' else shape


def torch_layout() -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
  """(key, shape) of pytorch-fid's FID Inception state_dict in its order, BN counters included."""
  layout = []
  for _, shape, key, transpose in _variable_specs():
    layout.append((key, _torch_shape(shape, transpose)))
    if key.endswith('.bn.running_var'):
      layout.append((key[:-len('running_var')] + 'num_batches_tracked', ()))
  return tuple(layout)


def variables_from_torch(state_dict: Mapping[str, np.ndarray], source: str) -> Variables:
  """Flax variables from a pytorch-fid state_dict; ConfigError naming `source` if it is not one."""
  expected = {key for key, _ in torch_layout()}
  unexpected = sorted(set(state_dict) - expected)
  if unexpected:
    raise ConfigError(f'{source}: unexpected entry {unexpected[0]!r} ({len(unexpected)} in all): '
                      f'not the FID Inception weights {PTH_NAME}')
  items = []
  for path, shape, key, transpose in _variable_specs():
    if key not in state_dict:
      raise ConfigError(f'{source}: missing {key!r}: not the FID Inception weights {PTH_NAME}')
    array = np.asarray(state_dict[key])
    if array.shape != _torch_shape(shape, transpose):
      raise ConfigError(f'{source}: {key} has shape {array.shape}, expected '
                        f'{_torch_shape(shape, transpose)}: not the FID Inception weights')
    items.append((path, np.array(_to_flax(array, transpose), np.float32, order='C')))
  return traverse_util.unflatten_dict(dict(items))


def _variables_from_npz(path: str) -> Variables:
  with np.load(path, allow_pickle=False) as npz:
    arrays = {name: npz[name] for name in npz.files}
  items = []
  for flax_path, shape, _, _ in _variable_specs():
    name = '/'.join(flax_path)
    if name not in arrays:
      raise ConfigError(f'{path}: missing {name!r}: not FID Inception weights (convert '
                        f'{PTH_NAME} with `python -m sagan_jax.inception '
                        '--inception_path=... --out=...`)')
    if arrays[name].shape != shape:
      raise ConfigError(f'{path}: {name} has shape {arrays[name].shape}, expected {shape}')
    items.append((flax_path, arrays.pop(name).astype(np.float32)))
  if arrays:
    raise ConfigError(f'{path}: unexpected array {sorted(arrays)[0]!r}: not FID Inception weights')
  return traverse_util.unflatten_dict(dict(items))


def save_npz(variables: Variables, path: str) -> None:
  """Writes the canonical .npz: one array per variable, named 'params/Mixed_5b/.../kernel'."""
  np.savez(path, **{k: np.asarray(v)
                    for k, v in traverse_util.flatten_dict(variables, sep='/').items()})


def load_variables(path: str) -> Variables:
  """Flax variables from pytorch-fid's .pth or a converted .npz; ConfigError when unusable."""
  if not os.path.isfile(path):
    raise ConfigError(missing_weights_message(path))
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as zf:
        is_npz = any(name.endswith('.npy') for name in zf.namelist())
      if is_npz:
        return _variables_from_npz(path)
    return variables_from_torch(pth.load_state_dict(path), path)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f'{path}: cannot read FID Inception weights ({type(e).__name__}: {e}); '
                      f'download {PTH_NAME} again') from e


# ----------------------------------------------------------------------------------------------
# Finding the weights.


def inception_weights_path(configured: Optional[str] = None) -> Optional[str]:
  """The configured path (eval.inception_path), else $SAGAN_INCEPTION_PATH, else None."""
  return configured or os.environ.get(ENV_VAR) or None


def missing_weights_message(path: Optional[str]) -> str:
  where = f'at {path}' if path else f'(eval.inception_path and ${ENV_VAR} are unset)'
  return (f'Inception weights not found {where}: download {PTH_NAME} from the pytorch-fid release '
          f'({PTH_URL}) on a machine with internet and set eval.inception_path or ${ENV_VAR} '
          'to its path')


def load_inception_or_none(configured: Optional[str] = None) -> Optional[Variables]:
  """The FID Inception variables, or None (with a logged one-line reason) when there is no file.

  Callers skip the Inception metrics on None. A file that is there but unusable raises ConfigError.
  """
  path = inception_weights_path(configured)
  if path is None or not os.path.isfile(path):
    logging.warning('%s; Inception metrics are skipped.', missing_weights_message(path))
    return None
  return load_variables(path)
