"""Continuing MXNet 1.9.1 FTML runs in Optax from MXNet's saved files.

The fixtures (tests/mxnet_fixtures/record.py) hold, for a Gluon network and a
Module, the files MXNet saved mid-run and then, for each step MXNet took next,
the gradients it used and its weights and FTML states after the step. Each
test continues in Optax from the files with the same gradients and compares
every step.

Tolerance: MXNet computes the new weight as ``-z / d``; Optax returns the
update ``-z / d - w``, added to ``w`` by ``optax.apply_updates`` (one more
rounding), and XLA may contract multiply-adds that MXNet's CPU kernel rounds
twice. Each step therefore differs by a few float32 roundings, and ``z`` and the
weights are differences of terms as large as the leaf's largest element, so
their rounding errors scale with that (not with each element, which may be
near 0). The comparison allows ``RELATIVE_TOLERANCE`` (8 float32
epsilons) times the leaf's largest magnitude.
"""

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ftml
from optax_ftml import FTMLState
from optax_ftml import mxnet
from optax_ftml.mxnet import _schedules
from optax_ftml.mxnet._files import _safe_loads

FIXTURES = pathlib.Path(__file__).parent / "mxnet_fixtures"
GLUON = FIXTURES / "gluon"
MODULE = FIXTURES / "module"
RELATIVE_TOLERANCE = 8 * float(np.finfo(np.float32).eps)


def load(directory):
  return (json.loads((directory / "network.json").read_text()),
          np.load(directory / "continued.npz"))


def ftml_buffers(state):
  """Each leaf's (d, v, z) from the FTMLStates of a state, by leaf name."""
  out = {}
  for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, FTMLState)):
    if isinstance(s, FTMLState):
      for key, tree in (("d", s.d_prev), ("v", s.v), ("z", s.z)):
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
          name = jax.tree_util.keystr(path, simple=True, separator=".")
          out[key, name] = np.asarray(x)
  return out


def continue_run(optimizer, state, params, steps, gradients):
  """Yields (params, state) after each step, gradients from ``gradients(t)``."""
  update = jax.jit(optimizer.update)
  for t in range(steps):
    updates, state = update(gradients(t), state, params)
    params = optax.apply_updates(params, updates)
    yield params, state


def worst_difference(actual, expected):
  """max |actual - expected| / max |expected| (see the module docstring)."""
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected))
               / np.max(np.abs(expected)))


def check_run(run, record, names, to_mxnet=lambda name, x: x):
  """Compares every step's weights and states; returns the worst differences."""
  worst = dict.fromkeys(("weight", "d", "v", "z"), 0.0)
  for t, (params, state) in enumerate(run):
    buffers = ftml_buffers(state)
    for name in names:
      values = {"weight": params[name],
                **{key: buffers[key, name] for key in "dvz"}}
      for key, value in values.items():
        difference = worst_difference(to_mxnet(name, np.asarray(value)),
                                      record[f"{t}/{key}/{name}"])
        assert difference <= RELATIVE_TOLERANCE, (t, key, name, difference)
        worst[key] = max(worst[key], difference)
  return worst


def gluon_setup():
  network, record = load(GLUON)
  weights = mxnet.read_params(GLUON / "model.params")
  trained = [n for n, req in network["grad_req"].items() if req != "null"]
  return network, record, weights, trained


def gluon_multipliers(network, trained):
  """Gluon keeps lr_mult and wd_mult on its Parameters, not in the file."""
  return {key: {n: network[key][n] for n in trained}
          for key in ("lr_mult", "wd_mult")}


def test_gluon_trainer_orders_parameters_by_sorted_full_name():
  network, _ = load(GLUON)
  full_names = network["full_names"]
  assert network["trainer_order"] == sorted(full_names.values())
  for name, index in network["trainer_indices"].items():
    assert network["trainer_order"][index] == full_names[name]
  # Nested blocks: structural "4.1.bias" is the full name of a nested Dense.
  assert full_names["4.1.bias"] == "hybridsequential0_hybridsequential0_dense1_bias"
  # BatchNorm's beta sorts first; the file's order differs from the trainer's.
  assert network["trainer_indices"]["1.beta"] == 0
  assert network["trainer_indices"]["0.weight"] == 5


def check_continuation(optimizer, state, params, network, record, trained,
                       convert, back):
  """Continues with MXNet's gradients (in the tested layout) and compares
  every step with MXNet's; returns the worst differences."""
  run = continue_run(
      optimizer, state, params, network["steps_after"],
      lambda t: {n: jnp.asarray(convert(n, record[f"{t}/grad/{n}"]))
                 for n in trained})
  return check_run(run, record, trained, back)


def layout_conversions(layout):
  """MXNet's layout to the tested one, and back (to compare with MXNet)."""
  if layout == "mxnet":
    return (lambda n, x: x), (lambda n, x: x)
  return mxnet.to_flax_layout, lambda n, x: np.transpose(
      x, (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2))) if x.ndim >= 2 else x


