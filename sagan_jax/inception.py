"""The FID Inception-v3 in Flax: pytorch-fid's network layer for layer, its weights and a converter.

The network is pytorch-fid's `fid_inception_v3()` (a port of TF's 2015-12-05 Inception graph):
torchvision's Inception-v3 stem and B/D blocks, the FID variants of the A, C and E blocks (average
pools that ignore padding, a max pool in Mixed_7c's pool branch), BN eps 1e-3 and 1008 logits.
Inputs follow pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`: NHWC images
in [0, 1] (float) or [0, 255] (uint8), bilinear resize to 299x299 as torch's
`interpolate(mode='bilinear', align_corners=False)` (no antialiasing), then scaling to [-1, 1].

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (read without torch by
sagan_jax.pth) or a `.npz` of the Flax variables written by the converter:

  python -m sagan_jax.inception --inception_path=pt_inception-2015-12-05-6726825d.pth \
      --out=inception.npz

Convolutions run at `Precision.HIGHEST`: the TPU default (one bfloat16 pass) and TF32 on GPUs move
the 2048-d features far more than FID's comparability allows.
"""

import sys

from absl import flags

from sagan_jax import cli

PTH_NAME = 'pt_inception-2015-12-05-6726825d.pth'

CONVERTER_DOC = f"""Converts pytorch-fid's {PTH_NAME} to the Flax .npz this package loads.

  python -m sagan_jax.inception --inception_path={PTH_NAME} --out=inception.npz
"""


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('inception_path', None, "pytorch-fid's state_dict (.pth).", flag_values=fv)
  flags.DEFINE_string('out', None, 'Output .npz of the Flax variables.', flag_values=fv)


# --help answers before the imports below load jax and flax (seconds).
if __name__ == '__main__':
  cli.exit_if_help(CONVERTER_DOC, define_flags)

# pylint: disable=g-import-not-at-top,wrong-import-position
import functools
import logging
import os
import zipfile
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sagan_jax import pth
from sagan_jax.errors import ConfigError

PTH_URL = f'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PTH_NAME}'
ENV_VAR = 'SAGAN_INCEPTION_PATH'
INPUT_SIZE = 299
HIGHEST = jax.lax.Precision.HIGHEST

Variables = Dict[str, Any]


# ----------------------------------------------------------------------------------------------
# The network.


def _pair(v) -> Tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d: conv without bias, BN (eps 1e-3, moving statistics), ReLU."""
  features: int
  kernel_size: Any
  strides: int = 1
  padding: Any = 0
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, _pair(self.kernel_size), self.strides,
                [(p, p) for p in _pair(self.padding)], use_bias=False, precision=self.precision,
                name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # TF's average pool divides by the number of real (unpadded) inputs. (The divisor's dtype
  # follows jax_enable_x64; the cast keeps float32 float32.)
  pooled = nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)
  return pooled.astype(x.dtype)


def _max_pool_3x3_stride_2(x):
  return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):
  """FIDInceptionA (Mixed_5b-d)."""
  pool_features: int
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(64, 1, name='branch1x1')(x)
    b5 = conv(48, 1, name='branch5x5_1')(x)
    b5 = conv(64, 5, padding=2, name='branch5x5_2')(b5)
    b3 = conv(64, 1, name='branch3x3dbl_1')(x)
    b3 = conv(96, 3, padding=1, name='branch3x3dbl_2')(b3)
    b3 = conv(96, 3, padding=1, name='branch3x3dbl_3')(b3)
    bp = conv(self.pool_features, 1, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """torchvision's InceptionB (Mixed_6a): 35x35 -> 17x17."""
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(384, 3, strides=2, name='branch3x3')(x)
    bd = conv(64, 1, name='branch3x3dbl_1')(x)
    bd = conv(96, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = conv(96, 3, strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride_2(x)], axis=-1)


