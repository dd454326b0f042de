"""``vpo train`` and ``vpo precompute-ref``: the trainer from a YAML configuration.

    vpo train --config FILE.yaml [--flag value ...]           train (flags override the file)
    vpo train --model_name_or_path DIR --data PATH [...]      train without a file
    vpo train --help | --help-all                             the main options | every TrainingArguments field
    vpo precompute-ref --config FILE.yaml [--flag value ...]  write the reference terms for ref_mode: precomputed

Behaviour (:mod:`vpo.trainer.cli_help` holds the help text and the error handling): no ``--config`` and no data is a
usage error (exit 2) — the synthetic data runs only when named (``--data synthetic[:N]``); a bad configuration, a
missing model folder, unreadable data or a dataset whose records are all skipped prints one ``vpo train: error: ...``
line (exit 1; the traceback with ``--debug``). ``--data`` is ``--data_path``. The saved model or adapter gets a filled
model card (``README.md``, :mod:`vpo.trainer.model_card`).

The configuration is a :class:`vpo.trainer.VPOConfig` read by ``transformers.HfArgumentParser``
(``parse_yaml_file``; with extra flags the file's values become the parser's defaults): every
``TrainingArguments`` field (``output_dir``, ``max_steps``, ``learning_rate``, ``bf16``, ``gradient_checkpointing``,
``report_to``, ``save_steps``, ``resume_from_checkpoint``, ...) plus vpo's. ``resume_from_checkpoint: last`` resumes
from the newest COMPLETE checkpoint in ``output_dir`` (none: an error naming the folder).
Examples: ``examples/configs/*.yaml``.

Entry points for ``vpo/cli.py``: :func:`add_subcommands` (adds both subcommands to an argparse subparsers object),
or :func:`train_main` / :func:`precompute_ref_main` called with the remaining argv.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, List, Optional, Sequence

if TYPE_CHECKING:  # importing transformers is slow: `vpo info` / `vpo demo` must not pay for it
    from vpo.trainer.config import VPOConfig


def parse_config(argv: Optional[Sequence[str]] = None) -> "VPOConfig":
    """A :class:`VPOConfig` from ``--config FILE.yaml`` and/or ``--flag value`` arguments."""
    from transformers import HfArgumentParser

    from vpo.trainer.config import VPOConfig

    from vpo.trainer.cli_help import UsageError
    from vpo.trainer.cli_report import join_negative_numbers

    argv = [("--data_path" if a == "--data" else a) for a in (sys.argv[1:] if argv is None else argv)]
    argv = join_negative_numbers(argv)  # --learning_rate -1e-4 is a value, not an unknown option
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    _refuse_trl_fields(known.config, rest)
    parser = HfArgumentParser(VPOConfig)

    def _usage(message):  # one line instead of argparse's full usage dump
        raise UsageError(message)

    parser.error = _usage
    if known.config is not None and not os.path.isfile(known.config):
        raise FileNotFoundError(f"--config {known.config}: no such file")
    if known.config is not None and not rest:
        (config,) = parser.parse_yaml_file(known.config)
        return config
    if known.config is not None:
        import dataclasses

        import yaml

        with open(known.config) as f:
            values = yaml.safe_load(f) or {}
        fields = {f.name for f in dataclasses.fields(VPOConfig)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"{known.config}: unknown keys {unknown} (not VPOConfig fields)")
        parser.set_defaults(**values)
    (config,) = parser.parse_args_into_dataclasses(args=rest)
    return config


def _refuse_trl_fields(config_path: Optional[str], flags: Sequence[str]) -> None:
    """A TRL DPOConfig field vpo does not take, in the YAML file or as a flag: one line naming vpo's equivalent
    (:data:`vpo.trainer.trl_options.REFUSED_TRL_FIELDS`) instead of the parser's unknown-key message."""
    from vpo.trainer.trl_options import REFUSED_TRL_FIELDS, refusal

    names = [a[2:].split("=", 1)[0] for a in flags if a.startswith("--")]
    if config_path is not None and os.path.isfile(config_path):
        import yaml

        with open(config_path) as f:
            values = yaml.safe_load(f) or {}
        names += list(values) if isinstance(values, dict) else []
    for name in names:
        if name in REFUSED_TRL_FIELDS:
            raise ValueError(refusal(name))


