"""The config files: the paper's recipe by default, every field commented, all buildable."""

import os
import re

import pytest

from configs import cifar10
from configs import default
from configs import fashion_mnist
from configs import imagenet
from configs import imagenet256
from sagan_jax import losses
from sagan_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_is_the_papers_imagenet_recipe():
  config = default.get_config()
  assert (config.data.resolution, config.model.ch, config.train.batch_size) == (128, 64, 256)
  assert config.train.num_steps == 1_000_000 and config.train.d_steps == 1
  assert (config.train.g_lr, config.train.d_lr, config.train.beta1) == (1e-4, 4e-4, 0.0)
  assert config.train.loss == 'hinge' and config.data.name == 'imagenet2012'
  assert config.model.g_attention == (64,) and config.model.d_attention == (64,)


def test_imagenet_config_takes_the_attention_placement():
  assert imagenet.get_config().model.g_attention == (64,)
  config = imagenet.get_config('32')
  assert config.model.g_attention == (32,) and config.model.d_attention == (32,)


@pytest.mark.parametrize('module', [default, imagenet, imagenet256, cifar10, fashion_mnist])
def test_every_config_builds(module):
  config = module.get_config()
  models.check_model_config(config.model, config.data.resolution)
  losses.get_adversarial_loss(config.train.loss)
  assert config.train.batch_size % 8 == 0


def test_imagenet256_has_attention_at_64_and_128_with_memory_efficient_kernels():
  config = imagenet256.get_config()
  assert config.data.resolution == 256
  assert config.model.g_attention == (64, 128) and config.model.d_attention == (64, 128)
  assert config.model.attention_impl in ('auto', 'blockwise')
  # 64 ch at D's 128x128 map: cuDNN's head size C/8 = 8 is a multiple of 8 (ch % 64 == 0).
  assert set(models.attention_widths(config.model, 256)) == {256, 128, 64}


def test_every_default_field_is_commented():
  lines = open(os.path.join(REPO, 'configs', 'default.py')).read().splitlines()
  for i, line in enumerate(lines):
    field = re.match(r'\s+(config|data|model|train|sample)\.\w+ = ', line)
    if field and 'ConfigDict()' not in line:
      assert '#' in line or lines[i - 1].strip().startswith('#'), f'uncommented field: {line}'
