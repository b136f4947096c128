"""SAGAN's networks as data: per-resolution channel tables, where attention may go, and the checks
that a model config can be built (models.py builds the networks from them).

ARCHITECTURES follows the authors' ResNet SAGAN (docs/recipe.md) and BigGAN's per-resolution
tables; model.g_widths and model.d_widths replace a table's multipliers.
"""

import dataclasses
from typing import Tuple

import jax

from sagan_jax import attention as attention_lib
from sagan_jax import layers
from sagan_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Architecture:
  """Channel multipliers of `ch` for one resolution.

  g_widths[0] is the width of G's 4x4 input map; G's block i maps g_widths[i] -> g_widths[i + 1]
  and doubles the resolution. D's block i outputs d_widths[i] channels, halving the resolution
  when d_downsample[i]; D's block 0 is the "optimized" block that reads the image.
  """
  g_widths: Tuple[int, ...]
  d_widths: Tuple[int, ...]
  d_downsample: Tuple[bool, ...]


ARCHITECTURES = {
    32: Architecture((4, 4, 4, 4), (4, 4, 4, 4), (True, True, False, False)),
    64: Architecture((16, 16, 8, 4, 2), (1, 2, 4, 8, 16), (True,) * 4 + (False,)),
    128: Architecture((16, 16, 8, 4, 2, 1), (1, 2, 4, 8, 16, 16), (True,) * 5 + (False,)),
    256: Architecture((16, 16, 8, 8, 4, 2, 1), (1, 2, 4, 8, 8, 16, 16), (True,) * 6 + (False,)),
}


def get_architecture(resolution: int) -> Architecture:
  if resolution not in ARCHITECTURES:
    raise ConfigError(f'unknown resolution {resolution}: set --config.data.resolution to one of '
                      f'{sorted(ARCHITECTURES)}')
  return ARCHITECTURES[resolution]


def architecture(model_config, resolution: int) -> Architecture:
  """The resolution's architecture, with model.g_widths and model.d_widths (multipliers of ch, one
  per G map and one per D block) in place of ARCHITECTURES' when set."""
  arch = get_architecture(resolution)
  # Configs saved in checkpoints before the fields existed lack them.
  return dataclasses.replace(arch,
                             g_widths=tuple(model_config.get('g_widths', ())) or arch.g_widths,
                             d_widths=tuple(model_config.get('d_widths', ())) or arch.d_widths)


def g_block_resolutions(resolution: int) -> Tuple[int, ...]:
  """Output resolutions of G's blocks (where G's attention may go)."""
  n = len(get_architecture(resolution).g_widths) - 1
  return tuple(4 * 2**(i + 1) for i in range(n))


def d_block_resolutions(resolution: int) -> Tuple[int, ...]:
  """Output resolutions of D's blocks (where D's attention may go)."""
  out, res = [], resolution
  for down in get_architecture(resolution).d_downsample:
    res = res // 2 if down else res
    out.append(res)
  return tuple(out)


def d_block_input_resolutions(resolution: int) -> Tuple[int, ...]:
  """Input resolutions of D's blocks: block 0 reads the image, block i block i - 1's output."""
  return (resolution,) + d_block_resolutions(resolution)[:-1]


DTYPES = ('float32', 'bfloat16')  # Computation dtypes; parameters and statistics stay float32.


def attention_widths(model_config, resolution: int) -> Tuple[int, ...]:
  """Channels of the feature maps that G's and D's attention layers read."""
  arch = architecture(model_config, resolution)
  g = [m * model_config.ch for m, res in zip(arch.g_widths[1:], g_block_resolutions(resolution))
       if res in model_config.g_attention]
  d = [m * model_config.ch for m, res in zip(arch.d_widths, d_block_resolutions(resolution))
       if res in model_config.d_attention]
  return tuple(g + d)


def _block_size(model_config) -> int:
  # Configs saved in checkpoints before the field existed lack it.
  return model_config.get('attention_block_size', attention_lib.DEFAULT_BLOCK_SIZE)