def _synthetic_size(path: Optional[str], default: int = 64) -> int:
    if path == "synthetic":
        return default
    try:
        return int(path.split(":", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"data path {path!r}: expected synthetic or synthetic:N") from None


def build_data(config: "VPOConfig", family: str, processor, tiny):
    """``(train_dataset, eval_dataset or None, collator)`` for the configuration."""
    if config.data_path is None:
        raise ValueError("no training data: set data_path (a JSONL file, a parquet file or folder, a save_to_disk "
                         "folder; docs/data_format.md), or data_path: synthetic[:N] for random data on a tiny model")
    synthetic = config.data_path.startswith("synthetic")
    if synthetic:
        if tiny is None:
            raise ValueError("synthetic data (data_path: synthetic[:N]) only works with the tiny "
                             f"models (model_name_or_path: tiny:<family>), got {config.model_name_or_path!r}")
        from vpo.trainer.synthetic import TinyPreferenceCollator, synthetic_records

        seed = config.data_seed if config.data_seed is not None else config.seed
        train = synthetic_records(_synthetic_size(config.data_path), tiny, seed=seed)
        evaluation = None
        if config.eval_data_path is not None:
            evaluation = synthetic_records(_synthetic_size(config.eval_data_path, 16), tiny, seed=seed + 1,
                                           prefix="syn-eval")
        collator = TinyPreferenceCollator(tiny, config.method, list_size=config.list_size,
                                          noise_step=config.noise_step,
                                          crop_frac=0.2 if config.crop_frac is None else config.crop_frac,
                                          fixed_noise=config.fixed_noise, ovip_rejected=_ovip_rejected(config))
        return train, evaluation, collator
    from vpo.data import PreferenceCollator
    from vpo.data.sources import open_preference_data

    if processor is None:
        raise ValueError(f"data_path {config.data_path!r} needs the model's processor, and none was loaded")
    read = dict(layout=config.data_layout, image_root=config.image_root)
    from vpo.trainer import cli_report
    from vpo.trainer.data_report import data_summary

    if config.online:  # OViP online: data_path holds the source rows; the pairs are sampled during training
        from vpo.trainer.online import build_online_dataset

        train = build_online_dataset(config, processor, rank=config.process_index, world_size=config.world_size)
    else:
        train = _read_quietly(config.data_path, read)  # all records skipped: an error naming the reason
    evaluation = None
    if config.eval_data_path is not None:
        evaluation = _read_quietly(config.eval_data_path, read)
    for name, path, ds in (("train", config.data_path, train), ("eval", config.eval_data_path, evaluation)):
        line = data_summary(name, path, ds, prefix="vpo train")  # one line per file, not a warning per record
        if line is not None and ds.stats.skipped:
            print(line, file=sys.stderr, flush=True)
        if ds is not None:
            cli_report.check_image_files(ds, name)  # a stat per path, before training (decoding stays lazy)
    if not config.online and len(train) == 0:
        raise ValueError(f"{config.data_path}: no usable record")
    collator = PreferenceCollator(processor, family, method=config.method, max_length=config.max_length,
                                  noise_step=config.noise_step, seed=config.seed, fixed_noise=config.fixed_noise,
                                  crop_max_frac=config.crop_frac, list_size=config.list_size,
                                  crop_keep=(config.crop_keep_min, config.crop_keep_max),
                                  noise_clip=config.noise_clip, ovip_rejected=_ovip_rejected(config))
    return train, evaluation, collator


def _read_quietly(path: str, read: dict):
    """:func:`vpo.data.sources.open_preference_data` without its per-record warnings (the caller prints one
    summary); a source with no usable record names the columns it found."""
    import warnings

    from vpo.data.records import DataWarning
    from vpo.data.sources import NoUsableRecordError, open_preference_data
    from vpo.trainer.data_report import columns_of

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        try:
            return open_preference_data(path, **read)
        except NoUsableRecordError as e:
            cols = columns_of(path)
            raise NoUsableRecordError(f"{e}; columns found: {', '.join(cols)}" if cols else str(e)) from None


def _ovip_rejected(config: "VPOConfig") -> bool:
    """Whether OViP's image-free and negative-image passes need the rejected rows too (symmetric loss, bi-anchor)."""
    return config.method == "ovip" and (config.ovip_image_loss == "symmetric" or config.ovip_anchor == "bi-anchor")


def _reference_table_paths(config: "VPOConfig") -> List[str]:
    from vpo.trainer.reference import reference_logps_path

    if config.ref_logps_path:
        return [config.ref_logps_path]
    paths = [reference_logps_path(config.data_path, config.method, config.output_dir)]
    if config.eval_data_path and not config.eval_data_path.startswith("synthetic"):
        paths.append(reference_logps_path(config.eval_data_path, config.method, config.output_dir))
    return paths


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """``vpo train``: load the model and data of the configuration and train; returns the exit status (module
    docstring: 2 for a usage error, 1 for any other error, printed as one line unless ``--debug``)."""
    from vpo.trainer import cli_help

    def _train(rest) -> int:
        train(parse_config(rest))
        return 0

    return cli_help.run("train", argv, _train)


def train(config: "VPOConfig"):
    """Load the model and data of ``config``, train, save the model and the state (and evaluate when there is
    evaluation data); returns the :class:`vpo.trainer.VPOTrainer`."""
    from vpo.trainer.cli_help import check_model_path
    from vpo.trainer.modeling import load_model
    from vpo.trainer.reference import load_reference_table
    from vpo.trainer.trainer import VPOTrainer
    from vpo.trainer.trl_compat import family_for

    from vpo.trainer.preflight import preflight_config

    preflight_config(config)  # output folder writable, data/model paths, judge endpoint: before any loading
    check_model_path(config.model_name_or_path, "model_name_or_path")
    if config.ref_mode == "model" and config.ref_model_path:
        check_model_path(config.ref_model_path, "ref_model_path")
    model, processor, tiny = load_model(config.model_name_or_path, dtype=config.torch_dtype,
                                        attn_implementation=config.attn_implementation, seed=config.seed)
    family = config.model_family or family_for(model)
    train, evaluation, collator = build_data(config, family, processor, tiny)

    ref_model = None
    if config.ref_mode == "model":
        path = config.ref_model_path or config.model_name_or_path
        ref_model, _, _ = load_model(path, dtype=config.torch_dtype, attn_implementation=config.attn_implementation,
                                     seed=config.seed, with_processor=False)
    ref_table = None
    if config.ref_mode == "precomputed":
        ref_table = {}
        for path in _reference_table_paths(config):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"ref_mode: precomputed but {path} does not exist: run `vpo precompute-ref "
                                        "--config ...` with the same configuration first")
            ref_table.update(load_reference_table(path))

    # true / last: the newest COMPLETE checkpoint, an error if there is none (vpo.trainer.resume)
    resume = config.resume_from_checkpoint
    from vpo.trainer import cli_report
    from vpo.trainer.cli_help import Interrupted

    trainer = VPOTrainer(model, config, ref_model=ref_model, ref_table=ref_table, train_dataset=train,
                         eval_dataset=evaluation, data_collator=collator, processing_class=processor)
    if trainer.args.should_log:
        cli_report.print_lines(cli_report.banner(trainer, config, train, evaluation))
    try:
        trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        raise Interrupted(cli_report.interrupted_message(trainer, config.output_dir)) from None
    eval_metrics = trainer.evaluate() if evaluation is not None else None
    trainer.save_model()
    trainer.save_state()
    if trainer.args.should_save:
        from vpo.trainer.model_card import write_model_card

        write_model_card(trainer, config.output_dir, eval_metrics=eval_metrics)
        cli_report.say(f"vpo train: saved to {os.path.abspath(config.output_dir)}")
    return trainer


