"""Command line: a thin layer over the Python API; each command has a flag per configuration field it uses."""

from __future__ import annotations

import argparse
import codecs
import difflib
import errno
import importlib
import io
import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
import traceback
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn

from imgclf.config import MACHINE_FIELDS, Config, describe_errors, parameter_table, utf8_problem

# Errors of the disk rather than of imgclf, and what to do about each: full, over quota, read-only, not
# permitted, failing (or a library's write that failed for a reason it does not give).
DISK_ADVICE = {
    errno.ENOSPC: "free space there",
    errno.EDQUOT: "free space there (your disk quota is used up)",
    errno.EROFS: "make the disk writable",
    errno.EACCES: "allow writing there",
    errno.EPERM: "allow writing there",
    errno.EIO: "check the disk",
}
# The other place to write to, by command; other commands name theirs in their --help.
ELSEWHERE = {
    "train": "train into another --out",
    "demo": "give other --data and --out folders",
    "evaluate": "copy the run folder to a disk you may write to and evaluate the copy",
    "predict": "give --csv another file",
    "export": "give another --out",
}
OOM_ADVICE = {  # what makes a command need less GPU memory, by its own flags
    **dict.fromkeys(("train", "demo"), "lower --ft-batch-size (fine-tuning), --batch-size (features) or --resolution"),
    **dict.fromkeys(("evaluate", "predict", "ui"), "lower --batch-size"),
    "serve": "lower --max-batch",
}
# Sub-command modules; each defines ``register(subparsers)`` adding its commands.
COMMAND_MODULES = (
    "imgclf.commands",
    "imgclf.tracking.cli",
    "imgclf.serving.cli",
    "imgclf.datatools.cli",
    "imgclf.ui.cli",
)


def _arg_type(annotation: Any) -> dict[str, Any]:
    """argparse keyword arguments for a pydantic field annotation."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is Literal:
        return {"choices": list(typing.get_args(annotation)), "type": type(typing.get_args(annotation)[0])}
    if origin is list:
        return {"nargs": "+", "type": args[0]}
    if args and origin is not None:  # Optional[X]
        return _arg_type(args[0])
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation is Path:
        return {"type": str}
    return {"type": annotation}


def add_config_args(
    parser: argparse.ArgumentParser,
    sections: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    base: Config | None = None,
    from_run: bool | Sequence[str] = False,
) -> None:
    """Add ``--config FILE`` and one flag per configuration field of ``sections``: a section's name adds all
    its fields, ``section.field`` one (a command offers only the flags it uses); ``None`` adds every field.
    ``exclude``: ``section.field`` names left out (a field the command takes as an argument instead). The help
    shows the defaults of ``base`` (default: ``Config()``), or "the run's" for the fields the command takes
    from a trained run (``from_run``: all of them but :data:`MACHINE_FIELDS`, or these ``section.field`` names).
    A command on a trained run (``from_run`` all) takes from a ``--config`` file only the fields it has flags for."""
    shown = base.model_dump(mode="json") if base is not None else None
    parser.add_argument(
        "--config",
        type=user_path,
        metavar="FILE",
        help="TOML, YAML or JSON configuration file (a run's config.json); flags override it.",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for section, name, _, default, help_text in parameter_table():
        if sections is not None and section not in sections and f"{section}.{name}" not in sections:
            continue
        if f"{section}.{name}" in exclude:
            continue
        group = groups.setdefault(section, parser.add_argument_group(f"{section} parameters"))
        annotation = Config.model_fields[section].annotation.model_fields[name].annotation  # type: ignore[union-attr]
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        kwargs = _arg_type(annotation)
        if "choices" not in kwargs and annotation is not bool:
            kwargs["metavar"] = name.upper()
        if name == "progress":  # config_from_args asks the terminal: not the run's value, nor the field's default
            default = "on a terminal"
        elif (from_run is True and f"{section}.{name}" not in MACHINE_FIELDS) or (
            from_run and from_run is not True and f"{section}.{name}" in from_run
        ):
            default = "the run's"
        elif shown is not None:
            default = json.dumps(shown[section][name])
        group.add_argument(
            *flags, dest=f"cfg__{name}", default=argparse.SUPPRESS, help=f"{help_text} [default: {default}]", **kwargs
        )
    if from_run is True:
        flagged = [a.dest.removeprefix("cfg__") for a in parser._actions if a.dest.startswith("cfg__")]
        parser.set_defaults(config_fields=frozenset(flagged))


def user_path(text: str) -> str:
    """argparse type of a path flag: ``~`` at its start is the home folder, as for the settings' paths (no shell
    expands ``--out=~/x``: it wrote into a folder named ``~``); an empty one (an unset variable) is refused."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path (an unset variable?): give a file or folder")
    return os.path.expanduser(text)


