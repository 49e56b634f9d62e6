"""MkDocs hook: the parameter and command-line reference pages, generated from the code at every build.

``parameters.md`` comes from the typed configuration (``imgclf.config``), ``cli.md`` from the argparse
parser (``imgclf.cli.build_parser``), so neither can drift from the code.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from mkdocs.structure.files import File, Files

from imgclf.cli import build_parser
from imgclf.config import Config, parameter_table

CONFIG_GROUP_SUFFIX = " parameters"  # argparse groups that add_config_args creates


def _cell(text: str) -> str:
    """Plain text safe in a Markdown table cell (no HTML tags, no column breaks)."""
    return text.replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;").replace("\n", " ")


def parameters_page() -> str:
    """Every parameter by section: flag, type, default, description."""
    lines = [
        "# Parameters",
        "",
        "Every parameter of imgclf, generated from the configuration itself (`src/imgclf/config.py`);",
        "`imgclf config --show` prints the same table with the values in effect.",
        "",
        "Set a parameter on the command line with the flag of its name (`--train-fraction 0.8` or",
        "`--train_fraction 0.8`; `--no-NAME` turns a yes/no parameter off), in a TOML, YAML or JSON file with the",
        "same sections (`--config run.toml`; flags override it), or in Python with",
        "`Config().updated(train_fraction=0.8)`.",
        "",
        "```toml",
        "[data]",
        "train_fraction = 0.8",
        "[backbone]",
        'backbone = "efficientnet_lite2"',
        "resolution = 448",
        "```",
    ]
    section = None
    for sec, name, type_, default, description in parameter_table():
        if sec != section:
            section = sec
            doc = (Config.model_fields[sec].annotation.__doc__ or "").strip()  # type: ignore[union-attr]
            lines += ["", f"## {sec}", "", doc, "", "| parameter | type | default | description |", "|---|---|---|---|"]
        shown = "none" if default == "null" else f"`{default}`"
        lines.append(f"| `{name}` | `{type_}` | {shown} | {_cell(description)} |")
    return "\n".join(lines) + "\n"


def _commands(parser: argparse.ArgumentParser, prog: str) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """(command line, one-line help, parser) of every sub-command, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{prog} {name}", helps.get(name, ""), sub
                yield from _commands(sub, f"{prog} {name}")


def _flag(action: argparse.Action) -> str:
    """``--name VALUE`` (or the positional's name), with the choices when there are a few."""
    if action.choices:
        value = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        value = str(action.metavar or action.dest.removeprefix("cfg__").upper())
    if action.nargs in ("+", "*"):
        value += " ..."
    if not action.option_strings:
        return f"`{value}`"
    names = [s for s in action.option_strings if "_" not in s]  # the --snake_case aliases are not shown
    return " / ".join(f"`{n}{'' if action.nargs == 0 else ' ' + value}`" for n in names)


def _argument_rows(group: argparse._ArgumentGroup) -> list[str]:
    rows = []
    for action in group._group_actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        help_text = action.help or ""
        if action.required and action.option_strings:
            help_text += " (required)"
        elif (
            not any(action.default is v for v in (None, False, argparse.SUPPRESS))  # 0 is a default to show
            and action.option_strings
            and "default" not in help_text
        ):
            help_text += f" [default: {action.default}]"
        rows.append(f"| {_flag(action)} | {_cell(help_text)} |")
    return rows


def _config_flags(group: argparse._ArgumentGroup) -> str:
    """``all of [data]``, or ``[output]: --progress`` where a command takes some of a section's parameters."""
    section = str(group.title).removesuffix(CONFIG_GROUP_SUFFIX)
    link = f"[{section}](parameters.md#{section})"
    names = [a.dest.removeprefix("cfg__") for a in group._group_actions]
    if set(names) == set(Config.model_fields[section].annotation.model_fields):  # type: ignore[union-attr]
        return f"all of {link}"
    return f"{link}: " + ", ".join(f"`--{n.replace('_', '-')}`" for n in names)


def cli_page() -> str:
    """Every command: what it does, its own arguments, and the configuration sections it takes."""
    parser = build_parser()
    lines = [
        "# Command line",
        "",
        "Generated from the argparse parser (`imgclf.cli.build_parser()`); `imgclf COMMAND --help` prints the",
        "same. Commands that take configuration flags list them by section (a whole section, or the parameters",
        "of it the command uses; see [Parameters](parameters.md)), and `--config FILE` reads a TOML or YAML file.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    commands = [
        c
        for c in _commands(parser, "imgclf")
        if not any(isinstance(a, argparse._SubParsersAction) for a in c[2]._actions)
    ]
    lines += [f"| [`{cmd}`](#{cmd.replace(' ', '-')}) | {_cell(help_text)} |" for cmd, help_text, _ in commands]
    lines += ["", "Every command also takes `-v` / `--verbose` (before the command) for more log output."]
    for cmd, help_text, sub in commands:
        lines += ["", f"## {cmd}", "", _cell(help_text), ""]
        groups = [g for g in sub._action_groups if g._group_actions]
        config_groups = [g for g in groups if g.title and g.title.endswith(CONFIG_GROUP_SUFFIX)]
        rows = [row for g in groups if g not in config_groups for row in _argument_rows(g)]
        if rows:
            lines += ["| argument | description |", "|---|---|", *rows]
        if config_groups:
            lines += ["", "Configuration flags: " + "; ".join(_config_flags(g) for g in config_groups) + "."]
    return "\n".join(lines) + "\n"


def on_files(files: Files, config: Any) -> Files:
    """Add the generated pages to the site."""
    for name, text in (("parameters.md", parameters_page()), ("cli.md", cli_page())):
        files.append(File.generated(config, name, content=text))
    return files
