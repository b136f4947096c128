"""Per-class figures of a class-conditional generator: which classes it draws well, which not.

An overall score hides a collapsed class (on Fashion-MNIST, 'Shirt' samples drawn as pullovers:
0.14 class accuracy there, above 0.86 in the other classes). This module computes, on the host in
float64, the per-class figures of the classifier metrics (sagan_jax.evaluation.registry):
- class_accuracy's table: per class the samples, the share the classifier puts in their class,
  the classifier's own accuracy on held-out real images of that class (the class's ceiling, from
  the classifier file's metadata), accuracy / ceiling, and the label the class is most often taken
  for, with its share of the class's samples; the worst class is the one of lowest accuracy.
- intra_fd_classifier (Miyato & Koyama 2018's intra-FID, in the classifier's features): per class
  the Frechet distance between the class's samples and the class's real images, and their mean.
It also formats them for the evaluate tool's table and the training log. ClassStatistics keeps
features' running statistics by class: the samples' (features.FeatureSet) and the real images'
(the classifier tool, which writes them to the classifier file as a metrics.ClassReference).
"""

import re
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from sagan_jax.evaluation import metrics

Row = Dict[str, Any]


class ClassStatistics:
  """metrics.RunningStatistics of each class's features (`by_class`, made as classes appear)."""

  def __init__(self):
    self.by_class: Dict[int, metrics.RunningStatistics] = {}

  def update(self, batch, labels) -> None:
    batch, labels = np.asarray(batch), np.asarray(labels)
    for label in np.unique(labels):
      self.by_class.setdefault(int(label), metrics.RunningStatistics()).update(
          batch[labels == label])

  def count(self, label: int) -> int:
    stats = self.by_class.get(label)
    return stats.count if stats is not None else 0

  def reference(self, num_classes: int, dim: int) -> metrics.ClassReference:
    """The statistics as arrays over classes 0..num_classes - 1 (zeros where a class has none;
    sigma is singular where a class has no more samples than dimensions)."""
    mu, sigma = np.zeros((num_classes, dim)), np.zeros((num_classes, dim, dim))
    count = np.zeros(num_classes, np.int64)
    for label, stats in self.by_class.items():
      mu[label], sigma[label] = stats.statistics(check=False)
      count[label] = stats.count
    return metrics.ClassReference(mu, sigma, count)


def _name(names: Optional[Sequence[str]], label: Optional[int]) -> Optional[str]:
  return names[label] if names and label is not None and label < len(names) else None


def _class_row(label: int, predicted: np.ndarray, num_classes: int,
               names: Optional[Sequence[str]], ceilings: Optional[Sequence[float]]) -> Row:
  """One class's row of the class_accuracy table; `predicted`: the classes of its samples."""
  samples = len(predicted)
  accuracy = float(np.mean(predicted == label)) if samples else None
  ceiling = ceilings[label] if ceilings is not None and label < len(ceilings) else None
  wrong = np.bincount(predicted[predicted != label], minlength=num_classes)
  taken = int(np.argmax(wrong)) if wrong.sum() else None  # Ties: the lowest label.
  return {'class': label, 'name': _name(names, label), 'samples': samples, 'accuracy': accuracy,
          'heldout_accuracy': ceiling,
          'ratio': accuracy / ceiling if accuracy is not None and ceiling else None,
          'taken_for': taken, 'taken_for_name': _name(names, taken),
          'taken_for_share': float(wrong[taken] / samples) if taken is not None else None}


def class_accuracy_table(predicted, labels, num_classes: int,
                         names: Optional[Sequence[str]] = None,
                         ceilings: Optional[Sequence[float]] = None) -> Dict[str, Any]:
  """class_accuracy's details from the predicted and the generated-for classes of the samples.

  Returns {'classes': a row per class (class, name, samples, accuracy, heldout_accuracy, ratio,
  taken_for, taken_for_name, taken_for_share; None where a class has no samples, ceiling or
  wrong prediction), 'worst': the row of the lowest accuracy (ties: the lowest class),
  'min_ratio': the lowest accuracy / ceiling, or None without ceilings}.
  """
  predicted, labels = np.asarray(predicted), np.asarray(labels)
  rows = [_class_row(c, predicted[labels == c], num_classes, names, ceilings)
          for c in range(num_classes)]
  worst = min((r for r in rows if r['accuracy'] is not None), key=lambda r: r['accuracy'])
  ratios = [r['ratio'] for r in rows if r['ratio'] is not None]
  return {'classes': rows, 'worst': worst, 'min_ratio': min(ratios) if ratios else None}


