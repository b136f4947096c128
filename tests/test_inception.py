"""The Flax FID Inception against pytorch-fid run by torch, with seeded weights (no torch needed).

tests/fixtures/inception_parity.npz comes from tools/make_inception_fixture.py: pytorch-fid's
`InceptionV3(resize_input=True, normalize_input=True)` holding weights drawn from a seed by numpy,
run in float64 on two 56x72 images. Here the same weights are drawn again, written as a .pth by
this package's writer, read back by its reader and run through the Flax network.
"""

import importlib.util
import json
import logging
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest

from sagan_jax import inception as converter
from sagan_jax.errors import ConfigError
from sagan_jax.evaluation import inception
from sagan_jax.evaluation import inception_weights
from sagan_jax.evaluation import pth
from tests import tolerances

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, 'tests', 'fixtures')
TOOL = os.path.join(REPO, 'tools', 'make_inception_fixture.py')
# Float32 rounding of the network is measured by the fixture itself: torch's own float32 run of the
# same weights and images against its float64 run (torch32/pool3 and torch32/logits, ~5e-7 of the
# largest value). Another float32 implementation (Flax, on any CPU or accelerator at
# Precision.HIGHEST) rounds as many terms in other orders, so its error is of the same size (here
# 0.6 to 1.6 times torch's): ROUNDING_FACTOR times torch's error bounds it with room to spare,
# while a wrong layer (a pool counting padding, a missed branch, a transposed kernel) moves the
# outputs by 1e-2 or more of their largest value.
ROUNDING_FACTOR = 20


def _load_tool():
  spec = importlib.util.spec_from_file_location('make_inception_fixture', TOOL)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tool = _load_tool()


@pytest.fixture(scope='module')
def fixture():
  with np.load(os.path.join(FIXTURES, 'inception_parity.npz')) as npz:
    return {k: npz[k] for k in npz.files}


def float32_error_of_max(fixture) -> float:
  """torch's float32 error on the fixture, relative to the largest output (the yardstick)."""
  return max(np.abs(fixture[f'torch32/{k}'] - fixture[f'torch64/{k}']).max() /
             np.abs(fixture[f'torch64/{k}']).max() for k in ('pool3', 'logits'))


@pytest.fixture(scope='module')
def rtol_of_max(fixture):
  return ROUNDING_FACTOR * float32_error_of_max(fixture)


@pytest.fixture(scope='module')
def seeded_state_dict(fixture):
  layout = [(k, tuple(s)) for k, s in json.loads(str(fixture['layout']))]
  return tool.seeded_state_dict(layout, int(fixture['seed']))


@pytest.fixture(scope='module')
def seeded_pth(seeded_state_dict, tmp_path_factory):
  path = str(tmp_path_factory.mktemp('inception') / 'seeded.pth')
  pth.save_state_dict(seeded_state_dict, path)
  return path


@pytest.fixture(scope='module')
def variables(seeded_pth):
  return inception_weights.load_variables(seeded_pth)


@pytest.fixture(scope='module')
def outputs(variables, fixture):
  out = inception.create_inception_fn(variables)(fixture['images'])
  return {k: np.asarray(v, np.float64) for k, v in out.items()}


def assert_close_to_max(actual, expected, rtol_of_max):
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol_of_max * np.abs(expected).max())


def test_layout_is_pytorch_fid_state_dict_in_order(fixture):
  torch_layout = [(k, tuple(s)) for k, s in json.loads(str(fixture['layout']))]
  assert list(inception_weights.torch_layout()) == torch_layout
  assert len(torch_layout) == 566 and torch_layout[-2:] == [('fc.weight', (1008, 2048)),
                                                            ('fc.bias', (1008,))]


def test_network_matches_pytorch_fid(outputs, fixture, rtol_of_max):
  assert outputs['pool3'].shape == (2, 2048) and outputs['logits'].shape == (2, 1008)
  for key in ('pool3', 'logits', 'logits_unbiased'):
    assert_close_to_max(outputs[key], fixture[f'torch64/{key}'], rtol_of_max)
  # The features are far from trivial (the seeded weights keep activations O(1)), and torch's
  # float32 error is small enough for the tolerance to catch a wrong layer (1e-2) by far.
  assert 1 < np.abs(fixture['torch64/pool3']).max() < 100
  assert np.std(fixture['torch64/pool3']) > 0.5
  assert 0 < float32_error_of_max(fixture) < 1e-6


def test_intermediate_blocks_match_pytorch_fid(variables, fixture, rtol_of_max):
  """pytorch-fid's blocks 0-2 (after the two stem max pools and Mixed_6e): where a bug would be."""
  apply_fn = jax.jit(lambda v, x: inception.FIDInceptionV3().apply(v, x, mutable='intermediates'))
  _, state = apply_fn(variables, fixture['images'])
  for i, channels in enumerate((64, 192, 768)):
    block = np.asarray(state['intermediates'][f'block{i}'][0], np.float64)
    assert block.shape[-1] == channels
    # Spatial means in float64: a float32 mean alone is off by ~4e-6.
    assert_close_to_max(block.mean(axis=(1, 2)), fixture[f'torch64/block{i}_mean'],
                        rtol_of_max)