class InceptionC(nn.Module):
  """FIDInceptionC (Mixed_6b-e): factorized 7x7 convolutions."""
  channels_7x7: int
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, 1, name='branch1x1')(x)
    b7 = conv(c7, 1, name='branch7x7_1')(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = conv(c7, 1, name='branch7x7dbl_1')(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = conv(192, 1, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """torchvision's InceptionD (Mixed_7a): 17x17 -> 8x8."""
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(192, 1, name='branch3x3_1')(x)
    b3 = conv(320, 3, strides=2, name='branch3x3_2')(b3)
    b7 = conv(192, 1, name='branch7x7x3_1')(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = conv(192, 3, strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride_2(x)], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (pool='avg', Mixed_7b) and FIDInceptionE_2 (pool='max', Mixed_7c)."""
  pool: str
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(320, 1, name='branch1x1')(x)
    b3 = conv(384, 1, name='branch3x3_1')(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                          conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], axis=-1)
    bd = conv(448, 1, name='branch3x3dbl_1')(x)
    bd = conv(384, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                          conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)], axis=-1)
    if self.pool == 'avg':
      pooled = _avg_pool_3x3(x)
    else:  # The TF graph's Mixed_7c pools with max (pytorch-fid keeps this quirk).
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    bp = conv(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] weights of torch's bilinear interpolate (align_corners=False) on one axis.

  Half-pixel centres, source positions below 0 clamped to 0, no antialiasing on downscale: the same
  as `jax.image.resize(..., antialias=False)`, whereas its default (antialias=True) averages over
  more pixels when downscaling. Weights in float32, as torch's float32 kernel computes them.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  src = np.maximum(src, np.float32(0))
  lower = np.minimum(src.astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  frac = src - lower.astype(np.float32)
  weights = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lower), np.float32(1) - frac)
  np.add.at(weights, (rows, upper), frac)
  return weights


def resize_bilinear(images, size: Tuple[int, int], precision=HIGHEST):
  """Resizes NHWC `images` to `size` as torch's bilinear interpolate with align_corners=False."""
  height, width = images.shape[1:3]
  if (height, width) == tuple(size):
    return images
  rows = jnp.asarray(resize_matrix(height, size[0]))
  cols = jnp.asarray(resize_matrix(width, size[1]))
  return jnp.einsum('oh,nhwc,pw->nopc', rows, images, cols, precision=precision)


def preprocess(images, precision=HIGHEST):
  """pytorch-fid's input transform: [0, 1] (or uint8 [0, 255]) -> 299x299 in [-1, 1].

  One-channel images are repeated to RGB, as pytorch-fid's loader converts them to RGB.
  """
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 255.0
  images = images.astype(jnp.float32)
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  images = resize_bilinear(images, (INPUT_SIZE, INPUT_SIZE), precision)
  return 2.0 * images - 1.0


class FIDInceptionV3(nn.Module):
  """pytorch-fid's FID Inception-v3 on NHWC images; returns pool3 features and logits.

  Images: float in [0, 1] (a generator's tanh output x goes in as (x + 1) / 2) or uint8, any
  size (resized to 299x299), 3 channels or 1 (repeated). Returns a dict: 'pool3' [N, 2048] (the
  global average pool FID uses), 'logits' [N, 1008] (the fc layer with its bias) and
  'logits_unbiased' [N, 1008] (without the bias: what the original Inception Score code and
  torch-fidelity take the softmax of). The outputs of pytorch-fid's blocks 0-2 are sown as
  'intermediates' ('block0': 64, 'block1': 192, 'block2': 768 channels).
  """
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, images):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    x = preprocess(images, self.precision)
    x = conv(32, 3, strides=2, name='Conv2d_1a_3x3')(x)
    x = conv(32, 3, name='Conv2d_2a_3x3')(x)
    x = conv(64, 3, padding=1, name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_stride_2(x)
    self.sow('intermediates', 'block0', x)
    x = conv(80, 1, name='Conv2d_3b_1x1')(x)
    x = conv(192, 3, name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_stride_2(x)
    self.sow('intermediates', 'block1', x)
    for name, pool_features in (('Mixed_5b', 32), ('Mixed_5c', 64), ('Mixed_5d', 64)):
      x = InceptionA(pool_features, self.precision, name=name)(x)
    x = InceptionB(self.precision, name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(c7, self.precision, name=name)(x)
    self.sow('intermediates', 'block2', x)
    x = InceptionD(self.precision, name='Mixed_7a')(x)
    x = InceptionE('avg', self.precision, name='Mixed_7b')(x)
    x = InceptionE('max', self.precision, name='Mixed_7c')(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    kernel = self.param('fc_kernel', nn.initializers.lecun_normal(), (pool3.shape[-1], 1008))
    bias = self.param('fc_bias', nn.initializers.zeros, (1008,))
    logits_unbiased = jnp.dot(pool3, kernel, precision=self.precision)
    return {'pool3': pool3, 'logits': logits_unbiased + bias, 'logits_unbiased': logits_unbiased}


def create_inception_fn(variables: Variables,
                        precision=HIGHEST) -> Callable[[Any], Dict[str, jax.Array]]:
  """A jitted `images -> {'pool3', 'logits', 'logits_unbiased'}` with `variables` bound.

  The variables are an argument of the compiled function, not constants baked into it.
  """
  apply_fn = jax.jit(FIDInceptionV3(precision).apply)
  return lambda images: apply_fn(variables, images)


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
    creation_order.extend(path for path, _ in _flatten(variables['params'], ('params',)))
    return variables

  shapes = dict(_flatten(jax.eval_shape(init_fn)))
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


def _flatten(tree: Mapping, prefix: Tuple[str, ...] = ()):
  for name, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (name,))
    else:
      yield prefix + (name,), value


def _unflatten(items) -> Variables:
  tree = {}
  for path, value in items:
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return tree


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
  return _unflatten(items)


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
  return _unflatten(items)


def save_npz(variables: Variables, path: str) -> None:
  """Writes the canonical .npz: one array per variable, named 'params/Mixed_5b/.../kernel'."""
  np.savez(path, **{'/'.join(p): np.asarray(v) for p, v in _flatten(variables)})


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


# ----------------------------------------------------------------------------------------------
# The converter CLI.


def convert(fv: flags.FlagValues) -> int:
  """The tool: reads the .pth (ConfigError if it is not the FID Inception) and writes the .npz."""
  variables = load_variables(fv.inception_path)
  save_npz(variables, fv.out)
  count = sum(1 for _ in _flatten(variables))
  print(f'wrote {fv.out}: {count} arrays (params and batch_stats) from {fv.inception_path}')
  return 0


def main(argv=None) -> int:
  return cli.run_tool(CONVERTER_DOC, define_flags, convert, argv,
                      required=('inception_path', 'out'))


if __name__ == '__main__':
  sys.exit(main())
