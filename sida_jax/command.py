"""The command line of main.py: flags → a mode of `cli.py`, with help, a listing of the config keys, and errors
a user can read.

A user's mistake (a config key or value, a missing or unreadable file, a shape mismatch, a refused pickle, a
busy workdir, a config that does not match the workdir) ends in one line, `main.py: error: ...` on stderr and
exit code 2; `--debug` adds the traceback and the libraries' logs. A run stopped by SIGTERM / SIGINT after
saving its progress exits with 128 + the signal. Nothing heavy is imported before a mode runs, so `--help` and
`--mode keys` are quick.
"""
from __future__ import annotations

import ast
import importlib
import io
import logging as std_logging
import os
import pickle
import re
import sys
import textwrap
import tokenize
import traceback
from typing import Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")   # before any library that logs from C++ is loaded

from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

FLAGS = flags.FLAGS
USAGE = ("python main.py --config configs/FILE.py[:VARIANT] --workdir DIR [--mode MODE] "
         "[--config.KEY=VALUE ...] [--debug]")

# --mode: what each does (the functions are in cli.py; `keys` is answered here).
MODES = {
    "train": "distil a one-step generator with config.method; the same command resumes",
    "teacher": "train an EDM teacher from scratch on config.data (configs/mnist_teacher.py)",
    "pipeline": "the MNIST demo: teacher → SiD, SiDA, SIM → FID-proxy (configs/mnist.py)",
    "sample": "PNGs and samples.npz from the workdir's generator (or config.sample.source, or the teacher)",
    "eval": "FID / Inception Score of the workdir's generator → WORKDIR/eval.json",
    "convert": "a .pkl → Orbax folder (a teacher); a generator → PyTorch-named safetensors",
    "ref": "reference statistics of config.data for FID",
    "plan": "memory and layout plan of the configured run on this machine's devices (nothing is trained)",
    "keys": "list every config key with its value and meaning (--workdir not needed)",
}
NO_WORKDIR = ("keys",)
LOCKING_MODES = ("train", "teacher", "pipeline")   # modes that write checkpoints hold WORKDIR/lock
HELP_FLAGS = ("-h", "-?", "--help", "-help", "--helpshort", "--helpfull")


class UsageError(Exception):
  """A mistake on the command line."""


# --- help ------------------------------------------------------------------------------------------------

def _configs_package():
  try:
    return importlib.import_module("configs")
  except ImportError:
    return None


def recipes() -> list:
  """[(file stem, variants, first docstring line)] of configs/*.py (the shared modules left out)."""
  package = _configs_package()
  if package is None:
    return []
  out = []
  for folder in package.__path__:
    for name in sorted(os.listdir(folder)):
      stem, ext = os.path.splitext(name)
      if ext != ".py" or stem in ("__init__", "base", "published"):
        continue
      try:
        module = importlib.import_module(f"configs.{stem}")
      except Exception:  # pylint: disable=broad-except  (a broken config file must not break --help)
        continue
      doc = (module.__doc__ or "").strip().splitlines()
      what = re.sub(r"[.:]?\s*(Usage)?:?$", "", doc[0]) if doc else ""   # "… teachers. Usage:" → "… teachers"
      out.append((stem, tuple(getattr(module, "VARIANTS", ())), what))
  return out


def _main_flags() -> list:
  """The flags main.py defines (whatever their number: a flag added there shows up here)."""
  module = FLAGS.find_module_defining_flag("mode")
  return sorted(FLAGS.get_flags_for_module(module), key=lambda f: f.name) if module else []


def help_text(prog: str = "main.py") -> str:
  lines = [f"usage: {USAGE.replace('main.py', prog, 1)}", "", "modes (--mode):"]
  lines += [f"  {name:<9} {what}" for name, what in MODES.items()]
  lines += ["", "recipes (--config configs/FILE.py:VARIANT; the first variant is the default):"]
  for stem, variants, what in recipes():
    lines.append(f"  {stem:<15} {what}")
    if variants:
      lines += textwrap.wrap(" ".join(variants), width=100, initial_indent=" " * 18, subsequent_indent=" " * 18)
  lines += ["", "flags:"]
  for flag in _main_flags():
    default = "" if flag.default in (None, "", False) else f" (default: {flag.default})"
    lines.append(f"  --{flag.name:<20} {flag.help}{default}")
  lines += ["  --config.KEY=VALUE     override one config key (python main.py --mode keys --config ... lists them)",
            "",
            "A run resumes from WORKDIR/checkpoints when started again; SIGTERM or Ctrl-C saves the step in progress",
            "and exits (run the same command to continue). See docs/long_runs.md."]
  return "\n".join(lines) + "\n"


# --- the config keys ---------------------------------------------------------------------------------------

