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

from sagan_jax import inception
from sagan_jax import pth
from sagan_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, 'tests', 'fixtures')
TOOL = os.path.join(REPO, 'tools', 'make_inception_fixture.py')
# Float32 rounding: torch's own float32 run is ~5e-7 (of the largest value) from its float64 run
# and the Flax run ~3e-7 to 8e-7. 1e-5 leaves room for other CPUs and accelerators at
# Precision.HIGHEST, while a wrong layer (a pool counting padding, a missed branch, a transposed
# kernel) moves the outputs by 1e-2 or more.
RTOL_OF_MAX = 1e-5


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
  return inception.load_variables(seeded_pth)


@pytest.fixture(scope='module')
def outputs(variables, fixture):
  out = inception.create_inception_fn(variables)(fixture['images'])
  return {k: np.asarray(v, np.float64) for k, v in out.items()}


def assert_close_to_max(actual, expected, rtol_of_max=RTOL_OF_MAX):
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol_of_max * np.abs(expected).max())


def test_layout_is_pytorch_fid_state_dict_in_order(fixture):
  torch_layout = [(k, tuple(s)) for k, s in json.loads(str(fixture['layout']))]
  assert list(inception.torch_layout()) == torch_layout
  assert len(torch_layout) == 566 and torch_layout[-2:] == [('fc.weight', (1008, 2048)),
                                                            ('fc.bias', (1008,))]


def test_network_matches_pytorch_fid(outputs, fixture):
  assert outputs['pool3'].shape == (2, 2048) and outputs['logits'].shape == (2, 1008)
  for key in ('pool3', 'logits', 'logits_unbiased'):
    assert_close_to_max(outputs[key], fixture[f'torch64/{key}'])
  # The features are far from trivial (the seeded weights keep activations O(1)), and torch's own
  # float32 run is as far from float64 as the tolerance assumes.
  assert 1 < np.abs(fixture['torch64/pool3']).max() < 100
  assert np.std(fixture['torch64/pool3']) > 0.5
  assert_close_to_max(fixture['torch32/pool3'], fixture['torch64/pool3'], 1e-6)


def test_intermediate_blocks_match_pytorch_fid(variables, fixture):
  """pytorch-fid's blocks 0-2 (after the two stem max pools and Mixed_6e): where a bug would be."""
  apply_fn = jax.jit(lambda v, x: inception.FIDInceptionV3().apply(v, x, mutable='intermediates'))
  _, state = apply_fn(variables, fixture['images'])
  for i, channels in enumerate((64, 192, 768)):
    block = np.asarray(state['intermediates'][f'block{i}'][0], np.float64)
    assert block.shape[-1] == channels
    # Spatial means in float64: a float32 mean alone is off by ~4e-6.
    assert_close_to_max(block.mean(axis=(1, 2)), fixture[f'torch64/block{i}_mean'])


def test_resize_matches_torch_interpolate(fixture):
  resized = np.asarray(inception.resize_bilinear(fixture['images'], (299, 299)))
  np.testing.assert_allclose(resized[:, ::tool.SUBSAMPLE, ::tool.SUBSAMPLE],
                             fixture['torch64/resized_299_sub'], rtol=0, atol=2e-6)
  for i, x in enumerate(tool.resize_inputs()):
    expected = fixture[f'resize{i}']
    np.testing.assert_allclose(inception.resize_bilinear(x, expected.shape[1:3]), expected,
                               rtol=0, atol=1e-6)
    # jax.image.resize antialiases when downscaling (its default): not pytorch-fid's resize.
    antialiased = jax.image.resize(x, expected.shape, 'bilinear')
    assert np.abs(np.asarray(antialiased) - expected).max() > 0.1


def test_input_convention_uint8_grayscale_and_range():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (1, 20, 30, 1), dtype=np.uint8)
  from_uint8 = np.asarray(inception.preprocess(pixels))
  from_float = np.asarray(inception.preprocess(np.repeat(pixels / 255.0, 3, axis=-1)))
  assert from_uint8.shape == (1, 299, 299, 3)
  np.testing.assert_allclose(from_uint8, from_float, rtol=0, atol=1e-6)
  np.testing.assert_allclose(
      inception.preprocess(np.full((1, 299, 299, 3), 0.25, np.float32)), -0.5, atol=1e-7)
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
  assert inception.main(['prog', f'--inception_path={seeded_pth}', f'--out={out}']) == 0
  assert 'wrote' in capsys.readouterr().out
  from_npz = inception.load_variables(out)
  assert jax.tree_util.tree_structure(from_npz) == jax.tree_util.tree_structure(variables)
  for a, b in zip(jax.tree_util.tree_leaves(from_npz), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, b)
  absent = tmp_path / 'absent.pth'
  assert inception.main(['prog', f'--inception_path={absent}', f'--out={out}']) == 2
  assert 'error: Inception weights not found at' in capsys.readouterr().err


def test_missing_weights_give_none_and_the_download_hint(tmp_path, monkeypatch, caplog):
  monkeypatch.delenv(inception.ENV_VAR, raising=False)
  with caplog.at_level(logging.WARNING):
    assert inception.load_inception_or_none(None) is None
  assert inception.PTH_NAME in caplog.text and 'SAGAN_INCEPTION_PATH' in caplog.text
  absent = str(tmp_path / 'absent.pth')
  monkeypatch.setenv(inception.ENV_VAR, absent)
  assert inception.inception_weights_path(None) == absent
  assert inception.inception_weights_path('/configured.pth') == '/configured.pth'
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert inception.load_inception_or_none(None) is None
  assert f'not found at {absent}: download {inception.PTH_NAME}' in caplog.text


def test_bad_files_raise_config_error(tmp_path, seeded_pth, seeded_state_dict):
  wrong = dict(seeded_state_dict)
  wrong['Mixed_6b.branch7x7_2.conv.weight'] = np.zeros((128, 128, 7, 1), np.float32)
  with pytest.raises(ConfigError, match=r'my\.pth: Mixed_6b\.branch7x7_2\.conv\.weight has shape'):
    inception.variables_from_torch(wrong, 'my.pth')
  del wrong['Mixed_6b.branch7x7_2.conv.weight']
  with pytest.raises(ConfigError, match='missing'):
    inception.variables_from_torch(wrong, 'my.pth')

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
      inception.load_variables(str(path))
    assert str(path) in str(info.value) and '\n' not in str(info.value)
