"""The ``gradwatch`` command: one function per subcommand."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._version import __version__
from .integrations.loggers import Logger
from .integrations.mlflow import MLflow
from .integrations.tensorboard import TensorBoard
from .integrations.wandb import WandB
from .lab.main import main as lab_main
from .measure.distributed import process_rank
from .measure.monitor import Options
from .preflight import load_factory, preflight, resolve_factory_result
from .report import Report
from .report.text import printable
from .runner import RunResult, run_script
from .thresholds import resolve_thresholds
from .verify.child import ChildControl
from .verify.fix import FixControl, final_run
from .verify.run import VerifySettings, verify_report
from .verify.settle import Settle
from .verify.zygote import start_server

__all__ = ["main"]

# Options of `gradwatch run` that may also follow the script path (before any `--`).
_RUN_FLAGS = {"--json": 1, "--html": 1, "--text": 1, "--quiet": 0, "--strict": 0,
              "--sync-every": 1, "--detail-every": 1, "--overhead": 1, "--threshold": 1,
              "--verify": 0, "--budget": 1, "--verify-time": 1, "--repeats": 1,
              "--verify-remedies": 1, "--fix": 0, "--tensorboard": 1, "--wandb": 0,
              "--mlflow": 1, "--per-rank": 0}
# Hidden options of a `--verify` re-run; gradwatch passes them before the script only.
_CHILD_FLAGS = {"--apply-remedy": 1, "--apply-params": 1, "--max-steps": 1, "--settle": 1}


def _split_run_args(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """gradwatch's own options, the script, and the script's arguments.

    Options before the script are gradwatch's. After it, the options in ``_RUN_FLAGS`` are
    still gradwatch's (``gradwatch run train.py --epochs 3 --json r.json``) unless they
    come after a ``--``, which passes everything behind it to the script untouched.
    """
    ours: list[str] = []
    script: str | None = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if a == "--":
            if script is None and i + 1 < len(argv):
                script = argv[i + 1]
                i += 1
            rest.extend(argv[i + 1:])
            break
        if name in _RUN_FLAGS or (script is None and a.startswith("-")):
            n = 0 if "=" in a else _RUN_FLAGS.get(name, _CHILD_FLAGS.get(name, 0))
            if name == "--wandb" and n == 0 and _is_project(argv[i + 1: i + 2]):
                n = 1  # --wandb PROJECT, as --wandb=PROJECT
            ours.extend(argv[i: i + 1 + n])
            i += 1 + n
            continue
        if script is None:
            script = a
        else:
            rest.append(a)
        i += 1
    return ours, script, rest


def _is_project(following: list[str]) -> bool:
    """Whether the argument after ``--wandb`` is its project name: a word that is not an
    option, nor a path that exists, nor a ``.py`` file (the script, or a script's argument)."""
    return bool(following) and not following[0].startswith("-") and \
        not following[0].endswith(".py") and not Path(following[0]).exists()


def _parse_thresholds(items: list[str]) -> dict[str, float]:
    """``--threshold NAME=VALUE`` items; a malformed one is a ValueError (a usage error)."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--threshold takes NAME=VALUE, got {item!r}")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--threshold {name}: {value!r} is not a number") from None
    return out


def cmd_run(argv: list[str]) -> int:
    """Run a training script unmodified and report what its gradients did."""
    ours, script, rest = _split_run_args(argv)
    parser = argparse.ArgumentParser(
        prog="gradwatch run", description="Run a training script unmodified under gradwatch. "
        "Usage: gradwatch run [OPTIONS] SCRIPT [SCRIPT ARGS] [OPTIONS] [-- ARGS FOR SCRIPT]")
    parser.add_argument("--json", metavar="PATH", help="write the JSON report here")
    parser.add_argument("--html", metavar="PATH", help="write the HTML report here")
    parser.add_argument("--text", metavar="PATH", help="write the text summary here")
    parser.add_argument("--quiet", action="store_true", help="no summary on stderr")
    parser.add_argument("--per-rank", action="store_true",
                        help="under torchrun, ranks other than 0 write their own reports too "
                        "(r.rank1.json...) and print their summaries; by default only rank 0 "
                        "writes the one report")
    parser.add_argument("--strict", action="store_true",
                        help="raise gradwatch's own errors instead of reporting them")
    parser.add_argument("--sync-every", type=int, default=None, metavar="N")
    parser.add_argument("--detail-every", type=int, default=None, metavar="N",
                        help="weights, updates and activations on steps 0-7 and every N-th "
                        "step (default 16; long runs stretch it to keep --overhead)")
    parser.add_argument("--overhead", type=_overhead, default=None, metavar="FRACTION",
                        help="gradwatch's share of the step to keep to (default 0.01 = 1%%), "
                        "or 'off' for a fixed --detail-every")
    parser.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                        help="override a threshold (see docs/thresholds.md); repeatable")
    parser.add_argument("--verify", action="store_true",
                        help="then re-run the script with each remedy of each problem found, "
                        "each until its outcome is settled, and record in the report what "
                        "each one changed")
    parser.add_argument("--fix", action="store_true",
                        help="at the first problem found, verify its remedies and restart the "
                        "script from its start with the one that repairs it (the script "
                        "itself is not modified); the report is of the restarted run")
    parser.add_argument("--budget", type=int, default=None, metavar="STEPS",
                        help="at most this many optimizer steps per --verify re-run (default: "
                        "as many as the first run, if they fit in --verify-time)")
    parser.add_argument("--verify-time", type=float, default=600.0, metavar="SECONDS",
                        help="time for the whole --verify pass (default 600); what does not "
                        "finish is reported as not_finished")
    parser.add_argument("--repeats", type=int, default=3, metavar="K",
                        help="re-runs per remedy when the script is not deterministic "
                        "(default 3)")
    parser.add_argument("--verify-remedies", metavar="ID,ID", default=None,
                        help="verify only these remedy ids (default: every remedy offered)")
    parser.add_argument("--tensorboard", metavar="DIR",
                        help="also log the run to TensorBoard event files in DIR")
    parser.add_argument("--wandb", nargs="?", const="", default=None, metavar="PROJECT",
                        help="also log the run to a Weights & Biases run in PROJECT (default: "
                        "WANDB_PROJECT, else gradwatch); WANDB_MODE=offline keeps it on this "
                        "machine")
    parser.add_argument("--mlflow", metavar="URI",
                        help="also log the run to MLflow at this tracking URI (a folder is "
                        "a local file store)")
    parser.add_argument("--apply-remedy", help=argparse.SUPPRESS)
    parser.add_argument("--apply-params", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--settle", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args(ours)
    if script is None:
        parser.error("no training script given")
    if (ns.budget is not None and ns.budget < 1) or ns.repeats < 1 or ns.verify_time <= 0:
        parser.error("--budget and --repeats take a positive integer, --verify-time a "
                     "positive number of seconds")
    if ns.fix and ns.verify:
        parser.error("--fix verifies the remedies itself: give --fix or --verify, not both")
    if (ns.fix or ns.verify) and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        parser.error("--verify and --fix re-run the script in one process: run them without "
                     "torchrun")
    kwargs: dict[str, Any] = {k: v for k, v in (("sync_every", ns.sync_every),
                                                ("detail_every", ns.detail_every))
                              if v is not None}
    if ns.overhead is not None:
        kwargs["overhead"] = None if ns.overhead == "off" else ns.overhead
    try:
        options = Options(strict=ns.strict, **kwargs)
        thresholds = resolve_thresholds(None, _parse_thresholds(ns.threshold))
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    for out in (ns.json, ns.html, ns.text):
        if out:
            _check_writable(parser, out)
    only = frozenset(r.strip() for r in ns.verify_remedies.split(",") if r.strip()) \
        if ns.verify_remedies else None
    settings = VerifySettings(budget=ns.budget, time_s=ns.verify_time, repeats=ns.repeats,
                              only=only, options=options, thresholds=thresholds,
                              passed_on=_passed_on(ns))
    say = None if ns.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    control: Any = None
    if ns.fix:
        control = FixControl(script, rest, settings, say or (lambda _msg: None))
    elif ns.apply_remedy is not None or ns.max_steps is not None:
        ids = ns.apply_remedy.split("+") if ns.apply_remedy else []
        params = json.loads(ns.apply_params)
        params = params if isinstance(params, list) else [params] * len(ids)
        if len(params) != len(ids) or not all(isinstance(p, dict) for p in params):
            parser.error("--apply-params takes one JSON object per remedy of --apply-remedy")
        settle = Settle.from_json(json.loads(ns.settle)) if ns.settle else None
        control = ChildControl(list(zip(ids, params, strict=True)), ns.max_steps, settle)
    try:
        loggers = _loggers(ns)
    except Exception as exc:  # a missing extra, a tracking URI MLflow cannot use
        print(printable(f"gradwatch: {exc}"), file=sys.stderr)
        return 2
    if ns.verify or ns.fix:
        start_server()  # forked before the script runs; it imports the rest meanwhile
    try:
        result = run_script(script, rest, options, thresholds, control, loggers)
    except FileNotFoundError as exc:
        for logger in loggers:
            logger.on_report(None)
        print(printable(f"gradwatch: {exc}"), file=sys.stderr)
        return 2
    if result.report is None:
        return result.exit_code  # a process the script forked: only the parent reports
    if ns.verify:
        result.report = verify_report(result.report, script, rest, settings, say)
    if ns.fix:
        result = _fixed(result, control, script, rest, settings)
    for logger in loggers:
        logger.on_report(result.report)  # the final report: after --verify and --fix
    rank = process_rank()
    if rank and not ns.per_rank:
        return result.exit_code  # rank 0 writes the one report of a distributed run
    outputs = (ns.json, ns.html, ns.text) if not rank else \
        tuple(_ranked(out, rank) for out in (ns.json, ns.html, ns.text))
    _write_outputs(result.report, outputs, ns.quiet, "gradwatch")
    return result.exit_code


def _ranked(path: str | None, rank: int) -> str | None:
    """``r.json`` -> ``r.rank1.json``: the report of rank ``rank`` under ``--per-rank``."""
    if not path:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}.rank{rank}{p.suffix}"))


def _loggers(ns: argparse.Namespace) -> list[Logger]:
    """The loggers that ``--tensorboard``, ``--wandb`` and ``--mlflow`` ask for; a missing
    package raises ``MissingExtra`` naming the extra that installs it."""
    loggers: list[Logger] = []
    if ns.tensorboard:
        loggers.append(TensorBoard(ns.tensorboard))
    if ns.wandb is not None:
        loggers.append(WandB(ns.wandb or None))
    if ns.mlflow:
        loggers.append(MLflow(ns.mlflow))
    return loggers


def _overhead(value: str) -> float | str:
    """``--overhead``: a fraction of the step in (0, 1], or ``off``."""
    if value.strip().lower() == "off":
        return "off"
    try:
        fraction = float(value)
    except ValueError:
        fraction = math.nan
    if not 0 < fraction <= 1:
        raise argparse.ArgumentTypeError(f"takes a fraction of the step in (0, 1] (0.01 = "
                                         f"1%) or 'off', got {value!r}")
    return fraction


def _passed_on(ns: argparse.Namespace) -> list[str]:
    """The options of this ``gradwatch run`` that a restarted run must have too."""
    out = [f"--threshold={t}" for t in ns.threshold]
    out += ["--strict"] if ns.strict else []
    out += [f"--sync-every={ns.sync_every}"] if ns.sync_every is not None else []
    out += [f"--detail-every={ns.detail_every}"] if ns.detail_every is not None else []
    out += [f"--overhead={ns.overhead}"] if ns.overhead is not None else []
    return out


def _fixed(first: RunResult, control: FixControl, script: str, args: list[str],
           settings: VerifySettings) -> RunResult:
    """After the first run under ``--fix``: the run restarted with the chosen remedy, or the
    first run itself; the report's ``fix`` says which, and why."""
    assert first.report is not None
    control.after(first.report)
    record = dict(control.record)
    if control.repair is None:
        record["reason"] = ("no problem found" if record["found_at_step"] is None else
                            "no remedy gradwatch could apply repaired the problem")
        return RunResult(first.exit_code, Report({**first.report.to_dict(), "fix": record}))
    started = time.monotonic()
    code, final = final_run(script, args, control.repair.parts, settings)
    record.update(restarted=True, kind=control.repair.kind, kinds=control.repair.kinds,
                  remedy=control.repair.remedy,
                  final_run_s=round(time.monotonic() - started, 3))
    if final is None:
        record["reason"] = "the restarted run wrote no report"
        return RunResult(code, Report({**first.report.to_dict(), "fix": record}))
    return RunResult(code, Report({**final.to_dict(), "fix": record}))


def _write_outputs(report: Any, outputs: Sequence[str | None], quiet: bool, prog: str,
                   summary_to: Any = None) -> None:
    """Each report file, then the summary: one that fails is one line on stderr, and the
    others are still written (the exit status stays the script's or the check's)."""
    written = []
    for out in outputs:
        if not out:
            continue
        try:
            report.save(out)
            written.append(out)
        except Exception as exc:  # a disk full, a renderer's bug: never the others
            print(printable(f"{prog}: could not write {out}: {type(exc).__name__}: {exc}"),
                  file=sys.stderr)
    if quiet:
        return
    try:
        text = report.summary()
    except Exception as exc:
        print(printable(f"{prog}: could not print the summary: {type(exc).__name__}: {exc}"),
              file=sys.stderr)
    else:
        (summary_to or sys.stderr).write(("\n" if summary_to is None else "") + text)
    if written:
        print(f"report written to {', '.join(written)}", file=sys.stderr)


def _check_writable(parser: argparse.ArgumentParser, path: str) -> None:
    """Refuse, before the script runs, a report path that could not be written after it."""
    p = Path(path)
    if p.is_dir():
        parser.error(f"cannot write {path}: it is a folder; give a file name")
    if p.suffix.lower() not in (".json", ".html", ".htm", ".txt", ".md", ".log"):
        parser.error(f"cannot tell the report format from {path!r}: use .json, .html or .txt")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        parser.error(f"cannot write {path}: folder {folder} does not exist")
    try:
        # The report is written through a temporary file in the same folder: try one.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        parser.error(f"cannot write {path}: folder {folder} is not writable ({exc.strerror})")


def cmd_demo(argv: list[str]) -> int:
    """Every lab experiment with the default seeds: the README's main job."""
    return lab_main(argv, command="demo")


def cmd_lab(argv: list[str]) -> int:
    """Chosen lab experiments over chosen seeds."""
    return lab_main(argv, command="lab")


def cmd_check(argv: list[str]) -> int:
    """Predict gradient problems of a model at init from one forward/backward pass."""
    parser = argparse.ArgumentParser(
        prog="gradwatch check",
        description="Build a model with FACTORY() and predict, from one forward/backward at "
        "init, which layers will have vanishing/exploding gradients, dead ReLUs or saturated "
        "units, and the init that fixes them. TARGET is MODULE:FACTORY (imported like "
        "`python -m`, from the current folder) or FILE.py:FACTORY. FACTORY() returns a model, "
        "(model, example_batch) or (model, example_batch, loss_fn); see "
        "gradwatch.preflight for what a batch may be.",
        epilog="exit status: 0 no warning or error finding, 1 at least one, 2 usage error or "
        "the model could not be checked")
    parser.add_argument("target", metavar="TARGET", help="MODULE:FACTORY or FILE.py:FACTORY")
    parser.add_argument("--input-shape", "--batch-shape", dest="shape", metavar="N,D,...",
                        help="example batch when FACTORY returns only a model: standard normal "
                        "values of this shape (seed --seed)")
    parser.add_argument("--seed", type=int, default=0,
                        help="torch seed set before FACTORY() and for the batch (default 0)")
    parser.add_argument("--json", metavar="PATH", help="write the JSON report here")
    parser.add_argument("--html", metavar="PATH", help="write the HTML report here")
    parser.add_argument("--text", metavar="PATH", help="write the text summary here")
    parser.add_argument("--quiet", action="store_true", help="no summary on stdout")
    parser.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                        help="override a threshold (docs/thresholds.md: the gradient-flow and "
                        "activation ones, and the preflight_* ones); repeatable")
    ns = parser.parse_args(argv)
    module_part, sep, factory_name = ns.target.rpartition(":")
    if not sep or not module_part or not factory_name:
        parser.error(f"TARGET must be MODULE:FACTORY or FILE.py:FACTORY, got {ns.target!r}")
    shape: tuple[int, ...] | None = None
    if ns.shape:
        try:
            shape = tuple(int(d) for d in ns.shape.replace("x", ",").split(",") if d.strip())
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            parser.error(f"--input-shape takes positive integers like 64,20; got {ns.shape!r}")
    for out in (ns.json, ns.html, ns.text):
        if out:
            _check_writable(parser, out)
    try:
        thresholds = resolve_thresholds(None, _parse_thresholds(ns.threshold))
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    try:
        factory = load_factory(module_part, factory_name)
        model, batch, loss_fn = resolve_factory_result(factory, factory_name, shape, ns.seed)
    except (ImportError, LookupError, TypeError, ValueError) as exc:
        print(f"gradwatch check: {exc}", file=sys.stderr)
        return 2
    try:
        report = preflight(model, batch, loss_fn, thresholds=thresholds, seed=ns.seed)
    except (TypeError, ValueError, RuntimeError) as exc:
        print(f"gradwatch check: {exc}", file=sys.stderr)
        return 2
    _write_outputs(report, (ns.json, ns.html, ns.text), ns.quiet, "gradwatch check",
                   summary_to=sys.stdout)
    return 1 if report.problems else 0


COMMANDS = {"run": cmd_run, "demo": cmd_demo, "lab": cmd_lab, "check": cmd_check}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = (f"usage: gradwatch {{{','.join(COMMANDS)}}} ...\n\n"
             "  run   SCRIPT [ARGS]  run a training script unmodified and report on it\n"
             "  check MODULE:FACTORY predict vanishing/exploding/dead/saturated layers at init\n"
             "  demo                 every lab experiment, 3 seeds: verdicts and a page of plots\n"
             "  lab   [NAME ...]     chosen lab experiments (--list, --seeds K, --out DIR)\n\n"
             "gradwatch COMMAND --help for a command's options; gradwatch --version")
    if not args or args[0] in ("-h", "--help"):
        print(usage)
        return 0 if args else 2
    if args[0] == "--version":
        print(f"gradwatch {__version__}")
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"gradwatch: unknown command {args[0]!r}; commands: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    return command(args[1:])


if __name__ == "__main__":
    sys.exit(main())
