"""``--config FILE`` and ``key=value`` overrides for the argparse stages (estimate, sample,
evaluate nll|fid, plan), on top of their flags.

Precedence, later wins: the flags' defaults < ``--config FILE`` < ``key=value`` < flags given on
the command line. The file is a YAML mapping (read by OmegaConf) of option names to values.

* A key is a flag's name without its leading dashes, with dashes or underscores alike
  (``batch-size`` or ``batch_size``), or the option's dest (``nll_clip_x0`` for ``--clip-x0``).
  An unknown key is a :class:`UsageError` naming the key, the file (or the override) and the
  nearest valid key.
* A value is what you would type after the flag. A YAML list is a comma list
  (``steps: [10, 25]`` is ``--steps 10,25``); a switch takes true or false (``no_progress: true``;
  ``clip_x0: false`` is ``--no-clip-x0``); null keeps the flag's default. In an override the
  text after ``=`` is taken as typed, except ``[a, b]`` (a list) and a switch's true/false.
  ``${key}`` and ``${oc.env:VAR}`` interpolations (keys in their underscore form) are resolved.
* Every entry becomes argv for the same parser, after its value has passed the flag's own
  ``type=`` and ``choices`` (so a config cannot bypass a check a flag has); the error names
  the file or override and the key.

The resolved configuration, every option's final value, is ``args.resolved_config`` (a
JSON-serialisable dict; :func:`resolved_config`): the stages write it next to their output,
and it can be given back as ``--config`` to repeat the run.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from adpm_dist.errors import UsageError, UserArgumentParser
from adpm_dist.io import storage

CONFIG_DEST = "config_file"
RESOLVED = "resolved_config"
_NOT_OPTIONS = {CONFIG_DEST, "help"}


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` (call last in a stage's parser). The ``key=value`` overrides are the
    arguments the parser leaves over (:func:`parse_with_config`), not an action of their own."""
    group = parser.add_argument_group(
        "configuration", "any number of key=value arguments set options too, e.g. batch_size=64 "
        "no_progress=true steps=[10,25]; later wins: defaults < --config FILE < key=value < flags "
        "given on the command line")
    group.add_argument("--config", dest=CONFIG_DEST, metavar="FILE", default=None,
                       help="YAML mapping of option names to values, e.g. 'batch_size: 64' or "
                            "'steps: [10, 25]' (keys: the flags without '--', dashes or underscores; "
                            "default: none)")


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every name a key may use → its action (the configurable options: flags with a value or a switch)."""
    names: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse has no public list of its actions
        if not action.option_strings or action.dest in _NOT_OPTIONS:
            continue
        if _switch(action) is None and action.nargs not in (None, "?"):
            continue  # append/count/help-like actions take no single value
        flags = action.option_strings[:1] if isinstance(action, argparse.BooleanOptionalAction) \
            else action.option_strings
        for flag in flags:
            bare = flag.lstrip("-")
            names.update({bare: action, bare.replace("-", "_"): action})
        names[action.dest] = action
    return names


def _switch(action: argparse.Action) -> str | None:
    """'on/off' for --x/--no-x, 'true' for store_true, 'false' for store_false, else None."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return "on/off"
    if action.nargs == 0 and isinstance(action.const, bool):
        return "true" if action.const else "false"
    return None