@pytest.mark.parametrize("layout", ["mxnet", "flax"])
def test_gluon_run_continues_as_in_mxnet(layout):
  network, record, weights, trained = gluon_setup()
  convert, back = layout_conversions(layout)
  params = {n: jnp.asarray(convert(n, weights[n])) for n in trained}
  optimizer, state = mxnet.resume(
      GLUON / "trainer.states", params,
      indices={n: network["trainer_indices"][n] for n in trained},
      layout=convert if layout == "flax" else None,
      hyperparameters=gluon_multipliers(network, trained))
  worst = check_continuation(optimizer, state, params, network, record,
                             trained, convert, back)
  print(f"gluon ({layout} layout): worst differences {worst}")


def test_multipliers_in_the_file_are_used():
  """Optimizers created with names (the Module API's) keep multipliers in the
  file, by index or by name through idx2name: MXNet's lookup order."""
  network, record, weights, trained = gluon_setup()
  indices = {n: network["trainer_indices"][n] for n in trained}
  saved = with_optimizer_attributes(
      lr_mult={indices["0.weight"]: network["lr_mult"]["0.weight"]},
      wd_mult={"dense1_bias": network["wd_mult"]["4.1.bias"]},
      idx2name={indices["4.1.bias"]: "dense1_bias"})
  params = {n: jnp.asarray(weights[n]) for n in trained}
  optimizer, state = mxnet.resume(saved, params, indices=indices)
  run = continue_run(
      optimizer, state, params, network["steps_after"],
      lambda t: {n: jnp.asarray(record[f"{t}/grad/{n}"]) for n in trained})
  check_run(run, record, trained)


def test_gluon_state_has_init_structure_and_file_values():
  network, _, weights, trained = gluon_setup()
  params = {n: jnp.asarray(weights[n]) for n in trained}
  indices = {n: network["trainer_indices"][n] for n in trained}
  optimizer, state = mxnet.resume(
      GLUON / "trainer.states", params, indices=indices,
      hyperparameters=gluon_multipliers(network, trained))
  fresh = optimizer.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(fresh)
  for resumed, initial in zip(jax.tree.leaves(state), jax.tree.leaves(fresh),
                              strict=True):
    assert resumed.dtype == initial.dtype and resumed.shape == initial.shape
  counts = {int(s.count) for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, FTMLState))
            if isinstance(s, FTMLState)}
  assert counts == {network["steps_before"]}
  saved = mxnet.read_trainer_states(GLUON / "trainer.states")
  buffers = ftml_buffers(state)
  for name in trained:
    for key, array in zip("dvz", saved.states[indices[name]], strict=True):
      np.testing.assert_array_equal(buffers[key, name], array)


def test_gluon_default_order_is_the_trainer_order():
  """A tree keyed by Gluon's full names flattens in the trainer's order."""
  network, _, weights, trained = gluon_setup()
  full = {network["full_names"][n]: jnp.asarray(weights[n]) for n in trained}
  by_order = mxnet.resume(GLUON / "trainer.states", full)[1]
  by_name = mxnet.resume(
      GLUON / "trainer.states", full,
      indices={network["full_names"][n]: network["trainer_indices"][n]
               for n in trained})[1]
  jax.tree.map(np.testing.assert_array_equal, by_order, by_name)


def test_gluon_schedule_gives_mxnet_learning_rates():
  network, _ = load(GLUON)
  saved = mxnet.read_trainer_states(GLUON / "trainer.states")
  assert saved.optimizer is not None
  schedule = mxnet.lr_schedule(saved.optimizer.attributes["lr_scheduler"])
  first = network["steps_before"] + 1
  rates = [schedule(n) for n in range(first, first + network["steps_after"])]
  np.testing.assert_array_equal(np.float32(rates),
                                np.float32(network["learning_rates"]))


def module_setup():
  network, record = load(MODULE)
  names = network["param_names"]
  weights = mxnet.read_params(MODULE / "module-0001.params")
  params = {n: jnp.asarray(weights["arg:" + n]) for n in names}
  hyperparameters = {
      "learning_rate": network["learning_rate"], "wd": network["wd"],
      "clip_gradient": network["clip_gradient"],
      "rescale_grad": 1 / network["batch_size"],
      "wd_mult": mxnet.module_wd_mult({n: n for n in names})}
  return network, record, names, params, hyperparameters


def test_module_wd_mult_is_the_modules_rule():
  network, _ = load(MODULE)
  names = network["param_names"]
  recorded = {n: network["wd_mult"].get(n, 1.0) for n in names}
  assert mxnet.module_wd_mult({n: n for n in names}) == recorded
  assert mxnet.module_wd_mult(["bn_gamma", "bn_beta", "arg:conv_weight",
                         "moving_mean"]) == [1.0, 0.0, 1.0, 0.0]
  with pytest.raises(TypeError, match="strings"):
    mxnet.module_wd_mult([1])


