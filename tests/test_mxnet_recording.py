"""The committed MXNet fixtures are what real MXNet 1.9.1 and 2.0.0b1 write.

.ci/mxnet_fixtures installs MXNet 1.9.1 and 2.0.0b1 in side environments,
re-records the fixtures with tests/mxnet_fixtures/record.py and record2.py
into a temporary directory and runs this test with OPTAX_FTML_MXNET_RECORDING
set to it; without it (no MXNet at hand: the other tests never import MXNet)
there is nothing to compare, and a part one MXNet could not record is skipped.

Files are compared byte for byte; where they differ, their arrays are
compared to RTOL times each array's largest magnitude, plus ATOL: MXNet's CPU
convolution kernels (oneDNN) choose their code by the processor's instruction
set, so gradients (and the weights trained with them) may differ in their last
bits between machines, and the gradient of a bias followed by BatchNorm, zero
in exact arithmetic, is rounding noise (~1e-7) on every machine. The recording
is byte-for-byte identical when repeated on one machine.
"""

import json
import os
import pathlib

import numpy as np
import pytest

from optax_ftml import mxnet
from optax_ftml.mxnet._files import _safe_loads

ROOT = pathlib.Path(__file__).parent.parent
FIXTURES = ROOT / "tests" / "mxnet_fixtures"
# part -> (committed directory, its files that part holds): MXNet 2.0.0b1
# records gluon2/, gluon2-unfused/ and gluon2-half/, MXNet 1.9.1 the rest.
MXNET2 = ("gluon2", "gluon2-unfused", "gluon2-half")
COMMITTED = {
    "fixtures": (FIXTURES, lambda path: path.parts[0] not in MXNET2),
    "example": (ROOT / "optax_ftml" / "mxnet" / "example", lambda path: True),
    "fixtures2": (FIXTURES, lambda path: path.parts[0] in MXNET2),
}
RECORDING = os.environ.get("OPTAX_FTML_MXNET_RECORDING")
RTOL = 1e-5
ATOL = 1e-6

pytestmark = pytest.mark.skipif(
    not RECORDING, reason="needs OPTAX_FTML_MXNET_RECORDING: a re-recording"
    " by real MXNet (.ci/mxnet_fixtures makes one)")


def data_files(directory, keep=lambda path: True):
  files = (p.relative_to(directory) for p in directory.rglob("*")
           if p.is_file() and p.suffix not in (".py", ".pyc"))
  return sorted(p for p in files if keep(p))


def arrays(path):
  """The arrays a fixture file holds, by name."""
  if path.suffix == ".npz":
    with np.load(path) as archive:
      return dict(archive)
  if path.suffix == ".params":
    loaded = mxnet.read_params(path)
    return dict(enumerate(loaded)) if isinstance(loaded, list) else loaded
  saved = mxnet.read_trainer_states(path)
  out = {f"{i}/{k}": a for i, state in saved.states.items()
         for k, a in enumerate(state)}
  if saved.optimizer is not None:
    out["optimizer"] = repr(saved.optimizer)
  return out


@pytest.mark.parametrize("part", sorted(COMMITTED))
def test_committed_fixtures_are_what_mxnet_writes(part):
  assert RECORDING is not None
  (committed, keep), recorded = COMMITTED[part], pathlib.Path(RECORDING) / part
  if not recorded.is_dir():
    pytest.skip(f"{part} was not re-recorded (see .ci/mxnet_fixtures' output)")
  assert data_files(committed, keep) == data_files(recorded)
  for name in data_files(committed, keep):
    ours, theirs = committed / name, recorded / name
    if ours.read_bytes() == theirs.read_bytes():
      continue
    if name.suffix == ".json":
      assert json.loads(ours.read_text()) == json.loads(theirs.read_text()), name
    elif name.suffix == ".pkl":  # pickled schedulers: compare attributes
      assert (_safe_loads(ours.read_bytes(), str(name)).attributes
              == _safe_loads(theirs.read_bytes(), str(name)).attributes), name
    else:
      expected, actual = arrays(theirs), arrays(ours)
      assert expected.keys() == actual.keys(), name
      for key, value in expected.items():
        if isinstance(value, str):
          assert actual[key] == value, (name, key)
        else:
          scale = float(np.max(np.abs(value))) if np.size(value) else 0.0
          np.testing.assert_allclose(actual[key], value, rtol=0,
                                     atol=RTOL * scale + ATOL,
                                     err_msg=f"{name} {key}")
