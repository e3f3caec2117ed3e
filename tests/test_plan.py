"""--mode plan: EDM2-XXL SiDA on fsdp = 8 (a per-device state of 1/8 of the total plus the replicated small
leaves, totals equal to the network's eval_shape, no weight file read), the plan's per-device bytes = what the placed state really
holds, the compiled scratch and the fit verdict, and block remat lowering the traced residuals."""
import json
import os
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sida_jax import checkpoint, cli
from sida_jax import plan as plan_lib
from sida_jax.models import convert
from sida_jax.models.edm2 import networks as edm2
from sida_jax.train import run as run_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import edm2 as edm2_configs  # noqa: E402
from configs import base  # noqa: E402
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


@pytest.mark.slow
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


T2I = pathlib.Path(__file__).resolve().parent / "data" / "t2i"


def _config_only(source: pathlib.Path, target: pathlib.Path, tokenizer: pathlib.Path = None) -> str:
  """A copy of a pipeline folder's config and tokenizer files, without its weights."""
  for root, _, files in os.walk(source, followlinks=True):
    for name in files:
      if name.endswith((".json", ".txt", ".model")) and not name.endswith(".index.json"):
        path = target / pathlib.Path(root).relative_to(source) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pathlib.Path(root) / name, path)
  if tokenizer is not None:
    shutil.copytree(tokenizer, target / "tokenizer")
  assert not [p for p in target.rglob("*") if p.suffix in (".safetensors", ".bin")]
  return str(target)


@pytest.mark.parametrize("folder,method,dtype", [("tiny-lsg", "lsg", "float32"), ("tiny-pixart", "sim", "bfloat16")])
def test_config_only_pipeline_folder_plans_the_real_run(tmp_path, folder, method, dtype):
  """A pipeline folder without weights plans what the run built from the real folder holds: the eval_shape of
  its initial state, its text encoder as stored (bf16 runs: bfloat16) and placed on the mesh, its VAE, its
  condition shapes, and the same scratch estimate."""
  pytest.importorskip("tokenizers", reason="the pipeline tokenizer needs the tokenizers package")
  from sida_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  config = base.method_config(method)
  config.batch_size, config.dtype = 8, dtype
  config.mesh.fsdp, config.mesh.min_shard_size = 2, 0
  config.teacher = _config_only(T2I / folder, tmp_path / folder)
  plan = plan_lib.make_plan(config)

  config.teacher = str(T2I / folder)
  run = run_lib.build_run(config, with_data=False)   # reads the weights
  state = jax.eval_shape(lambda: run_lib.initial_state(run))
  nbytes = lambda tree: sum(_bytes(x) for x in jax.tree.leaves(tree))
  encoder, vae = run.text.text_encoder.variables, run.text.vae.variables
  assert {x.dtype for x in jax.tree.leaves(encoder)} == {np.dtype(dtype)}
  assert {x.dtype for x in jax.tree.leaves(vae)} == {np.dtype("float32")}
  assert plan["bytes_total"] == {
      "teacher": nbytes(run.teacher.variables),
      "parameters": nbytes((state.generator.params, state.generator.buffers, state.critic.params,
                            state.critic.buffers)),
      "optimizer": nbytes((state.generator.opt_state, state.critic.opt_state)), "ema": nbytes(state.generator_ema),
      "text_encoder": nbytes(encoder), "vae": nbytes(vae)}
  assert plan["parameter_count"] == {"teacher": convert.count_params(run.teacher.variables),
                                     "generator": convert.count_params(run.teacher.variables),
                                     "critic": convert.count_params(run.teacher.variables),
                                     "text_encoder": convert.count_params(encoder), "vae": convert.count_params(vae)}
  # The encoder's share on one device, as the run really places it (split along 'fsdp' = 2).
  layout = run.layout()
  tokens = step_lib.shard_batch(run.text.tokens(["a cat"] * 8), layout.mesh)
  placed, _ = run.text._placed_for(tokens["input_ids"])  # pylint: disable=protected-access
  first = layout.mesh.devices.reshape(-1)[0]
  on_first = sum(s.data.nbytes for x in jax.tree.leaves(placed) for s in x.addressable_shards if s.device == first)
  assert plan["bytes_per_device"]["text_encoder"] == on_first < nbytes(encoder)
  assert plan["bytes_per_device"]["vae"] == nbytes(vae)
  # The batch the step sees: the real condition's shapes and dtypes.
  condition = run.text.condition(tokens)
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), plan_lib.batch_shapes(run, 8)["critic"]["labels"]) ==
          jax.tree.map(lambda x: (x.shape, x.dtype), condition))
  micro = plan["per_device_micro_batch"]
  phases = plan_lib.residual_model(run, plan_lib.state_shapes(run), micro)
  assert {k: {n: v[n] for n in phases[k]} for k, v in plan["scratch"]["phases"].items()} == phases
  assert plan["scratch_bytes_per_device"] > 0


@pytest.mark.parametrize("name,recipe,tokenizer,counts", [
    ("sd15", "sd15_lsg:k1.5", "t2i/tiny-sd/tokenizer",
     dict(teacher=859_520_964, text_encoder=123_060_480, vae=83_653_863)),
    ("sd21_base", "sd21_lsg:k1.5_bf16", "t2i/tokenizer-sd2",
     dict(teacher=865_910_724, text_encoder=340_387_840, vae=83_653_863)),
    ("pixart_xl_2_512", "pixart_sim:bf16", "t2i_pixart/tokenizer",
     dict(teacher=610_856_096, text_encoder=4_762_310_656, vae=83_653_863))])
def test_published_pipeline_configs_plan_the_published_sizes(tmp_path, name, recipe, tokenizer, counts):
  """The published config.json files (tests/data/t2i/published; counts by diffusers / transformers in
  make_published.py --count) with a stand-in tokenizer (only its length matters): parameter counts, the text
  encoder stored in the recipe's dtype and split along 'fsdp' = 8, the VAE in float32."""
  pytest.importorskip("tokenizers", reason="the pipeline tokenizer needs the tokenizers package")
  from configs import published  # pylint: disable=import-outside-toplevel
  family, variant = recipe.split(":")
  config = (published.pixart_sim_config(variant) if family == "pixart_sim" else
            published.sd_lsg_config(family.split("_")[0], variant))
  config.teacher = _config_only(T2I / "published" / name, tmp_path / name, T2I.parent / tokenizer)
  config.mesh.fsdp = 8
  plan = plan_lib.make_plan(config, scratch=False)
  assert plan["parameter_count"] == dict(counts, generator=counts["teacher"], critic=counts["teacher"])
  width = 2 if config.dtype == "bfloat16" else 4
  assert plan["bytes_total"]["text_encoder"] == width * counts["text_encoder"]
  assert plan["bytes_total"]["vae"] == plan["bytes_per_device"]["vae"] == 4 * counts["vae"]
  assert plan["bytes_total"]["teacher"] == 4 * counts["teacher"]     # trained networks stay float32
  # Split in 8 but for the leaves too small or without an axis divisible by 8 (under 1 % of the encoder).
  assert plan["bytes_total"]["text_encoder"] / 8 < plan["bytes_per_device"]["text_encoder"]
  assert plan["bytes_per_device"]["text_encoder"] < 1.01 * plan["bytes_total"]["text_encoder"] / 8
  assert plan["scratch"]["source"] == "not estimated"