def module_run(hyperparameters):
  network, record, names, params, _ = module_setup()
  optimizer, state = mxnet.resume(
      MODULE / "module-0001.states", params,
      indices={n: i for i, n in enumerate(names)},
      hyperparameters=hyperparameters, num_update=network["steps_before"])
  return continue_run(
      optimizer, state, params, network["steps_after"],
      lambda t: {n: jnp.asarray(record[f"{t}/grad/{n}"]) for n in names})


def test_module_run_continues_as_in_mxnet():
  _, record, names, _, hyperparameters = module_setup()
  worst = check_run(module_run(hyperparameters), record, names)
  print(f"module: worst differences {worst}")


def test_module_run_needs_the_module_wd_mult_rule():
  _, record, names, _, hyperparameters = module_setup()
  wrong = {**hyperparameters, "wd_mult": {n: 1.0 for n in names}}
  with pytest.raises(AssertionError):
    check_run(module_run(wrong), record, names)
  del hyperparameters["wd_mult"]
  with pytest.raises(ValueError, match=r"mxnet.module_wd_mult"):
    module_run(hyperparameters)
  # Without weight decay the multipliers do not matter.
  list(module_run({**hyperparameters, "wd": 0.0}))


def test_module_wrong_default_order_points_to_indices():
  """A dict of Module names flattens sorted (fc1_bias first), the file numbers
  them in the symbol's order (fc1_weight first): the shapes disagree."""
  network, _, _, params, hyperparameters = module_setup()
  with pytest.raises(ValueError, match=r"pass indices="):
    mxnet.resume(MODULE / "module-0001.states", params,
                      hyperparameters=hyperparameters,
                      num_update=network["steps_before"])


def test_resumed_state_is_sharded_like_init():
  mesh = jax.make_mesh((8,), ("x",))
  network, _, _, params, hyperparameters = module_setup()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.device_put(params, sharding)
  optimizer, state = mxnet.resume(
      MODULE / "module-0001.states", params,
      indices={n: i for i, n in enumerate(network["param_names"])},
      hyperparameters=hyperparameters, num_update=network["steps_before"])
  fresh = optimizer.init(params)
  for resumed, initial in zip(jax.tree.leaves(state), jax.tree.leaves(fresh),
                              strict=True):
    assert resumed.sharding == initial.sharding
  # Sharded over the 8 devices along the first axis where it divides.
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  wide = {"w": jax.device_put(jnp.zeros((8, 3), jnp.float32), split)}
  saved = mxnet.TrainerStates({0: tuple(np.ones((8, 3), np.float32)
                                       for _ in range(3))}, None)
  optimizer, state = mxnet.resume(
      saved, wide, hyperparameters={"learning_rate": 0.1, "rescale_grad": 1.0},
      num_update=1)
  buffers = [x for x in jax.tree.leaves(state) if x.ndim == 2]
  assert len(buffers) == 3
  for buffer in buffers:
    assert buffer.sharding.is_equivalent_to(wide["w"].sharding, 2)
    assert len(buffer.sharding.device_set) == 8


def test_module_files_need_hyperparameters_and_step_count():
  network, _, names, params, hyperparameters = module_setup()
  path = MODULE / "module-0001.states"
  with pytest.raises(ValueError, match=r"learning_rate.*rescale_grad.*num_update"):
    mxnet.resume(path, params)
  with pytest.raises(ValueError, match=r"num_update=.*\(missing\)"):
    mxnet.resume(path, params, hyperparameters=hyperparameters)
  with pytest.raises(ValueError,
                     match=r"num_update must be an integer in \[1, 2\*\*31\)"):
    mxnet.resume(path, params, hyperparameters=hyperparameters,
                      num_update=0)
  with pytest.raises(ValueError, match="only for Module files"):
    mxnet.resume(GLUON / "trainer.states", gluon_params(), num_update=3)
  del network, names


def gluon_params():
  network, _, weights, trained = gluon_setup()
  return {network["full_names"][n]: jnp.asarray(weights[n]) for n in trained}


def with_optimizer_attributes(**changes):
  saved = mxnet.read_trainer_states(GLUON / "trainer.states")
  assert saved.optimizer is not None
  saved.optimizer.attributes.update(changes)
  return saved


def test_differing_step_counts_are_refused():
  saved = mxnet.read_trainer_states(GLUON / "trainer.states")
  assert saved.optimizer is not None
  counts = dict(saved.optimizer.attributes["_index_update_count"])
  counts[min(counts)] -= 1
  with pytest.raises(ValueError, match="updated different numbers of times"):
    mxnet.resume(with_optimizer_attributes(_index_update_count=counts),
                      gluon_params())
  with pytest.raises(ValueError, match="num_update"):
    mxnet.resume(with_optimizer_attributes(num_update=99), gluon_params())