def config_comments(path: str) -> dict:
  """{dotted key: comment} of the assignments `x.a.b = value  # comment` in a config file: the comment on the
  line, and a block of comment lines just above it (a section's description) prefixed with '§'. Sections
  (`x.a = ConfigDict()`) are keyed 'a:'."""
  with open(path, encoding="utf-8") as f:
    source = f.read()
  trailing, blocks, block = {}, {}, []
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      if tok.line.strip().startswith("#"):
        block.append(tok.string.lstrip("# ").rstrip())
      else:
        trailing[tok.start[0]] = tok.string.lstrip("# ").rstrip()
    elif tok.type == tokenize.NL and not tok.line.strip():
      block = []
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT):
      if block:
        blocks[tok.start[0]] = " ".join(block)
        block = []
  out = {}
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Assign):
      continue
    for target in node.targets:
      parts = []
      while isinstance(target, ast.Attribute):
        parts.insert(0, target.attr)
        target = target.value
      if parts and isinstance(target, ast.Name):
        is_section = (isinstance(node.value, ast.Call) and
                      getattr(node.value.func, "attr", getattr(node.value.func, "id", "")) == "ConfigDict")
        key = ".".join(parts) + (":" if is_section else "")
        comment = trailing.get(node.lineno, "")
        if node.lineno in blocks:
          comment = f"§ {blocks[node.lineno]}" + (f" | {comment}" if comment else "")
        out.setdefault(key, comment)
  return out


def _leaves(config, prefix: str = "") -> list:
  """[(dotted key, value or None for a section)] in the order the config file sets them."""
  out = []
  fields = getattr(config, "_fields", None)   # ConfigDict.keys() sorts; its fields keep the file's order
  for key in (list(fields) if isinstance(fields, dict) else config.keys()):
    value = config[key]
    if hasattr(value, "keys") and hasattr(value, "to_dict"):
      out.append((f"{prefix}{key}", None))
      out += _leaves(value, f"{prefix}{key}.")
    else:
      out.append((f"{prefix}{key}", value))
  return out


def keys_text(config, config_path: Optional[str]) -> str:
  """Every key of `config` with its value, and the comment of configs/base.py (or of the config file)."""
  comments = {}
  package = _configs_package()
  base = os.path.join(list(package.__path__)[0], "base.py") if package is not None else None
  for path in (base, config_path):
    if path and os.path.isfile(path):
      comments.update({k: v for k, v in config_comments(path).items() if v})

  def comment_of(key, section):
    key += ":" if section else ""
    if key in comments or section:
      return comments.get(key, "")
    return comments.get(key.partition(".")[2], "")   # the pipeline's `sid.loss.alpha`: base.py's `loss.alpha`

  lines = []
  for key, value in _leaves(config):
    comment = comment_of(key, value is None)
    section = comment.startswith("§ ")
    if section:
      header, _, comment = comment[2:].partition(" | ")
      lines.append(f"# {header}")
    if value is None:
      lines.append(f"{key}:" + (f"  # {comment}" if comment else ""))
      continue
    entry = f"{key} = {value!r}"
    lines.append(f"{entry:<44} # {comment}" if comment else entry)
  return "\n".join(lines) + "\n"


# --- errors ------------------------------------------------------------------------------------------------

def _root(error: BaseException) -> BaseException:
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  return error


def one_line(error: BaseException) -> str:
  """An error's message in one line (the first; the rest is for --debug)."""
  if isinstance(error, OSError) and error.strerror and error.filename:
    return f"{error.strerror}: {error.filename}"
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  return lines[0] + (" (--debug shows more)" if len(lines) > 1 else "")


def _overrides(argv: Sequence[str]) -> list:
  """The config keys named by --config.KEY[=VALUE] arguments."""
  out = []
  for arg in argv:
    for prefix in ("--config.", "--noconfig."):
      if arg.startswith(prefix):
        out.append(arg[len(prefix):].split("=", 1)[0])
  return out


def _unknown_key(config, key: str) -> Optional[str]:
  """A message for the first part of `key` that `config` lacks (with the closest spellings), or None."""
  import difflib  # pylint: disable=import-outside-toplevel
  node, done = config, []
  for part in key.split("."):
    if not hasattr(node, "keys"):
      return f"--config.{key}: {'.'.join(done)} is a value, not a section"
    if part not in node.keys():
      close = difflib.get_close_matches(part, list(node.keys()), n=3)
      prefix = ".".join(done) + "." if done else ""
      hint = f" (did you mean {' or '.join(prefix + c for c in close)}?)" if close else ""
      return f"--config.{key}: unknown config key {prefix + part}{hint}; `--mode keys` lists them"
    node, done = node[part], done + [part]
  return None


def _config_arg(argv: Sequence[str]) -> Optional[str]:
  """The value of the last --config (the one absl keeps)."""
  found = None
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      found = argv[i + 1]
    elif arg.startswith("--config="):
      found = arg[len("--config="):]
  return found