def intra_fd_skip_reason(fake: ClassStatistics, real: metrics.ClassReference,
                         dim: int) -> Optional[str]:
  """Why the intra-class FD cannot be computed (a class with no more samples or real images than
  feature dimensions: singular covariances), naming the fixes, or None."""
  num_classes, reasons = len(real.count), []
  counts = [fake.count(c) for c in range(num_classes)]
  low = int(np.argmin(counts))
  if counts[low] <= dim:
    need = num_classes * (dim + 1)
    reasons.append(f'class {low} has {counts[low]} samples, and {dim}-d features need more than '
                   f'{dim} in every class: set --num_samples (eval.num_samples) at least '
                   f'K*(D+1) = {need} (labels are drawn at random: better {2 * need})')
  low = int(np.argmin(real.count))
  if real.count[low] <= dim:
    reasons.append(f'the classifier file holds {real.count[low]} real images of class {low}, not '
                   f'more than {dim}: retrain the classifier with more reference images '
                   '(--num_reference_images) or leave intra_fd_classifier out')
  return '; '.join(reasons) or None


def intra_fd_table(fake: ClassStatistics, real: metrics.ClassReference,
                   names: Optional[Sequence[str]] = None) -> List[Row]:
  """Per class: class, name, samples, real_images and intra_fd, the Frechet distance between
  the class's samples' features and its real images' (intra_fd_skip_reason must be None)."""
  return [{'class': c, 'name': _name(names, c), 'samples': fake.count(c),
           'real_images': int(real.count[c]),
           'intra_fd': metrics.frechet_distance(*fake.by_class[c].statistics(), real.mu[c],
                                                real.sigma[c])}
          for c in range(len(real.count))]


# ----------------------------------------------------------------------------------------------
# Reports: the evaluate tool's table, the training log's line and TensorBoard's scalars.


def merge(details: Dict[str, Any]) -> List[Row]:
  """One row per class merging the class_accuracy and intra_fd_classifier details present."""
  rows: Dict[int, Row] = {}
  for row in (details.get('class_accuracy') or {}).get('classes', []):
    rows[row['class']] = dict(row)
  for row in (details.get('intra_fd_classifier') or {}).get('classes', []):
    rows.setdefault(row['class'], {'class': row['class'], 'name': row['name']})
    rows[row['class']]['intra_fd'] = row['intra_fd']
  return [rows[c] for c in sorted(rows)]


def _label(name: Optional[str], label: int) -> str:
  return name if name else f'class {label}'


def _taken_for(row: Row) -> str:
  if row.get('taken_for') is None:
    return '-'
  return f"{_label(row['taken_for_name'], row['taken_for'])} {row['taken_for_share']:.0%}"


def format_table(rows: Sequence[Row]) -> List[str]:
  """The rows of `merge` as text lines: class, name, accuracy, held-out, ratio, most often taken
  for (with its share of the class's samples), intra-FD; '-' where a figure is missing."""
  number = lambda value, spec: '-' if value is None else format(value, spec)
  width = max([len(r['name'] or '') for r in rows] + [4])
  lines = [f"{'class':>5}  {'name':<{width}}  {'accuracy':>8}  {'held-out':>8}  {'ratio':>5}  "
           f"{'most often taken for':<24}  {'intra-FD':>9}"]
  for r in rows:
    lines.append(f"{r['class']:>5}  {r['name'] or '':<{width}}  "
                 f"{number(r.get('accuracy'), '.4f'):>8}  "
                 f"{number(r.get('heldout_accuracy'), '.4f'):>8}  "
                 f"{number(r.get('ratio'), '.2f'):>5}  {_taken_for(r):<24}  "
                 f"{number(r.get('intra_fd'), '.4g'):>9}")
  return lines


def worst_class_summary(accuracy_details: Dict[str, Any]) -> str:
  """'worst class 6 Shirt: 0.14 (held-out 0.62), taken for Pullover 74%'."""
  worst = accuracy_details['worst']
  name = f" {worst['name']}" if worst['name'] else ''
  text = f"worst class {worst['class']}{name}: {worst['accuracy']:.2f}"
  if worst['heldout_accuracy'] is not None:
    text += f" (held-out {worst['heldout_accuracy']:.2f})"
  if worst['taken_for'] is not None:
    text += f", taken for {_taken_for(worst)}"
  return text


def class_accuracy_scalars(accuracy_details: Dict[str, Any], prefix: str) -> Dict[str, float]:
  """{'<prefix>/<class>_<name>': accuracy} of the classes with samples (names made tag-safe)."""
  scalars = {}
  for row in accuracy_details['classes']:
    if row['accuracy'] is not None:
      name = re.sub(r'[^0-9A-Za-z]+', '_', row['name'] or '').strip('_')
      scalars[f"{prefix}/{row['class']}{'_' + name if name else ''}"] = row['accuracy']
  return scalars
