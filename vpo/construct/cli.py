"""The data-construction subcommands: ``vpo csr``, ``vpo lpoi-lists``, ``vpo mdpo-crops``, ``vpo ovip``.

Wire them into the main parser with::

    from vpo.construct.cli import register
    register(subparsers)            # the object returned by parser.add_subparsers(...)

Each prints the writer's summary as JSON and returns 0. Examples on the shapes world (CPU, no download)::

    python -c "from vpo.worlds import shapes; shapes.make_dataset('data/shapes', 64)"
    vpo csr --data data/shapes --out data/csr --model tiny:llava --scorer shapes --limit 8
    vpo lpoi-lists --data data/shapes --out data/lpoi --verify detector --detector ground-truth
    vpo mdpo-crops --data data/shapes --out data/mdpo --save-images
    vpo ovip --data data/shapes/train.jsonl --out data/ovip --model tiny:llava --k 8 --max-new-tokens 16
    vpo csr --data data/shapes --out runs/csr --iterations 3 --train-config csr.yaml   # the iterative loop

``vpo csr --iterations T`` (T > 1) runs CSR's loop: build ``iter{t}/`` with ``π_{t-1}``, train ``π_t`` on it with
``π_{t-1}`` as the reference (:func:`vpo.trainer.make_csr_train_fn`, configured by ``--train-config``: a
``vpo train`` YAML whose method / model / data / output_dir the loop sets), merge, repeat.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _rgb(values):
    return tuple(int(v) for v in values)


def _errors_to_exit_code(fn):
    """A bad argument (``ValueError``) prints ``vpo <command>: error: ...`` and returns 2 instead of a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ValueError as e:
            print(f"vpo {getattr(args, 'command', '')}: error: {e}", file=sys.stderr)
            return 2

    return wrapper


@_errors_to_exit_code
def csr_main(args: argparse.Namespace) -> int:
    from vpo.construct.csr import CSRConfig, csr_iterate, load_policy, make_scorer, vlm_factory, write_csr_dataset

    groups = args.beam_groups
    if groups is None:
        groups = 5 if args.token_beams % 5 == 0 else 1
        if groups == 1:
            print(f"vpo csr: --token-beams {args.token_beams} is not a multiple of CSR's 5 beam groups: plain beam "
                  f"search (pass --beam-groups to choose)", file=sys.stderr)
    config = CSRConfig(mode=args.mode, lam=args.lam, keep_top=args.keep_top, keep_bottom=args.keep_bottom,
                       num_candidates=args.num_candidates, token_beams=args.token_beams,
                       num_beam_groups=groups,
                       diversity_penalty=args.diversity_penalty,
                       max_new_tokens=args.max_new_tokens, max_sentences=args.max_sentences,
                       max_response_tokens=args.max_response_tokens, sentence_end=tuple(args.sentence_end),
                       language_score=args.language_score, min_sentence_tokens=args.min_sentence_tokens)
    scorer = make_scorer(args.scorer, clip_path=args.clip_path, device=args.device)

    def load(path):
        return load_policy(path, device=args.device, seed=args.seed)

    if args.iterations == 1:
        model, processor = load(args.model)
        summary = write_csr_dataset(args.data, args.out, lm_factory=vlm_factory(model, processor), scorer=scorer,
                                    config=config, limit=args.limit, iteration=1)
        print(json.dumps(summary.as_dict(), indent=2))
        return 0
    try:
        from vpo.trainer import make_csr_train_fn  # (dataset_dir, ref_model_path) -> new_model_path
    except ImportError:
        print("vpo csr --iterations > 1 needs vpo.trainer.make_csr_train_fn(train_config, output_root) (the "
              "trainer's CSR step); build one iteration at a time with --iterations 1 and `vpo train` meanwhile",
              file=sys.stderr)
        return 2
    trainer_fn = make_csr_train_fn(args.train_config, args.out)

    def train_fn(dataset_dir, ref_model_path):
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):  # the Trainer's log lines; stdout keeps the JSON summary
            return trainer_fn(dataset_dir, ref_model_path)

    its = csr_iterate(args.data, args.out, model_path=args.model, train_fn=train_fn, scorer=scorer,
                      iterations=args.iterations, config=config, load_fn=load, limit=args.limit)
    print(json.dumps([{"iteration": i.iteration, "dataset_dir": i.dataset_dir, "ref_model_path": i.ref_model_path,
                       "model_path": i.model_path, "summary": i.summary} for i in its], indent=2))
    return 0