def _check_attention_impl(model_config, resolution: int) -> None:
  impl = model_config.attention_impl
  if impl not in attention_lib.ATTENTION_CHOICES:
    raise ConfigError(f"unknown model.attention_impl '{impl}': set --config.model.attention_impl "
                      f'to one of {sorted(attention_lib.ATTENTION_CHOICES)}')
  if _block_size(model_config) < 1:
    raise ConfigError(f'model.attention_block_size={_block_size(model_config)} must be '
                      'positive: set --config.model.attention_block_size=512')
  if impl != 'cudnn':
    return
  if jax.default_backend() != 'gpu':
    raise ConfigError(f"model.attention_impl 'cudnn' runs on GPUs only (this backend is "
                      f"{jax.default_backend()}): set --config.model.attention_impl=blockwise")
  if model_config.dtype != 'bfloat16':
    raise ConfigError("model.attention_impl 'cudnn' has no float32 kernel: set "
                      '--config.model.dtype=bfloat16 or --config.model.attention_impl=blockwise')
  if any(c % 64 for c in attention_widths(model_config, resolution)):
    raise ConfigError("model.attention_impl 'cudnn' needs attention head sizes C/8 that are "
                      'multiples of 8: set --config.model.ch to a multiple of 64 or '
                      '--config.model.attention_impl=blockwise')


def _check_widths(model_config, resolution: int) -> None:
  default = get_architecture(resolution)
  for net, field, what in (('G', 'g_widths', 'its 4x4 input map and each block'),
                           ('D', 'd_widths', 'each block')):
    widths, standard = tuple(model_config.get(field, ())), getattr(default, field)
    if widths and (len(widths) != len(standard) or
                   not all(isinstance(m, int) and m > 0 for m in widths)):
      raise ConfigError(
          f'model.{field}={widths}: at {resolution} px {net} needs {len(standard)} positive '
          f'integers (channel multipliers of ch for {what}): set --config.model.{field} to '
          f"{len(standard)} numbers, e.g. '{standard}' (the default)")


def check_model_config(model_config, resolution: int) -> None:
  """Raises ConfigError for settings the networks cannot be built with."""
  _check_widths(model_config, resolution)
  layers.create_kernel_init(model_config.init)
  if model_config.dtype not in DTYPES:
    raise ConfigError(f"unknown model.dtype '{model_config.dtype}': set --config.model.dtype to "
                      f"one of {list(DTYPES)}")
  for net, field, valid in (('G', 'g_attention', g_block_resolutions(resolution)),
                            ('D', 'd_attention', d_block_resolutions(resolution))):
    for res in getattr(model_config, field):
      if res not in valid or res < 2:
        raise ConfigError(
            f'{net} has no {res}x{res} feature map at {resolution} px: set --config.model.{field} '
            f'to resolutions among {sorted(set(r for r in valid if r >= 2))} (or an empty tuple)')
  if model_config.ch % 8:
    raise ConfigError(f'model.ch={model_config.ch} must be a multiple of 8 (attention uses C/8)')
  chunks = len(get_architecture(resolution).g_widths)  # One per G block + the input layer.
  if model_config.get('g_shared_embedding', 0) and model_config.z_dim % chunks:
    raise ConfigError(f'model.g_shared_embedding cuts z into {chunks} chunks at {resolution} px: '
                      f'set --config.model.z_dim to a multiple of {chunks}, e.g. '
                      f'{chunks * max(1, round(model_config.z_dim / chunks))}')
  _check_attention_impl(model_config, resolution)
  _check_stages(progressive_resolutions(model_config), resolution)


def progressive_resolutions(model_config) -> Tuple[int, ...]:
  # Configs saved in checkpoints before progressive growing existed lack the field.
  return tuple(model_config.get('progressive_resolutions', ()))


def _check_stages(stages: Tuple[int, ...], resolution: int) -> None:
  """Progressive growing's stages double from 8 px or more (G's first block) to the data's."""
  if not stages:
    return
  if (len(stages) < 2 or stages[0] < 8 or stages[-1] != resolution
      or any(b != 2 * a for a, b in zip(stages, stages[1:]))):
    example = tuple(resolution >> k for k in reversed(range(min(3, resolution.bit_length() - 3))))
    raise ConfigError(f'model.progressive_resolutions={stages} must double at each stage from 8 '
                      f'px or more up to data.resolution={resolution}: set '
                      f'--config.model.progressive_resolutions="{example}" (or "()": no growing)')
