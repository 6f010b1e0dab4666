"""Records the MXNet fixtures with real MXNet 1.9.1 (run in its own environment).

    python -m venv venv-mxnet
    venv-mxnet/bin/pip install mxnet==1.9.1 "numpy<1.24"
    venv-mxnet/bin/python tests/mxnet_fixtures/record.py \
        --digits <scikit-learn>/datasets/data/digits.csv.gz

writes, from fixed seeds, into tests/mxnet_fixtures/ (or --out):

* gluon/: a Gluon network (convolution, BatchNorm, nested Dense blocks; a
  learning-rate multiplier, a bias without weight decay, a FactorScheduler
  with warm-up, gradient clipping, trainer.step(batch_size)) trained with FTML
  for a few steps, saved (model.params, trainer.states), then continued:
  continued.npz holds each continued step's gradients and MXNet's weights and
  FTML states after it; network.json the names, indices and multipliers.
* gluon-half/: a float16 Gluon network trained with multi_precision=True
  (weight decay and clipping), its continued.npz also holding the float32
  master weights after each step.
* module/: the same for the Module API (save_checkpoint with optimizer states).
* schedulers/: MXNet's four schedulers pickled before their first call and
  mid-run, and the learning rates they return (lrs.json).
* arrays/: NDArray files in several dtypes, without names, with NumPy shape
  semantics (a scalar, an empty array), and sparse.

and, into optax_ftml/mxnet/example/ (or --example-out), the half-trained
checkpoint of a small convolutional network on scikit-learn's digits used by
colabs/migrating_from_mxnet.ipynb, with MXNet's loss before and after it.

Everything runs on one CPU thread with the naive engine, so a re-recording
repeats the same operations in the same order.
"""

import argparse
import gzip
import io
import json
import os
import pathlib
import pickle
import zipfile

os.environ.update(OMP_NUM_THREADS="1", MXNET_ENGINE_TYPE="NaiveEngine",
                  MXNET_SUBGRAPH_VERBOSE="0")

import mxnet as mx
import numpy as np
from mxnet import autograd
from mxnet import gluon

HERE = pathlib.Path(__file__).parent
EXAMPLE = HERE.parent.parent / "optax_ftml" / "mxnet" / "example"


def save_npz(path, arrays):
  """np.savez with fixed timestamps, so that equal arrays give equal files."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
    for name, array in arrays.items():
      buffer = io.BytesIO()
      np.lib.format.write_array(buffer, np.asarray(array),
                                allow_pickle=False)
      info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      archive.writestr(info, buffer.getvalue())


def save_json(path, value):
  path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")


def set_weights(params, rng, array=mx.nd.array):
  """Seeded weights; ``array`` makes MXNet arrays (MXNet 2: mx.np.array)."""
  for name, param in params.items():
    if name.endswith("running_mean"):
      value = np.zeros(param.shape)
    elif name.endswith("running_var"):
      value = np.ones(param.shape)
    elif name.endswith("gamma"):
      value = 1 + 0.1 * rng.standard_normal(param.shape)
    else:
      value = 0.3 * rng.standard_normal(param.shape)
    param.set_data(array(value.astype(np.float32)))


def random_batch_step(net, trainer, params, trained, rng, batch_size,
                      array=mx.nd.array):
  """One training step on a seeded random batch; returns the gradients."""
  loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

  def step():
    x = array(rng.standard_normal((batch_size, 1, 6, 6)).astype(np.float32))
    y = array(rng.randint(0, 3, batch_size).astype(np.float32))
    with autograd.record():
      loss = loss_fn(net(x), y)
    loss.backward()
    grads = {n: params[n].grad().asnumpy() for n in trained}
    trainer.step(batch_size)
    return grads

  return step


def continue_and_record(step, trainer, params, indices, steps):
  """Takes ``steps`` more steps; returns each one's gradients and the
  weights, float32 master weights (multi_precision) and FTML states after it,
  by "t/key/name", and the rates used."""
  record, learning_rates = {}, []
  for t in range(steps):
    for name, grad in step().items():
      state = trainer._updaters[0].states[indices[name]]
      record[f"{t}/grad/{name}"] = grad
      record[f"{t}/weight/{name}"] = params[name].data().asnumpy()
      if len(state) == 2:  # multi_precision: (float32 master, (d, v, z))
        record[f"{t}/master/{name}"] = state[0].asnumpy()
        state = state[1]
      for key, array in zip(("d", "v", "z"), state, strict=True):
        record[f"{t}/{key}/{name}"] = array.asnumpy()
    learning_rates.append(trainer.learning_rate)
  return record, learning_rates


def trainer_indices(net, trainer):
  """Structural name -> the parameter's index in the trainer."""
  position = {id(p): i for i, p in enumerate(trainer._params)}
  return {name: position[id(p)]
          for name, p in net._collect_params_with_prefix().items()}