def test_missing_and_unmapped_states_are_refused():
  network, _, weights, trained = gluon_setup()
  params = {n: jnp.asarray(weights[n]) for n in trained}
  indices = {n: network["trainer_indices"][n] for n in trained}
  path = GLUON / "trainer.states"
  # BatchNorm's running mean (grad_req='null') has an index but no state.
  running_mean = network["trainer_indices"]["1.running_mean"]
  with pytest.raises(ValueError, match="no state for"):
    mxnet.resume(path, params, indices={**indices, "1.beta": running_mean})
  smaller = {n: p for n, p in params.items() if n != "0.bias"}
  with pytest.raises(ValueError, match="not mapped to any leaf"):
    mxnet.resume(path, smaller, indices={n: indices[n] for n in smaller})
  with pytest.raises(ValueError, match="states for 8 parameters"):
    mxnet.resume(path, smaller)
  with pytest.raises(ValueError, match="leaves without an index"):
    mxnet.resume(path, params, indices={"0.bias": 4})
  states = dict(mxnet.read_trainer_states(path).states)
  del states[indices["0.bias"]]
  saved = mxnet.TrainerStates(states, mxnet.read_trainer_states(path).optimizer)
  with pytest.raises(ValueError, match="no state for"):
    mxnet.resume(saved, params, indices=indices)


def test_layout_mismatch_is_refused():
  network, _, weights, trained = gluon_setup()
  params = {n: jnp.asarray(mxnet.to_flax_layout(n, weights[n])) for n in trained}
  indices = {n: network["trainer_indices"][n] for n in trained}
  with pytest.raises(ValueError, match="pass layout="):
    mxnet.resume(GLUON / "trainer.states", params, indices=indices)


def test_other_optimizers_and_unknown_hyperparameters_are_refused():
  saved = mxnet.read_trainer_states(GLUON / "trainer.states")
  adam = mxnet.PickledObject("mxnet.optimizer.optimizer.Adam")
  with pytest.raises(ValueError, match=r"optimizer\.Adam optimizer, not FTML"):
    mxnet.resume(mxnet.TrainerStates(saved.states, adam), gluon_params())
  with pytest.raises(ValueError, match="unknown hyperparameters"):
    mxnet.resume(saved, gluon_params(), hyperparameters={"lr": 0.1})


SCHEDULES = json.loads((FIXTURES / "schedulers" / "lrs.json").read_text())


SCHEDULER_NAMES = sorted(k for k in SCHEDULES if not k.endswith("-paused-at"))


def ulps_apart(a, b):
  """How many float32 values lie between a and b (both non-negative)."""
  return np.abs(np.float32(a).view(np.int32).astype(np.int64)
                - np.float32(b).view(np.int32).astype(np.int64))


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_schedulers_give_mxnet_float32_rates_bit_for_bit(name):
  rates = np.float32(SCHEDULES[name])
  assert len(rates) >= 1000
  paused = SCHEDULES[name + "-paused-at"]
  n = np.arange(1, len(rates) + 1)
  for kind, first in (("fresh", 1), ("paused", paused + 1)):
    data = (FIXTURES / "schedulers" / f"{name}-{kind}.pkl").read_bytes()
    schedule = jax.jit(jax.vmap(mxnet.lr_schedule(_safe_loads(data, name))))
    ours = np.asarray(schedule(n))[first - 1:]
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ulps_apart(ours, rates[first - 1:]), 0,
                                  err_msg=f"{name}-{kind}")
  # The paused scheduler has already decayed: its state matters.
  if name.startswith("factor") or name == "multifactor":
    assert _safe_loads(data, name).attributes["base_lr"] < rates[0] * 10


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_schedules_beyond_the_tables_stay_within_a_few_ulps(name, monkeypatch):
  monkeypatch.setattr(_schedules, "_MAX_TABULATED_UPDATES", 7)
  monkeypatch.setattr(_schedules, "_MAX_TABULATED_DECAYS", 3)
  rates = np.float32(SCHEDULES[name])
  data = (FIXTURES / "schedulers" / f"{name}-fresh.pkl").read_bytes()
  schedule = jax.jit(jax.vmap(mxnet.lr_schedule(_safe_loads(data, name))))
  ours = np.asarray(schedule(np.arange(1, len(rates) + 1)))
  assert ulps_apart(ours, rates).max() <= 8


