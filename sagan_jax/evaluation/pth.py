"""torch's .pth state_dict files without torch: a reader and a writer that torch.load accepts.

Two formats are read: the zip archive torch.save writes since torch 1.6 (`NAME/data.pkl`, the
storages as raw records `NAME/data/KEY`) and the legacy stream before it (a magic number and three
pickles, then the storages one after another, each after its int64 element count). Only the
globals a state_dict needs resolve while unpickling, so no code from the file runs. The writer
emits the zip format with a hand-written protocol-2 pickle (pickling torch's globals would need
torch itself).
"""

import collections
import io
import pickle
import struct
import zipfile
from typing import Dict, Mapping

import numpy as np


_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_}
_DTYPE_STORAGES = {np.dtype(v): k for k, v in _STORAGE_DTYPES.items()}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c

_TensorRef = collections.namedtuple('_TensorRef', 'key offset shape strides')


class _StorageType:

  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, shape, strides, *unused_args):
  return _TensorRef(storage, offset, tuple(shape), tuple(strides))


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles a state_dict; only the few globals it needs resolve (no code from the file runs)."""

  def __init__(self, file, storage_dtypes: Dict[str, np.dtype]):
    super().__init__(file)
    self.storage_dtypes = storage_dtypes

  def find_class(self, module, name):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if module == 'torch._utils' and name in ('_rebuild_tensor', '_rebuild_tensor_v2'):
      return _rebuild_tensor
    if (module, name) == ('torch._utils', '_rebuild_parameter'):
      return lambda data, *unused: data
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f'unsupported object {module}.{name} in a state_dict')

  def persistent_load(self, pid):
    kind, storage_type, key = pid[:3]
    if kind != 'storage' or not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid[:2]}')
    if len(pid) > 5 and pid[5] is not None:
      raise pickle.UnpicklingError('storage views (torch < 0.4 files) are not supported')
    self.storage_dtypes[str(key)] = storage_type.dtype
    return str(key)


def _tensor(ref: _TensorRef, storage: np.ndarray) -> np.ndarray:
  extent = sum((n - 1) * s for n, s in zip(ref.shape, ref.strides))
  if min(ref.shape, default=1) > 0 and (ref.offset < 0 or ref.offset + extent >= storage.size):
    raise ValueError(f'tensor of shape {ref.shape} overruns its storage of {storage.size}')
  strides = [s * storage.itemsize for s in ref.strides]
  return np.lib.stride_tricks.as_strided(storage[ref.offset:], ref.shape, strides).copy()


def _materialize(state_dict, storages: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  if not isinstance(state_dict, Mapping):
    raise ValueError(f'the file holds a {type(state_dict).__name__}, not a state_dict')
  return {k: _tensor(v, storages[v.key]) for k, v in state_dict.items()
          if isinstance(v, _TensorRef)}


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """A torch state_dict file as {name: numpy array}, without torch (zip and legacy formats).

  Raises OSError when the file cannot be opened and ValueError when it is not a state_dict file
  (corrupt, cut short, or holding other objects).
  """
  try:
    return _load_state_dict(path)
  except (pickle.UnpicklingError, zipfile.BadZipFile, struct.error, EOFError, KeyError,
          IndexError, TypeError, AttributeError, OverflowError, MemoryError, ValueError,
          NotImplementedError) as e:  # The last from zipfile, on corrupt headers.
    raise ValueError(f'{type(e).__name__}: {e}') from e


def _load_state_dict(path: str) -> Dict[str, np.ndarray]:
  dtypes = {}
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as zf:
      pickles = [n for n in zf.namelist() if n.endswith('data.pkl')]
      if not pickles:
        raise ValueError('no data.pkl in the zip: not a torch file')
      prefix = pickles[0][:-len('data.pkl')]
      if prefix + 'byteorder' in zf.namelist() and zf.read(prefix + 'byteorder') != b'little':
        raise ValueError('big-endian torch files are not supported')
      state_dict = _TorchUnpickler(io.BytesIO(zf.read(pickles[0])), dtypes).load()
      storages = {k: np.frombuffer(zf.read(f'{prefix}data/{k}'), d) for k, d in dtypes.items()}
    return _materialize(state_dict, storages)
  with open(path, 'rb') as f:
    header = _TorchUnpickler(f, dtypes)
    if header.load() != _LEGACY_MAGIC:
      raise ValueError('neither a zip nor a legacy torch file (bad magic number)')
    header.load()  # The protocol version.
    sys_info = header.load()
    if not isinstance(sys_info, dict) or not sys_info.get('little_endian', True):
      raise ValueError('not a little-endian legacy torch file')
    state_dict = _TorchUnpickler(f, dtypes).load()
    storages = {}
    for key in _TorchUnpickler(f, dtypes).load():
      numel, = struct.unpack('<q', f.read(8))
      dtype = dtypes[key]
      data = f.read(numel * dtype.itemsize)
      if len(data) != numel * dtype.itemsize:
        raise EOFError(f'storage {key} is cut short')
      storages[key] = np.frombuffer(data, dtype)
  return _materialize(state_dict, storages)


class _PickleWriter:
  """Emits the protocol-2 pickle of a state_dict that torch.load reads (no torch needed)."""

  def __init__(self):
    self.out = bytearray(b'\x80\x02')  # PROTO 2

  def global_(self, module: str, name: str):
    self.out += b'c' + f'{module}\n{name}\n'.encode()

  def str_(self, s: str):
    data = s.encode()
    self.out += b'X' + struct.pack('<I', len(data)) + data  # BINUNICODE

  def int_(self, v: int):
    if -2**31 <= v < 2**31:
      self.out += b'J' + struct.pack('<i', v)  # BININT
    else:
      data = v.to_bytes(9, 'little', signed=True)
      self.out += b'\x8a\x09' + data  # LONG1 of 9 bytes

  def tuple_(self, items):
    if not items:
      self.out += b')'  # EMPTY_TUPLE
      return
    self.out += b'('  # MARK
    for item in items:
      self.int_(item)
    self.out += b't'  # TUPLE

  def ordered_dict(self):
    self.global_('collections', 'OrderedDict')
    self.out += b')R'  # OrderedDict()

  def tensor(self, key: str, array: np.ndarray):
    self.global_('torch._utils', '_rebuild_tensor_v2')
    self.out += b'('
    self.out += b'('  # Persistent id ('storage', torch.XStorage, key, 'cpu', numel).
    self.str_('storage')
    self.global_('torch', _DTYPE_STORAGES[array.dtype])
    self.str_(key)
    self.str_('cpu')
    self.int_(array.size)
    self.out += b'tQ'  # TUPLE, BINPERSID
    self.int_(0)  # Storage offset.
    self.tuple_(array.shape)
    self.tuple_(tuple(s // array.itemsize for s in array.strides))
    self.out += b'\x89'  # requires_grad = False
    self.ordered_dict()  # Backward hooks.
    self.out += b'tR'


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  """Writes {name: array} as a torch zip-format state_dict file (torch.load reads it)."""
  # np.array, not np.ascontiguousarray: that one turns 0-d tensors into 1-d ones.
  arrays = [np.array(v, np.dtype(v.dtype).newbyteorder('<'), order='C')
            for v in state_dict.values()]
  for name, array in zip(state_dict, arrays):
    if array.dtype not in _DTYPE_STORAGES:
      raise ValueError(f'{name}: dtype {array.dtype} has no torch storage type here')
  writer = _PickleWriter()
  writer.ordered_dict()
  writer.out += b'('
  for i, (name, array) in enumerate(zip(state_dict, arrays)):
    writer.str_(name)
    writer.tensor(str(i), array)
  writer.out += b'u.'  # SETITEMS, STOP
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
    zf.writestr('archive/data.pkl', bytes(writer.out))
    zf.writestr('archive/byteorder', 'little')
    for i, array in enumerate(arrays):
      zf.writestr(f'archive/data/{i}', array.tobytes())
    zf.writestr('archive/version', '3\n')