def save_and_continue(out, net, trainer, params, step, before, after):
  """``before`` steps, the files MXNet saves, then ``after`` steps recorded
  into continued.npz; returns the trainer's indices and the rates used."""
  for _ in range(before):
    step()
  net.save_parameters(str(out / "model.params"))
  trainer.save_states(str(out / "trainer.states"))
  indices = trainer_indices(net, trainer)
  record, learning_rates = continue_and_record(step, trainer, params, indices,
                                               after)
  save_npz(out / "continued.npz", record)
  return indices, learning_rates


def gluon_fixture(out):
  out.mkdir(parents=True, exist_ok=True)
  rng = np.random.RandomState(0)
  batch_size, before, after = 8, 6, 8
  net = gluon.nn.HybridSequential()
  with net.name_scope():
    net.add(gluon.nn.Conv2D(3, 3, in_channels=1),
            gluon.nn.BatchNorm(in_channels=3),
            gluon.nn.Activation("relu"),
            gluon.nn.Flatten())
    head = gluon.nn.HybridSequential()
    with head.name_scope():
      head.add(gluon.nn.Dense(6, activation="relu", in_units=48),
               gluon.nn.Dense(3, in_units=6))
    net.add(head)
  net.initialize(mx.init.Zero())
  set_weights(net._collect_params_with_prefix(), rng)
  net[0].weight.lr_mult = 0.5
  head[1].bias.wd_mult = 0.0
  scheduler = mx.lr_scheduler.FactorScheduler(
      step=3, factor=0.7, base_lr=0.05, warmup_steps=4, warmup_begin_lr=0.005)
  trainer = gluon.Trainer(net.collect_params(), "ftml", {
      "learning_rate": 0.05, "wd": 0.01, "clip_gradient": 0.3,
      "lr_scheduler": scheduler})
  params = net._collect_params_with_prefix()
  trained = [n for n, p in params.items() if p.grad_req != "null"]

  step = random_batch_step(net, trainer, params, trained, rng, batch_size)

  indices, learning_rates = save_and_continue(out, net, trainer, params,
                                              step, before, after)
  save_json(out / "network.json", {
      "batch_size": batch_size, "steps_before": before, "steps_after": after,
      "full_names": {n: p.name for n, p in params.items()},
      "trainer_order": [p.name for p in trainer._params],
      "trainer_indices": indices,
      "grad_req": {n: p.grad_req for n, p in params.items()},
      "lr_mult": {n: p.lr_mult for n, p in params.items()},
      "wd_mult": {n: p.wd_mult for n, p in params.items()},
      "learning_rates": learning_rates,
  })


class HalfDense(gluon.Block):
  """``Dense`` from elementwise operations: MXNet's CPU ``FullyConnected``
  refuses float16 (1.9.1: "only supported by CuDNN")."""

  def __init__(self, units, in_units):
    super().__init__()
    self.shape = (units, in_units)
    for name, shape in (("weight", self.shape), ("bias", (units,))):
      setattr(self, name, gluon.Parameter(name, shape=shape)
              if mx.__version__.startswith("2") else
              self.params.get(name, shape=shape))

  def forward(self, x):  # pylint: disable=arguments-differ
    batch, (units, in_units) = x.shape[0], self.shape
    full = (batch, units, in_units)
    w = self.weight.data().reshape((1, units, in_units)).broadcast_to(full)
    x = x.reshape((batch, 1, in_units)).broadcast_to(full)
    return (x * w).sum(axis=2) + self.bias.data().reshape(
        (1, units)).broadcast_to((batch, units))


def half_precision_fixture(out, array, **optimizer):
  """A float16 Gluon network trained with ``multi_precision=True`` (float32
  master weights in the optimizer's states, weight decay, clipping), saved
  and continued for 30 steps; ``optimizer`` adds FTML arguments. Used by
  record.py (MXNet 1.9.1) and record2.py (MXNet 2.0.0b1)."""
  out.mkdir(parents=True, exist_ok=True)
  rng = np.random.RandomState(3)
  batch_size, before, after = 8, 6, 30
  net = gluon.nn.Sequential()
  net.add(HalfDense(6, 36), gluon.nn.Activation("relu"), HalfDense(3, 6))
  net.initialize(mx.init.Zero())
  params = net._collect_params_with_prefix()
  set_weights(params, rng, array)
  net.cast("float16")
  trainer = gluon.Trainer(net.collect_params(), "ftml", {
      "learning_rate": 0.01, "wd": 0.01, "clip_gradient": 0.3,
      "multi_precision": True, **optimizer})
  trained = list(params)
  step = random_batch_step(
      lambda x: net(x.reshape((batch_size, 36))), trainer, params, trained,
      rng, batch_size, lambda x: array(x).astype("float16"))
  indices, learning_rates = save_and_continue(out, net, trainer, params,
                                              step, before, after)
  save_json(out / "network.json", {
      "batch_size": batch_size, "steps_before": before, "steps_after": after,
      "trainer_indices": indices, "learning_rates": learning_rates,
      "dtypes": {n: np.dtype(p.data().dtype).name for n, p in params.items()},
  })


