"""The committed MXNet fixtures are what real MXNet 1.9.1 writes.

.ci/mxnet_fixtures installs MXNet 1.9.1 in a side environment, re-records the
fixtures with tests/mxnet_fixtures/record.py into a temporary directory and
runs this test with OPTAX_FTML_MXNET_RECORDING set to it; without it (no MXNet
at hand: the other tests never import MXNet) there is nothing to compare.

Files are compared byte for byte; where they differ, their arrays are compared
to RTOL: MXNet's CPU convolution kernels (oneDNN) choose their code by the
processor's instruction set, so gradients (and the weights trained with them)
may differ in their last bits between machines. The recording is
byte-for-byte identical when repeated on one machine.
"""

import json
import os
import pathlib

import numpy as np
import pytest

from optax_ftml import read_mxnet_params
from optax_ftml import read_mxnet_trainer_states
from optax_ftml._mxnet_files import _safe_loads

ROOT = pathlib.Path(__file__).parent.parent
COMMITTED = {"fixtures": ROOT / "tests" / "mxnet_fixtures",
             "example": ROOT / "optax_ftml" / "mxnet_example"}
RECORDING = os.environ.get("OPTAX_FTML_MXNET_RECORDING")
RTOL = 1e-5

pytestmark = pytest.mark.skipif(
    not RECORDING, reason="needs OPTAX_FTML_MXNET_RECORDING: a re-recording"
    " by real MXNet (.ci/mxnet_fixtures makes one)")


def data_files(directory):
  return sorted(p.relative_to(directory) for p in directory.rglob("*")
                if p.is_file() and p.suffix not in (".py", ".pyc"))


def arrays(path):
  """The arrays a fixture file holds, by name."""
  if path.suffix == ".npz":
    with np.load(path) as archive:
      return dict(archive)
  if path.suffix == ".params":
    loaded = read_mxnet_params(path)
    return dict(enumerate(loaded)) if isinstance(loaded, list) else loaded
  saved = read_mxnet_trainer_states(path)
  out = {f"{i}/{k}": a for i, state in saved.states.items()
         for k, a in enumerate(state)}
  if saved.optimizer is not None:
    out["optimizer"] = repr(saved.optimizer)
  return out


@pytest.mark.parametrize("part", sorted(COMMITTED))
def test_committed_fixtures_are_what_mxnet_writes(part):
  assert RECORDING is not None
  committed, recorded = COMMITTED[part], pathlib.Path(RECORDING) / part
  assert data_files(committed) == data_files(recorded)
  for name in data_files(committed):
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
          np.testing.assert_allclose(actual[key], value, rtol=RTOL, atol=0,
                                     err_msg=f"{name} {key}")