def test_unknown_scheduler_is_refused():
  base = mxnet.PickledObject("mxnet.lr_scheduler.LRScheduler")
  with pytest.raises(ValueError, match=r"unsupported MXNet scheduler"
                     r" mxnet\.lr_scheduler\.LRScheduler"):
    mxnet.lr_schedule(base)
  with pytest.raises(TypeError, match=r"mxnet\.PickledObject"):
    mxnet.lr_schedule(lambda n: 0.1)  # pyright: ignore[reportArgumentType]
  # A pickled custom scheduler is refused when the file is read.
  with pytest.raises(optax_ftml.mxnet.FileError, match=r"__main__\.WarmupCosine"):
    mxnet.read_trainer_states(b"\x80\x04c__main__\nWarmupCosine\n)R.")


def test_mxnet_to_flax_layout():
  assert mxnet.to_flax_layout("w", np.zeros((5, 3))).shape == (3, 5)
  assert mxnet.to_flax_layout("w", np.zeros((8, 2, 3, 4))).shape == (3, 4, 2, 8)
  assert mxnet.to_flax_layout("w", np.zeros((8, 2, 3))).shape == (3, 2, 8)
  assert mxnet.to_flax_layout("b", np.zeros(5)).shape == (5,)
  dense = np.arange(6).reshape(2, 3)
  np.testing.assert_array_equal(mxnet.to_flax_layout("w", dense), dense.T)


GUIDE = FIXTURES.parent.parent / "docs" / "guides" / "resuming_mxnet_run.md"


@pytest.mark.extras  # the guide's Flax NNX example
def test_guide_python_blocks(monkeypatch, capsys):
  """The guide's blocks run in order, in the Module fixture's directory (its
  Module example reads those files), and print what their comments say."""
  monkeypatch.chdir(MODULE)
  namespace = {}
  for block in re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S):
    with jax.numpy_dtype_promotion("standard"):  # user code, default promotion
      exec(compile(block, str(GUIDE), "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    expected = [line[2:] for line in block.splitlines() if line.startswith("# {")]
    if expected:
      assert printed[-len(expected):] == expected


# Values a hostile or damaged file may hold where MXNet pickles a number.
HOSTILE_VALUES = [
    "x", "", None, True, b"0.1", bytearray(b"\x01"), [0.1], {"a": 1},
    np.array([1.0]), np.array([0.1, 0.2, 0.3]), float("nan"), float("inf"),
    -5, 2**4096, 1e308, mxnet.PickledObject("mxnet.lr_scheduler.FactorScheduler"),
]


def scheduler_record(name, **changes):
  record = _safe_loads(
      (FIXTURES / "schedulers" / f"{name}-paused.pkl").read_bytes(), name)
  record.attributes.update(changes)
  return record


# Attributes MXNet pickles but FTML's resume does not read (lr too: a
# scheduler replaces it), and the hostile values that are valid where they
# are, as in MXNet: no clipping (None, or a negative bound), a negative
# rescale_grad, multipliers for another name, multi_precision (which takes
# effect through each state's form).
UNREAD = ("_all_index_update_counts", "aggregate_num", "allow_np_array",
          "begin_num_update", "lr", "sym_info")
VALID = {"clip_gradient": (None, -5), "rescale_grad": (-5,),
         "idx2name": ({"a": 1},), "lr_mult": ({"a": 1},),
         "wd_mult": ({"a": 1},), "multi_precision": (True,)}


def test_hostile_file_values_are_refused_or_give_finite_steps():
  """Every FTML and scheduler attribute replaced by each hostile value: the
  resume refuses it with an mxnet.FileError, unless the attribute is not read
  or the value is valid there, and then takes a finite step."""
  saved = mxnet.read_trainer_states(GLUON / "trainer.states")
  assert saved.optimizer is not None
  params = gluon_params()
  grads = jax.tree.map(jnp.ones_like, params)
  scheduler = saved.optimizer.attributes["lr_scheduler"]
  keys = [("optimizer", k) for k in sorted(saved.optimizer.attributes)
          if k != "lr_scheduler"] + [("scheduler", k)
                                     for k in sorted(scheduler.attributes)]
  outcomes = {"refused": 0, "finite": 0}
  for where, key in keys:
    for value in HOSTILE_VALUES:
      changed = mxnet.read_trainer_states(GLUON / "trainer.states")
      assert changed.optimizer is not None
      record = (changed.optimizer if where == "optimizer"
                else changed.optimizer.attributes["lr_scheduler"])
      record.attributes[key] = value
      try:
        optimizer, state = mxnet.resume(changed, params)
      except optax_ftml.mxnet.FileError:
        outcomes["refused"] += 1
        continue
      assert where == "optimizer" and (key in UNREAD or any(
          value is v or value == v for v in VALID.get(key, ()))), (key, value)
      updates, _ = optimizer.update(grads, state, params)
      assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates)), (
          where, key, value)
      outcomes["finite"] += 1
  print(f"hostile attribute values: {outcomes}")


