"""``retrieval``: one subcommand per stage. Flags are derived from ``training.config.Config``.

    retrieval run                  the main job: data stages, training, release (synthetic data by default)
    retrieval generate | ingest    source stage -> <data_dir>/raw (generate --continue --days N: the world goes on)
    retrieval build                pandera contracts + dbt build, then switch live
    retrieval features             feast apply + materialize (incremental when possible)
    retrieval training-set         point-in-time training set through the feature services
    retrieval pretrain             pre-trained ID embeddings (a versioned table under <data_dir>/pretrained)
    retrieval train | report       two-tower training (checkpoint) | model variants vs baselines report
    retrieval release ACTION       publish | rollback | status | recover | history: versioned Milvus index + user tower
    retrieval retrain              refresh data, train a candidate, validate against live, publish or reject
    retrieval stack up|down|status a local Milvus server + Redis for development (training/stack.py)
    retrieval config               print the effective config as YAML

Every subcommand accepts ``--config FILE`` (a YAML file of overrides) and ``--section.field VALUE``. The
service has its own command, ``retrieval-service`` (bentos/launcher.py): the online path lives in bentos/.
``retrieval train`` under ``torchrun --nproc_per_node=N`` trains with N DDP ranks (training/train.py).
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable

import yaml

from training import __version__
from training.config import Config, ConfigError, add_config_flags, config_from_args


def _cmd(fn_name: str) -> Callable[[Config, argparse.Namespace], object]:
    def run(cfg: Config, args: argparse.Namespace) -> object:
        from training import pipeline

        return getattr(pipeline, fn_name)(cfg)

    return run


def _generate(cfg: Config, args: argparse.Namespace) -> object:
    from training import pipeline

    cfg.data.source = "synthetic"
    if args.continue_world:
        if args.days is None:
            raise ValueError("--continue needs --days N (the days to append)")
        return pipeline.continue_raw(cfg, args.days)
    if args.days is not None:
        raise ValueError("--days goes with --continue (a new world's history length is --data.days)")
    return pipeline.make_raw(cfg)


def _ingest(cfg: Config, args: argparse.Namespace) -> object:
    from training import pipeline

    cfg.data.source = "movielens"
    return pipeline.make_raw(cfg)


def _run(cfg: Config, args: argparse.Namespace) -> object:
    from training import pipeline

    return pipeline.run_all(cfg, regenerate=not args.keep_raw, data_only=args.data_only)


def _release(cfg: Config, args: argparse.Namespace) -> object:
    from pathlib import Path

    from training.release import publish

    if args.action == "publish":
        return publish.publish(cfg, Path(args.checkpoint) if args.checkpoint else None)
    if args.action == "history":
        from training import retrain

        return retrain.summary(retrain.history(cfg))
    return getattr(publish, args.action)(cfg)


def _retrain(cfg: Config, args: argparse.Namespace) -> object:
    from dataclasses import replace

    from training import pipeline

    overrides = {k: v for k, v in (("every", args.every), ("cycles", args.cycles)) if v is not None}
    if overrides:
        cfg = replace(cfg, retrain=replace(cfg.retrain, **overrides))
    return pipeline.retrain(cfg)


def _stack(cfg: Config, args: argparse.Namespace) -> object:
    from training import stack

    state = getattr(stack, args.action)(cfg)
    if state.get("up"):
        print("# point the project at the stack: save as e.g. stack.yaml, then --config stack.yaml (or merge it into "
              "your config)\n" + yaml.safe_dump(stack.overrides(state), sort_keys=False), file=sys.stderr)
    return state


def _print_config(cfg: Config, args: argparse.Namespace) -> object:
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return None


COMMANDS: dict[str, tuple[Callable[[Config, argparse.Namespace], object], str]] = {
    "run": (_run, "the main job: every data stage end to end"),
    "generate": (_generate, "write the synthetic raw data (deterministic by --data.seed)"),
    "ingest": (_ingest, "ingest MovieLens files from --data.movielens_path"),
    "build": (_cmd("build"), "pandera contracts + dbt build, then switch the live snapshot"),
    "features": (_cmd("features"), "feast apply + materialize the live snapshot"),
    "training-set": (_cmd("training_set"), "point-in-time training set through the feature services"),
    "pretrain": (_cmd("pretrain"), "pre-train user and pin ID embeddings on the window before the training window"),
    "train": (_cmd("train"), "train the two-tower model on the live training set; save the checkpoint"),
    "report": (_cmd("report"), "two-tower variants (seeds) vs tuned baselines on one split: report.md/.json, plot"),
    "release": (_release, "publish (build + verify + switch) | rollback | status | recover the retrieval release | "
                          "history of retrain candidates"),
    "retrain": (_retrain, "one retrain cycle (or --cycles N, one --every interval apart): new data, candidate, "
                          "gate against the live model, synchronized publish or a recorded rejection, pruning"),
    "stack": (_stack, "up | down | status: a local Milvus server and Redis under <data_dir>/stack (development)"),
    "config": (_print_config, "print the effective config as YAML"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retrieval", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and third-party warnings)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_config_flags(p)
        if name == "release":
            p.add_argument("action", choices=["publish", "rollback", "status", "recover", "history"])
            p.add_argument("--checkpoint", help="publish this model.pt (default: the newest under <data_dir>/models)")
        if name == "retrain":
            p.add_argument("--every", help="shorthand for --retrain.every (e.g. 1d, 6h, 0s)")
            p.add_argument("--cycles", type=int, help="shorthand for --retrain.cycles")
        if name == "stack":
            p.add_argument("action", choices=["up", "down", "status"])
        if name == "generate":
            p.add_argument("--continue", dest="continue_world", action="store_true",
                           help="append the next --days days of the synthetic world in <data_dir>/raw (same users, "
                                "pins and trends, new pins; deterministic by seed and day) instead of a new world")
            p.add_argument("--days", type=int, metavar="N",
                           help="with --continue: days to append (not --data.days, the generated history's length)")
        if name == "run":
            p.add_argument("--keep-raw", action="store_true", help="reuse <data_dir>/raw instead of regenerating it")
            p.add_argument("--data-only", action="store_true", help="stop after the training set (no train/publish)")
    return parser


def quiet_warnings(verbose: bool) -> None:
    """Python warnings go to the log (logger ``py.warnings``), shown with ``-v`` only. The libraries this project
    drives warn about their own dependencies (ibis about duckdb's API, milvus-lite about pkg_resources, Feast
    about pydantic fields), nothing a user of ``retrieval`` can act on; Feast also resets the warning filters
    when its modules load, so filters alone do not keep them out of the console."""
    warnings.simplefilter("default")
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.DEBUG if verbose else logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("feast", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_warnings(args.verbose)
    try:
        cfg = config_from_args(args)
        result = COMMANDS[args.command][0](cfg, args)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"retrieval {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_status", 2)
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


def entry() -> None:
    """Console-script entry. Skips interpreter teardown: duckdb's bindings print spurious leak reports
    when Feast's cached connections are collected at exit."""
    rc = main()
    atexit._run_exitfuncs()  # everything a normal exit does (flush logs, multiprocessing cleanup) ...
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # ... but module teardown


if __name__ == "__main__":
    entry()
