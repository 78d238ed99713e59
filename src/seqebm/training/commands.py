"""The ``train`` / ``compare`` command pair shared by the experiment runners (``seqebm jem``, ``ssl``, ``nlu``, ...).

Each runner has a typed config, ``run(cfg, run_dir, resume=...)`` and a ``compare`` over configs x seeds
(x one more axis, e.g. label counts). :func:`add_train_compare_commands` gives them one command-line shape:

    seqebm NAME train --config C.yaml [--run-dir R] [overrides ...]
    seqebm NAME train --run-dir R --resume [overrides ...]        # reads R/config.yaml
    seqebm NAME compare --configs A.yaml B.yaml [--seeds 0 1 2] [--AXIS ...] --out OUT [overrides ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

from seqebm.config import load_config

__all__ = ["add_train_compare_commands", "train_from_args"]


def train_from_args(args: argparse.Namespace, config_cls: type, run: Callable[..., Any]) -> Path:
    """Load the config (``--resume``: the run folder's own ``config.yaml``), then ``run(cfg, run_dir, resume=...)``.

    Raises:
        FileNotFoundError: ``--resume`` without a ``config.yaml`` in ``--run-dir``.
        ValueError: a bad config value or override (without ``--config`` the defaults apply).
    """
    if args.resume and not (args.run_dir and (Path(args.run_dir) / "config.yaml").is_file()):
        raise FileNotFoundError(f"cannot resume: no config.yaml in {args.run_dir}")
    cfg = load_config(config_cls, Path(args.run_dir) / "config.yaml" if args.resume else args.config, args.overrides)
    run_dir = Path(args.run_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run(cfg, run_dir, resume=args.resume)
    print(f"[seqebm] report: {run_dir / 'report.md'}")
    return run_dir


def add_train_compare_commands(subparsers, name: str, help: str, *, config_cls: type, run: Callable[..., Any],
                               compare: Callable[[argparse.Namespace], Any], train_help: str, compare_help: str,
                               compare_axis: tuple[str, type, list] | None = None,
                               override_example: str = "optim.lr=1e-3") -> argparse.ArgumentParser:
    """Add ``seqebm <name> train|compare`` to ``subparsers``; returns the ``<name>`` parser.

    Args:
        config_cls: the runner's config dataclass (``load_config`` target).
        run: ``run(cfg, run_dir, resume=bool)``.
        compare: called with the parsed arguments (``configs``, ``seeds``, ``out``, ``overrides`` and the axis).
        compare_axis: an extra ``compare`` option as (flag name, element type, default list), e.g.
            ``("labels", int, [50, 100])`` -> ``--labels 50 100``.
    """

    def _cmd(args: argparse.Namespace) -> int:
        if args.action == "compare":
            compare(args)
        else:
            train_from_args(args, config_cls, run)
        return 0

    p = subparsers.add_parser(name, help=help)
    ps = p.add_subparsers(dest="action", required=True)
    t = ps.add_parser("train", help=train_help)
    t.add_argument("--config")
    t.add_argument("--run-dir", help="output folder (must not exist unless --resume)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    c = ps.add_parser("compare", help=compare_help)
    c.add_argument("--configs", nargs="+", required=True)
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    if compare_axis is not None:
        flag, kind, default = compare_axis
        c.add_argument(f"--{flag}", nargs="+", type=kind, default=default)
    c.add_argument("--out", required=True, help="output folder (re-running reuses finished runs)")
    for q in (t, c):
        q.add_argument("overrides", nargs="*", help=f"dotted overrides (compare: for every config), e.g. "
                                                    f"{override_example}")
        q.set_defaults(func=_cmd)
    return p