@_errors_to_exit_code
def lpoi_main(args: argparse.Namespace) -> int:
    from vpo.construct.lpoi import LPOIConfig, write_lpoi_dataset
    from vpo.construct.lpoi_detectors import DetectorVerifier, GroundTruthDetector, ZeroShotDetector

    config = LPOIConfig(L=args.list_size, ellipse_color=_rgb(args.ellipse_color), ellipse_width=args.ellipse_width,
                        mask_fill=_rgb(args.mask_fill), max_candidates=args.max_candidates)
    detector = None
    if args.detector == "ground-truth":
        detector = GroundTruthDetector()
    elif args.detector == "zero-shot":
        detector = ZeroShotDetector(args.detector_path, threshold=args.threshold, device=args.device)
    verify = None
    if args.verify == "detector":
        if detector is None:
            print("--verify detector needs --detector ground-truth or zero-shot", file=sys.stderr)
            return 2
        verify = DetectorVerifier(detector)
    summary = write_lpoi_dataset(args.data, args.out, config=config, detector=detector, verify=verify,
                                 use_record_bbox=not args.no_record_bbox, limit=args.limit)
    print(json.dumps(summary.as_dict(), indent=2))
    return 0


@_errors_to_exit_code
def mdpo_main(args: argparse.Namespace) -> int:
    from vpo.construct.mdpo import write_mdpo_dataset

    summary = write_mdpo_dataset(args.data, args.out, seed=args.seed, max_frac=args.max_frac, keep=tuple(args.keep),
                                 save_images=args.save_images, limit=args.limit)
    print(json.dumps(summary.as_dict(), indent=2))
    return 0


@_errors_to_exit_code
def ovip_main(args: argparse.Namespace) -> int:
    from vpo.construct.csr import load_policy
    from vpo.online import make_judge, make_negative_generator, ovip_build_dataset

    judge = make_judge(args.judge, url=args.judge_url, model=args.judge_model)
    negatives = make_negative_generator(args.negatives, path=args.negatives_path)
    model, processor = load_policy(args.model, device=args.device, seed=args.seed)
    summary = ovip_build_dataset(args.out, model, processor, args.data, judge=judge, negatives=negatives,
                                 seed=args.seed, prompts_per_step=args.prompts_per_step, limit=args.limit,
                                 split=args.split, k=args.k, temperature=args.temperature,
                                 max_new_tokens=args.max_new_tokens)
    print(json.dumps(summary, indent=2))
    return 0


_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow")


def out_folder(value: str) -> str:
    """``--out``: a folder (created if missing). An existing file, or a name ending like a data file
    (``x.jsonl``), is refused: the commands write several files inside the folder."""
    if os.path.isfile(value) or value.lower().endswith(_FILE_SUFFIXES):
        raise argparse.ArgumentTypeError(f"{value!r} must be a folder (the command writes train.jsonl and more "
                                         f"inside it), not a file: e.g. --out {os.path.splitext(value)[0] or 'out'}")
    return value