def resize_matrix64(in_size: int, out_size: int) -> np.ndarray:
  """inception.resize_matrix computed in float64, as torch's float64 kernel does."""
  src = np.maximum(in_size / out_size * (np.arange(out_size) + 0.5) - 0.5, 0.0)
  lower = np.minimum(src.astype(np.int64), in_size - 1)
  weights = np.zeros((out_size, in_size))
  np.add.at(weights, (np.arange(out_size), lower), 1 - (src - lower))
  np.add.at(weights, (np.arange(out_size), np.minimum(lower + 1, in_size - 1)), src - lower)
  return weights


def resize_error(images, size, reference_weights: str) -> np.ndarray:
  """A float32 error bound of inception.resize_bilinear against a reference (R x C^T per channel).

  Each output sums 2 x 2 products (the other weights are 0), maybe in two passes: gamma_4 of its
  absolute terms. The reference's weights differ from ours: 'float64', by |R32 - R64| exactly;
  'float32' (another float32 implementation of the formula), by the rounding of the source
  position scale (o + 1/2) - 1/2, at most gamma_4 (|src| + 1) in each implementation.
  """
  x = np.abs(np.asarray(images, np.float64))
  apply = lambda r, c: np.einsum('oh,nhwc,pw->nopc', np.abs(r), x, np.abs(c))
  weights, deltas = [], []
  for n, m in zip(x.shape[1:3], size):
    ours = inception.resize_matrix(n, m).astype(np.float64)
    if reference_weights == 'float64':
      delta = ours - resize_matrix64(n, m)
    else:
      src = np.abs(n / m * (np.arange(m) + 0.5) - 0.5)
      delta = 2 * tolerances.gamma(4) * (src + 1)[:, None] * (ours != 0)
    weights.append(ours)
    deltas.append(delta)
  (rows, cols), (d_rows, d_cols) = weights, deltas
  return (tolerances.gamma(4) * apply(rows, cols) + apply(d_rows, cols) +
          apply(rows + np.abs(d_rows), d_cols))


def test_resize_matches_torch_interpolate(fixture):
  resized = np.asarray(inception.resize_bilinear(fixture['images'], (299, 299)))
  error = resize_error(fixture['images'], (299, 299), 'float64')
  tolerances.assert_within(resized[:, ::tool.SUBSAMPLE, ::tool.SUBSAMPLE],
                           fixture['torch64/resized_299_sub'],
                           error[:, ::tool.SUBSAMPLE, ::tool.SUBSAMPLE], 'resize vs torch64')
  for i, x in enumerate(tool.resize_inputs()):
    expected = fixture[f'resize{i}']  # torch's float32 run: both round, weights too.
    tolerances.assert_within(inception.resize_bilinear(x, expected.shape[1:3]), expected,
                             2 * resize_error(x, expected.shape[1:3], 'float32'), f'resize{i}')
    # jax.image.resize antialiases when downscaling (its default): not pytorch-fid's resize.
    antialiased = jax.image.resize(x, expected.shape, 'bilinear')
    assert np.abs(np.asarray(antialiased) - expected).max() > 0.1


def test_input_convention_uint8_grayscale_and_range():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (1, 20, 30, 1), dtype=np.uint8)
  from_uint8 = np.asarray(inception.preprocess(pixels))
  from_float = np.asarray(inception.preprocess(np.repeat(pixels / 255.0, 3, axis=-1)))
  assert from_uint8.shape == (1, 299, 299, 3)
  # The inputs agree to one rounding (float32 p / 255 against float64 p / 255 cast to float32),
  # each resize (the same weights) rounds 2 x 2 products of values in [0, 1], 2 x - 1 once more.
  same_weights = tolerances.gamma(4) * np.ones((1, 299, 299, 1))  # |R| |x| |C|^T <= 1 here.
  error = 2 * (tolerances.EPS32 / 2 * (1 + same_weights) + 2 * same_weights) + tolerances.EPS32
  tolerances.assert_within(from_uint8, from_float, error, 'uint8 vs float input')
  # At 299 px nothing is resized, and 2 * 0.25 - 1 is exact in float32.
  np.testing.assert_array_equal(
      inception.preprocess(np.full((1, 299, 299, 3), 0.25, np.float32)), -0.5)
  # Bilinear weights sum to 1 on every row, so [0, 1] maps into [-1, 1].
  assert from_uint8.min() >= -1 and from_uint8.max() <= 1


def test_tiny_torch_files_read_without_torch():
  expected = tool.tiny_arrays()
  for name in ('tiny_zip.pth', 'tiny_legacy.pth'):  # torch.save's zip and legacy formats.
    loaded = pth.load_state_dict(os.path.join(FIXTURES, name))
    assert list(loaded) == list(expected)
    for key, value in expected.items():
      assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
      np.testing.assert_array_equal(loaded[key], value)


