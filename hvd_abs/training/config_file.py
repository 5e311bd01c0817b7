"""`--config run.yaml`: train options from a YAML file, the command line's flags over them; and
the resolved config a run writes into OUT/config.yaml (a file `--config` takes back).

The file maps option names (`base-batch` or `base_batch`) to values; a repeatable option takes a
list. It is read by `hvd-abs train`'s parser, where it fills click's default map, so a flag given
on the command line wins and every value goes through the option's own type and choices. A
launcher writes the file's values into its workers' command lines (`inline_config`), so workers
on other hosts need no copy of it.
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import click

from hvd_abs.errors import UserError

CONFIG_FILE = "config.yaml"
# Options of the command line itself, not of the run: no TrainConfig field, never in a file.
COMMAND_LINE_ONLY = ("config", "print_config")
# Not written into OUT/config.yaml: where and how this run went, not what it trains.
NOT_SAVED = ("out", "resume", "overwrite", "elastic", "max_np", "stop_at_update")


def read_config_file(path: str | Path, names: dict[str, str]) -> dict[str, Any]:
    """{field name: value} of a config file (`names`: each accepted key, underscored, to its
    field); UserError naming the file and the fix."""
    import yaml

    p = Path(path).expanduser()
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror}): pass a YAML file of train options")
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise UserError(f"{path} is not valid YAML{line}: fix it, or write it anew with --print-config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}: give a mapping of option names to values")
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            near = difflib.get_close_matches(name, list(names), n=1)
            hint = f" (did you mean {near[0].replace('_', '-')}?)" if near else ""
            raise UserError(f"{path}: {key!r} is not an option of hvd-abs train{hint}")
        values[names[name]] = value
    return values


def load_into_context(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """The eager --config option's callback: the file's values become the command's defaults."""
    if not value or ctx.resilient_parsing:
        return value
    if len(value) > 1:
        raise click.BadParameter(f"give one file (got {len(value)}); flags given beside it override it",
                                 param_hint="--config")
    params = {p.name: p for p in ctx.command.params if p.name and p.name not in COMMAND_LINE_ONLY}
    names = {}  # the field's name and its flag's (--logger: loggers)
    for p in params.values():
        names.update({o.lstrip("-").replace("-", "_"): p.name for o in p.opts if o.startswith("--")})
        names[p.name] = p.name
    try:
        values = {name: _as_given(params[name], v, value[0]) for name, v in read_config_file(value[0], names).items()}
    except UserError as exc:
        raise click.BadParameter(str(exc), param_hint="--config") from None
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _as_given(p: click.Parameter, v: Any, path: str) -> Any:
    """A file's value as the command line would give it (text), so the option's own type checks
    it: 1.5 or true for an integer are refused, not rounded."""
    flag = f"--{p.name.replace('_', '-')}"
    if getattr(p, "is_flag", False):
        if not isinstance(v, bool):
            raise UserError(f"{path}: {flag} is on or off: give true or false, got {v!r}")
        return v
    items = v if isinstance(v, list) else [v]
    if v is None or (isinstance(v, list) and getattr(p, "multiple", False) and not v):
        return None if v is None else ()
    if not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in items):
        raise UserError(f"{path}: {flag} takes {'values' if isinstance(v, list) else 'a value'} like the command "
                        f"line's, got {v!r}")
    if getattr(p, "multiple", False):
        return [str(x) for x in items]  # (one value for a repeatable option: a list of one)
    if isinstance(v, list):  # a list for a one-value option: --lr-decay-epochs 30,60
        return ",".join(str(x) for x in v)
    return str(v)


def to_yaml(cfg: Any) -> str:
    """The run's resolved options as a config file (NOT_SAVED left out)."""
    import yaml

    values = {f.name.replace("_", "-"): _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
              if f.name not in NOT_SAVED}
    return yaml.safe_dump(values, sort_keys=False)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def inline_config(ctx: click.Context, train_args: list[str]) -> list[str]:
    """`train_args` with `--config FILE` replaced by the flags of the values taken from it (those
    the command line did not give), so that every worker reads the same options without the file."""
    flags: list[str] = []
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in COMMAND_LINE_ONLY:
            continue
        if ctx.get_parameter_source(param.name) != click.core.ParameterSource.DEFAULT_MAP:
            continue
        value, flag = ctx.params[param.name], param.opts[0]
        if param.is_flag:
            flags += [flag] if value else []
        elif param.multiple:
            for v in value:
                flags += [flag, str(v)]
        elif value is not None:
            flags += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    rest, skip = [], False
    for i, a in enumerate(train_args):
        if a == "--":  # (a script's own arguments: as they are)
            rest += train_args[i:]
            break
        if skip:
            skip = False
        elif a == "--config":
            skip = True
        elif not a.startswith("--config="):
            rest.append(a)
    return [*flags, *rest]