def module_fixture(out):
  out.mkdir(parents=True, exist_ok=True)
  rng = np.random.RandomState(1)
  batch_size, before, after = 8, 5, 6
  data = mx.sym.Variable("data")
  hidden = mx.sym.Activation(
      mx.sym.FullyConnected(data, num_hidden=5, name="fc1"), act_type="relu")
  symbol = mx.sym.SoftmaxOutput(
      mx.sym.FullyConnected(hidden, num_hidden=3, name="fc2"), name="softmax")
  module = mx.mod.Module(symbol, context=mx.cpu())
  module.bind(data_shapes=[("data", (batch_size, 6))],
              label_shapes=[("softmax_label", (batch_size,))])
  shapes = dict(zip(symbol.list_arguments(),
                    symbol.infer_shape(data=(batch_size, 6))[0], strict=True))
  names = module._param_names
  module.init_params(arg_params={
      n: mx.nd.array(0.3 * rng.standard_normal(shapes[n]).astype(np.float32))
      for n in names})
  module.init_optimizer(kvstore=None, optimizer="ftml", optimizer_params={
      "learning_rate": 0.05, "wd": 0.02, "clip_gradient": 0.5})

  def step():
    module.forward_backward(mx.io.DataBatch(
        [mx.nd.array(rng.standard_normal((batch_size, 6)).astype(np.float32))],
        [mx.nd.array(rng.randint(0, 3, batch_size).astype(np.float32))]))
    grads = {n: g[0].asnumpy()
             for n, g in zip(names, module._exec_group.grad_arrays, strict=True)}
    module.update()
    return grads

  for _ in range(before):
    step()
  module.save_checkpoint(str(out / "module"), 1, save_optimizer_states=True)
  (out / "module-symbol.json").unlink()
  record = {}
  for t in range(after):
    grads = step()
    weights = module.get_params()[0]
    for i, name in enumerate(names):
      record[f"{t}/grad/{name}"] = grads[name]
      record[f"{t}/weight/{name}"] = weights[name].asnumpy()
      for key, array in zip(("d", "v", "z"), module._updater.states[i],
                            strict=True):
        record[f"{t}/{key}/{name}"] = array.asnumpy()
  save_npz(out / "continued.npz", record)
  save_json(out / "network.json", {
      "batch_size": batch_size, "steps_before": before, "steps_after": after,
      "param_names": names, "learning_rate": 0.05, "wd": 0.02,
      "clip_gradient": 0.5,
      "idx2name": {str(k): v for k, v in module._optimizer.idx2name.items()},
      "wd_mult": module._optimizer.wd_mult,
  })


# name -> (scheduler, calls before pickling it mid-run, calls in all): each
# run past its warm-up and its decay, over 1,500 updates.
SCHEDULERS = {
    "factor": (lambda: mx.lr_scheduler.FactorScheduler(
        step=37, factor=0.93, stop_factor_lr=1e-4, base_lr=0.1,
        warmup_steps=50, warmup_begin_lr=0.01), 400, 1500),
    "factor-to-stop": (lambda: mx.lr_scheduler.FactorScheduler(
        step=3, factor=0.7, stop_factor_lr=1e-3, base_lr=0.1, warmup_steps=5,
        warmup_begin_lr=0.01), 9, 1500),
    "multifactor": (lambda: mx.lr_scheduler.MultiFactorScheduler(
        step=[150, 300, 600, 900, 1200], factor=0.6, base_lr=0.1,
        warmup_steps=100, warmup_begin_lr=0.02, warmup_mode="constant"),
        450, 1500),
    "poly": (lambda: mx.lr_scheduler.PolyScheduler(
        max_update=1200, base_lr=0.1, pwr=2, final_lr=0.001,
        warmup_steps=100), 500, 1500),
    "poly-power-1.5": (lambda: mx.lr_scheduler.PolyScheduler(
        max_update=1100, base_lr=0.03, pwr=1.5, final_lr=0, warmup_steps=0),
        700, 1500),
    "cosine": (lambda: mx.lr_scheduler.CosineScheduler(
        max_update=1200, base_lr=0.1, final_lr=0.01, warmup_steps=80,
        warmup_begin_lr=0.005), 600, 1500),
}


