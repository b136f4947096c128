"""Compiles the README's TPU sizing table: per-chip memory, fit and largest batch per slice.

  PYTHONPATH=.venv/libtpu .venv/bin/python tools/tpu_table.py --out=tpu_table [--rows=128]
      [--topologies=v5e-8,v4-8] [--max_batch] [--dry-run]

Each row is one `python -m sagan_jax.benchmark --topology=...` run (a subprocess, JSON kept in
--out, reused when it is already there; an interrupted --max_batch search resumes from the probes
kept beside it in JSON.probes.jsonl); at the end the markdown table is printed. A full-size
compile takes minutes on a few CPU cores and `--max_batch` several compiles per row: run it on a
machine with cores to spare, or a subset with --rows and --topologies.
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGIES = ('v4-8', 'v5e-8', 'v5p-8', 'v6e-8', 'v5e-16')
# (row name, config flags): ImageNet-128 with attention at 64 and 32; 256 px at 64 and 128.
ROWS = {
    '128': [],
    '128-attn32': ['--config=imagenet:32'],
    '256-fused': ['--config=imagenet256', '--config.model.attention_impl=fused'],
    '256-einsum': ['--config=imagenet256', '--config.model.attention_impl=einsum'],
    '256-blockwise': ['--config=imagenet256', '--config.model.attention_impl=blockwise'],
}
DTYPES = ('bfloat16', 'float32')


def _command(row: str, dtype: str, topology: str, max_batch: bool, out: str):
  flags = ROWS[row] or ['--config=imagenet']
  return [sys.executable, '-m', 'sagan_jax.benchmark', *flags, f'--config.model.dtype={dtype}',
          '--config.train.batch_size=256', f'--topology={topology}', f'--json_out={out}'] + (
              ['--max_batch'] if max_batch else [])


def _cell(report) -> str:
  gib = report['bytes_per_device']['total'] / 2**30 if report['bytes_per_device']['total'] else 0
  text = f"{gib:.1f} GiB, {'fits' if report['fits'] else 'no'}"
  return text + (f", max {report['max_batch']}" if 'max_batch' in report else '')


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default='tpu_table')
  parser.add_argument('--rows', default=','.join(ROWS))
  parser.add_argument('--dtypes', default=','.join(DTYPES))
  parser.add_argument('--topologies', default=','.join(TOPOLOGIES))
  parser.add_argument('--max_batch', action='store_true')
  parser.add_argument('--dry-run', action='store_true')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  topologies = args.topologies.split(',')
  table = ['| config | dtype | ' + ' | '.join(topologies) + ' |',
           '|---|---|' + '---|' * len(topologies)]
  for row in args.rows.split(','):
    for dtype in args.dtypes.split(','):
      cells = []
      for topology in topologies:
        out = os.path.join(args.out, f'{row}_{dtype}_{topology}.json')
        command = _command(row, dtype, topology, args.max_batch, out)
        if args.dry_run:
          print(' '.join(command))
        elif not os.path.exists(out):
          subprocess.run(command, cwd=REPO, check=False)
        if os.path.exists(out):
          with open(out) as f:
            cells.append(_cell(json.load(f)))
        else:
          cells.append('not measured')
      table.append(f'| {row} | {dtype} | ' + ' | '.join(cells) + ' |')
  print('\n'.join(table))
  return 0


if __name__ == '__main__':
  sys.exit(main())
