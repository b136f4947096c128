"""Writes the FID Inception parity fixture: pytorch-fid's network with seeded weights, run by torch.

The real weights cannot be downloaded on our machines, so parity is shown with weights drawn from a
seed by numpy (`seeded_state_dict`, no torch needed: tests regenerate them). This script fills
pytorch-fid's own `fid_inception_v3()` with them (its download replaced), runs two small images
through `InceptionV3(resize_input=True, normalize_input=True)` in float64 and float32 and saves the
inputs and outputs in `tests/fixtures/inception_parity.npz` (well under 1 MiB), plus two tiny
torch-written .pth files (zip and legacy formats) for the reader. Run it with a venv that has torch:

  python3 -m venv /work/torchenv
  /work/torchenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
  /work/torchenv/bin/pip install pytorch-fid numpy scipy pillow
  /work/torchenv/bin/python tools/make_inception_fixture.py --out_dir=tests/fixtures

`--save_pth=FILE` also writes the seeded weights with torch.save (about 95 MB) and
`--check_pth=FILE` torch.loads a file written by `sagan_jax.evaluation.pth.save_state_dict` and
compares it with the seeded weights: together they check the torch-free reader and writer against
torch.
"""

import argparse
import collections
import json
import os

import numpy as np

SEED = 20151205
IMAGE_SHAPE = (2, 56, 72, 3)  # NHWC, H != W so a transposed axis cannot pass.
SUBSAMPLE = 6  # Every 6th row and column of the 299x299 resize is stored.
# Small resize cases: (input H, W) -> output (H, W), up- and downscaling on each axis.
RESIZE_CASES = (((13, 11), (29, 5)), ((40, 7), (9, 16)))


def seeded_state_dict(layout, seed: int = SEED) -> 'collections.OrderedDict[str, np.ndarray]':
  """Deterministic weights for a state_dict layout [(key, shape), ...], drawn in layout order.

  Scaled so activations stay O(1) through the ~95 conv layers: He-normal convolutions (ReLU halves
  the second moment), BN near identity, the fc layer LeCun-normal.
  """
  rng = np.random.default_rng(seed)
  state_dict = collections.OrderedDict()
  for key, shape in layout:
    shape = tuple(shape)
    leaf = key.rsplit('.', 1)[-1]
    if leaf == 'num_batches_tracked':
      value = np.zeros(shape, np.int64)
    elif key.endswith('conv.weight'):
      fan_in = int(np.prod(shape[1:]))
      value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    elif key.endswith('bn.weight'):
      value = rng.uniform(0.8, 1.2, shape)
    elif key.endswith('bn.bias'):
      value = rng.normal(0.0, 0.1, shape)
    elif leaf == 'running_mean':
      value = rng.normal(0.0, 0.1, shape)
    elif leaf == 'running_var':
      value = rng.uniform(0.5, 1.5, shape)
    elif key == 'fc.weight':
      value = rng.standard_normal(shape) / np.sqrt(shape[1])
    elif key == 'fc.bias':
      value = rng.normal(0.0, 0.1, shape)
    else:
      raise ValueError(f'no rule for {key}')
    state_dict[key] = value.astype(np.int64 if leaf == 'num_batches_tracked' else np.float32)
  return state_dict


def fixture_images(seed: int = SEED) -> np.ndarray:
  """Two NHWC images in [0, 1] (smooth gradients plus noise), float32."""
  rng = np.random.default_rng(seed + 1)
  _, height, width, _ = IMAGE_SHAPE
  ramp = np.linspace(0, 1, height)[:, None, None] * np.linspace(1, 0, width)[None, :, None]
  images = 0.6 * ramp + 0.4 * rng.uniform(0, 1, IMAGE_SHAPE)
  return images.astype(np.float32)


def resize_inputs(seed: int = SEED):
  rng = np.random.default_rng(seed + 2)
  return [rng.uniform(0, 1, (2,) + size + (3,)).astype(np.float32) for size, _ in RESIZE_CASES]


