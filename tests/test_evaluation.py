"""The evaluation pipeline: sharded sampling and features, metrics end to end, the CLIs' files,
reference statistics, standing statistics, the classifier and the best checkpoint.

A tiny generator (ch 8, 32 px, no attention), a data set of squares whose size and brightness
give the class, and the FID Inception with seeded weights on one image.
"""

import dataclasses
import functools
import json
import logging
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sagan_jax import checkpointing
from sagan_jax import classifier as classifier_tool
from sagan_jax import evaluate
from sagan_jax import latents
from sagan_jax import layers
from sagan_jax import models
from sagan_jax import reference_stats
from sagan_jax import sharding
from sagan_jax import train_loop
from sagan_jax.errors import ConfigError
from sagan_jax.evaluation import classifier
from sagan_jax.evaluation import evaluator
from sagan_jax.evaluation import features
from sagan_jax.evaluation import inception_weights
from sagan_jax.evaluation import metrics
from sagan_jax.evaluation import per_class
from sagan_jax.train_state import GANTrainState
from tests.conftest import tiny_config
from tests.conftest import write_idx
from tests import tolerances
from tests.test_inception import FIXTURES
from tests.test_inception import tool

NUM_TRAIN, NUM_TEST = 300, 200


def square_images(n: int, seed: int):
  """28x28 noise with a centred square of side 4 + 2 * class and brightness 75 + 20 * class."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % 10
  images = rng.integers(0, 30, (n, 28, 28)).astype(np.uint8)
  for i, c in enumerate(labels):
    side = 4 + 2 * c
    start = (28 - side) // 2
    images[i, start:start + side, start:start + side] = 75 + 20 * c
  return images, labels


def padded_real(images):
  """What the input pipeline makes of 28 px images at 32 px: padded, in [-1, 1]."""
  return np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None].astype(np.float32) / 127.5 - 1.0


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('squares'))
  for prefix, n, seed in (('train', NUM_TRAIN, 0), ('t10k', NUM_TEST, 1)):
    images, labels = square_images(n, seed)
    write_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'), images)
    write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'), labels)
  config = tiny_config(directory)
  config.model.g_attention = config.model.d_attention = ()  # Compiles faster; not used here.
  return config


@pytest.fixture(scope='module')
def mesh():
  assert jax.device_count() == 8
  return sharding.create_mesh()


@pytest.fixture(scope='module')
def state(config, mesh):
  """G's part of a train state at step 7 (D and the optimizers are not needed here)."""
  generator = models.create_generator(config)
  g_vars = jax.jit(functools.partial(generator.init, train=True))(
      jax.random.PRNGKey(0), jnp.zeros((2, config.model.z_dim)), jnp.zeros((2,), jnp.int32))
  g_vars = jax.device_put(dict(g_vars), sharding.replicated(mesh))
  params = g_vars.pop('params')
  # Different EMA and raw weights, so that a test can tell which one was used.
  ema = jax.tree.map(lambda x: x * 1.01, params)
  unused = {'unused': jnp.zeros(())}
  return GANTrainState(step=jnp.asarray(7, jnp.int32), rng=jax.random.PRNGKey(1),
                       g_params=params, d_params=unused, g_state=g_vars, d_state=unused,
                       g_opt_state=unused, d_opt_state=unused, ema_g_params=ema, g_tx=None,
                       d_tx=None)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, config, state):
  workdir = str(tmp_path_factory.mktemp('run'))
  manager = checkpointing.create_checkpoint_manager(workdir, config)
  checkpointing.save(manager, state, config)
  manager.wait_until_finished()
  return workdir


@pytest.fixture(scope='module')
def classifier_file(config, tmp_path_factory):
  path = str(tmp_path_factory.mktemp('classifier') / 'classifier.npz')
  metadata = classifier_tool.create_classifier_file(config, path, epochs=6, batch_size=50,
                                                    num_heldout=NUM_TRAIN,
                                                    num_reference_images=1000)
  return path, metadata


