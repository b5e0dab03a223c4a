"""The `feixing` command: subcommands, each a thin call into one module."""

from __future__ import annotations

import argparse
import sys


def _add_config_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("config", help="TOML config file")
    else:
        p.add_argument("--config", required=True, help="TOML config file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable); beats the file")


def _train(a: argparse.Namespace) -> int:
    from feixing import config
    from feixing.distributed import launch

    cfg = config.load(a.config, a.set)
    if not a.nproc and not launch.launched():
        a.nproc = launch.processes_needed(cfg.parallel)
        if a.nproc > 1:
            print(f"feixing train: the parallel degrees in {a.config} need {a.nproc} processes; "
                  f"starting {a.nproc} local ones (--nproc N chooses)", file=sys.stderr)
    if a.nproc and a.nproc > 1 and not launch.launched():
        config.check(cfg, a.nproc)  # fail fast, before starting any process
        argv = ["train", "--config", a.config, "--resume", a.resume]
        for item in a.set:
            argv += ["--set", item]
        return launch.relaunch_with_torchrun(a.nproc, argv)
    from feixing.train.trainer import train

    train(cfg, resume=a.resume)
    return 0


def _check_config(a: argparse.Namespace) -> int:
    from feixing import config

    cfg = config.load(a.config, a.set)
    found = config.problems(cfg, a.nproc)
    if not found:
        print(f"{a.config}: OK for {a.nproc} process(es)")
        return 0
    print(f"{a.config}: {len(found)} problem(s) for {a.nproc} process(es):")
    for p in found:
        print(f"  - {p}")
    return 1


def _print_config(a: argparse.Namespace) -> int:
    from feixing import config

    print(config.to_toml(config.load(a.config, a.set), with_docs=True))
    return 0


def _prepare(a: argparse.Namespace) -> int:
    from feixing.data.prepare import DEMO_MAX_BYTES, demo_corpus_paths, prepare

    inputs = list(a.inputs)
    if a.demo:
        inputs += demo_corpus_paths()
        if a.max_bytes is None:
            a.max_bytes = DEMO_MAX_BYTES
    if not inputs:
        raise SystemExit("feixing prepare: give INPUT files/folders, or --demo for the Python "
                         "standard library corpus")
    summary = prepare(inputs, a.out, a.tokenizer, progress=not a.quiet, max_bytes=a.max_bytes)
    print(f"prepared {summary['tokens']:,} tokens in {summary['documents']:,} "
          f"documents -> {a.out}")
    return 0


def _generate(a: argparse.Namespace) -> int:
    from feixing.train.sample import generate_from_run

    print(generate_from_run(a.run, a.prompt, max_new_tokens=a.max_new_tokens,
                            temperature=a.temperature, top_k=a.top_k, seed=a.seed))
    return 0


def _export(a: argparse.Namespace) -> int:
    from feixing.checkpoint.export import export_hf

    if a.to != "hf":
        raise SystemExit("feixing export: only --to hf is supported")
    export_hf(a.checkpoint, a.out)
    print(f"exported {a.checkpoint} -> {a.out}")
    return 0


def _doctor(a: argparse.Namespace) -> int:
    from feixing.diagnose.report import doctor_main

    return doctor_main(a.run_dir, json=a.json, html=a.html)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feixing", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a TOML config (one rank, N local ranks, or a "
                                     "rank of a torchrun/srun job)")
    _add_config_args(p)
    p.add_argument("--nproc", type=int, default=0,
                   help="start this many local processes through torchrun (default: as many as "
                        "the config's fixed parallel degrees need, else 1)")
    p.add_argument("--resume", default="none",
                   help="none | auto (newest valid checkpoint in run.dir) | PATH")
    p.set_defaults(fn=_train)

    p = sub.add_parser("check-config", help="validate a config for N processes; start nothing")
    _add_config_args(p, positional=True)
    p.add_argument("--nproc", type=int, default=1, help="world size to check against")
    p.set_defaults(fn=_check_config)

    p = sub.add_parser("print-config", help="print the resolved config with each field's doc")
    _add_config_args(p, positional=True)
    p.set_defaults(fn=_print_config)

    p = sub.add_parser("prepare", help="tokenize text/jsonl files and folders into token shards")
    p.add_argument("inputs", nargs="*", help="text or .jsonl files, or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a HF tokenizer.json")
    p.add_argument("--demo", action="store_true",
                   help="add the running Python's standard library source (the demo corpus; "
                        "capped at 8 MB unless --max-bytes says otherwise)")
    p.add_argument("--max-bytes", type=int, default=None, help="stop after this much input text")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=_prepare)

    p = sub.add_parser("generate", help="sample text from the latest weights of a run")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_generate)

    p = sub.add_parser("export", help="export a checkpoint to a HF safetensors folder")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder")
    p.add_argument("--to", default="hf", choices=["hf"])
    p.add_argument("out", help="output folder")
    p.set_defaults(fn=_export)

    p = sub.add_parser("doctor", help="say which rank, which layer and since when a run got slow")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print findings as JSON")
    p.add_argument("--html", default=None, help="write a self-contained HTML report here")
    p.set_defaults(fn=_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    from feixing.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"feixing {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
