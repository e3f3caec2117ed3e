"""--mode plan: EDM2-XXL SiDA on fsdp = 8 (a per-device state of 1/8 of the total plus the replicated small
leaves, totals equal to the network's eval_shape, no weight file read), the plan's per-device bytes = what the placed state really
holds, the compiled scratch and the fit verdict, and block remat lowering the traced residuals."""
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from sida_jax import checkpoint, cli
from sida_jax import plan as plan_lib
from sida_jax.models import convert
from sida_jax.models.edm2 import networks as edm2
from sida_jax.train import run as run_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import edm2 as edm2_configs  # noqa: E402
from configs import smoke  # noqa: E402


def _bytes(leaf):
  return int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def test_edm2_xxl_sida_on_fsdp_8_holds_an_eighth_plus_the_small_leaves(tmp_path, capsys, monkeypatch):
  """The state alone (config.plan.estimate=False: seconds), from the published snapshot's name: no file is read
  (the teacher named is absent, and reading any network fails)."""
  def no_reading(*args, **kwargs):
    raise AssertionError("the plan read a network file")
  monkeypatch.setattr(checkpoint, "load_network", no_reading)
  config = edm2_configs.get_config("xxl,sida")
  config.teacher = str(tmp_path / "absent" / config.teacher)
  config.mesh.fsdp = 8
  config.plan.estimate = False
  config.plan.device_gib = 5.0
  cli.run("plan", config, str(tmp_path))
  plan = json.loads((tmp_path / "plan.json").read_text())
  assert "does NOT fit in 5 GiB" in capsys.readouterr().out

  # Independently: the published XXL Precond's variables by eval_shape (teacher, generator, critic and EMA
  # share its shapes; the EMA and both Adam moments cover the parameters only), and the rule (≥ 16384 elements and an
  # axis divisible by 8: split in 8; otherwise whole on every device).
  template = convert.variables_template(edm2.Precond(**edm2.preset_config("xxl"), dtype=jnp.bfloat16))
  buffer_tree = {k: v for k, v in template.items() if k != "params"}
  params = sum(_bytes(x) for x in jax.tree.leaves(template["params"]))
  buffers = sum(_bytes(x) for x in jax.tree.leaves(buffer_tree))
  small = lambda tree: sum(_bytes(x) for x in jax.tree.leaves(tree)
                           if x.size < 16384 or not any(n % 8 == 0 for n in x.shape))
  adam_counts = 2 * 4   # one int32 step count per Adam
  assert plan["bytes_total"] == {"teacher": params + buffers, "parameters": 2 * (params + buffers),
                                 "optimizer": 4 * params + adam_counts, "ema": params}
  total = 8 * params + 3 * buffers + adam_counts
  assert plan["state_bytes_total"] == total
  replicated = 8 * small(template["params"]) + 3 * small(buffer_tree) + adam_counts
  assert plan["replicated_bytes_per_device"] == replicated
  assert plan["state_bytes_per_device"] == (total - replicated) // 8 + replicated
  assert 0 < replicated < 1e-3 * total
  assert round(plan["parameter_count"]["generator"] / 1e9, 2) == 1.52
  assert plan["mesh"] == {"data": 1, "fsdp": 8} and plan["per_device_batch"] == 256
  assert plan["scratch"]["source"].startswith("left out") and plan["scratch_bytes_per_device"] == 0
  # 5.67 GiB per device (state only) does not fit in 5 GiB; the unsharded 45.4 GiB would need fsdp.
  assert plan["total_bytes_per_device"] == plan["state_bytes_per_device"] and plan["fits"] is False
  config.plan.device_gib = 6.0
  assert plan_lib.make_plan(config)["fits"] is True


def _toy_config(**mesh):
  config = smoke.get_config("toy")
  config.mesh.update(mesh)
  return config


def test_plan_bytes_are_what_the_placed_state_holds():
  config = _toy_config(data=2, fsdp=4, min_shard_size=0)
  plan = plan_lib.make_plan(config)
  run = run_lib.build_run(config)
  layout = run.layout()
  state = run_lib.initial_state(run, layout)
  held = (state.generator, state.critic, state.generator_ema, layout.place(run.teacher.variables))
  first = layout.mesh.devices.reshape(-1)[0]
  on_first = sum(s.data.nbytes for x in jax.tree.leaves(held) for s in x.addressable_shards if s.device == first)
  assert plan["state_bytes_per_device"] == on_first
  whole = sum(x.nbytes for x in jax.tree.leaves(held))
  assert plan["state_bytes_total"] == whole and on_first < whole / 3


def test_compiled_scratch_and_the_fit_verdict():
  config = _toy_config()
  config.plan.compile = True
  config.plan.device_gib = 1e-4
  plan = plan_lib.make_plan(config)
  assert plan["scratch"]["source"].startswith("compiled")
  assert plan["scratch_bytes_per_device"] > 0
  assert plan["total_bytes_per_device"] == plan["state_bytes_per_device"] + plan["scratch_bytes_per_device"]
  assert plan["fits"] == (plan["total_bytes_per_device"] <= 1e-4 * plan_lib.GIB)
  config.plan.compile, config.plan.device_gib = False, 1.0
  assert plan_lib.make_plan(config)["fits"]


def test_block_remat_lowers_the_generator_phase_residuals():
  """Through build_run's wiring (the method's generator loss on rematerialised networks): the residuals per
  sample of the generator phase drop; 'full' keeps the peak of 'none' (the backward pass recomputes it all).
  With dropout, whose keys are among the rematerialised blocks' residuals."""
  per_sample = {}
  for remat in ("none", "blocks", "full"):
    config = smoke.get_config("ddpmpp")
    config.remat, config.dropout = remat, 0.1
    scratch = plan_lib.make_plan(config)["scratch"]
    per_sample[remat] = scratch["phases"]["generator"]["residual_bytes_per_sample"]
  assert per_sample["blocks"] < 0.6 * per_sample["none"]
  assert per_sample["full"] == per_sample["none"]
