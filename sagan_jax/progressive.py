"""Progressive growing (Karras et al. 2018, ProGAN): the schedule of stages and their fade-ins.

With `model.progressive_resolutions = (8, 16, 32)` G and D (models._Grown) train first at 8 px,
then at 16, then at 32. Every stage's layers exist from the start (one variable tree: checkpoints
never change shape, a new stage keeps every parameter), as in ProGAN's own code; a stage's train
step reads and updates only its own. Stage i begins after `train.progressive_stage_steps[i - 1]` G
steps; its first `train.progressive_fade_steps` steps blend its new layers in:

  G: image = alpha * head_r(G_r) + (1 - alpha) * upsample(head_r/2(G_r/2))
  D: h = alpha * new blocks(from_rgb_r(x)) + (1 - alpha) * from_rgb_r/2(avgpool(x))
  real images: alpha * x + (1 - alpha) * upsample(avgpool(x))   (D never sees a jump)

with alpha rising linearly from 0 to 1 (`Schedule.alpha`). The train step writes alpha into the
'progress' collection of G's and D's state at its start, so sampling and evaluation use the step's
alpha, checkpoints keep it and a resumed run continues exactly. train_loop trains stage by stage:
one compiled step, one input stream at the stage's resolution (from the same input position) and
one sampler (upsampled to the data resolution) per stage.

Optimizers: one Adam state for all parameters. Layers a stage does not reach get zero gradients
and their Adam moments stay zero, so they do not move (with any beta1); their EMA stays equal to
them. (The previous stage's head and from-RGB layer, weighted by 1 - alpha = 0 after the fade,
get zero gradients too: with beta1 = 0 they stop at once, else their momentum runs out.) Adam's
step count is shared, though: a layer that starts training at step S gets the bias correction of
step S (about 1), not of step 1, so its first updates are up to 1 / sqrt(1 - beta2) times the
learning rate (3.2x with beta2 = 0.9, 32x with 0.999) until its second-moment estimate fills up;
early in the fade its output is weighted by a small alpha. ProGAN resets its optimizers at each
new stage instead.
"""

import bisect
import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from sagan_jax import architectures
from sagan_jax import layers
from sagan_jax import models
from sagan_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When each stage begins and how long its fade-in lasts.

  Steps count the G steps taken before a step (state.step): stage i trains the steps
  stage_start(i) <= step < stage_start(i + 1). In a stage after the first, alpha rises linearly
  over `fade_steps` steps: (step - start) / fade_steps, 0 at the stage's first step, 1 from
  start + fade_steps on (and everywhere with fade_steps 0).
  """
  resolutions: Tuple[int, ...]
  stage_steps: Tuple[int, ...]  # The first step of every stage after the first.
  fade_steps: int = 0

  @property
  def num_stages(self) -> int:
    return len(self.resolutions)

  def stage_start(self, index: int) -> int:
    return 0 if index == 0 else self.stage_steps[index - 1]

  def stage_index(self, step: int) -> int:
    """The stage that trains `step` (a host int)."""
    return bisect.bisect_right(self.stage_steps, step)

  def resolution(self, step: int) -> int:
    return self.resolutions[self.stage_index(step)]

  def alpha(self, step) -> jax.Array:
    """The fade-in weight (float32) of `step`: an int or a traced int32 scalar."""
    step = jnp.asarray(step)
    alpha = jnp.ones((), jnp.float32)
    if self.fade_steps:
      for start in self.stage_steps:
        fading = (step >= start) & (step < start + self.fade_steps)
        alpha = jnp.where(fading, (step - start).astype(jnp.float32) / self.fade_steps, alpha)
    return alpha


def schedule_from_config(config) -> Optional[Schedule]:
  """The config's schedule; None when `model.progressive_resolutions` is empty (no growing)."""
  resolutions = architectures.progressive_resolutions(config.model)
  if not resolutions:
    return None
  return Schedule(resolutions, tuple(config.train.get('progressive_stage_steps', ())),
                  int(config.train.get('progressive_fade_steps', 0)))


