"""Records the MXNet 2 fixtures with real MXNet 2.0.0b1 (in its own environment).

    python -m venv venv-mxnet2
    venv-mxnet2/bin/pip install mxnet==2.0.0b1 "numpy<1.24"
    venv-mxnet2/bin/python tests/mxnet_fixtures/record2.py

writes, from fixed seeds, into tests/mxnet_fixtures/gluon2/ (or --out/gluon2):
a Gluon network in MXNet 2's default NumPy mode (convolution, BatchNorm,
nested Dense blocks; a learning-rate multiplier, a bias without weight decay,
gradient clipping, trainer.step(batch_size)) trained with FTML's fused kernel
and a FactorScheduler with warm-up, the optimizer created without
learning_rate (MXNet 2 then sets the scheduler's base_lr to FTML's default
0.0025), saved (model.params, a NumPy .npz; trainer.states), then continued:
continued.npz holds each continued step's gradients and MXNet's weights and
FTML states after it, network.json the names, indices, multipliers and
learning rates.
The same network trained with use_fused_step=False (FTML.step) goes to
gluon2-unfused/, 30 continued steps; a float16 network trained with
multi_precision=True to gluon2-half/ (as record.py's gluon-half/).
"""

import argparse
import os
import pathlib
import sys

os.environ.update(OMP_NUM_THREADS="1", MXNET_ENGINE_TYPE="NaiveEngine",
                  MXNET_SUBGRAPH_VERBOSE="0")

import mxnet as mx
import numpy as np
from mxnet import gluon

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
from record import continue_and_record  # noqa: E402  (the 1.x recorder's)
from record import half_precision_fixture  # noqa: E402
from record import random_batch_step  # noqa: E402
from record import save_json  # noqa: E402
from record import save_npz  # noqa: E402
from record import set_weights  # noqa: E402


def network():
  net = gluon.nn.HybridSequential()
  net.add(gluon.nn.Conv2D(3, 3, in_channels=1),
          gluon.nn.BatchNorm(in_channels=3),
          gluon.nn.Activation("relu"),
          gluon.nn.Flatten())
  head = gluon.nn.HybridSequential()
  head.add(gluon.nn.Dense(6, activation="relu", in_units=48),
           gluon.nn.Dense(3, in_units=6))
  net.add(head)
  net.initialize(mx.init.Zero())
  net(mx.np.zeros((1, 1, 6, 6)))  # MXNet 2 infers some shapes on first use
  return net, head


def gluon2_fixture(out, after=8, **optimizer_arguments):
  out.mkdir(parents=True, exist_ok=True)
  rng = np.random.RandomState(2)
  batch_size, before = 8, 6
  net, head = network()
  params = net.collect_params()
  set_weights(params, rng, mx.np.array)
  net[0].weight.lr_mult = 0.5
  head[1].bias.wd_mult = 0.0
  scheduler = mx.lr_scheduler.FactorScheduler(
      step=3, factor=0.7, base_lr=0.05, warmup_steps=4, warmup_begin_lr=0.001)
  optimizer = mx.optimizer.FTML(wd=0.01, clip_gradient=0.3,
                                lr_scheduler=scheduler, **optimizer_arguments)
  trainer = gluon.Trainer(params, optimizer)
  trained = [n for n, p in params.items() if p.grad_req != "null"]

  step = random_batch_step(net, trainer, params, trained, rng, batch_size,
                           mx.np.array)

  for _ in range(before):
    step()
  net.save_parameters(str(out / "model.params"))
  trainer.save_states(str(out / "trainer.states"))
  position = {id(p): i for i, p in enumerate(trainer._params)}
  indices = {name: position[id(p)] for name, p in params.items()}
  record, learning_rates = continue_and_record(step, trainer, params, indices,
                                               after)
  save_npz(out / "continued.npz", record)
  save_json(out / "network.json", {
      "batch_size": batch_size, "steps_before": before, "steps_after": after,
      "trainer_indices": indices,
      "grad_req": {n: p.grad_req for n, p in params.items()},
      "lr_mult": {n: p.lr_mult for n, p in params.items()},
      "wd_mult": {n: p.wd_mult for n, p in params.items()},
      "learning_rates": learning_rates,
      "scheduler_base_lr_given": 0.05,
  })


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=pathlib.Path, default=HERE)
  args = parser.parse_args()
  assert mx.__version__ == "2.0.0beta1", mx.__version__
  gluon2_fixture(args.out / "gluon2")
  # FTML.step, the NDArray arithmetic (in double: 1 - beta2, the bias
  # corrections), which the pickled optimizer records and a Trainer resuming
  # from the file follows.
  gluon2_fixture(args.out / "gluon2-unfused", after=30, use_fused_step=False)
  half_precision_fixture(args.out / "gluon2-half", mx.np.array)


if __name__ == "__main__":
  main()
