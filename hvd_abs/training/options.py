"""`hvd-abs train`'s command line, made from TrainConfig's fields (each option is declared once,
in training/config.py, with its type, default, help and group), and what a launcher checks of
a train command line before it starts anything."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import click

from hvd_abs.errors import UserError
from hvd_abs.training.config import TrainConfig
from hvd_abs.training.config_file import COMMAND_LINE_ONLY, load_into_context

GROUPS = ("data", "model", "method", "schedule", "second order", "elastic", "output")


def _int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    if value.strip() == "":
        raise click.BadParameter("is empty: leave it out for the default (E/3 and 2E/3), or give epochs, e.g. 30,60")
    try:
        epochs = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of epochs, e.g. 30,60") from None
    if len(set(epochs)) < len(epochs):  # (here, not in validate: a resumed run's own list is not refused)
        raise click.BadParameter(f"{value} names an epoch twice (two decays at once): give each epoch once")
    return epochs


class GroupedOption(click.Option):
    def __init__(self, *args: Any, group: str = "output", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group


class GroupedCommand(click.Command):
    """A command whose --help lists its options under their groups' headings. make_params: its
    options, made anew for each command line (their choices are the registries' entries then)."""

    def __init__(self, name: str, make_params: Callable[[], list[click.Parameter]], **kwargs: Any) -> None:
        self._make_params = make_params
        super().__init__(name, **kwargs)

    @property
    def params(self) -> list[click.Parameter]:  # type: ignore[override]
        if self._params is None:
            self._params = self._make_params()
        return self._params

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._params = list(value) if value else None

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        self._params = None
        return super().make_context(*args, **kwargs)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                rows.setdefault(getattr(param, "group", "other"), []).append(record)
        for group in [*GROUPS, *sorted(set(rows) - set(GROUPS))]:
            if group in rows:
                with formatter.section(f"{group.capitalize()} options"):
                    formatter.write_dl(rows[group])


def _option(f: dataclasses.Field) -> click.Option:
    meta, kind = f.metadata, str(f.type)
    flag = "--" + meta.get("flag", f.name.replace("_", "-"))
    kw: dict[str, Any] = {"help": meta["help"], "group": meta["group"], "hidden": meta.get("hidden", False)}
    if "metavar" in meta:
        kw["metavar"] = meta["metavar"]
    if kind == "bool":
        return GroupedOption([flag, f.name], is_flag=True, default=f.default, **kw)
    if meta.get("multiple"):
        if "choices" in meta:
            kw["type"] = click.Choice(list(meta["choices"]()))
        return GroupedOption([flag, f.name], multiple=True, default=f.default, **kw)
    if f.name == "lr_decay_epochs":
        return GroupedOption([flag, f.name], callback=_int_list, default=None, **kw)
    if "choices" in meta:
        kw["type"] = click.Choice(list(meta["choices"]()))
    elif kind.startswith("int"):
        kw["type"] = int
    elif kind.startswith("float"):
        kw["type"] = float
    return GroupedOption([flag, f.name], default=f.default, show_default=f.default is not None, **kw)




def train_options() -> list[click.Option]:
    """--config, then one click option per TrainConfig field (choices from the registries as
    they are now), then --print-config."""
    config = GroupedOption(["--config", "config"], metavar="FILE", is_eager=True, expose_value=True,
                           multiple=True, callback=load_into_context, group="output",
                           help="A YAML file of these options (name: value); flags given here override it.")
    show = GroupedOption(["--print-config", "print_config"], is_flag=True, group="output",
                         help="Print the resolved options as a --config file and exit, training nothing.")
    return [config, *(_option(f) for f in dataclasses.fields(TrainConfig)), show]


def train_command(body: Callable[..., Any], name: str = "train") -> click.Command:
    """The `hvd-abs train` command, calling body(**options)."""
    return GroupedCommand(
        name, train_options, callback=body, context_settings={"help_option_names": ["-h", "--help"]},
        help="Train with a fixed (sgd) or adaptive (abs, absa) batch; writes metrics.jsonl, summary.json, "
             "plots.png.\n\nRuns as one process, or as every worker of `horovodrun -np N ... hvd-abs train ...`.")


_PARSER = train_command(lambda **options: None)  # for parsing only


def config_from_options(options: dict, ctx: click.Context) -> TrainConfig:
    """The TrainConfig of parsed `hvd-abs train` options (with --resume, the run's own options
    where not given again: training/resume.py resumed_options)."""
    from hvd_abs.training.resume import resumed_options

    options = {k: (tuple(v) if k in ("callbacks", "loggers") else v) for k, v in options.items()
               if k not in COMMAND_LINE_ONLY}
    given = lambda name: ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)  # noqa: E731
    return TrainConfig(**resumed_options(options, given))


def train_context(train_args: list[str], extras: bool = False, resilient: bool = False) -> click.Context:
    """`hvd-abs train`'s parsed command line. extras: a script's own arguments may be among the
    options (parse_train_args hands them to the script); they are kept in ctx.args."""
    return _PARSER.make_context("hvd-abs train", list(train_args), resilient_parsing=resilient,
                                ignore_unknown_options=extras, allow_extra_args=extras)


def option_names() -> list[str]:
    return [o for p in _PARSER.params for o in p.opts if o.startswith("--")]


def check_script_extras(extras: list[str]) -> None:
    """Refuse a script's own argument that is a near miss of a train option (`--epoch` for
    --epochs): it would reach the script's parser instead, where argparse may even take it as an
    abbreviation of one of the script's options, and the train option keep its default.
    Raises click.UsageError naming the option meant."""
    import difflib

    names = option_names()
    for arg in extras:
        name = arg.split("=", 1)[0]
        if not name.startswith("--") or name == "--":
            continue
        near = difflib.get_close_matches(name, names, n=1, cutoff=0.85)
        if near:
            raise click.UsageError(f"{name} is not an option of hvd-abs train: did you mean {near[0]}? (a script's "
                                   f"own options must not be near misses of them: rename it)")


def check_train_args(train_args: list[str], load_data: bool = False, script: bool = False) -> TrainConfig:
    """Validate `hvd-abs train TRAIN_ARGS` as a launcher would start them, before anything starts:
    click's parsing, TrainConfig.validate() for a fresh (not elastic) run, so an out dir holding
    another run is refused unless --resume or --overwrite is given, and the data set's name.
    load_data: also load the data set (for workers on this machine: a wrong --data-dir is then one
    line here, not a traceback per worker; the decode cache it leaves saves the workers the work).
    script: the options of a `--script` (hvd_abs.parse_train_args): its own arguments may be
    among them, and the data set is the script's, so neither it nor its name is checked.
    Returns the config; raises click.UsageError or UserError naming the fix."""
    from hvd_abs.data import DATASETS
    from hvd_abs.training.run_dir import read_newest_checkpoint

    ctx = train_context(train_args, extras=script)
    if not script:  # (a script's workers check, knowing its own options: hvd_abs.parse_train_args)
        check_script_extras(ctx.args)
    cfg = config_from_options(ctx.params, ctx)
    dataclasses.replace(cfg, elastic=False).validate()
    if script:
        load_data = False
    elif cfg.dataset.strip().lower() not in DATASETS:
        raise UserError(f"--dataset {cfg.dataset!r} is unknown; pass one of {', '.join(DATASETS)}")
    if load_data:
        from hvd_abs.training.run_data import load_data

        load_data(cfg.dataset, cfg.data_dir, cfg.download, cfg.image_size, cfg.data_loading)
    if cfg.resume is not None:
        read_newest_checkpoint(cfg.resume)  # (a UserError when none verifies)
    return cfg
