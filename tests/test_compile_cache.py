"""The persistent compilation cache: where it goes (config, environment, XDG default, off), and that a second
process compiles the training step from the cache instead of compiling it again (counted through JAX's
monitoring events and the cache folder, not by time)."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import pytest

from sida_jax import compile_cache

REPO = pathlib.Path(__file__).resolve().parents[1]

# One process: the cache as `cli.run` enables it, then the toy SiD step of test_step.py compiled once.
STEP_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from jax import monitoring
    from sida_jax import compile_cache
    counts = {"hits": 0, "misses": 0}
    def listen(event, **kwargs):
      if event == "/jax/compilation_cache/cache_hits":
        counts["hits"] += 1
      elif event == "/jax/compilation_cache/cache_misses":
        counts["misses"] += 1
    monitoring.register_event_listener(listen)
    folder = compile_cache.enable("", min_compile_secs=0.0)
    sys.path.insert(0, "tests")
    import ml_collections
    from test_step import _setup, _batches
    from sida_jax.losses import sid
    from sida_jax.train import state as state_lib, step as step_lib
    spec, variables = _setup(sid)
    train_step = step_lib.make_train_step(spec, step_lib.make_mesh(1))
    state = state_lib.init_state(jax.random.key(1), variables, variables, spec.generator_tx, spec.critic_tx)
    before = dict(counts)
    train_step.lower(state, variables, _batches(1)[0]).compile()
    print(json.dumps({"folder": folder, "hits": counts["hits"] - before["hits"],
                      "misses": counts["misses"] - before["misses"]}))
""")


def _start(env_updates):
  env = {k: v for k, v in os.environ.items() if k not in (compile_cache.ENV, "JAX_COMPILATION_CACHE_DIR")}
  env.update(env_updates, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  done = subprocess.run([sys.executable, "-c", STEP_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_compiles_the_step_from_the_cache(tmp_path):
  folder = tmp_path / "cache"
  first = _start({compile_cache.ENV: str(folder)})
  assert first["folder"] == str(folder)
  assert first["hits"] == 0 and first["misses"] >= 1
  written = sorted(p.name for p in folder.iterdir())
  assert written, "the first start wrote nothing to the cache"
  second = _start({compile_cache.ENV: str(folder)})
  assert second["misses"] == 0 and second["hits"] == first["misses"]
  assert sorted(p.name for p in folder.iterdir()) == written   # nothing new compiled


def test_off_switch_writes_nothing(tmp_path):
  off = _start({compile_cache.ENV: "off", "XDG_CACHE_HOME": str(tmp_path)})
  assert off["folder"] is None and off["hits"] == 0
  assert not (tmp_path / "sida_jax").exists()


def test_where_the_cache_goes(tmp_path, monkeypatch):
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  given = jax.config.jax_compilation_cache_dir   # the test-wide cache of conftest.py
  assert compile_cache.resolve("") == given      # a folder already given to JAX is kept
  jax.config.update("jax_compilation_cache_dir", None)
  try:
    assert compile_cache.resolve("") == str(tmp_path / "xdg" / "sida_jax" / "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.resolve("") == str(tmp_path / "home" / ".cache" / "sida_jax" / "jax")
  finally:
    jax.config.update("jax_compilation_cache_dir", given)
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
  assert compile_cache.resolve("") == str(tmp_path / "env")
  assert compile_cache.resolve(str(tmp_path / "config")) == str(tmp_path / "config")   # the config wins
  assert compile_cache.resolve("off") is None
  monkeypatch.setenv(compile_cache.ENV, "OFF")
  assert compile_cache.resolve("") is None
  assert compile_cache.resolve(str(tmp_path / "config")) == str(tmp_path / "config")
