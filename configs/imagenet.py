"""SAGAN on ImageNet 128x128: the paper's recipe (docs/recipe.md), the defaults of default.py.

  python -m sagan_jax.main --config=configs/imagenet.py --workdir=gs://BUCKET/sagan128
  python -m sagan_jax.main --config=configs/imagenet.py:32 ...  (the official code's 32x32 wiring)

tfds `imagenet2012` must be prepared beforehand (manual download; see README).
"""

from configs import default


def get_config(attention: str = '64'):
  """Paper: batch 256, 1M steps, ch 64, attention at the 64x64 maps (FID 18.65) or at 32x32."""
  config = default.get_config()
  res = int(attention)
  config.model.g_attention = (res,)
  config.model.d_attention = (res,)
  return config
