"""SAGAN on ImageNet 256x256 with attention at the 64x64 and 128x128 maps of G and D.

  python -m sagan_jax.main --config=configs/imagenet256.py --workdir=gs://BUCKET/sagan256
  ... --config.model.dtype=bfloat16 --config.train.grad_accum_steps=2   (mixed precision, 2
      micro-batches per update: the same global batch in half the activation memory)

At 128x128 an attention layer has 16,384 queries and 4,096 keys: the full [N, M] float32 matrix
is 256 MiB per image. 'auto' uses cuDNN's flash attention on GPUs in bfloat16 and the pure-JAX
blockwise kernel elsewhere, both with memory linear in positions. The widths follow
architectures.ARCHITECTURES[256] (BigGAN's table). tfds `imagenet2012` must be prepared (see
README).
"""

from configs import default


def get_config():
  """256 px, ch 64, batch 256, attention at 64 and 128 in G and D, memory-efficient attention."""
  config = default.get_config()
  config.data.resolution = 256
  config.model.g_attention = (64, 128)
  config.model.d_attention = (64, 128)
  config.model.attention_impl = 'auto'
  config.model.attention_block_size = 512
  return config