@pytest.mark.parametrize("changes, message", [
    ({"base_lr": "x", "factor": 2, "stop_factor_lr": ""}, "factor is 2"),
    ({"base_lr": "x"}, "base_lr is 'x'"),
    ({"stop_factor_lr": ""}, "stop_factor_lr is ''"),
    ({"factor": 2}, r"factor is 2; MXNet's FactorScheduler has a real number"
     r" in \(0.0, 1.0\]"),
    ({"factor": 2**4096}, "factor is an integer of 4097 bits"),
    ({"factor": 0.0}, r"factor is 0.0"),
    ({"step": 0}, r"step is 0; .* integer in \[1, 2\*\*31\)"),
    ({"count": -1}, "count is -1"),
    ({"warmup_steps": 2**31}, "warmup_steps is 2147483648"),
    ({"warmup_mode": "cosine"}, "warmup_mode is 'cosine'"),
    ({"warmup_begin_lr": 1.0}, "warmup_begin_lr is 1.0; .* at most"),
])
def test_factor_scheduler_fields_are_checked(changes, message):
  with pytest.raises(optax_ftml.mxnet.FileError, match=message):
    mxnet.lr_schedule(scheduler_record("factor", **changes))


@pytest.mark.parametrize("name, changes, message", [
    ("multifactor", {"step": [True] * 30_000}, "step is a list"),
    ("multifactor", {"step": [True, 2]}, r"step\[0\] is True"),
    ("multifactor", {"step": [5, 5]}, r"step\[1\] is 5; .* \[6, 2\*\*31\)"),
    ("multifactor", {"cur_step_ind": 9}, "cur_step_ind is 9; .* at most"),
    ("poly", {"max_update": 0}, "max_update is 0"),
    ("poly", {"power": float("nan")}, "power is nan"),
    ("cosine", {"warmup_steps": 1200, "max_steps": 0}, "max_steps is 0"),
    ("cosine", {"max_steps": 7}, r"max_steps is 7; .* = 1120"),
    ("cosine", {"final_lr": np.float32(0.01)}, "final_lr is a float32"),
    ("cosine", {"base_lr_orig": -0.1}, "base_lr_orig is -0.1"),
])
def test_decay_scheduler_fields_are_checked(name, changes, message):
  with pytest.raises(optax_ftml.mxnet.FileError, match=message):
    mxnet.lr_schedule(scheduler_record(name, **changes))


def test_a_long_step_list_is_one_comparison():
  steps = list(range(10, 100_010, 10))  # the most steps allowed: 10,000
  schedule = mxnet.lr_schedule(scheduler_record(
      "multifactor", step=steps, cur_step_ind=0, factor=0.999, base_lr=0.1))
  rate = jax.jit(schedule)
  hlo = rate.lower(5000).as_text()
  assert hlo.count("compare") < 10  # not one comparison per step
  expected = 0.1
  for _ in range(499):  # updates 11, 21, ..., 4991 passed their step
    expected *= 0.999
  assert float(rate(5000)) == float(np.float32(expected))


@pytest.mark.parametrize("changes, message", [
    ({"lr": np.array([-0.5]), "lr_scheduler": None}, "lr is a ndarray"),
    ({"lr": bytearray(b"\x01"), "lr_scheduler": None}, "lr is a bytearray"),
    ({"lr": 0.0, "lr_scheduler": None}, "learning_rate must be > 0"),
    ({"beta2": np.array([1.0])}, "beta2 is a ndarray"),
    ({"beta2": 1.0}, r"beta2 must be in \[0, 1\), got 1.0"),
    ({"epsilon": "1e-8"}, "epsilon is '1e-8'"),
    ({"num_update": -5}, r"num_update is -5; .* \[0, 2\*\*31\)"),
    ({"multi_precision": "yes"}, "multi_precision is 'yes'"),
    ({"_index_update_count": [6]}, "_index_update_count is a list"),
    ({"lr_mult": {0: "2"}}, r"lr_mult\[0\] is '2'"),
    ({"idx2name": [1]}, "idx2name is a list"),
])
def test_ftml_fields_are_checked(changes, message):
  with pytest.raises(optax_ftml.mxnet.FileError, match=message):
    mxnet.resume(with_optimizer_attributes(**changes), gluon_params())


def test_multipliers_are_looked_up_by_index_before_name():
  network, _, weights, trained = gluon_setup()
  indices = {n: network["trainer_indices"][n] for n in trained}
  params = {n: jnp.asarray(weights[n]) for n in trained}
  index = indices["0.weight"]
  saved = with_optimizer_attributes(lr_mult={index: 0.0, "conv": 1.0},
                                    idx2name={index: "conv"})
  optimizer, state = mxnet.resume(saved, params, indices=indices)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = optimizer.update(grads, state, params)
  assert not np.asarray(updates["0.weight"]).any()  # lr_mult 0: frozen
  assert np.asarray(updates["0.bias"]).any()


