"""JAX's persistent compilation cache, on by default, so a resumed run (or a second run of the same config)
loads its compiled step instead of compiling it again.

Where the compiled programs go, first match wins:
  1. `config.compile_cache` when set: a folder, or 'off';
  2. $SIDA_JAX_COMPILE_CACHE: a folder, or 'off';
  3. a folder already given to JAX itself ($JAX_COMPILATION_CACHE_DIR or jax_compilation_cache_dir);
  4. $XDG_CACHE_HOME/sida_jax/jax, else ~/.cache/sida_jax/jax.
Only programs that took at least `min_compile_secs` to compile are written (the small ones are cheaper to
compile again than to read). Entries are keyed by the program, the JAX/XLA version and the devices, so a
changed step or another machine compiles afresh; deleting the folder is always safe.
"""
from __future__ import annotations

import os
from typing import Optional

import jax

ENV = "SIDA_JAX_COMPILE_CACHE"
OFF = ("off", "none", "0", "false")


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "sida_jax", "jax")


def resolve(setting: str = "") -> Optional[str]:
  """The cache folder for `setting` (config.compile_cache), or None when the cache is off."""
  for value in (setting, os.environ.get(ENV, "")):
    if value:
      return None if value.strip().lower() in OFF else os.path.expanduser(value)
  return jax.config.jax_compilation_cache_dir or default_dir()


def enable(setting: str = "", min_compile_secs: float = 1.0) -> Optional[str]:
  """Points JAX's persistent compilation cache at `resolve(setting)`; returns the folder (None: off).

  Call before the first compilation of the process: JAX opens the cache once.
  """
  folder = resolve(setting)
  if folder is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  os.makedirs(folder, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
  return folder
