"""Generator and Discriminator: shapes and ranges at every resolution, parameter counts, errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from sagan_jax import architectures
from sagan_jax import models
from sagan_jax.errors import ConfigError


def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def small_config(resolution: int, g_attention=(), d_attention=()):
  config = default.get_config()
  config.data.resolution = resolution
  config.data.num_classes = 5
  config.model.ch = 8
  config.model.g_attention = g_attention
  config.model.d_attention = d_attention
  return config


def variable_shapes(config):
  """Shapes of G's and D's variables (every collection), built without computing anything."""
  generator, discriminator = models.create_models(config)
  res, channels = config.data.resolution, config.data.channels
  labels = jnp.zeros((2,), jnp.int32)
  g = jax.eval_shape(lambda: generator.init(
      jax.random.PRNGKey(0), jnp.zeros((2, config.model.z_dim)), labels, train=True))
  d = jax.eval_shape(lambda: discriminator.init(
      jax.random.PRNGKey(0), jnp.zeros((2, res, res, channels)), labels, update_sn=True))
  return g, d


@pytest.mark.parametrize('resolution,attention', [(32, 16), (64, 32), (128, 64), (256, 128)])
def test_shapes_and_ranges_at_every_resolution(resolution, attention):
  config = small_config(resolution, (attention,), (attention,))
  generator, discriminator = models.create_models(config)
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 128))
  labels = jnp.array([0, 4])
  if resolution > 32:  # Shapes only: running these op by op costs minutes on 2 cores.
    g_vars = jax.eval_shape(lambda: generator.init(jax.random.PRNGKey(1), z, labels, train=True))
    images = jax.eval_shape(lambda v: generator.apply(v, z, labels, train=False), g_vars)
    d_vars = jax.eval_shape(
        lambda x: discriminator.init(jax.random.PRNGKey(2), x, labels, update_sn=True), images)
    logits = jax.eval_shape(
        lambda v, x: discriminator.apply(v, x, labels, update_sn=False), d_vars, images)
  else:
    g_vars = generator.init(jax.random.PRNGKey(1), z, labels, train=True)
    images = generator.apply(g_vars, z, labels, train=False)
    assert float(jnp.min(images)) >= -1.0 and float(jnp.max(images)) <= 1.0
    assert float(jnp.std(images)) > 0.0
    d_vars = discriminator.init(jax.random.PRNGKey(2), images, labels, update_sn=True)
    logits = discriminator.apply(d_vars, images, labels, update_sn=False)
    assert np.all(np.isfinite(logits))
  assert images.shape == (2, resolution, resolution, 3)
  assert logits.shape == (2,) and logits.dtype == jnp.float32
  assert f'attention{attention}' in g_vars['params']
  assert f'attention{attention}' in d_vars['params']


def test_both_attention_placements_build_at_128():
  for res in (32, 64):
    config = small_config(128, (res,), (res,))
    architectures.check_model_config(config.model, 128)
  # The official code's 32x32 placement: G's 4ch block and D's 2ch block.
  config = default.get_config()
  config.model.g_attention, config.model.d_attention = (32,), (32,)
  g_shapes, d_shapes = variable_shapes(config)
  assert g_shapes['params']['attention32']['theta']['kernel'].shape == (1, 1, 256, 32)
  assert d_shapes['params']['attention32']['theta']['kernel'].shape == (1, 1, 128, 16)


def test_d_attention_on_a_map_several_blocks_keep_is_placed_once():
  """At 32 px D's blocks 1-3 all output 8x8 maps: attention at 8 follows block 1 only (before
  the fix, Flax refused a second module named attention8)."""
  config = small_config(32, (), (8,))
  discriminator = models.create_models(config)[1]
  images = jnp.zeros((2, 32, 32, 3))
  d_vars = discriminator.init(jax.random.PRNGKey(0), images, jnp.zeros((2,), jnp.int32),
                              update_sn=True)
  assert d_vars['params']['attention8']['theta']['kernel'].shape == (1, 1, 32, 4)

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and context.module.name in ('attention8', 'block2'):
      calls.append(context.module.name)
    return next_fun(*args, **kwargs)

  calls = []
  with nn.intercept_methods(record):
    discriminator.apply(d_vars, images, jnp.zeros((2,), jnp.int32), update_sn=False)
  assert calls == ['attention8', 'block2']


def test_per_map_widths_replace_the_architecture_table():
  """model.g_widths / d_widths: multipliers of ch per map, here wide at 4-8 px and narrow at 32.

  G (ch 8, widths 64, 64, 32, 16): linear z -> 4x4x64; block0 64 -> 64 (8x8), block1 64 -> 32
  (16x16, then attention on 32 channels), block2 32 -> 16 (32x32), output conv 16 -> 3.
  D (widths 16, 32, 64, 64): block0 3 -> 16 (16x16, then attention on 16 channels), block1
  16 -> 32 (8x8), blocks 2-3 32 -> 64 -> 64 (8x8), linear and class embedding on 64 features.
  """
  config = small_config(32, (16,), (16,))
  config.model.g_widths, config.model.d_widths = (8, 8, 4, 2), (2, 4, 8, 8)
  assert architectures.attention_widths(config.model, 32) == (32, 16)
  g, d = (shapes['params'] for shapes in variable_shapes(config))
  assert g['linear']['kernel'].shape == (128, 4 * 4 * 64)
  assert [g[f'block{i}']['conv2']['kernel'].shape[-1] for i in range(3)] == [64, 32, 16]
  assert g['block1']['conv1']['kernel'].shape == (3, 3, 64, 32)
  assert g['attention16']['theta']['kernel'].shape == (1, 1, 32, 4)
  assert g['conv_out']['kernel'].shape == (3, 3, 16, 3)
  assert [d[f'block{i}']['conv2']['kernel'].shape[-1] for i in range(4)] == [16, 32, 64, 64]
  assert d['attention16']['theta']['kernel'].shape == (1, 1, 16, 2)
  assert d['linear']['kernel'].shape == (64, 1)
  # () keeps the table's multipliers: 4 * ch = 32 channels in every block at 32 px.
  config.model.g_widths, config.model.d_widths = (), ()
  assert architectures.attention_widths(config.model, 32) == (32, 32)


def test_parameter_counts_at_128px_ch64():
  """Trainable parameters of the paper's ImageNet-128 model (ch 64, 1000 classes, attention 64).

  Generator (z 128):
    linear z -> 4x4x1024:                128 * 16384 + 16384                 =  2,113,536
    up-block in -> out: CBN tables 2*1000*in + 2*1000*out, conv3x3 9*in*out + out,
      conv3x3 9*out*out + out, shortcut conv1x1 in*out + out:
      1024 -> 1024: 2,048,000 + 2,048,000 + 9,438,208 + 9,438,208 + 1,049,600 = 24,022,016
      1024 ->  512: 2,048,000 + 1,024,000 + 4,719,104 + 2,359,808 +   524,800 = 10,675,712
       512 ->  256: 1,024,000 +   512,000 + 1,179,904 +   590,080 +   131,328 =  3,437,312
       256 ->  128:   512,000 +   256,000 +   295,040 +   147,584 +    32,896 =  1,243,520
       128 ->   64:   256,000 +   128,000 +    73,792 +    36,928 +     8,256 =    502,976
    attention at 64x64 (C = 128, no biases): C*C/8 * 2 + C*C/2 * 2 + gamma    =     20,481
    last BN gamma, beta (64 each) + conv3x3 64 -> 3 (1,728 + 3)                =      1,859
    total                                                                       = 42,017,412
  Discriminator:
    optimized block 3 -> 64: 1,792 + 36,928 + shortcut 256                      =     38,976
    attention at 64x64 (C = 64): 2*512 + 2*2,048 + 1                            =      5,121
    down-blocks in -> out: conv3x3 9*in*out + out, conv3x3 9*out*out + out, shortcut in*out + out:
        64 ->  128:    73,856 +   147,584 +    8,320                            =    229,760
       128 ->  256:   295,168 +   590,080 +   33,024                            =    918,272
       256 ->  512: 1,180,160 + 2,359,808 +  131,584                            =  3,671,552
       512 -> 1024: 4,719,616 + 9,438,208 +  525,312                            = 14,683,136
      1024 -> 1024 (no downsampling, identity shortcut): 2 * 9,438,208          = 18,876,416
    linear 1024 -> 1 (1,025) + class embedding 1000 x 1024 (1,024,000)         =  1,025,025
    total                                                                       = 39,448,258
  Spectral vectors u and BN moving statistics are not parameters.
  """
  g_shapes, d_shapes = variable_shapes(default.get_config())
  assert count(g_shapes['params']) == 42_017_412
  assert count(d_shapes['params']) == 39_448_258
  assert set(g_shapes) == {'params', 'spectral', 'batch_stats'}
  assert set(d_shapes) == {'params', 'spectral'}


@pytest.mark.parametrize('field,value,message', [
    ('resolution', 48, 'unknown resolution 48'),
    ('g_attention', (128,), 'G has no 128x128 feature map at 64 px'),
    ('d_attention', (2,), 'D has no 2x2 feature map at 64 px'),
    ('init', 'he', "unknown model.init 'he'"),
    ('attention_impl', 'flash', "unknown model.attention_impl 'flash'"),
    ('dtype', 'float16', "unknown model.dtype 'float16'"),
    ('attention_block_size', 0, 'model.attention_block_size=0 must be positive'),
    ('g_shared_embedding', 16, 'cuts z into 5 chunks at 64 px: .* multiple of 5, e.g. 130'),
    ('g_widths', (8, 4), r'g_widths=\(8, 4\): at 64 px G needs 5 positive integers .*'
                         r"g_widths to 5 numbers, e.g. '\(16, 16, 8, 4, 2\)'"),
    ('d_widths', (1, 2, 4, 0, 16), r'd_widths=\(1, 2, 4, 0, 16\): at 64 px D needs 5 positive'),
])
def test_bad_model_settings_name_the_fix(field, value, message):
  config = small_config(64)
  if field == 'resolution':
    config.data.resolution = value
  else:
    setattr(config.model, field, value)
  with pytest.raises(ConfigError, match=message) as error:
    models.create_models(config)
  assert '--config.' in str(error.value)


def test_shared_embedding_conditions_every_block_on_the_class_and_a_z_chunk():
  """BigGAN's conditioning (model.g_shared_embedding): the BN maps start at gamma 1, beta 0; once
  they are not zero the class and each z chunk change the images; class blends (one-hot rows)
  give what integer labels give."""
  config = small_config(32)
  config.model.g_shared_embedding = 16  # z (128) in 4 chunks of 32 at 32 px.
  generator = models.create_generator(config)
  z = jax.random.normal(jax.random.PRNGKey(0), (4, 128))
  labels = jnp.array([0, 1, 2, 3])
  variables = generator.init(jax.random.PRNGKey(1), z, labels, train=False)
  bn = variables['params']['block1']['bn2']
  assert bn['gamma']['kernel'].shape == (16 + 32, 32) and not np.any(bn['gamma']['kernel'])
  assert variables['params']['linear']['kernel'].shape == (32, 4 * 4 * 32)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(  # Every BN map made non-zero.
      lambda path, x: rng.normal(0, 0.1, x.shape).astype(np.float32)
      if 'bn' in jax.tree_util.keystr(path) and x.ndim == 2 else x, variables['params'])
  apply = lambda zz, yy: generator.apply({**variables, 'params': params}, zz, yy, train=False)
  images = apply(z, labels)
  np.testing.assert_allclose(apply(z, jax.nn.one_hot(labels, 5)), images, atol=1e-5)
  assert np.abs(apply(z, jnp.array([4, 1, 2, 3])) - images)[0].max() > 1e-3
  last_chunk = z.at[:, 96:].set(0.0)  # The last block's chunk alone changes.
  assert np.abs(apply(last_chunk, labels) - images).max() > 1e-3


def test_cudnn_attention_off_gpu_names_blockwise():
  assert jax.default_backend() == 'cpu'
  config = small_config(64, (32,), ())
  config.model.attention_impl = 'cudnn'
  with pytest.raises(ConfigError, match="runs on GPUs only.*attention_impl=blockwise"):
    models.create_models(config)


def _primitive_dtypes(jaxpr, name: str):
  """Operand dtypes of every `name` equation in a jaxpr and its sub-jaxprs (jit, scan, vjp)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          found += _primitive_dtypes(inner, name)
  return found