def check_config(config) -> None:
  """ConfigError naming the fix for stage starts and fades that do not fit the resolutions.

  The resolutions themselves are architectures.check_model_config's.
  """
  train_config = config.train
  steps = tuple(train_config.get('progressive_stage_steps', ()))
  fade = train_config.get('progressive_fade_steps', 0)
  num_steps = train_config.num_steps
  resolutions = architectures.progressive_resolutions(config.model)
  if not resolutions:
    if steps or fade:
      raise ConfigError('train.progressive_stage_steps / progressive_fade_steps are set but '
                        'model.progressive_resolutions is empty: set '
                        '--config.model.progressive_resolutions (e.g. "(8, 16, 32)") or '
                        '--config.train.progressive_stage_steps="()" and progressive_fade_steps=0')
    return
  later = len(resolutions) - 1
  example = tuple(num_steps * (i + 1) // (later + 1) for i in range(later))
  if (len(steps) != later or any(not isinstance(s, int) or isinstance(s, bool) for s in steps)
      or any(b <= a for a, b in zip((0,) + steps, steps + (num_steps,)))):
    raise ConfigError(f'train.progressive_stage_steps={steps} must give the first G step of each '
                      f'of the {later} stages after the first of {resolutions}, increasing, '
                      f'above 0 and below train.num_steps={num_steps}: set '
                      f'--config.train.progressive_stage_steps="{example}"')
  shortest = min(b - a for a, b in zip(steps, steps[1:] + (num_steps,)))
  if not isinstance(fade, int) or isinstance(fade, bool) or not 0 <= fade <= shortest:
    raise ConfigError(f'train.progressive_fade_steps={fade!r} must be between 0 and the shortest '
                      f'stage after the first ({shortest} steps): set '
                      f'--config.train.progressive_fade_steps={shortest // 2}')


def stage_models(config, index: int, output_resolution: int = 0):
  """(G, D) of stage `index`; G's images upsampled to `output_resolution` px when larger."""
  generator, discriminator = models.create_models(config)
  resolution = architectures.progressive_resolutions(config.model)[index]
  return (generator.clone(stage_resolution=resolution, output_resolution=output_resolution),
          discriminator.clone(stage_resolution=resolution))


def sampling_generator(config, step: Optional[int] = None) -> models.Generator:
  """G as it samples after `step` G steps, at the data resolution (sample, evaluate, best).

  That is the stage that trained the last of those steps, its images upsampled; without growing
  (or with step None: the last stage) models.create_generator's G.
  """
  schedule = schedule_from_config(config)
  if schedule is None or step is None:
    return models.create_generator(config)
  return stage_models(config, schedule.stage_index(max(step - 1, 0)), config.data.resolution)[0]


def describe_stage(schedule: Schedule, index: int) -> str:
  """'Stage 2/3: 16x16 from step 1500 (fade-in over 500 steps)'."""
  res = schedule.resolutions[index]
  fade = (f' (fade-in over {schedule.fade_steps} steps)'
          if index and schedule.fade_steps else '')
  return (f'Stage {index + 1}/{schedule.num_stages}: {res}x{res} from step '
          f'{schedule.stage_start(index)}{fade}')


# The train step's part (sagan_jax.train): alpha into G's and D's state, the real images' fade.


def with_alpha(state, alpha: jax.Array):
  """`state` with `alpha` in the 'progress' collection of G's and D's state."""
  progress = {'alpha': alpha}
  return state.replace(g_state={**state.g_state, models.PROGRESS: progress},
                       d_state={**state.d_state, models.PROGRESS: progress})


def fade_real(images: jax.Array, g_state) -> jax.Array:
  """Real images as a fading stage shows them: alpha * x + (1 - alpha) * upsample(avgpool(x))."""
  alpha = g_state[models.PROGRESS]['alpha']
  coarse = layers.upsample_2x(layers.avg_pool_2x2(images))
  return alpha * images + (1.0 - alpha) * coarse.astype(images.dtype)