def test_default_order_sorts_the_files_indices():
  saved = mxnet.read_trainer_states(GLUON / "trainer.states")
  assert saved.optimizer is not None
  reversed_states = dict(sorted(saved.states.items(), reverse=True))
  params = gluon_params()
  in_file_order = mxnet.resume(
      mxnet.TrainerStates(reversed_states, saved.optimizer), params)[1]
  sorted_order = mxnet.resume(saved, params)[1]
  jax.tree.map(np.testing.assert_array_equal, in_file_order, sorted_order)


def test_repeated_indices_are_refused():
  network, _, weights, trained = gluon_setup()
  indices = {n: network["trainer_indices"][n] for n in trained}
  params = {n: jnp.asarray(weights[n]) for n in trained}
  with pytest.raises(ValueError, match="repeat an index"):
    mxnet.resume(GLUON / "trainer.states", params,
                      indices={**indices, "0.bias": indices["0.weight"]})


def test_partial_multiplier_trees_default_to_one():
  network, record, weights, trained = gluon_setup()
  indices = {n: network["trainer_indices"][n] for n in trained}
  params = {n: jnp.asarray(weights[n]) for n in trained}
  full = gluon_multipliers(network, trained)
  partial = {key: {n: m for n, m in values.items() if m != 1.0}
             for key, values in full.items()}
  assert all(0 < len(p) < len(trained) for p in partial.values())
  optimizer, state = mxnet.resume(GLUON / "trainer.states", params,
                                       indices=indices, hyperparameters=partial)
  run = continue_run(
      optimizer, state, params, network["steps_after"],
      lambda t: {n: jnp.asarray(record[f"{t}/grad/{n}"]) for n in trained})
  check_run(run, record, trained)
  with pytest.raises(ValueError, match=r"hyperparameters\['wd_mult'\] names"
                     r" \['4.bias'\]"):
    mxnet.resume(GLUON / "trainer.states", params, indices=indices,
                      hyperparameters={"wd_mult": {"4.bias": 0.0}})


GLUON2 = FIXTURES / "gluon2"


@pytest.mark.parametrize("layout", ["mxnet", "flax"])
def test_mxnet2_gluon_run_continues_as_in_mxnet2(layout):
  """MXNet 2.0.0b1's files: parameters as a NumPy .npz, FTML's fused kernel
  (clip, then weight decay), a scheduler whose base_lr MXNet 2 replaced by
  FTML's default learning rate."""
  network, record = load(GLUON2)
  weights = mxnet.read_params(GLUON2 / "model.params")
  assert isinstance(weights, dict)
  assert set(weights) == set(network["trainer_indices"])
  trained = [n for n, req in network["grad_req"].items() if req != "null"]
  convert, back = layout_conversions(layout)
  params = {n: jnp.asarray(convert(n, weights[n])) for n in trained}
  saved = mxnet.read_trainer_states(GLUON2 / "trainer.states")
  assert saved.optimizer is not None
  assert saved.optimizer.mxnet_class == "mxnet.optimizer.ftml.FTML"
  optimizer, state = mxnet.resume(
      saved, params, layout=convert if layout == "flax" else None,
      hyperparameters=gluon_multipliers(network, trained))
  worst = check_continuation(optimizer, state, params, network, record,
                             trained, convert, back)
  print(f"MXNet 2 gluon ({layout} layout): worst differences {worst}")
  schedule = mxnet.lr_schedule(saved.optimizer.attributes["lr_scheduler"])
  first = network["steps_before"] + 1
  rates = [schedule(n) for n in range(first, first + network["steps_after"])]
  np.testing.assert_array_equal(np.float32(rates),
                                np.float32(network["learning_rates"]))
  assert network["learning_rates"][0] < 0.0025 < network[
      "scheduler_base_lr_given"]


def test_mxnet2_version_order_matters():
  """The file's class picks MXNet 2's clip-then-decay order: 1.x's order
  fails the comparison."""
  network, record = load(GLUON2)
  weights = mxnet.read_params(GLUON2 / "model.params")
  trained = [n for n, req in network["grad_req"].items() if req != "null"]
  params = {n: jnp.asarray(weights[n]) for n in trained}
  optimizer, state = mxnet.resume(
      GLUON2 / "trainer.states", params,
      hyperparameters={**gluon_multipliers(network, trained),
                       "mxnet_version": 1})
  run = continue_run(
      optimizer, state, params, network["steps_after"],
      lambda t: {n: jnp.asarray(record[f"{t}/grad/{n}"]) for n in trained})
  with pytest.raises(AssertionError):
    check_run(run, record, trained)


GLUON2_UNFUSED = FIXTURES / "gluon2-unfused"


def mxnet2_gluon_setup(directory):
  network, record = load(directory)
  weights = mxnet.read_params(directory / "model.params")
  trained = [n for n, req in network["grad_req"].items() if req != "null"]
  params = {n: jnp.asarray(weights[n]) for n in trained}
  return network, record, params, trained


