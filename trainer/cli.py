"""The `reasonrl` command line (also ``python -m trainer``).

    reasonrl train --config configs/grpo_tiny_cpu.yaml [section.key=value ...]
    reasonrl train --resume RUN_DIR [section.key=value ...]
    reasonrl train --config CONFIG --dry-run [--world-size N]   (checks and the schedule; nothing loaded or written)
    reasonrl eval --config CONFIG --checkpoint DIR [section.key=value ...]
    reasonrl plot RUN_DIR
    reasonrl tiny OUT_DIR
    reasonrl demo [--out runs/demo]
    reasonrl rollout-server --model PATH [--host 127.0.0.1 --port 8000 ...]
    reasonrl doctor
    reasonrl models smollm2 DIR
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.checkpoint import ResumeError, StorageError, latest_checkpoint
from trainer.config import ConfigError, RunConfig
from trainer.config_io import load_config
from trainer.data.tasks import DatasetFormatError
from trainer.hub import HubError
from trainer.stop_signal import Stopped, interrupt_in_one_line
from trainer.tools.plot import PlotError

TRAINERS = {"grpo": "trainer.learners.grpo:train_grpo", "sft": "trainer.learners.sft:train_sft", "dpo": "trainer.learners.dpo:train_dpo",
            "ei": "trainer.learners.ei:train_ei"}


def _import(target: str) -> Callable[..., object]:
    import importlib

    module, name = target.split(":")
    fn: Callable[..., object] = getattr(importlib.import_module(module), name)
    return fn


def _load(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, list(args.overrides))


def _load_train(args: argparse.Namespace) -> RunConfig:
    """The config to train with. ``--resume RUN_DIR`` continues with the run's own resolved config
    (``RUN_DIR/config.yaml``) plus the command line's overrides, so a resumed run is the run it continues."""
    if not args.resume:
        if not args.config:
            raise ConfigError(["train needs --config FILE (or --resume RUN_DIR to continue a run)"], "command line")
        return _load(args)
    run_dir = Path(args.resume)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--resume {run_dir}: no such run directory")
    if args.config:
        raise ConfigError([f"--resume continues with {run_dir / 'config.yaml'} (the run's resolved config): drop "
                           f"--config {args.config} and give changes as section.key=value overrides"], "command line")
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no config.yaml there (not a reasonrl run directory?)")
    moved = [o for o in args.overrides if o.split("=", 1)[0] == "output_dir"]
    if moved:
        raise ConfigError([f"--resume {run_dir} writes into the run it continues: {moved[0]} cannot move it (copy "
                           "the run directory and resume the copy instead)"], "command line")
    if latest_checkpoint(run_dir) is None:  # found before the model loads, not after
        raise FileNotFoundError(f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}, nothing "
                                f"to continue: start the run again with --config {saved} and another output_dir")
    cfg = load_config(saved, [*args.overrides, f"output_dir={run_dir}"])
    before = load_config(saved, [f"output_dir={run_dir}"]).model_dump()
    for key, (old, new) in _changed(before, cfg.model_dump()).items():
        logging.getLogger("reasonrl").info("resume: %s %r -> %r", key, old, new)
    return cfg