def _tiny_sources(seed: int = SEED):
  rng = np.random.default_rng(seed + 3)
  return collections.OrderedDict([
      ('conv.weight', rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
      ('transposed', rng.standard_normal((5, 3)).astype(np.float32)),
      ('sliced', rng.standard_normal((4, 6))),
      ('half', rng.standard_normal(7).astype(np.float16)),
      ('count', np.array(12345678901, np.int64)),
  ])


# Views torch saves as they are (its storage, offset and strides): the reader must honour them.
_TINY_VIEWS = {'transposed': lambda t: t.T, 'sliced': lambda t: t[1:, 2:]}


def tiny_arrays(seed: int = SEED):
  """What the tiny .pth files hold: float32, float64, float16 and int64 tensors, two of them views
  (a transpose, and a slice with a storage offset)."""
  return collections.OrderedDict((k, _TINY_VIEWS.get(k, lambda t: t)(v))
                                 for k, v in _tiny_sources(seed).items())


def _torch_tiny_state_dict(torch):
  state_dict = collections.OrderedDict(
      (k, _TINY_VIEWS.get(k, lambda t: t)(torch.from_numpy(v)))
      for k, v in _tiny_sources().items())
  for key, value in tiny_arrays().items():
    assert np.array_equal(state_dict[key].numpy(), value), key
  assert not state_dict['transposed'].is_contiguous()
  assert state_dict['sliced'].storage_offset() > 0
  return state_dict


def build_fid_inception(seed: int = SEED):
  """pytorch-fid's InceptionV3 (blocks 0-3) and its fc layer, holding the seeded weights."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from pytorch_fid import inception as fid  # pylint: disable=g-import-not-at-top

  # fid_inception_v3() downloads the weights, then load_state_dict()s them: both are skipped
  # while it builds, and the seeded weights are loaded (strictly) afterwards.
  inception3 = torchvision.models.inception.Inception3
  original_download, original_load = fid.load_state_dict_from_url, inception3.load_state_dict
  fid.load_state_dict_from_url = lambda *args, **kwargs: None
  inception3.load_state_dict = lambda *args, **kwargs: None
  try:
    network = fid.fid_inception_v3()
  finally:
    fid.load_state_dict_from_url, inception3.load_state_dict = original_download, original_load
  layout = [(k, tuple(v.shape)) for k, v in network.state_dict().items()]
  state_dict = seeded_state_dict(layout, seed)
  network.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  original_build, fid.fid_inception_v3 = fid.fid_inception_v3, lambda: network
  try:
    model = fid.InceptionV3(output_blocks=(0, 1, 2, 3), resize_input=True, normalize_input=True)
  finally:
    fid.fid_inception_v3 = original_build
  return model.eval(), network.fc, layout, state_dict


def run_torch(model, fc, images_nhwc: np.ndarray, dtype):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  model, fc = model.to(dtype), fc.to(dtype)
  x = torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2)).to(dtype)
  with torch.no_grad():
    blocks = model(x)
    pool3 = blocks[3].flatten(1)
    resized = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    outputs = {
        'pool3': pool3, 'logits': fc(pool3), 'logits_unbiased': pool3 @ fc.weight.T,
        'resized_299_sub': resized[:, :, ::SUBSAMPLE, ::SUBSAMPLE].permute(0, 2, 3, 1)}
    for i in range(3):
      outputs[f'block{i}_mean'] = blocks[i].mean(dim=(2, 3))
  return {k: v.double().numpy() for k, v in outputs.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out_dir', default='tests/fixtures')
  parser.add_argument('--save_pth', default=None, help='Also torch.save the seeded weights here.')
  parser.add_argument('--check_pth', default=None,
                      help='torch.load this file (from sagan_jax.evaluation.pth.save_state_dict) '
                      'and compare.')
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(max(1, os.cpu_count() // 2))

  model, fc, layout, state_dict = build_fid_inception()
  if args.check_pth:
    loaded = torch.load(args.check_pth, weights_only=True)
    assert list(loaded) == list(state_dict), 'keys or their order differ'
    for key, value in state_dict.items():
      assert loaded[key].dtype == torch.from_numpy(value).dtype, key
      assert np.array_equal(loaded[key].numpy(), value), key
    print(f'{args.check_pth}: torch.load gives the seeded weights exactly ({len(loaded)} entries)')
  if args.save_pth:
    torch.save(collections.OrderedDict((k, torch.from_numpy(v)) for k, v in state_dict.items()),
               args.save_pth)
    print(f'wrote {args.save_pth}')

  images = fixture_images()
  reference = run_torch(model, fc, images, torch.float64)
  single = run_torch(model, fc, images, torch.float32)
  for key in ('pool3', 'logits', 'block0_mean', 'block1_mean', 'block2_mean'):
    err = np.abs(single[key] - reference[key]).max() / np.abs(reference[key]).max()
    print(f'{key}: max |float64| {np.abs(reference[key]).max():.4g}, '
          f'torch float32 max error / max |value| {err:.3g}')
  fixture = {'seed': np.int64(SEED), 'layout': np.array(json.dumps(layout)), 'images': images}
  fixture.update({f'torch64/{k}': v for k, v in reference.items()})
  # torch's own float32 outputs show the rounding error a float32 network has (~5e-7 of the
  # largest value): the yardstick for the Flax network's tolerance.
  fixture.update({f'torch32/{k}': single[k].astype(np.float32) for k in ('pool3', 'logits')})
  for i, ((_, out_size), x) in enumerate(zip(RESIZE_CASES, resize_inputs())):
    y = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=out_size, mode='bilinear',
                      align_corners=False)
    fixture[f'resize{i}'] = y.permute(0, 2, 3, 1).numpy()
  os.makedirs(args.out_dir, exist_ok=True)
  np.savez_compressed(os.path.join(args.out_dir, 'inception_parity.npz'), **fixture)
  tiny = _torch_tiny_state_dict(torch)
  torch.save(tiny, os.path.join(args.out_dir, 'tiny_zip.pth'))
  torch.save(tiny, os.path.join(args.out_dir, 'tiny_legacy.pth'),
             _use_new_zipfile_serialization=False)
  print(f'wrote inception_parity.npz, tiny_zip.pth and tiny_legacy.pth in {args.out_dir}')


if __name__ == '__main__':
  main()