def statistics_rounding(feats, abs_terms, n):
  """Bounds on |d mu| and |d sigma| between two float32 computations of the same features.

  Each feature is within twice the probabilistic rounding bound of its absolute terms, n the
  network's longest reduction (tests/tolerances.py; a ReLU adds nothing). mu moves by the mean of
  that; sigma_ij by (sum |f_i - mu_i| e_j + e_i |f_j - mu_j| + e_i e_j) / (N - 1), the means'
  errors cancelling (sum (f - mu) = 0). The float64 sums add gamma_(N + 2) of their terms.
  """
  feats = np.asarray(feats, np.float64)
  errors = 2 * tolerances.probabilistic_sum_bound(abs_terms, n)
  centred = np.abs(feats - feats.mean(0))
  count = len(feats)
  float64 = tolerances.gamma(count + 2, tolerances.EPS64)
  mu_error = errors.mean(0) + float64 * np.abs(feats).mean(0)
  sigma_error = ((centred.T @ errors + errors.T @ centred + errors.T @ errors) / (count - 1) +
                 float64 * centred.T @ centred / (count - 1))
  return mu_error, sigma_error


def dense_abs_terms(apply_fn, variables, images, num_features):
  """|x| @ |W| + |b| of the Dense layer of apply_fn's network that makes `num_features` outputs,
  and its number of terms."""
  captured = []

  def interceptor(next_fn, args, kwargs, context):
    out = next_fn(*args, **kwargs)
    if isinstance(context.module, nn.Dense) and context.module.features == num_features:
      captured.append((args[0], context.module.variables['params']))
    return out

  with nn.intercept_methods(interceptor):
    apply_fn(variables, images)
  (x, params), = captured
  abs_terms = (np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(params['kernel'], np.float64))
               + np.abs(np.asarray(params['bias'], np.float64)))
  return abs_terms, x.shape[-1]


def create_direct_fn(config, net, padded):
  """Samples and features without the mesh: `fn(params, g_state, rng, count)` on one device."""
  generator = models.create_generator(config)

  @jax.jit
  def run(params, g_state, variables, rng):
    z, labels = latents.sample_latents(rng, padded, config.model.z_dim, 10, 0.0)
    images = generator.apply({'params': params, **g_state}, z, labels, train=False)
    return labels, net.apply_fn(variables, features.quantize(images))

  def fn(params, g_state, rng, count):
    inputs = jax.device_put(jax.device_get((params, g_state, net.variables, rng)),
                            jax.devices()[0])
    labels, out = jax.device_get(run(*inputs))
    return labels[:count], {k: v[:count] for k, v in out.items()}

  return fn