def utf8_path(text: str) -> str:
    """:func:`user_path` of a folder whose path imgclf records (a data folder: in config.json, the hash cache):
    one that is not UTF-8 is refused, as the settings' paths are (:func:`~imgclf.config.utf8_problem`); made
    absolute, so that the working folder's name counts too."""
    path = user_path(text)
    if problem := utf8_problem(os.path.abspath(path)):
        raise argparse.ArgumentTypeError(problem)
    return path


def positive_int(text: str) -> int:
    """argparse type: a whole number of 1 or more."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}")
    return int(text)


def non_negative_int(text: str) -> int:
    """argparse type: a whole number of 0 or more."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of 0 or more, got {text!r}")
    return int(text)


def host_name(text: str) -> str:
    """argparse type: an address to listen on; empty (an unset variable) would mean every interface."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty address (an unset variable?): give one, e.g. 127.0.0.1")
    return text


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1 to 65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {text!r}")
    return int(text)


def config_from_args(args: argparse.Namespace, base: Config | None = None, **overrides: Any) -> Config:
    """The resolved configuration: ``base`` (default: defaults) < --config file < flags < ``overrides``."""
    flat = {k.removeprefix("cfg__"): v for k, v in vars(args).items() if k.startswith("cfg__")}
    flat.update({k: v for k, v in overrides.items() if v is not None})
    if "progress" not in flat:  # bars where this command runs on a terminal, whatever the run's config.json says
        # (a run trained into a log file kept predict silent on a terminal); --progress and a --config file decide
        base = (base or Config()).updated(progress=sys.stderr.isatty())
    if getattr(args, "config", None) is not None:
        return Config.from_file(args.config, base, then=flat, only=getattr(args, "config_fields", None))
    cfg = base or Config()
    return cfg.updated(**flat) if flat else cfg


def console(stderr: bool = False) -> Any:
    """A rich console for tables, on standard output (or error): the terminal's width, or 200 columns into a
    file or pipe (not rich's 80, which cuts names to one or two letters)."""
    from rich.console import Console

    return Console(stderr=stderr, width=None if (sys.stderr if stderr else sys.stdout).isatty() else 200)


def _show_config(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    cfg = config_from_args(args)
    table = Table(title="imgclf parameters", show_lines=False)
    for col in ("section", "parameter", "type", "value", "description"):
        table.add_column(col, overflow="fold")
    flat = cfg.flat()
    for section, name, type_, _, help_text in parameter_table():  # values as JSON writes them (null, true, "a")
        cells = (section, name, type_, json.dumps(flat[name], ensure_ascii=False), help_text)
        table.add_row(*map(escape, cells))  # text, not rich markup: "[old] trip", list[float]
    console().print(table)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, taking an abbreviation that matches only the two spellings of one flag (``--balance`` for
    ``--balance-classes`` / ``--balance_classes``), which argparse on Python 3.11 calls ambiguous."""

    def _get_option_tuples(self, option_string: str) -> list[Any]:
        tuples = super()._get_option_tuples(option_string)  # type: ignore[misc]
        return [t for i, t in enumerate(tuples) if all(t[0] is not u[0] for u in tuples[:i])]

    def error(self, message: str) -> NoReturn:
        """argparse's error after one line of usage, not the whole usage (48 lines for train, while a value out
        of range got none); with the choice meant where one is close (``imgclf trian``, ``--classifier svn``),
        and what a number flag takes (argparse: "invalid int value: 'abc'")."""
        if wrong := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message):
            choices = re.findall(r"'([^']*)'", wrong.group(2))
            if close := difflib.get_close_matches(wrong.group(1), choices, n=1, cutoff=0.6):
                message += f" (did you mean {close[0]!r}?)"
        message = re.sub(r"invalid int value: (.*)$", r"expected a whole number, got \1", message)
        message = re.sub(r"invalid float value: (.*)$", r"expected a number, got \1", message)
        positionals = " ".join(_usage_of(action) for action in self._get_positional_actions())
        usage = f"usage: {self.prog} [options] {positionals}".rstrip()
        self.exit(2, f"{usage} (see {self.prog} --help)\n{self.prog}: error: {message}\n")


def _usage_of(action: argparse.Action) -> str:
    """How a positional argument shows in a usage line: ``data_dir``, ``inputs [inputs ...]``, ``COMMAND ...``."""
    name = str(action.metavar or action.dest)
    return {
        argparse.PARSER: f"{name} ...",
        argparse.ONE_OR_MORE: f"{name} [{name} ...]",
        argparse.ZERO_OR_MORE: f"[{name} ...]",
        argparse.OPTIONAL: f"[{name}]",
    }.get(str(action.nargs), name)


def build_parser() -> argparse.ArgumentParser:
    from imgclf import __version__

    parser = _Parser(prog="imgclf", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"imgclf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="More log output.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("config", help="Show every parameter, its value and one line of help.")
    p.add_argument("--show", action="store_true", help="Print the table (the default action).")
    add_config_args(p)
    p.set_defaults(func=_show_config)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    _underscore_spellings(parser)
    return parser


def _underscore_spellings(parser: argparse.ArgumentParser) -> None:
    """Let every ``--two-words`` flag of every command take its ``--two_words`` spelling too, as the settings'
    flags do (``predict --top_k`` was refused while ``serve --top_k`` worked). Parsed only, not listed in the
    help; a ``--no-two-words`` keeps its ``--no-`` (argparse turns off only a spelling that starts so)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _underscore_spellings(sub)
        for flag in action.option_strings:
            prefix = "--no-" if flag.startswith("--no-") else "--"
            alias = prefix + flag.removeprefix(prefix).replace("-", "_")
            if flag.startswith("--"):
                parser._option_string_actions.setdefault(alias, action)


def _flag_hint(parser: argparse.ArgumentParser, command: argparse.ArgumentParser, given: str) -> str:
    """What was meant by ``given``, a flag ``command`` does not take: a global flag given after the command, a
    flag of other commands (predict has no --resolution: it takes the run's), or one spelt alike."""
    flag = given.split("=")[0]
    if not flag.startswith("-"):
        return ""
    if os.path.lexists(given):  # a file whose name starts with -
        return f" ({given} is a file here: give it as ./{given}, or after --)"
    if flag in ("-v", "--verbose"):
        return f" ({flag} goes before the command: imgclf {flag} {command.prog.split(maxsplit=1)[-1]} ...)"
    flags = [f for action in command._actions for f in action.option_strings]
    if close := difflib.get_close_matches(flag, flags, n=1, cutoff=0.8):
        return f" (did you mean {close[0]}?)"
    others = sorted(
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, sub in action.choices.items()
        if any(flag in a.option_strings for a in sub._actions)
    )
    if others:
        return f" ({flag} is a flag of {', '.join(others)}; see {command.prog} --help for this command's)"
    close = difflib.get_close_matches(flag, flags, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command given (``imgclf runs list``'s, say), for its own usage and flags."""
    current = parser
    while sub := next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None):
        name = getattr(args, sub.dest, None)
        if name not in sub.choices:
            break
        current = sub.choices[name]
    return current


def _utf8_output() -> None:
    """Standard output and error into a file or pipe in UTF-8 where Python would write a narrower code page
    (Windows' cp1252, which has no letter of most class names and stopped the command at the first; both, so that
    `> log 2>&1` is one encoding). Where the encoding stays (a terminal's, or $PYTHONIOENCODING's), a character
    it lacks is written as an escape (``\\u8702``), not an error."""
    asked = "PYTHONIOENCODING" in os.environ
    for out in (sys.stdout, sys.stderr):
        if not isinstance(out, io.TextIOWrapper) or codecs.lookup(out.encoding).name == "utf-8":
            continue
        if asked or out.isatty():
            out.reconfigure(errors="backslashreplace")
        else:
            out.reconfigure(encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    _utf8_output()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the command's own usage, and the flag meant where one is close (argparse 3.11 gives neither)
        command = _command_parser(parser, args)
        command.error(f"unrecognized arguments: {' '.join(extra)}{_flag_hint(parser, command, extra[0])}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.verbose:  # imgclf's own details, not every library's (matplotlib's font search alone is hundreds)
        logging.getLogger("imgclf").setLevel(logging.DEBUG)
    main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:  # SIGTERM (`timeout`, `docker stop`, systemd) as Ctrl-C: a command cleans up after itself (it left an
        code = int(args.func(args) or 0)  # export's scratch folder, a partial model, behind)
        sys.stdout.flush()  # here, where a reader gone away is caught, rather than at exit
        return code
    except BrokenPipeError:  # `imgclf predict ... | head`: the reader has what it wanted; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python exits
        return 141  # 128 + SIGPIPE, as tools killed by it report
    except KeyboardInterrupt as e:
        print("interrupted" + _resume_hint(args, e), file=sys.stderr)
        return 130
    except Exception as e:
        message = _user_message(e, args.command)
        if message is None:
            raise
        if args.verbose:  # the traceback too; the message and exit status stay those of the error
            traceback.print_exc()
        print(f"imgclf: error: {message}", file=sys.stderr)
        return 2
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C. A subclass: CPython notes a plain KeyboardInterrupt that passes through code
    run by ``PyRun_String`` (an extension's embedded Python) and, under ``python -m``, ends the process killed
    by SIGINT at exit, whatever status ``main`` returned."""


def _interrupt(signum: int, frame: object) -> None:
    raise Terminated


RESUME_HINT = "the same command plus --resume continues the fine-tuning from its last checkpoint"


def _resumable(e: BaseException) -> bool:
    """Whether ``e`` ended a fine-tuning train that ``--resume`` continues (``imgclf.pipeline.RESUMABLE``)."""
    pipeline = sys.modules.get("imgclf.pipeline")  # not imported: no train ran
    return pipeline is not None and pipeline.RESUMABLE in getattr(e, "__notes__", ())


def _resume_hint(args: argparse.Namespace, e: KeyboardInterrupt) -> str:
    """How to go on after Ctrl-C, for the commands that leave work half done."""
    if _resumable(e):
        return f" ({RESUME_HINT})"
    if args.command == "train" and getattr(args, "cfg__classifier", None) in ("dnn", "svm_on_refined"):
        return " (the same command again reuses the images decoded so far)"  # stopped before its first checkpoint
    if args.command == "train" and getattr(args, "cfg__use_cache", True):
        return " (the same command again reuses the image features computed so far)"
    if args.command == "dedup" and getattr(args, "apply", False):
        return (
            " (the copies moved so far are in the quarantine and its journal: the same command again moves the "
            f"rest, `imgclf dedup {shlex.quote(args.data_dir)} --undo` brings every one back)"
        )
    return ""


def _user_message(e: Exception, command: str | None = None) -> str | None:
    """What to print for an error of the input or the setup (exit status 2); None for a fault of imgclf.

    A disk's error says what to do for ``command``, the sub-command that met it."""
    from pydantic import ValidationError

    from imgclf.errors import USER_ERRORS

    if type(e).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
        smaller = OOM_ADVICE.get(command or "", "a smaller batch (see the command's --help)")
        return f"out of GPU memory: {smaller}, or run on the CPU with --device cpu"
    if isinstance(e, ValidationError):
        return describe_errors(e)
    if isinstance(e, OSError) and e.errno in DISK_ADVICE:
        where = f": {e.filename}" if e.filename else ""
        elsewhere = ELSEWHERE.get(command or "", "write elsewhere: see the command's --help")
        resume = f"; {RESUME_HINT}" if _resumable(e) else ""
        return f"{e.strerror}{where} ({DISK_ADVICE[e.errno]}, or {elsewhere}{resume})"
    if isinstance(e, USER_ERRORS):
        return str(e)
    return None


if __name__ == "__main__":
    sys.exit(main())