def scheduler_fixture(out):
  """Each scheduler pickled fresh and after `paused` calls, and its rates."""
  out.mkdir(parents=True, exist_ok=True)
  rates = {}
  for name, (make, paused, total) in SCHEDULERS.items():
    scheduler = make()
    (out / f"{name}-fresh.pkl").write_bytes(pickle.dumps(scheduler))
    rates[name] = [scheduler(n) for n in range(1, paused + 1)]
    (out / f"{name}-paused.pkl").write_bytes(pickle.dumps(scheduler))
    rates[name] += [scheduler(n) for n in range(paused + 1, total + 1)]
    rates[name + "-paused-at"] = paused
  save_json(out / "lrs.json", rates)


DTYPES = ("float16", "float32", "float64", "uint8", "int8", "int32", "int64")


def array_values(dtype):
  """What arrays/ holds for each dtype (the tests compute the same)."""
  return ((np.arange(24).reshape(2, 3, 4) - 6) / 4).astype(dtype)


def array_fixture(out):
  out.mkdir(parents=True, exist_ok=True)
  arrays = {d: mx.nd.array(array_values(d), dtype=d) for d in DTYPES}
  mx.nd.save(str(out / "dtypes.params"), arrays)
  mx.nd.save(str(out / "list.params"), [arrays["float32"], arrays["float64"]])
  # NumPy shape semantics (npx.set_np()) allow scalars and empty arrays.
  with mx.util.np_shape(True):
    mx.nd.save(str(out / "np_shape.params"), {
        "scalar": mx.nd.array(np.float32(2.5).reshape(())),
        "empty": mx.nd.zeros((0, 3)), "float32": arrays["float32"]})
  mx.nd.save(str(out / "row_sparse.params"), {"w": mx.nd.sparse.row_sparse_array(
      (np.ones((1, 2), np.float32), np.array([1])), shape=(3, 2))})
  # Pickled NDArrays, as trainer-state files hold them.
  (out / "dtypes.states").write_bytes(pickle.dumps(
      {i: tuple(arrays[d] for d in DTYPES[:3]) for i in range(2)}))


def example_fixture(out, digits_csv):
  """The notebook's checkpoint: a Gluon convolutional network on digits."""
  out.mkdir(parents=True, exist_ok=True)
  with gzip.open(digits_csv, "rt") as f:
    digits = np.loadtxt(f, delimiter=",", dtype=np.float32)
  images = (digits[:, :64] / 16).reshape(-1, 1, 8, 8)
  labels = digits[:, 64]
  rng = np.random.RandomState(0)
  batch_size, before, after = 32, 100, 200
  net = gluon.nn.HybridSequential()
  with net.name_scope():
    net.add(gluon.nn.Conv2D(4, 3, padding=1, in_channels=1, activation="relu"),
            gluon.nn.MaxPool2D(2), gluon.nn.Flatten(),
            gluon.nn.Dense(10, in_units=64))
  net.initialize(mx.init.Zero())
  set_weights(net._collect_params_with_prefix(), rng)
  scheduler = mx.lr_scheduler.CosineScheduler(
      max_update=before + after, base_lr=0.02, final_lr=0.002, warmup_steps=20,
      warmup_begin_lr=0.002)
  trainer = gluon.Trainer(net.collect_params(), "ftml", {
      "learning_rate": 0.02, "wd": 1e-4, "lr_scheduler": scheduler})
  loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
  batches = np.stack([rng.choice(len(labels), batch_size, replace=False)
                      for _ in range(before + after)]).astype(np.uint16)

  def step(batch):
    with autograd.record():
      loss = loss_fn(net(mx.nd.array(images[batch])), mx.nd.array(labels[batch]))
    loss.backward()
    trainer.step(batch_size)
    return loss.mean().asscalar()

  losses = [step(batch) for batch in batches[:before]]
  net.save_parameters(str(out / "model.params"))
  trainer.save_states(str(out / "trainer.states"))
  losses += [step(batch) for batch in batches[before:]]
  save_npz(out / "losses.npz", {
      "batches": batches, "loss": np.array(losses, np.float32),
      "steps_before": np.array(before)})


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=pathlib.Path, default=HERE)
  parser.add_argument("--example-out", type=pathlib.Path, default=EXAMPLE)
  parser.add_argument("--digits", type=pathlib.Path, required=True,
                      help="scikit-learn's datasets/data/digits.csv.gz")
  args = parser.parse_args()
  assert mx.__version__ == "1.9.1", mx.__version__
  gluon_fixture(args.out / "gluon")
  half_precision_fixture(args.out / "gluon-half", mx.nd.array)
  module_fixture(args.out / "module")
  scheduler_fixture(args.out / "schedulers")
  array_fixture(args.out / "arrays")
  example_fixture(args.example_out, args.digits)


if __name__ == "__main__":
  main()