def register(sub) -> None:
    """Add ``csr``, ``lpoi-lists``, ``mdpo-crops`` and ``ovip`` to ``sub`` (an ``argparse`` subparsers object); each
    sets ``func`` to its main function (``args.func(args) -> exit code``)."""
    c = sub.add_parser("csr", help="CSR: sentence-level beam search with a calibrated reward -> preference pairs")
    c.add_argument("--data", required=True, help="prompts: a .jsonl (image + prompt per line) or a folder with "
                                                 "train.jsonl")
    c.add_argument("--out", required=True, type=out_folder, help="output folder (train.jsonl; iter{t}/ with --iterations > 1)")
    c.add_argument("--model", default="tiny:llava", help="tiny:<family> or a local model folder (π_0)")
    c.add_argument("--scorer", choices=["shapes", "clip"], default="shapes", help="R_I: the shapes world's ground "
                                                                                 "truth, or CLIP from --clip-path")
    c.add_argument("--clip-path", default=None, help="local CLIP folder for --scorer clip")
    c.add_argument("--mode", choices=["score", "rank"], default="score")
    c.add_argument("--lam", type=float, default=0.9, help="λ: weight of R_I")
    c.add_argument("--keep-top", type=int, default=1)
    c.add_argument("--keep-bottom", type=int, default=2)
    c.add_argument("--num-candidates", type=int, default=5, help="sentences proposed per beam")
    c.add_argument("--token-beams", type=int, default=5, help="token-level beam width inside a sentence")
    c.add_argument("--beam-groups", type=int, default=None,
                   help="diverse beam search: groups of --token-beams (default: CSR's 5 when --token-beams is a "
                        "multiple of 5, else 1 = plain beam search)")
    c.add_argument("--diversity-penalty", type=float, default=3.0, help="Hamming diversity penalty (CSR: 3.0)")
    c.add_argument("--max-new-tokens", type=int, default=74, help="tokens per sentence")
    c.add_argument("--max-sentences", type=int, default=8)
    c.add_argument("--max-response-tokens", type=int, default=512)
    c.add_argument("--sentence-end", nargs="+", default=["."], help="strings that end a sentence (one token each)")
    c.add_argument("--language-score", choices=["prob", "logprob", "mean_logprob"], default="prob")
    c.add_argument("--min-sentence-tokens", type=int, default=3,
                   help="a proposed sentence needs this many tokens before its stop token (0 = the paper's search, "
                        "where the diverse groups propose '.' and one-word fragments)")
    c.add_argument("--iterations", type=int, default=1, help="T > 1 runs the iterative loop: build, train (method "
                                                             "csr, reference = the previous iterate), merge, repeat")
    c.add_argument("--train-config", default=None, help="the iterative loop's trainer YAML (VPOConfig fields, as "
                                                        "for vpo train; default: the defaults)")
    c.add_argument("--limit", type=int, default=None, help="first N prompts only")
    c.add_argument("--device", default="cpu")
    c.add_argument("--seed", type=int, default=0, help="seed of a tiny:<family> model")
    c.set_defaults(func=csr_main)

    p = sub.add_parser("lpoi-lists", help="LPOI: progressively masked image lists with a visual prompt")
    p.add_argument("--data", required=True, help="preference data: a .jsonl or a folder with train.jsonl")
    p.add_argument("--out", required=True, type=out_folder)
    p.add_argument("--list-size", type=int, default=5, help="L (x_1 = the original image)")
    p.add_argument("--ellipse-color", type=int, nargs=3, default=[255, 0, 0], metavar=("R", "G", "B"))
    p.add_argument("--ellipse-width", type=int, default=2, help="0 = no visual prompt")
    p.add_argument("--mask-fill", type=int, nargs=3, default=[0, 0, 0], metavar=("R", "G", "B"))
    p.add_argument("--detector", choices=["none", "ground-truth", "zero-shot"], default="none",
                   help="boxes for records without bbox: the shapes world's ground truth or a local zero-shot model")
    p.add_argument("--detector-path", default=None, help="local OWL-ViT / OWLv2 / Grounding DINO folder")
    p.add_argument("--threshold", type=float, default=0.1, help="zero-shot detector score threshold")
    p.add_argument("--verify", choices=["none", "detector"], default="none",
                   help="keep a list only if the detector no longer finds the object in x_L")
    p.add_argument("--no-record-bbox", action="store_true", help="ignore the records' bbox")
    p.add_argument("--max-candidates", type=int, default=3)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=lpoi_main)

    m = sub.add_parser("mdpo-crops", help="mDPO: record each example's crop (keeping 1-20%% of the area)")
    m.add_argument("--data", required=True, help="preference data: a .jsonl or a folder with train.jsonl")
    m.add_argument("--out", required=True, type=out_folder)
    m.add_argument("--seed", type=int, default=0, help="use the training collator's seed")
    m.add_argument("--keep", type=float, nargs=2, default=[0.01, 0.2], metavar=("LO", "HI"),
                   help="the fraction of the area a crop keeps, drawn uniformly in [LO, HI] (mDPO's code: 0.01 0.2)")
    m.add_argument("--max-frac", type=float, default=None,
                   help="the older crop instead: remove at most this fraction of the area")
    m.add_argument("--save-images", action="store_true", help="also save the cropped-and-resized images")
    m.add_argument("--limit", type=int, default=None)
    m.set_defaults(func=mdpo_main)

    o = sub.add_parser("ovip", help="OViP: sample from a policy, judge, pair, render negative images -> an OViP "
                                    "dataset (offline; `vpo train` with online: true runs the loop in the trainer)")
    o.add_argument("--data", required=True, help="source rows: a .jsonl with image, prompt and a ground truth "
                                                 "(answer, response or chosen), e.g. the shapes world's train.jsonl")
    o.add_argument("--out", required=True, type=out_folder, help="output folder ({split}.jsonl, images/, {split}_ovip_stats.json)")
    o.add_argument("--model", default="tiny:llava", help="tiny:<family> or a local model folder (the policy)")
    o.add_argument("--judge", choices=["shapes", "http"], default="shapes",
                   help="G_r: the shapes world's exact judge, or an OpenAI-compatible chat endpoint")
    o.add_argument("--judge-url", default=None, help="--judge http: the API root, e.g. http://127.0.0.1:8000/v1")
    o.add_argument("--judge-model", default=None, help="--judge http: the served model's name")
    o.add_argument("--negatives", choices=["shapes", "diffusers"], default="shapes",
                   help="negative images: the shapes world's renderer, or a local diffusers pipeline")
    o.add_argument("--negatives-path", default=None, help="--negatives diffusers: the local pipeline folder")
    o.add_argument("--k", type=int, default=16, help="responses sampled per prompt")
    o.add_argument("--temperature", type=float, default=1.2)
    o.add_argument("--max-new-tokens", type=int, default=128)
    o.add_argument("--prompts-per-step", type=int, default=8, help="prompts per sampling call")
    o.add_argument("--split", default="train", help="the output file names' split")
    o.add_argument("--limit", type=int, default=None, help="first N source rows only")
    o.add_argument("--seed", type=int, default=0, help="sampling seed (and the weights of a tiny:<family> model)")
    o.add_argument("--device", default="cpu")
    o.set_defaults(func=ovip_main)


def main(argv=None) -> int:
    """Stand-alone entry (``python -m vpo.construct.cli csr ...``) until the subcommands are in ``vpo``."""
    parser = argparse.ArgumentParser(prog="vpo", description="vpo data construction")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
