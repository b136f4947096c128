"""The demo (configs/fashion_mnist.py) grown progressively: 8x8, then 16x16, then 32x32.

  python -m sagan_jax.main --config=configs/fashion_mnist_progressive.py --workdir=DIR

Everything else is the demo's (6,000 steps, batch 16, rates decaying from step 4,000, G's weights
averaged from step 4,500, the classifier's scores every 1,000 steps on images upsampled to 32 px),
so the two runs compare. Measured (README, "Progressive growing") with the demo of then (Glorot
init, the table's widths, an EMA of 0.999 from step 1,000, rates decaying from step 3,000): with
--config.train.num_steps=8000, the time of the demo's 6,000 steps, it scores 0.920 class accuracy
(the demo 0.921) and fd_classifier 43.7 (the demo 24.3). The stage lengths are a first guess, not
tuned.
"""

from configs import fashion_mnist


def get_config():
  """Stages of 8, 16 and 32 px from steps 0, 1,500 and 3,000, each fading in over 500 steps."""
  config = fashion_mnist.get_config()
  config.model.progressive_resolutions = (8, 16, 32)
  # The full 32 px network keeps the second half of the run, which holds all of the learning-rate
  # decay (from step 4,000) and G's average; the 8 and 16 px stages get 1,500 steps each. ProGAN
  # fades over half of a stage; a third here (500 of 1,500 steps) leaves each small stage 1,000
  # steps unblended.
  config.train.progressive_stage_steps = (1500, 3000)
  config.train.progressive_fade_steps = 500
  return config