def test_mxnet2_unfused_run_continues_as_in_mxnet2():
  """A run with use_fused_step=False (FTML.step): the pickle records it, and
  the resumed optimizer follows it, as a resuming MXNet Trainer does. 30
  continued steps."""
  network, record, params, trained = mxnet2_gluon_setup(GLUON2_UNFUSED)
  saved = mxnet.read_trainer_states(GLUON2_UNFUSED / "trainer.states")
  assert saved.optimizer is not None
  assert saved.optimizer.attributes["use_fused_step"] is False
  optimizer, state = mxnet.resume(
      saved, params, hyperparameters=gluon_multipliers(network, trained))
  worst = check_continuation(optimizer, state, params, network, record,
                             trained, lambda n, x: x, lambda n, x: x)
  print(f"MXNet 2 unfused: worst differences {worst}")


def test_mxnet2_unfused_run_is_not_the_fused_kernels():
  """The fused kernel's arithmetic (1 - beta2 in float32) fails the
  comparison with the unfused run."""
  network, record, params, trained = mxnet2_gluon_setup(GLUON2_UNFUSED)
  optimizer, state = mxnet.resume(
      GLUON2_UNFUSED / "trainer.states", params,
      hyperparameters={**gluon_multipliers(network, trained),
                       "use_fused_step": True})
  run = continue_run(
      optimizer, state, params, network["steps_after"],
      lambda t: {n: jnp.asarray(record[f"{t}/grad/{n}"]) for n in trained})
  with pytest.raises(AssertionError):
    check_run(run, record, trained)


HALF_PRECISION = [FIXTURES / "gluon-half", FIXTURES / "gluon2-half"]


def half_setup(directory):
  network, record = load(directory)
  weights = mxnet.read_params(directory / "model.params")
  assert isinstance(weights, dict)
  names = sorted(network["trainer_indices"], key=network["trainer_indices"].get)
  params = {n: jnp.asarray(weights[n]) for n in names}
  assert all(p.dtype == jnp.float16 for p in params.values())
  return network, record, params, names


@pytest.mark.parametrize("directory", HALF_PRECISION, ids=lambda d: d.name)
def test_half_precision_run_continues_as_in_mxnet(directory):
  """multi_precision=True with float16 weights (MXNet 1.9.1 and 2.0.0b1): the
  float32 masters from the file are optimized, fed MXNet's float16 gradients
  widened to float32; masters and FTML's state agree with MXNet's at every
  step to float32 rounding, and the float16 weights (the masters' casts) are
  within half a float16 ulp of MXNet's masters (so MXNet's float16 weights,
  but where the two masters straddle a float16 tie)."""
  network, record, params, names = half_setup(directory)
  masters = mxnet.master_weights(directory / "trainer.states", params)
  assert all(m.dtype == jnp.float32 for m in masters.values())
  for name in names:  # MXNet's float16 weights are its masters' casts
    np.testing.assert_array_equal(masters[name].astype(jnp.float16),
                                  params[name])
  optimizer, state = mxnet.resume(directory / "trainer.states", masters)
  run = list(continue_run(
      optimizer, state, masters, network["steps_after"],
      lambda t: {n: jnp.asarray(record[f"{t}/grad/{n}"], jnp.float32)
                 for n in names}))
  master_record = {k.replace("/master/", "/weight/"): v
                   for k, v in record.items() if "/master/" in k}
  worst = check_run(iter(run), {**record, **master_record}, names)
  mismatched = 0
  for t, (ours, _) in enumerate(run):
    for name in names:
      half = np.asarray(ours[name]).astype(np.float16)
      master = record[f"{t}/master/{name}"]
      half_ulp = np.spacing(np.abs(master).astype(np.float16)).astype(
          np.float32) / 2
      # Where the masters straddle a float16 tie, by their float32 difference.
      assert np.all(np.abs(half.astype(np.float32) - master)
                    <= half_ulp + np.abs(np.asarray(ours[name]) - master)), (
                        t, name)
      mismatched += int(np.sum(half != record[f"{t}/weight/{name}"]))
  print(f"{directory.name}: worst differences {worst}; {mismatched} float16"
        " weights differ from MXNet's")


def test_half_precision_file_needs_the_masters():
  """The float16 weights are not what MXNet steps: the error says how to
  resume the masters."""
  _, _, params, _ = half_setup(FIXTURES / "gluon2-half")
  with pytest.raises(ValueError, match=re.escape(
      "masters = mxnet.master_weights(file, params)")):
    mxnet.resume(FIXTURES / "gluon2-half" / "trainer.states", params)


def test_master_weights_of_a_float32_run_are_the_params():
  params = gluon_params()
  masters = mxnet.master_weights(GLUON / "trainer.states", params)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a is b, params,
                                          masters)))
