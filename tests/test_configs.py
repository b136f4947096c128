"""The config files: the paper's recipe by default, every field commented, all buildable."""

import os
import re

import pytest

from configs import cifar10
from configs import default
from configs import fashion_mnist
from configs import fashion_mnist_progressive
from configs import imagenet
from configs import imagenet256
from configs import imagenet256_progressive
from sagan_jax import architectures
from sagan_jax import config_check
from sagan_jax import losses

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


@pytest.mark.parametrize('module', [default, imagenet, imagenet256, cifar10, fashion_mnist,
                                    fashion_mnist_progressive, imagenet256_progressive])
def test_every_config_builds(module):
  config = module.get_config()
  architectures.check_model_config(config.model, config.data.resolution)
  losses.get_adversarial_loss(config.train.loss)
  assert config.train.batch_size % 8 == 0


def test_imagenet256_has_attention_at_64_and_128_with_memory_efficient_kernels():
  config = imagenet256.get_config()
  assert config.data.resolution == 256
  assert config.model.g_attention == (64, 128) and config.model.d_attention == (64, 128)
  assert config.model.attention_impl in ('auto', 'blockwise')
  # 64 ch at D's 128x128 map: cuDNN's head size C/8 = 8 is a multiple of 8 (ch % 64 == 0).
  assert set(architectures.attention_widths(config.model, 256)) == {256, 128, 64}


@pytest.mark.parametrize('grown,base,stages', [
    (fashion_mnist_progressive, fashion_mnist, (8, 16, 32)),
    (imagenet256_progressive, imagenet256, (32, 64, 128, 256))])
def test_progressive_configs_are_their_base_configs_grown(grown, base, stages):
  config, base_config = grown.get_config(), base.get_config()
  config_check.check_config(config)
  assert config.model.progressive_resolutions == stages
  assert len(config.train.progressive_stage_steps) == len(stages) - 1
  assert config.train.progressive_fade_steps > 0
  for field in ('model.progressive_resolutions', 'train.progressive_stage_steps',
                'train.progressive_fade_steps'):
    section, name = field.split('.')
    config[section][name] = base_config[section][name]
  assert config.to_dict() == base_config.to_dict()


def test_every_default_field_is_commented():
  lines = open(os.path.join(REPO, 'configs', 'default.py')).read().splitlines()
  for i, line in enumerate(lines):
    field = re.match(r'\s+(config|data|model|train|sample)\.\w+ = ', line)
    if field and 'ConfigDict()' not in line:
      assert '#' in line or lines[i - 1].strip().startswith('#'), f'uncommented field: {line}'