def test_classifier_learns_the_classes_and_its_reference_is_all_training_images(
    config, classifier_file):
  path, metadata = classifier_file
  assert metadata['train_split'] == 'test' and metadata['heldout_split'] == 'train'
  # Chance is 0.1; 24 small steps learn the easy classes in part.
  assert metadata['train_images'] == NUM_TEST and metadata['heldout_accuracy'] > 0.4
  net, reference = classifier.load_feature_net(path)
  assert net.feature_dim == 128 and reference.info['num_images'] == NUM_TRAIN
  # The reference is every training image once (no flips, no repeats): numpy on all of them.
  # The features there were computed in other batches: float32 rounding bounded by the absolute
  # terms of the feature layer (the classifier's longest reduction).
  images, labels = square_images(NUM_TRAIN, 0)
  images = padded_real(images)
  outputs = jax.device_get(net.apply_fn(net.variables, images))
  real = np.asarray(outputs['features'], np.float64)
  abs_terms, terms = dense_abs_terms(net.apply_fn, net.variables, images, net.feature_dim)
  mu_error, sigma_error = statistics_rounding(real, abs_terms, terms)
  tolerances.assert_within(reference.mu, real.mean(0), mu_error, 'reference mu')
  tolerances.assert_within(reference.sigma, np.cov(real.T), sigma_error, 'reference sigma')
  assert reference.features.shape == (NUM_TRAIN, 128)
  # Per class, in the same pass: the same bounds on each class's 30 images.
  assert reference.classes.count.tolist() == [NUM_TRAIN // 10] * 10
  assert reference.classes.sigma.shape == (10, 128, 128) and reference.classes.sigma.dtype == float
  for c in range(10):
    mu_error, sigma_error = statistics_rounding(real[labels == c], abs_terms[labels == c], terms)
    tolerances.assert_within(reference.classes.mu[c], real[labels == c].mean(0), mu_error,
                             f'class {c} mu')
    tolerances.assert_within(reference.classes.sigma[c], np.cov(real[labels == c].T), sigma_error,
                             f'class {c} sigma')
  # The held-out split is these images: accuracy per class, the same in the file's metadata.
  assert metadata['class_names'][6] == 'Shirt' and net.description['class_names'][6] == 'Shirt'
  assert metadata['heldout_per_class_count'] == [NUM_TRAIN // 10] * 10
  hits = np.round(np.multiply(metadata['heldout_per_class_accuracy'], NUM_TRAIN // 10))
  assert metadata['heldout_accuracy'] == hits.sum() / NUM_TRAIN
  direct = [np.mean(outputs['logits'][labels == c].argmax(1) == c) for c in range(10)]
  # Other batches: rounding may flip the argmax of a near-tie image (1 of a class's 30).
  np.testing.assert_allclose(metadata['heldout_per_class_accuracy'], direct, rtol=0,
                             atol=1 / 30 + 1e-12)
  assert net.description['heldout_per_class_accuracy'] == metadata['heldout_per_class_accuracy']
  other = tiny_config()
  other.data.channels = 3
  with pytest.raises(ConfigError, match='data.channels=1 but the generator has data.channels=3'):
    classifier.check_compatible(net, other, path)


def test_an_old_classifier_file_without_the_per_class_figures_still_loads(
    classifier_file, tmp_path):
  path = str(tmp_path / 'old.npz')
  with np.load(classifier_file[0]) as npz:
    arrays = {k: npz[k] for k in npz.files if not k.startswith('reference/class_')}
  metadata = json.loads(str(arrays['metadata']))
  for key in ('class_names', 'heldout_per_class_accuracy', 'heldout_per_class_count'):
    del metadata[key]
  arrays['metadata'] = np.asarray(json.dumps(metadata))
  np.savez(path, **arrays)
  net, reference = classifier.load_feature_net(path)
  assert reference.classes is None and 'heldout_per_class_accuracy' not in net.description
  new_net, new_reference = classifier.load_feature_net(classifier_file[0])
  np.testing.assert_array_equal(reference.sigma, new_reference.sigma)
  # class_accuracy runs without ceilings and says where they come from; intra-FD is skipped.
  labels = np.arange(200) % 10
  fake = features.FeatureSet(keep=0, by_class=True)
  fake.update({'features': np.random.default_rng(0).standard_normal((200, 128)),
               'logits': np.eye(10)[labels]}, labels)
  results = evaluator.evaluate_metrics(['class_accuracy', 'intra_fd_classifier'],
                                       {'classifier': fake}, labels, {'classifier': reference},
                                       {'classifier': net.description})
  assert results.scores == {'class_accuracy': 1.0, 'worst_class_accuracy': 1.0}
  assert 'retraining the classifier' in results.details['class_accuracy']['heldout_missing']
  assert 'retrain the classifier' in results.skipped['intra_fd_classifier']
  assert new_net.description['heldout_per_class_accuracy'] is not None


def test_a_metric_skipped_at_each_evaluation_is_logged_once_and_class_statistics_kept_for_it(
    config, mesh, classifier_file, tmp_path, caplog, monkeypatch):
  labels = np.arange(20) % 10
  requests = []

  def sample_features(sample_fn, g_params, g_state, num_samples, batch_size, rng, keep,
                      keep_logits, by_class, show_progress=False):
    """Hand-made outputs instead of sampling (the sampling is tested above)."""
    del sample_fn, g_params, g_state, num_samples, batch_size, rng, show_progress  # Unused.
    requests.append(set(by_class))
    fake = features.FeatureSet(keep, keep_logits['classifier'], 'classifier' in by_class)
    fake.update({'features': np.random.default_rng(0).standard_normal((20, 128)),
                 'logits': np.eye(10)[labels]}, labels)
    return {'classifier': fake}, labels

  monkeypatch.setattr(features, 'sample_features', sample_features)
  settings = evaluator.Settings(metrics=('class_accuracy', 'intra_fd_classifier'), num_samples=20,
                                classifier_path=classifier_file[0])
  generator = models.create_generator(config)
  scorer = evaluator.create_evaluator(config, generator, mesh, settings)
  with caplog.at_level(logging.INFO):
    for _ in range(3):
      assert scorer(None, None) == {'class_accuracy': 1.0, 'worst_class_accuracy': 1.0}
  skip_lines = [r for r in caplog.records if 'intra_fd_classifier skipped' in r.getMessage()]
  assert len(skip_lines) == 1 and skip_lines[0].levelno == logging.INFO
  assert 'K*(D+1) = 1290' in scorer.skipped['intra_fd_classifier']
  assert requests == [{'classifier'}] * 3
  assert scorer.details['class_accuracy']['worst']['class'] == 0
  # A classifier file without per-class statistics: skipped before sampling, none kept.
  old = str(tmp_path / 'old.npz')
  with np.load(classifier_file[0]) as npz:
    np.savez(old, **{k: npz[k] for k in npz.files if not k.startswith('reference/class_')})
  scorer = evaluator.create_evaluator(config, generator, mesh,
                                      dataclasses.replace(settings, classifier_path=old))
  assert 'retrain the classifier' in scorer.skipped['intra_fd_classifier']
  scorer(None, None)
  assert requests[-1] == set() and 'intra_fd_classifier' not in scorer.details


def test_fd_classifier_of_real_images_against_their_reference_is_about_zero(classifier_file):
  net, reference = classifier.load_feature_net(classifier_file[0])
  sets = {}
  for name, (images, _) in (('train', square_images(NUM_TRAIN, 0)),
                            ('test', square_images(NUM_TEST, 1))):
    sets[name] = features.FeatureSet(keep=0)
    sets[name].update(jax.device_get(net.apply_fn(net.variables, padded_real(images))))
  same = evaluator.compute_scores(['fd_classifier'], {'classifier': sets['train']}, None,
                                  {'classifier': reference})[0]['fd_classifier']
  other = evaluator.compute_scores(['fd_classifier'], {'classifier': sets['test']}, None,
                                   {'classifier': reference})[0]['fd_classifier']
  scale = np.trace(reference.sigma)
  # Identical statistics up to float32 feature noise (which enters FD at second order) and the
  # float64 sqrtm (here about 1e-11 of the scale); the features' 128 dims hold dead ReLU units,
  # so the covariances are singular and no useful bound on sqrtm's rounding follows from them.
  # 1e-6 of the scale separates that from other images of the distribution (1.4e-5 here).
  assert abs(same) < 1e-6 * scale
  assert 0 < other < 0.2 * scale  # Other images of the same distribution: small, not zero.


def test_evaluate_samples_as_the_run_did_unless_a_flag_says_otherwise(workdir, classifier_file,
                                                                      monkeypatch, tmp_path):
  """--truncation and --standing_stats default to the checkpoint config's eval fields."""
  workdir = shutil.copytree(workdir, str(tmp_path / 'run'))  # The shared one keeps its files.
  load = checkpointing.load_generator

  def load_with_run_settings(*args, **kwargs):
    config, *rest = load(*args, **kwargs)
    config.eval.truncation, config.eval.standing_stats = 0.5, 2
    return (config, *rest)

  monkeypatch.setattr(checkpointing, 'load_generator', load_with_run_settings)
  args = ['prog', f'--workdir={workdir}', f'--classifier={classifier_file[0]}',
          '--num_samples=150', '--batch_size=60', '--metrics=class_accuracy']
  assert evaluate.main(args) == 0
  assert evaluate.main(args + ['--standing_stats=0']) == 0
  names = set(os.listdir(os.path.join(workdir, 'eval')))
  assert {'step_0000007_trunc0.5_standing2.json', 'step_0000007_trunc0.5.json'} <= names


def test_evaluate_cli_without_inception_scores_writes_json_and_tensorboard(
    workdir, classifier_file, config, state, monkeypatch, caplog, capsys):
  monkeypatch.delenv(inception_weights.ENV_VAR, raising=False)
  with caplog.at_level(logging.WARNING):
    code = evaluate.main(['prog', f'--workdir={workdir}', f'--classifier={classifier_file[0]}',
                          '--num_samples=150', '--batch_size=60'])
  assert code == 0
  skip_lines = [r.getMessage() for r in caplog.records if 'Inception metrics are skipped' in
                r.getMessage()]
  assert len(skip_lines) == 1 and inception_weights.PTH_NAME in skip_lines[0]
  stdout = capsys.readouterr().out
  assert 'fid: skipped (no Inception weights)' in stdout and 'class_accuracy: ' in stdout

  path = os.path.join(workdir, 'eval', 'step_0000007.json')
  with open(path) as f:
    result = json.load(f)
  assert result['num_samples'] == 150 and result['generator'] == 'ema'
  assert result['feature_networks']['classifier']['path'] == classifier_file[0]
  assert set(result['scores']) == {'fd_classifier', 'class_accuracy', 'worst_class_accuracy'}
  # 150 samples are about 15 per class: intra-FD is skipped, naming the fix (10 classes x 129).
  assert 'at least K*(D+1) = 1290' in result['skipped']['intra_fd_classifier']
  # The same numbers without the mesh: 60 per batch (padded to 64 on 8 devices), 30 in the last.
  net, reference = classifier.load_feature_net(classifier_file[0])
  rng = jax.random.fold_in(jax.random.PRNGKey(0), 0)
  labels, embeddings, logits = [], [], []
  direct_fn = create_direct_fn(config, net, 64)
  for index, count in ((0, 60), (1, 60), (2, 30)):
    y, out = direct_fn(state.ema_g_params, state.g_state, jax.random.fold_in(rng, index), count)
    labels.append(y)
    embeddings.append(out['features'])
    logits.append(out['logits'])
  embeddings, logits = np.concatenate(embeddings), np.concatenate(logits)
  expected_fd = metrics.frechet_distance(embeddings.mean(0), np.cov(np.float64(embeddings).T),
                                         reference.mu, reference.sigma)
  # Other batches and device splits, so float32 feature noise (FD differs by ~1e-9 relative here;
  # FD's covariances are singular, see above, so no derived bound): 1e-3 is for noise only.
  assert result['scores']['fd_classifier'] == pytest.approx(expected_fd, rel=1e-3)
  # Rounding may flip the argmax of one near-tie sample of 150 (and 1e-9 absorbs the float sum).
  assert result['scores']['class_accuracy'] == pytest.approx(
      np.mean(logits.argmax(1) == np.concatenate(labels)), abs=1 / 150 + 1e-9)
  # The per-class table: the same labels (drawn on device from the same keys), so the same counts;
  # accuracies up to that one flip; the held-out ceilings of the classifier file.
  labels, rows = np.concatenate(labels), result['per_class']
  assert [r['class'] for r in rows] == list(range(10)) and rows[6]['name'] == 'Shirt'
  assert [r['samples'] for r in rows] == np.bincount(labels, minlength=10).tolist()
  for row in rows:
    mine = labels == row['class']
    assert row['accuracy'] == pytest.approx(np.mean(logits[mine].argmax(1) == row['class']),
                                            abs=1 / mine.sum() + 1e-12)
  assert [r['heldout_accuracy'] for r in rows] == classifier_file[1]['heldout_per_class_accuracy']
  worst = result['details']['class_accuracy']['worst']
  assert result['scores']['worst_class_accuracy'] == worst['accuracy'] == min(
      r['accuracy'] for r in rows)
  assert 'per class:' in stdout and f"worst class {worst['class']} {worst['name']}: " in stdout
  assert 'intra_fd_classifier: skipped (class ' in stdout
  events = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
  assert events
  with open(os.path.join(workdir, events[0]), 'rb') as f:
    assert b'eval/fd_classifier' in f.read()

  # Fewer samples than the classifier's 128 features: FD undefined, one error line, exit 2.
  assert evaluate.main(['prog', f'--workdir={workdir}', f'--classifier={classifier_file[0]}',
                        '--num_samples=100']) == 2
  err = capsys.readouterr().err
  last = err.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'at least 129' in last
  # Nothing to score at all: an error that says why.
  assert evaluate.main(['prog', f'--workdir={workdir}', '--metrics=fid,is']) == 2
  assert 'no metric can run (fid: no Inception weights' in capsys.readouterr().err
  # --best reads WORKDIR/best, which this run has not written.
  assert evaluate.main(['prog', f'--workdir={workdir}', '--best']) == 2
  assert 'error: no best checkpoint in' in capsys.readouterr().err
  assert evaluate.main(['prog', f'--workdir={workdir}', '--best', '--step=7']) == 2
  assert '--best and --step pick different checkpoints' in capsys.readouterr().err
  # A corrupt classifier file: one line that names it, no JSON written.
  corrupt = os.path.join(os.path.dirname(classifier_file[0]), 'corrupt.npz')
  with open(corrupt, 'wb') as f:
    f.write(b'PK\x03\x04 not an npz')
  evals_before = sorted(os.listdir(os.path.join(workdir, 'eval')))
  assert evaluate.main(['prog', f'--workdir={workdir}', f'--classifier={corrupt}']) == 2
  err = capsys.readouterr().err
  assert 'Traceback' not in err and err.strip().splitlines()[-1].startswith(f'error: {corrupt}')
  assert sorted(os.listdir(os.path.join(workdir, 'eval'))) == evals_before


def test_inception_features_of_the_sharded_path_match_pytorch_fid(config, mesh):
  """evaluation's Inception wrapper (the [-1, 1] convention, 8-bit rounding, padding over the
  mesh) against pytorch-fid's outputs for the parity fixture (tests/test_inception.py)."""
  with np.load(os.path.join(FIXTURES, 'inception_parity.npz')) as fixture:
    images, expected = fixture['images'][:1], {k: fixture[f'torch64/{k}'][0] for k in (
        'pool3', 'logits_unbiased')}
  variables = inception_weights.variables_from_torch(
      tool.seeded_state_dict(inception_weights.torch_layout(), tool.SEED), 'seeded')
  net = features.inception_net(variables, 'seeded')
  # Inception is slow on CPUs: 1 image, padded to 2 devices and cut back.
  features_fn = features.create_features_fn([net], sharding.create_mesh(jax.devices()[:2]))
  out = features_fn(images * 2.0 - 1.0)['inception']
  assert out['features'].shape == (1, 2048) and out['logits'].shape == (1, 1008)
  # The fixture's pixels are not on 8-bit levels: rounding them moves the outputs by 3.5e-4 of
  # their largest value (measured), a wrong input range ([-1, 1] read as [0, 1]) by 1.7 times it.
  # That 8-bit rounding is the same on every machine (the same float32 pixels); float32 network
  # rounding is ~1e-6 of the largest value (tests/test_inception.py), far below 3e-3.
  for key, name in (('features', 'pool3'), ('logits', 'logits_unbiased')):
    np.testing.assert_allclose(out[key][0], expected[name], rtol=0,
                               atol=3e-3 * np.abs(expected[name]).max())
  # FID from 100 samples of 2048-d features is undefined: refused before any sampling.
  settings = evaluator.Settings(metrics=('fid',), num_samples=100)
  reference = metrics.Reference(np.zeros(2048), np.eye(2048), None, {'resolution': 32})
  with pytest.raises(ConfigError, match='fid needs more samples than features.*at least 2049'):
    evaluator.Evaluator(models.create_generator(config), config.model.z_dim, mesh, settings,
                        [net], {'inception': reference}, {})


def test_reference_statistics_of_another_resolution_or_feature_size_are_refused(tmp_path):
  path = str(tmp_path / 'ref.npz')
  rng = np.random.default_rng(0)
  vectors = rng.standard_normal((40, 16))
  metrics.save_reference(path, vectors.mean(0), np.cov(vectors.T), vectors, resolution=64,
                         channels=3)
  reference = metrics.load_reference(path)
  assert reference.info['resolution'] == 64 and reference.info['feature_dim'] == 16
  np.testing.assert_allclose(reference.features, vectors.astype(np.float32))
  with np.load(path) as npz:  # Plain numpy readers see the essentials too.
    assert int(npz['resolution']) == 64 and npz['mu'].shape == (16,)
  with pytest.raises(ConfigError, match=r'computed at 64x64 px but the generator makes 128x128'):
    evaluator.check_reference(reference, path, 16, 128, 'FID Inception')
  with pytest.raises(ConfigError, match=r'holds 16-d features but the FID Inception gives '
                                        r'2048-d'):
    evaluator.check_reference(reference, path, 2048, 64, 'FID Inception')
  evaluator.check_reference(reference, path, 16, 64, 'FID Inception')  # Matching: no error.


class _Projection(nn.Module):
  """A tiny stand-in feature network: a fixed random projection of the pixels."""

  @nn.compact
  def __call__(self, images):
    flat = images.reshape(images.shape[0], -1)
    projected = flat @ self.param('w', nn.initializers.normal(0.05), (flat.shape[1], 16))
    return {'features': projected, 'logits': projected[:, :4]}


def test_reference_stats_cover_the_training_images_and_the_cli_needs_weights(
    config, tmp_path, monkeypatch, capsys):
  model = _Projection()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))
  net = features.FeatureNet('tiny', model.apply, variables, 16, {'network': 'projection'})
  out = str(tmp_path / 'ref.npz')
  info = reference_stats.compute_reference_stats(config, out, num_images=1000, batch_size=64,
                                                 net=net)
  assert info['num_images'] == NUM_TRAIN  # All of them, once each.
  reference = metrics.load_reference(out)
  images = padded_real(square_images(NUM_TRAIN, 0)[0])
  real = np.asarray(model.apply(variables, images)['features'], np.float64)
  # Features computed in other batches: each a 1024-term dot product, rounded in other orders.
  flat = images.reshape(len(images), -1)
  mu_error, sigma_error = statistics_rounding(
      real, tolerances.abs_matmul(flat, variables['params']['w']), flat.shape[1])
  tolerances.assert_within(reference.mu, real.mean(0), mu_error, 'reference mu')
  tolerances.assert_within(reference.sigma, np.cov(real.T), sigma_error, 'reference sigma')
  assert reference.info['resolution'] == 32 and reference.features.shape == (NUM_TRAIN, 16)
  with pytest.raises(ConfigError, match='needs more images than that'):
    reference_stats.compute_reference_stats(config, out, num_images=16, net=net)

  monkeypatch.delenv(inception_weights.ENV_VAR, raising=False)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  assert reference_stats.main(['prog', f'--config={repo}/configs/fashion_mnist.py',
                               f'--out={out}']) == 2
  assert 'error: Inception weights not found' in capsys.readouterr().err


def create_bn_inputs_fn(generator):
  """`fn(params, g_state, z, labels)`: the input of every batch norm of G in training mode."""

  @jax.jit
  def fn(params, g_state, z, labels):
    captured = {}

    def interceptor(next_fn, args, kwargs, context):
      if (isinstance(context.module, layers.ConditionalBatchNorm) and
          context.method_name == '__call__'):
        captured['/'.join(context.module.path)] = args[0]
      return next_fn(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      generator.apply({'params': params, **g_state}, z, labels, train=True,
                      mutable=['batch_stats', 'spectral'])
    return captured

  return fn


def test_standing_statistics_are_the_mean_of_batch_moments(config, state, mesh):
  generator = models.create_generator(config)
  standing_fn = features.create_standing_stats_fn(generator, config.model.z_dim, mesh,
                                                  batch_size=12)
  rng = jax.random.PRNGKey(9)
  params, g_state = jax.device_get(state.ema_g_params), jax.device_get(state.g_state)
  new_state = jax.device_get(features.standing_statistics(standing_fn, params, g_state, 3, rng))
  sums, bounds = {}, {}
  bn_inputs_fn = create_bn_inputs_fn(generator)
  for index in range(3):
    z, labels = latents.sample_latents(jax.random.fold_in(rng, index), 16, config.model.z_dim,
                                       10, 0.0)
    for name, x in jax.device_get(bn_inputs_fn(params, g_state, z, labels)).items():
      x = np.asarray(x, np.float64)
      centred = np.abs(x - x.mean((0, 1, 2)))
      moments = np.stack([x.mean((0, 1, 2)), x.var((0, 1, 2))])
      # Absolute terms of each moment (an error dx in x, of the size of |x|, moves the term
      # (x - mean)^2 by 2 |x - mean| dx): G's forward runs in other batches and device splits.
      terms = np.stack([np.abs(x).mean((0, 1, 2)), (centred**2 + 2 * centred * np.abs(x)).mean(
          (0, 1, 2))])
      sums[name] = sums.get(name, 0) + moments / 3
      bounds[name] = bounds.get(name, 0) + 2 * tolerances.probabilistic_sum_bound(
          terms, x.size // x.shape[-1]) / 3
  assert len(sums) == 7  # Two conditional BNs in each of G's 3 blocks, and the last BN.
  for name, (mean, var) in sums.items():
    stats = new_state['batch_stats']
    for part in name.split('/'):
      stats = stats[part]
    tolerances.assert_within(stats['mean'], mean, bounds[name][0], f'{name} mean')
    tolerances.assert_within(stats['var'], var, bounds[name][1], f'{name} var')
    assert not np.allclose(stats['var'], 1.0)  # Changed from the initial statistics.
  # Spectral vectors and parameters stay as they were.
  for a, b in zip(jax.tree.leaves(g_state['spectral']), jax.tree.leaves(new_state['spectral'])):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('metric,values,best_step', [('fid', (5.0, 3.0, 4.0), 2),
                                                     ('class_accuracy', (0.5, 0.7, 0.6), 2)])
def test_the_best_checkpoint_is_kept_by_its_metric(config, state, tmp_path, metric, values,
                                                   best_step):
  keeper = checkpointing.BestCheckpoint(tmp_path, metric)
  states = {}
  for step, value in enumerate(values, 1):
    states[step] = state.replace(step=jnp.asarray(step, jnp.int32), ema_g_params=jax.tree.map(
        lambda x, s=step: x + s, state.ema_g_params))
    keeper.update(states[step], config, {metric: value, 'other': 1.0})
  assert checkpointing.best_checkpoint_dir(tmp_path).exists()
  _, _, params, _, step, metadata = checkpointing.load_best_generator(tmp_path)
  assert step == best_step and metadata['metric'] == metric
  assert metadata['value'] == values[best_step - 1]
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(states[best_step].ema_g_params)):
    np.testing.assert_array_equal(a, b)
  assert os.listdir(checkpointing.best_checkpoint_dir(tmp_path)) == [str(best_step)]
  # A resumed run reads the kept best and only replaces it with a better score.
  resumed = checkpointing.BestCheckpoint(tmp_path, metric)
  assert not resumed.is_better(values[2]) and not resumed.is_better(float('nan'))
  assert resumed.is_better(values[best_step - 1] + (-1 if metric == 'fid' else 1) * 0.1)
  with pytest.raises(ConfigError, match="eval.best_metric='is_std' cannot rank"):
    checkpointing.BestCheckpoint(tmp_path, 'is_std')


def test_evaluation_during_training_logs_scores_and_keeps_the_best(
    config, state, mesh, classifier_file, tmp_path, caplog, monkeypatch):
  shutil.copy(classifier_file[0], tmp_path / evaluator.CLASSIFIER_FILE)  # Found in the workdir.
  train_config = tiny_config(config.data.fashion_mnist_dir)
  train_config.eval.num_samples = 130
  train_config.eval.metrics = ('fid', 'class_accuracy')
  train_config.eval.best_metric = 'fid'
  generator = models.create_generator(train_config)

  class Writer:
    scalars = {}

    def write_scalars(self, step, scalars):
      self.scalars[step] = scalars

  with caplog.at_level(logging.INFO):
    train_loop._create_periodic_evaluation(train_config, tmp_path, generator, mesh, Writer())
  assert 'eval.best_metric=fid is not evaluated (no Inception weights)' in caplog.text
  assert not checkpointing.best_checkpoint_dir(tmp_path).exists()
  train_config.eval.every_steps = 0
  assert train_loop._create_periodic_evaluation(train_config, tmp_path, generator, mesh,
                                                Writer()) is None

  # The evaluator's numbers are tested above; here it is replaced by one that records its input.
  calls = []

  def fake_evaluator(self, g_params, g_state):
    calls.append(g_params)
    # Class 0 ('Top'): one of two samples right, the other taken for 'Shirt'; class 1: right.
    self.details = {'class_accuracy': per_class.class_accuracy_table(
        np.array([0, 1, 1]), np.array([0, 0, 1]), 2, ['Top', 'Shirt'], [0.9, 0.6])}
    return {'class_accuracy': 0.25 * len(calls)}

  monkeypatch.setattr(evaluator.Evaluator, '__call__', fake_evaluator)
  train_config.eval.every_steps = 5
  train_config.eval.best_metric = 'class_accuracy'
  evaluate_fn = train_loop._create_periodic_evaluation(train_config, tmp_path, generator, mesh,
                                                       Writer())
  with caplog.at_level(logging.INFO):
    scores = evaluate_fn(7, state)
  assert scores == {'class_accuracy': 0.25} and calls[0] is state.ema_g_params
  assert Writer.scalars[7] == {'eval/class_accuracy': 0.25, 'eval/class_accuracy/0_Top': 0.5,
                               'eval/class_accuracy/1_Shirt': 1.0}
  assert 'eval at step 7 (130 samples' in caplog.text
  assert 'worst class 0 Top: 0.50 (held-out 0.90), taken for Shirt 50%' in caplog.text
  with open(tmp_path / 'eval' / 'train_step_0000007.json') as f:
    written = json.load(f)
  assert written['step'] == 7 and written['scores'] == {'class_accuracy': 0.25}
  assert written['details']['class_accuracy']['worst']['taken_for_name'] == 'Shirt'
  evaluate_fn(8, state.replace(step=jnp.asarray(8, jnp.int32)))
  assert checkpointing.load_best_generator(tmp_path)[4:] == (
      8, {'step': 8, 'metric': 'class_accuracy', 'value': 0.5, 'scores': {'class_accuracy': 0.5}})