def precompute_ref_main(argv: Optional[Sequence[str]] = None) -> int:
    """``vpo precompute-ref``: write the reference terms of every training (and evaluation) record next to the data."""
    from vpo.trainer import cli_help

    return cli_help.run("precompute-ref", argv, _precompute_ref)


def _precompute_ref(argv) -> int:
    from vpo.trainer import cli_help
    from vpo.trainer.modeling import load_model
    from vpo.trainer.reference import precompute_reference, reference_logps_path
    from vpo.trainer.trl_compat import family_for

    config = parse_config(argv)
    if config.online:
        raise ValueError("online=True: the OViP pairs are sampled during training, so there is no reference term to "
                         "precompute")
    path = config.ref_model_path or config.model_name_or_path
    cli_help.check_model_path(path, "ref_model_path" if config.ref_model_path else "model_name_or_path")
    model, processor, tiny = load_model(path, dtype=config.torch_dtype,
                                        attn_implementation=config.attn_implementation, seed=config.seed)
    model.eval().requires_grad_(False)
    from vpo.trainer.distributed import init_from_env

    init_from_env(config.use_cpu)  # torchrun: each process its share of the rows (vpo.trainer.distributed)
    if not config.use_cpu:
        import torch

        if torch.cuda.is_available():
            model.cuda()  # this process's GPU (LOCAL_RANK), selected by init_from_env
    family = config.model_family or family_for(model)
    train, evaluation, collator = build_data(config, family, processor, tiny)
    if config.ref_logps_path:
        table = precompute_reference(model, train, collator, config)
        if evaluation is not None:
            table.update(precompute_reference(model, evaluation, collator, config))
        from vpo.trainer.reference import save_reference_table

        save_reference_table(table, config.ref_logps_path)
        print(f"wrote {len(table)} records to {config.ref_logps_path}")
        return 0
    train_path = reference_logps_path(config.data_path, config.method, config.output_dir)
    table = precompute_reference(model, train, collator, config)
    if evaluation is not None:
        eval_table = precompute_reference(model, evaluation, collator, config)
        if config.eval_data_path.startswith("synthetic"):
            table.update(eval_table)
        else:
            from vpo.trainer.reference import save_reference_table

            eval_path = reference_logps_path(config.eval_data_path, config.method, config.output_dir)
            save_reference_table(eval_table, eval_path)
            print(f"wrote {len(eval_table)} records to {eval_path}")
    from vpo.trainer.reference import save_reference_table

    save_reference_table(table, train_path)
    print(f"wrote {len(table)} records to {train_path}")
    return 0


def add_subcommands(subparsers) -> None:
    """Add ``train`` and ``precompute-ref`` to ``vpo``'s argparse subparsers; each parser's ``func(args)`` runs it
    with ``args.rest`` (everything after the subcommand)."""
    for name, fn, text in (
        ("train", train_main, "train a VLM with a preference method (--config FILE.yaml)"),
        ("precompute-ref", precompute_ref_main, "precompute the reference terms (ref_mode: precomputed)"),
    ):
        # prefix_chars="+": every "--flag" after the subcommand is left to the VPOConfig parser.
        p = subparsers.add_parser(name, help=text, add_help=False, prefix_chars="+",
                                  description=f"{text}; flags are VPOConfig fields (see --help of HfArgumentParser)")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda args, fn=fn: fn(args.rest))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m vpo.trainer.cli {train,precompute-ref} ...``"""
    parser = argparse.ArgumentParser(prog="vpo")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