def load_config(config_arg: str):
  """The config `FILE.py[:ARG]` names, as config_flags loads it (get_config(ARG)), without overrides."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  path, _, arg = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location("_sida_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def flag_error(error: BaseException, argv: Sequence[str]) -> str:
  """One line for an error raised while parsing the command line."""
  config_arg = _config_arg(argv)
  try:   # without the overrides (config_flags applies them while loading the file, from sys.argv)
    config = load_config(config_arg) if config_arg else None
  except Exception:  # pylint: disable=broad-except  (then the error is about the file itself)
    config = None
  if config is not None:
    for key in _overrides(argv):
      message = _unknown_key(config, key)
      if message:
        return message
  root = _root(error)
  if root is not error and "config file" in str(error):
    return f"--config={config_arg}: {type(root).__name__}: {one_line(root)}"
  return one_line(error)


def is_user_error(error: BaseException) -> bool:
  """Errors that come from what the user gave (config, files, workdir), not from a bug."""
  kinds = [ValueError, OSError, pickle.UnpicklingError]
  workdir = sys.modules.get("sida_jax.train.workdir")   # loaded by any mode that can raise its errors
  if workdir is not None:
    kinds.append(workdir.WorkdirInUse)
  return isinstance(error, tuple(kinds))


# --- logging -------------------------------------------------------------------------------------------------

class _ProjectLogs:
  """Passes this project's records, and libraries' warnings and errors except known chatter."""

  QUIET = ("/orbax/",)   # logs every file operation, and at WARNING what the fallback already reports

  def filter(self, record):
    own = f"{os.sep}sida_jax{os.sep}" in record.pathname or record.pathname.endswith("main.py")
    if own:
      return True
    return record.levelno >= std_logging.WARNING and not any(q in record.pathname for q in self.QUIET)


def _quiet_unraisable(default_hook):
  """TensorStore reports each failed read of an unreadable checkpoint once more, as a traceback from a callback
  into Orbax's already closed event loop (after the restore has failed and the fallback has said so)."""
  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
      return
    default_hook(unraisable)
  return hook


def setup_logging(debug: bool) -> None:
  logging.use_absl_handler()
  logging.set_verbosity(logging.DEBUG if debug else logging.INFO)
  if not debug:
    logging.get_absl_handler().addFilter(_ProjectLogs())
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)


# --- main ----------------------------------------------------------------------------------------------------

def main(argv: Sequence[str]) -> int:
  """Runs main.py's command line; returns the exit code."""
  prog = os.path.basename(argv[0]) if argv else "main.py"

  def fail(message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2

  if any(arg in HELP_FLAGS for arg in argv[1:]):
    sys.stdout.write(help_text(prog))
    return 0
  debug = "--debug" in argv[1:]
  config_arg = _config_arg(argv)
  if config_arg is not None and not os.path.isfile(config_arg.split(":", 1)[0]):
    return fail(f"--config: file not found: {config_arg.split(':', 1)[0]}")
  try:
    rest = FLAGS(list(argv))
  except Exception as e:  # pylint: disable=broad-except  (every parsing problem is the user's to fix)
    if debug:
      traceback.print_exc()
    return fail(flag_error(e, argv))
  if len(rest) > 1:
    return fail(f"unexpected arguments: {' '.join(rest[1:])} (options are --name=value; see --help)")
  config = FLAGS.config
  if FLAGS.mode == "keys":
    if config is None:
      config = importlib.import_module("configs.base").get_config()
    sys.stdout.write(keys_text(config, config_arg and config_arg.split(":", 1)[0]))
    return 0
  if config is None:
    return fail("--config is required (e.g. --config configs/smoke.py; --help lists the recipes)")
  if not FLAGS.workdir and FLAGS.mode not in NO_WORKDIR:
    return fail("--workdir is required")
  setup_logging(FLAGS.debug)
  try:
    from sida_jax.train import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
    explicit = bool(FLAGS.coordinator_address or FLAGS.num_processes)   # multi-process by flags
    if FLAGS.mode in LOCKING_MODES and not (explicit or workdir_lib.multi_process_environment()):
      workdir_lib.check_free(FLAGS.workdir)   # a busy workdir is refused before the slow imports
    if explicit:   # before anything touches a device
      import jax  # pylint: disable=import-outside-toplevel
      jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from sida_jax import cli  # pylint: disable=import-outside-toplevel
    from sida_jax.train import preemption  # pylint: disable=import-outside-toplevel
    try:
      cli.run(FLAGS.mode, config, FLAGS.workdir)
    except preemption.Interrupted as e:
      print(f"{prog}: {e}", file=sys.stderr)
      return e.exit_code
  except KeyboardInterrupt:
    if FLAGS.debug:
      traceback.print_exc()
    print(f"{prog}: interrupted (no checkpoint saved at this point)", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    if not is_user_error(e):
      raise
    if FLAGS.debug:
      traceback.print_exc()
    return fail(one_line(e))
  return 0
