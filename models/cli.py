"""`lma synth`, `lma train`, `lma study`: the data and training subcommands.

Registration imports nothing heavy; each handler imports what it needs.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from models.names import (
    DEVICES,
    EMBEDDING_KINDS,
    FORMATS,
    LR_SCHEDULES,
    MODEL_KINDS,
    PRESET_NAMES,
    SEMANTIC_MODES,
)


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("synth", help="write a synthetic Criteo-format TSV (see docs/DATA.md)")
    p.add_argument("--rows", type=int, required=True, help="rows to write")
    p.add_argument("--out", type=Path, required=True, help="output file (.gz compresses)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=0.001, help="factor on Criteo Kaggle's per-field cardinalities")
    p.set_defaults(func=_synth)  # NumPy only: works in the base install

    p = sub.add_parser("train", help="train a DLRM on a data file and write a run folder")
    add_train_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="run folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace the run --out holds (refused without it)")
    p.set_defaults(func=_train, extra="train")

    p = sub.add_parser("study", help="full / hash / lma over a list of compressions, everything else equal")
    add_train_arguments(p)
    p.add_argument("--compressions", type=str, default="4,8,16,32,64", help="comma-separated list")
    p.add_argument("--kinds", type=str, default="full,hash,lma,lr", help="comma-separated; lr: the linear reference")
    p.add_argument("--seeds", type=str, default="0", help="comma-separated training seeds (spreads)")
    p.add_argument("--out", type=Path, required=True, help="study folder (runs, table, plot)")
    p.set_defaults(func=_study, extra="train")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--data", type=Path, required=True, help="data file (plain or .gz)")
    d.add_argument("--format", choices=FORMATS, default="criteo")
    d.add_argument("--split", choices=("order", "random"), default="order", help="order: last rows validate/test")
    d.add_argument("--val-fraction", type=float, default=0.1)
    d.add_argument("--test-fraction", type=float, default=0.1)
    d.add_argument("--max-rows", type=int, default=0, help="read at most this many rows (0: all)")
    d.add_argument("--cache-dir", type=Path, default=Path("data/cache"), help="parsed-array cache")
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=MODEL_KINDS, default="dlrm", help="dlrm, or lr: the linear reference")
    m.add_argument("--preset", choices=PRESET_NAMES, default="small")
    m.add_argument(
        "--linear-part", action=argparse.BooleanOptionalAction, default=True,
        help="dlrm: a linear reference inside (one hashed weight per token, counted in the memory), trained first;"
        " --no-linear-part: the recipe before it (first-order terms, no memory per token)",
    )  # fmt: skip
    m.add_argument("--embedding", choices=EMBEDDING_KINDS, default=None, help="default: lma (dlrm), hash (lr)")
    m.add_argument("--dim", type=int, default=0, help="embedding dimension (0: the preset's; lr: 1)")
    m.add_argument("--compression", type=float, default=None, help="default: 16 (dlrm), 1 (lr)")
    m.add_argument("--block-size", type=int, default=0, help="Z (0: gcd(8, dim))")
    m.add_argument("--per-block", type=int, default=8, help="K: packed values per block's bucket key")
    m.add_argument("--bits", type=int, default=4, help="b: bits per packed minhash value")
    m.add_argument("--num-hashes", type=int, default=15, help="packed minhash values per signature")
    m.add_argument("--signature-share", type=float, default=0.25, help="budget share of the signature table")
    m.add_argument("--sample-rows", type=int, default=125_000, help="rows in the minhash sample")
    m.add_argument("--semantic", choices=SEMANTIC_MODES, default="rows")
    m.add_argument("--min-count", type=int, default=1)
    t = p.add_argument_group("training")
    t.add_argument("--optimizer", choices=("sgd", "adagrad", "adam"), default="adagrad")
    t.add_argument("--lr", type=float, default=0.0, help="learning rate (0: the optimizer's default)")
    t.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant", help="decay over the planned steps")
    t.add_argument("--embedding-l2", type=float, default=0.0, help="L2 penalty on every looked-up embedding vector")
    t.add_argument("--epochs", type=int, default=10, help="at most this many (early stop on validation AUC)")
    t.add_argument(
        "--batch-size", type=int, default=0,
        help="global batch size, split over --nproc ranks (0: the largest of 1024..64 giving >= 150 steps an epoch)",
    )  # fmt: skip
    t.add_argument("--evals-per-epoch", type=int, default=4, help="validations per epoch (the best is kept)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--patience", type=int, default=4, help="validations without val AUC gain before stopping")
    t.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: the cores / local ranks)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = p.add_argument_group("data-parallel (docs/RESULTS.md; several machines: torchrun, see models/distributed.py)")
    r.add_argument("--nproc", type=int, default=1, help="ranks on this machine (gloo on CPU, NCCL on GPU)")
    r.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when present")
    r.add_argument("--dist-timeout", type=float, default=300.0, help="seconds any collective may wait for a rank")


def _synth(args: argparse.Namespace) -> int:
    from models.synth import synthesize

    summary = synthesize(args.out, rows=args.rows, seed=args.seed, scale=args.scale)
    print(json.dumps(summary, indent=2))
    return 0


def _check_run_folder(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, or that holds a run (unless ``overwrite``: then that run's files go
    now, so that the folder never mixes two runs). Checked before the data is read."""
    from models.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())  # "/" always exists
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable")
    held = [name for name in (CONFIG_FILE, WEIGHTS_FILE, "metrics.json") if (out / name).exists()]
    if held and not overwrite:
        raise ValueError(
            f"--out {out}: holds a run already ({', '.join(held)}); write to another folder, or pass --overwrite"
            " to replace it"
        )
    from models.distributed import env_ranks

    if held and env_ranks()[0] == 0:  # under torchrun, rank 0 alone writes (and clears) the run folder
        for name in held:
            (out / name).unlink()


def _train(args: argparse.Namespace) -> int:
    from models.distributed import DistributedError, env_ranks, leave
    from models.train import TrainSettings, train

    _check_run_folder(args.out, args.overwrite)
    try:
        result = train(TrainSettings.from_args(args), args.out)
    except DistributedError as e:  # a rank failed and the run was stopped: one line, not the launcher's traceback
        print(f"lma train: error: {e}", file=sys.stderr)
        return 1
    if result is not None:  # under torchrun, rank 0 reports
        print(json.dumps(result.summary(), indent=2))
    if env_ranks()[1] > 1:  # a torchrun rank: see leave() for why it does not finalize
        leave(0)
    return 0


def _study(args: argparse.Namespace) -> int:
    from models.study import run_study

    table = run_study(args)
    print(table)
    return 0