def test_bfloat16_model_computes_in_bfloat16_and_returns_float32():
  """Every convolution of G and D runs on bf16 operands; images and logits come out float32."""
  config = small_config(32, (16,), (16,))
  config.model.dtype = 'bfloat16'
  config.model.attention_impl = 'blockwise'
  generator, discriminator = models.create_models(config)
  z = jax.ShapeDtypeStruct((2, 128), jnp.float32)
  labels = jax.ShapeDtypeStruct((2,), jnp.int32)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  g_vars = jax.eval_shape(lambda z, y: generator.init(jax.random.PRNGKey(0), z, y, train=True),
                          z, labels)
  d_vars = jax.eval_shape(
      lambda x, y: discriminator.init(jax.random.PRNGKey(0), x, y, update_sn=True), images, labels)
  assert {x.dtype for x in jax.tree.leaves((g_vars, d_vars))} == {jnp.dtype(jnp.float32)}
  g_fn = lambda v, z, y: generator.apply(v, z, y, train=True, mutable=['batch_stats', 'spectral'])
  d_fn = lambda v, x, y: discriminator.apply(v, x, y, update_sn=True, mutable=['spectral'])
  for fn, args in ((g_fn, (g_vars, z, labels)), (d_fn, (d_vars, images, labels))):
    closed = jax.make_jaxpr(fn)(*args)
    convs = _primitive_dtypes(closed.jaxpr, 'conv_general_dilated')
    assert convs and all(dtypes == ('bfloat16', 'bfloat16') for dtypes in convs)
    assert closed.out_avals[0].dtype == jnp.float32  # G's images, D's logits.