def _canonical(entries: dict, options: dict[str, argparse.Action], source: str, prog: str) -> dict:
    """Keys → dests, refusing unknown keys (naming the nearest valid one) and a key given twice."""
    out: dict[str, Any] = {}
    for key, value in entries.items():
        action = options.get(str(key))
        if action is None:
            valid = sorted({a.dest for a in options.values()})
            near = difflib.get_close_matches(str(key).replace("-", "_"), valid, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise UsageError(f"{prog}: {source}: unknown key '{key}'{hint}; valid keys: {', '.join(valid)}")
        if action.dest in out:
            raise UsageError(f"{prog}: {source}: '{key}' sets {action.dest} a second time")
        out[action.dest] = value
    return out


def _read_file(path: str, prog: str) -> dict:
    try:
        loaded = OmegaConf.load(path)
    except FileNotFoundError:
        raise UsageError(f"{prog}: --config {path}: file not found") from None
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise UsageError(f"{prog}: --config {path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(loaded, DictConfig):
        raise UsageError(f"{prog}: --config {path}: the top level must be a mapping of option names")
    return OmegaConf.to_container(loaded, resolve=False)


def _read_override(text: str, options: dict[str, argparse.Action], prog: str) -> tuple[str, Any]:
    key, eq, raw = text.partition("=")
    if not eq or not key.strip():
        raise UsageError(f"{prog}: '{text}' is neither a flag nor a key=value override")
    key, raw = key.strip(), raw.strip()
    action = options.get(key)
    if (action is not None and _switch(action) is not None) or raw.startswith("["):
        try:
            return key, yaml.safe_load(raw)
        except yaml.YAMLError:
            raise UsageError(f"{prog}: override '{text}': not a YAML value; quote it") from None
    return key, raw


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    if isinstance(value, (dict, bool)) or value is None:
        raise TypeError(type(value).__name__)
    return str(value)


def _checked(action: argparse.Action, text: str, where: str) -> None:
    """The flag's own ``type=`` and ``choices`` checks on ``text``, as argparse applies them."""
    try:
        value = action.type(text) if callable(action.type) else text
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{where}: {exc}") from None
    except (TypeError, ValueError):
        name = getattr(action.type, "__name__", repr(action.type))
        raise UsageError(f"{where}: invalid {name} value: {text!r}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(repr, action.choices))
        raise UsageError(f"{where}: invalid choice: {value!r} (choose from {choices})")


def _as_argv(action: argparse.Action, value: Any, where: str) -> list[str]:
    """One entry as the argv of its flag (checked first); [] for null (the default)."""
    flag, switch = action.option_strings[0], _switch(action)
    if value is None:
        return []
    if switch is not None:
        if not isinstance(value, bool):
            raise UsageError(f"{where}: a switch takes true or false, not {value!r}")
        if switch == "on/off":
            return [flag] if value else ["--no-" + flag[2:]]
        return [flag] if value == (switch == "true") else []
    try:
        text = _text(value)
    except TypeError as exc:
        raise UsageError(f"{where}: expects a value or a list, not a {exc}") from None
    _checked(action, text, where)
    return [flag, text]


@contextlib.contextmanager
def _nothing_required(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Required flags may come from the config: the first pass only finds --config and overrides."""
    real_usage = parser.format_usage().removeprefix("usage: ").rstrip().replace("%", "%%")
    usage, parser.usage = parser.usage, real_usage
    required = [a for a in parser._actions if a.required]
    for action in required:
        action.required = False
    try:
        yield  # --help here still shows the real usage line (kept above)
    finally:
        parser.usage = usage
        for action in required:
            action.required = True


def _config_argv(parser: argparse.ArgumentParser, config_file: str | None, overrides: list[str]) -> list[str]:
    """argv of the --config file's entries overridden by the key=value ones, each checked."""
    prog, options = parser.prog, _options(parser)
    layers = []
    if config_file is not None:
        source = f"--config {config_file}"
        layers.append((source, _canonical(_read_file(config_file, prog), options, source, prog)))
    for text in overrides:
        key, value = _read_override(text, options, prog)
        layers.append((f"override '{text}'", _canonical({key: value}, options, f"override '{text}'", prog)))
    sources = {dest: source for source, entries in layers for dest in entries}
    try:  # later layers win; interpolations see the merged entries
        merged = OmegaConf.to_container(OmegaConf.merge(*(OmegaConf.create(e) for _, e in layers)),
                                        resolve=True) if layers else {}
    except OmegaConfBaseException as exc:
        key = exc.full_key or exc.key
        raise UsageError(f"{prog}: {sources.get(str(key), '--config')}: key '{key}': "
                         f"{(exc.msg or str(exc)).splitlines()[0]}") from None
    by_dest = {a.dest: a for a in options.values()}
    argv: list[str] = []
    for dest, value in merged.items():
        action = by_dest[dest]
        argv += _as_argv(action, value, f"{prog}: {sources[dest]}: key '{dest}' ({action.option_strings[0]})")
    return argv


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv`` of a leaf parser with :func:`add_config_options`: see the module doc."""
    with _nothing_required(parser):
        first, left = parser.parse_known_args(list(argv))
    # What argparse leaves over: the key=value overrides (flag values were consumed by their flags).
    unknown = [t for t in left if t.startswith("-") or "=" not in t]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args, _ = parser.parse_known_args(_config_argv(parser, first.config_file, left) + list(argv))
    options = {a.dest: a for a in _options(parser).values()}
    setattr(args, RESOLVED, {dest: getattr(args, dest) for dest in options})
    return args


def resolved_config(args: argparse.Namespace) -> dict:
    """Every option's final value, as the stages record it (configured credentials masked, as in
    every other record); also for a Namespace built without :func:`parse_with_config`."""
    found = getattr(args, RESOLVED, None)
    if found is None:
        found = {k: v for k, v in vars(args).items() if k not in (CONFIG_DEST, RESOLVED)}
    return {k: storage.redact(v) if isinstance(v, str) else v for k, v in found.items()}


class ConfigParser(UserArgumentParser):
    """A stage's parser: :func:`parse_with_config` on a parser with the config options (for one
    with subcommands, on the chosen subcommand's parser); plain argparse otherwise."""

    def parse_args(self, args: Sequence[str] | None = None, namespace=None) -> argparse.Namespace:
        argv = list(sys.argv[1:] if args is None else args)
        sub = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is not None and argv[:1] and argv[0] in sub.choices:
            leaf = sub.choices[argv[0]]
            parsed = leaf.parse_args(argv[1:])  # a ConfigParser too (argparse makes it our class)
            setattr(parsed, sub.dest, argv[0])
            return parsed
        if sub is None and any(a.dest == CONFIG_DEST for a in self._actions):
            return parse_with_config(self, argv)
        return super().parse_args(argv, namespace)
