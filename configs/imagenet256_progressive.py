"""configs/imagenet256.py grown progressively: 32, 64, 128, then 256 px (ProGAN-style stages).

  python -m sagan_jax.main --config=configs/imagenet256_progressive.py --workdir=gs://BUCKET/pg256

The paper's recipe otherwise (batch 256, 1M steps, TTUR, attention at 64 and 128, which the
stages reach when they get there). Experimental and not yet measured.
"""

from configs import imagenet256


def get_config():
  """Stages from steps 0, 100k, 200k and 300k, each later one fading in over 50k steps."""
  config = imagenet256.get_config()
  config.model.progressive_resolutions = (32, 64, 128, 256)
  # As ProGAN: the same number of images in every stage before the last (100k steps of 256 =
  # 25.6M images, ProGAN's 1.2M times about 20), half of each later stage a fade-in (ProGAN: 600k
  # images of fade, 600k stable). The 256 px network then trains the remaining 700k steps. ProGAN
  # also shrinks its batch at high resolution; the batch stays 256 here.
  config.train.progressive_stage_steps = (100_000, 200_000, 300_000)
  config.train.progressive_fade_steps = 50_000
  return config