def test_cut_short_torch_files_raise_value_error(tmp_path):
  path = tmp_path / 'cut.pth'
  for name in ('tiny_zip.pth', 'tiny_legacy.pth'):
    with open(os.path.join(FIXTURES, name), 'rb') as f:
      data = f.read()
    for size in range(0, len(data), 37):
      path.write_bytes(data[:size])
      with pytest.raises(ValueError):
        pth.load_state_dict(str(path))


def test_writer_and_reader_round_trip(tmp_path, seeded_pth, seeded_state_dict):
  path = str(tmp_path / 'tiny.pth')
  pth.save_state_dict(tool.tiny_arrays(), path)
  for loaded, expected in ((pth.load_state_dict(path), tool.tiny_arrays()),
                           (pth.load_state_dict(seeded_pth), seeded_state_dict)):
    assert list(loaded) == list(expected)
    for key, value in expected.items():
      assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
      np.testing.assert_array_equal(loaded[key], value)


def test_torch_reads_our_file_and_we_read_torchs(tmp_path, seeded_pth, seeded_state_dict):
  torch = pytest.importorskip('torch')
  loaded = torch.load(seeded_pth, weights_only=True)
  assert list(loaded) == list(seeded_state_dict)
  for key, value in seeded_state_dict.items():
    np.testing.assert_array_equal(loaded[key].numpy(), value)
  path = str(tmp_path / 'torch_saved.pth')
  torch.save(loaded, path)
  ours = pth.load_state_dict(path)
  for key, value in seeded_state_dict.items():
    np.testing.assert_array_equal(ours[key], value)


def test_converter_cli_writes_npz_that_loads_identically(tmp_path, seeded_pth, variables, capsys):
  out = str(tmp_path / 'inception.npz')
  assert converter.main(['prog', f'--inception_path={seeded_pth}', f'--out={out}']) == 0
  assert 'wrote' in capsys.readouterr().out
  from_npz = inception_weights.load_variables(out)
  assert jax.tree_util.tree_structure(from_npz) == jax.tree_util.tree_structure(variables)
  for a, b in zip(jax.tree_util.tree_leaves(from_npz), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, b)
  absent = tmp_path / 'absent.pth'
  assert converter.main(['prog', f'--inception_path={absent}', f'--out={out}']) == 2
  assert 'error: Inception weights not found at' in capsys.readouterr().err


def test_missing_weights_give_none_and_the_download_hint(tmp_path, monkeypatch, caplog):
  monkeypatch.delenv(inception_weights.ENV_VAR, raising=False)
  with caplog.at_level(logging.WARNING):
    assert inception_weights.load_inception_or_none(None) is None
  assert inception_weights.PTH_NAME in caplog.text and 'SAGAN_INCEPTION_PATH' in caplog.text
  absent = str(tmp_path / 'absent.pth')
  monkeypatch.setenv(inception_weights.ENV_VAR, absent)
  assert inception_weights.inception_weights_path(None) == absent
  assert inception_weights.inception_weights_path('/configured.pth') == '/configured.pth'
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert inception_weights.load_inception_or_none(None) is None
  assert f'not found at {absent}: download {inception_weights.PTH_NAME}' in caplog.text


def test_bad_files_raise_config_error(tmp_path, seeded_pth, seeded_state_dict):
  wrong = dict(seeded_state_dict)
  wrong['Mixed_6b.branch7x7_2.conv.weight'] = np.zeros((128, 128, 7, 1), np.float32)
  with pytest.raises(ConfigError, match=r'my\.pth: Mixed_6b\.branch7x7_2\.conv\.weight has shape'):
    inception_weights.variables_from_torch(wrong, 'my.pth')
  del wrong['Mixed_6b.branch7x7_2.conv.weight']
  with pytest.raises(ConfigError, match='missing'):
    inception_weights.variables_from_torch(wrong, 'my.pth')

  truncated = tmp_path / 'truncated.pth'
  with open(seeded_pth, 'rb') as f:
    truncated.write_bytes(f.read(1_000_000))
  stats = str(tmp_path / 'stats.npz')
  np.savez(stats, mu=np.zeros(3), sigma=np.eye(3))
  garbage = tmp_path / 'garbage.pth'
  garbage.write_bytes(b'not a torch file at all')
  malicious = str(tmp_path / 'malicious.pth')  # A pickle that would run code if trusted.
  with zipfile.ZipFile(malicious, 'w') as zf:
    zf.writestr('archive/data.pkl', b'\x80\x02cos\nsystem\n(X\x04\x00\x00\x00truetR.')
  assert pickle.loads(b'\x80\x02cbuiltins\nlen\n(X\x04\x00\x00\x00truetR.') == 4  # Well-formed.
  for path, problem in ((truncated, 'cannot read'), (stats, "missing 'params/"),
                        (garbage, 'cannot read'), (malicious, 'unsupported object os.system')):
    with pytest.raises(ConfigError, match=problem) as info:
      inception_weights.load_variables(str(path))
    assert str(path) in str(info.value) and '\n' not in str(info.value)