def _changed(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two config dumps, with (before, after)."""
    out: dict[str, tuple[Any, Any]] = {}
    for key in before.keys() | after.keys():
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out |= _changed(old, new, f"{prefix}{key}.")
        elif old != new:
            out[f"{prefix}{key}"] = (old, new)
    return out


def _cpu_threads() -> None:
    """Before any engine starts (trainer.threads); after the config is read, so a config error is the only
    line its command prints."""
    from trainer.threads import configure_cpu_threads

    configure_cpu_threads()


def cmd_train(args: argparse.Namespace) -> int:
    if args.world_size is not None and not args.dry_run:
        raise ConfigError([f"--world-size {args.world_size} goes with --dry-run: a run's world size is the "
                           "launcher's (accelerate launch --num_processes N)"], "command line")
    cfg = _load_train(args)
    if args.dry_run:
        from trainer.tools.dry_run import dry_run

        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        lines = dry_run(cfg, resume=bool(args.resume), world_size=world)
        warned = sum(line.startswith("warning:") for line in lines)
        print("\n".join(lines))
        print(f"dry run: the run would start{f', with {warned} warning(s)' if warned else ''} (nothing was loaded "
              "onto a device or written)")
        return 0
    _cpu_threads()
    result = _import(TRAINERS[cfg.mode])(cfg, resume=bool(args.resume))
    if isinstance(result, dict) and result:
        print("final:", " ".join(f"{k}={_shown(v)}" for k, v in sorted(result.items())))
    return 0


def _shown(value: float) -> str:
    """A metric as printed: counts as integers (eval/n=400), other values to 4 decimals."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.4f}"


def cmd_eval(args: argparse.Namespace) -> int:
    from trainer.tools.eval_cli import run_eval

    cfg = _load(args)
    _cpu_threads()
    metrics = run_eval(cfg, args.checkpoint, args.out)
    for k, v in sorted(metrics.items()):
        print(f"{k:32s} {_shown(v)}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from trainer.tools.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from trainer.tools.tiny import main as tiny_main

    tiny_main([args.out_dir, "--seed", str(args.seed)])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from trainer.tools.demo import demo_config, run_demo

    demo_config(args.out, args.overrides)  # a refused --out or a typo: the only line, not after the thread count
    _cpu_threads()
    run_demo(args.out, args.overrides)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from trainer.tools.models import convert

    convert(args.name, args.out_dir)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from trainer.tools.doctor import main as doctor_main

    return doctor_main()


OVERRIDES_HELP = "changes to the config, e.g. grpo.n_grpo_steps=50 optim.learning_rate=3e-4"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reasonrl", description="RL post-training for reasoning LLMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (give it before the command)")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train with a config (mode: grpo, sft, dpo, ei)")
    train.add_argument("--config", help="the run's YAML config (not with --resume)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue RUN_DIR from its newest checkpoint, with its saved config.yaml + overrides")
    train.add_argument("--dry-run", action="store_true",
                       help="check the config, model config, tokenizer, data, reward and output directory, print "
                       "the run's schedule, and exit: no weights loaded, nothing written")
    train.add_argument("--world-size", type=_positive,
                       help="with --dry-run: the number of learner processes to check the batch split for "
                       "(default: WORLD_SIZE, else 1)")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)
    train.set_defaults(fn=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on the held-out set (zero-shot baseline too)")
    ev.add_argument("--config", required=True, help="the YAML config whose held-out set and eval settings to use")
    ev.add_argument("--checkpoint", help="HF model dir or a run checkpoint dir; default: config model.path")
    ev.add_argument("--out", help="also copy the per-sample JSONL records to this path")
    ev.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)
    ev.set_defaults(fn=cmd_eval)

    plot = sub.add_parser("plot", help="PNG of reward, accuracy and length curves of a run")
    plot.add_argument("run_dir", help="a run directory (the one holding metrics.jsonl)")
    plot.add_argument("--out", help="PNG path, or a folder to write curves.png into (default RUN_DIR/curves.png)")
    plot.set_defaults(fn=cmd_plot)

    tiny = sub.add_parser("tiny", help="build the tiny local test models")
    tiny.add_argument("out_dir", help="directory to write tiny-gpt2/, tiny-qwen2/ and the tiny SFT/DPO data into")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the weights and tokenizer (default 0)")
    tiny.set_defaults(fn=cmd_tiny)

    demo = sub.add_parser("demo", help="the CPU demo: tiny model, SFT warm start, GRPO with vLLM, plot")
    demo.add_argument("--out", default="runs/demo", help="run directory: new, empty or an earlier demo's, which "
                      "is replaced (default runs/demo)")
    demo.add_argument("overrides", nargs="*", metavar="section.key=value",
                      help="changes to configs/grpo_tiny_cpu.yaml, e.g. grpo.n_grpo_steps=10")
    demo.set_defaults(fn=cmd_demo)

    sub.add_parser("rollout-server", help="serve rollouts to a remote learner (vLLM's server); see --help there")

    doctor = sub.add_parser("doctor", help="check the installation and the machine")
    doctor.set_defaults(fn=cmd_doctor)

    models = sub.add_parser("models", help="write a real pretrained model as an HF checkpoint (offline; "
                            "from an installed package, e.g. SmolLM2-135M-Instruct)")
    models.add_argument("name", choices=["smollm2"])
    models.add_argument("out_dir", help="directory to write the HF checkpoint to (kept when already complete)")
    models.set_defaults(fn=cmd_models)
    return parser


def _server_args(argv: list[str]) -> list[str] | None:
    """The arguments after ``rollout-server`` when it is the command (``-v`` may come before it), else None."""
    head = 0
    while argv[head:head + 1] in (["-v"], ["--verbose"]):
        head += 1
    return argv[head + 1:] if argv[head:head + 1] == ["rollout-server"] else None


def main(argv: list[str] | None = None) -> int:
    with interrupt_in_one_line():  # Ctrl-C: one line, then death by SIGINT
        return _dispatch(sys.argv[1:] if argv is None else argv)


def _dispatch(argv: list[str]) -> int:
    server_args = _server_args(argv)
    if server_args is not None:  # every further argument belongs to the server's own parser
        from rollout.server import main as server_main

        server_main(server_args)
        return 0
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code: int = args.fn(args)
    except (ConfigError, DatasetFormatError, FileNotFoundError, FileExistsError, ResumeError, PlotError) as err:
        print(f"reasonrl: error: {err}", file=sys.stderr)
        return 2
    except (StorageError, HubError) as err:  # a failed write under the run directory or upload: no traceback
        print(f"reasonrl: error: {err}", file=sys.stderr)
        return 1
    except Stopped as stop:  # SIGTERM: a checkpoint after the current step (trainer.stop_signal)
        sys.stderr.write(f"reasonrl: {stop}\n")  # one write: the ranks' lines do not run into each other
        sys.stderr.flush()
        return 128 + stop.signum
    return code


if __name__ == "__main__":
    sys.exit(main())
