"""`fastsae train --model M --hook H [--hook H ...] --text FILE`: SAEs trained on activations
streamed from the model (fastsae.streaming), no harvest step; `--e2e` trains end to end
(fastsae.e2e). The flags of `fastsae train` that shape the SAE and the training apply to every
SAE; one run folder per SAE under --out-dir: <out-dir>/<hook>/, or <out-dir>/<hook>-<d_sae>/ for
several --widths.

    fastsae train --model gpt2 --hook transformer.h.4 --hook transformer.h.8 --text corpus.txt \\
        --expansion 16 --k 32 --steps 20000 --out-dir runs/gpt2
    fastsae train --model gpt2 --hook transformer.h.6 --text corpus.txt --widths 6144,24576 --k 32 ...
    fastsae train --model gpt2 --hook transformer.h.6 --text corpus.txt --e2e --downstream transformer.h.8 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import ConfigError, InputError

MODEL_BATCH_SIZE = 8  # documents per forward pass, and sequences per end-to-end step
E2E_FLAGS = {"kl_coefficient": "kl_coefficient", "downstream": "downstream",
             "downstream_coefficient": "downstream_coefficient"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("activations straight from a model (instead of --data)")
    g.add_argument("--model", help="a Hugging Face model name or local directory to run while training")
    g.add_argument("--hook", action="append", help="hook point (module name) to train an SAE on, e.g. "
                                                   "transformer.h.6; repeat for one SAE per hook from one pass")
    g.add_argument("--text", action="append", help=".txt (one document per line) or .jsonl file; repeatable")
    g.add_argument("--text-field", default="text", help="the field of a .jsonl record holding the text")
    g.add_argument("--tokens", action="append", help="token ids instead of text: .npy/.safetensors [sequences, seq] "
                                                     "or [tokens], or a directory of them; repeatable")
    g.add_argument("--context-length", type=int, help="tokens per document at most (default 128, or the model's "
                                                      "limit if lower)")
    g.add_argument("--model-batch-size", type=int, help=f"documents per forward pass (default {MODEL_BATCH_SIZE})")
    g.add_argument("--widths", help="several SAEs per hook: their d_sae, separated by commas (e.g. 4096,16384)")
    g.add_argument("--keep-special", action="store_true", help="keep special tokens' (e.g. BOS) activations")
    g.add_argument("--e2e", action="store_true",
                   help="train end to end: loss KL(clean output || output with the SAE spliced in), the model frozen; "
                        f"one --hook; --batch-size counts sequences (default {MODEL_BATCH_SIZE})")
    g.add_argument("--downstream", action="append", help="with --e2e: a later hook point whose activations the "
                                                         "spliced model should keep (MSE); repeatable")
    g.add_argument("--downstream-coefficient", type=float, help="with --e2e: weight of the downstream MSE (default 1)")
    g.add_argument("--kl-coefficient", type=float, help="with --e2e: weight of the KL (default 1)")


def _check_flags(args: argparse.Namespace) -> None:
    """Every flag combination that cannot work, refused before a model is loaded."""
    if not args.hook:
        raise ConfigError("name the hook point(s) to train on: --hook MODULE (repeatable), e.g. --hook "
                          "transformer.h.6")
    if bool(args.text) == bool(args.tokens):
        raise ConfigError("--model reads text: pass --text FILE (.txt or .jsonl) or --tokens FILE (token ids), "
                          "one of the two")
    for f in args.text or ():
        if not Path(f).is_file():
            raise InputError(f"text file {f} does not exist")
    for f in args.tokens or ():
        if not Path(f).exists():
            raise InputError(f"token file {f} does not exist")
    if args.widths and (args.d_sae or args.expansion):
        raise ConfigError("--widths gives the d_sae of each SAE: drop --d-sae / --expansion")
    if args.chunk_rows is not None:
        raise ConfigError("--chunk-rows is for --data shards; a model source fills whole forward passes")
    e2e_only = [f"--{k.replace('_', '-')}" for k in E2E_FLAGS if getattr(args, k) is not None]
    if args.e2e:
        if len(args.hook) > 1 or args.widths:
            raise ConfigError("--e2e trains one SAE: pass one --hook and one width")
        if args.model_batch_size is not None:
            raise ConfigError("--e2e steps on whole sequences: --batch-size sets how many per step; drop "
                              "--model-batch-size")
    elif e2e_only:
        raise ConfigError(f"{', '.join(e2e_only)} shape the end-to-end loss: add --e2e")


def _widths(args, sae: dict, d_in: int) -> list[int]:
    if args.widths:
        try:
            widths = [int(w) for w in args.widths.split(",") if w.strip()]
        except ValueError:
            raise ConfigError(f"--widths {args.widths!r}: write d_sae values separated by commas, "
                              "e.g. 4096,16384") from None
        if not widths or len(set(widths)) != len(widths):
            raise ConfigError(f"--widths {args.widths!r}: give distinct d_sae values, e.g. 4096,16384")
        return widths
    if "d_sae" in sae:
        return [sae["d_sae"]]
    if args.expansion:
        return [args.expansion * d_in]
    raise ConfigError("say how wide the SAEs are: --d-sae N, --expansion E or --widths N,M")


def _folder(hook: str, d_sae: int, widths: bool) -> str:
    """<hook>, or <hook>-<d_sae> when --widths names the SAEs' widths."""
    return f"{hook}-{d_sae}" if widths else hook


def run(args: argparse.Namespace) -> int:
    from .cli import check_device
    from .config import SAEConfig, TrainConfig
    from .distributed.groups import init_distributed
    from .model import check_context_length, load_model, resolve_hook
    from .streaming import TokenStream
    from .train_cli import _default, build

    _check_flags(args)
    layout = init_distributed(args.shards, args.replicas, args.dist_backend, args.dist_timeout)
    if layout.world_size > 1 and not args.e2e:
        raise ConfigError("SAEs streamed from a model train on one process (several in one pass); under torchrun "
                          "use --e2e with --shards, or --data shards")
    train, data = build(args)
    if "path" in data:
        raise ConfigError("--data (or data.path) trains on harvested shards and --model streams activations from "
                          "the model: pass one of them")
    sae = train.pop("sae")
    root = Path(train.pop("out_dir", _default("out_dir")))
    device = sae.get("device", "cpu")
    check_device(device)
    if args.resume:
        if args.overwrite:
            raise ConfigError("--resume continues the runs in --out-dir and --overwrite replaces them: pick one")
        changed = [f"--{k.replace('_', '-')}" for k in E2E_FLAGS if getattr(args, k) is not None]
        if changed:
            raise ConfigError(f"a resumed run keeps its loss: drop {', '.join(changed)}")
    elif args.checkpoint:
        raise ConfigError("--checkpoint picks where a resumed run continues from: add --resume")
    model, tokenizer = load_model(args.model, head="lm" if args.e2e else "none", device=device)
    hooks = list(args.hook)  # as given: the run folders' and the SAEs' metadata's names
    resolved = {h: resolve_hook(model, h) for h in hooks}
    if len(set(resolved.values())) != len(hooks):
        raise ConfigError(f"hook points {hooks} name one module twice: pass each once")
    context_length = check_context_length(model, args.context_length)
    saved = _saved_configs(root, hooks, args) if args.resume else None
    # the stream's shape comes from the saved run on resume (the source must be the same)
    batch_size = int(saved[0]["batch_size"] if saved else train.get("batch_size", MODEL_BATCH_SIZE if args.e2e
                                                                       else _default("batch_size")))
    seed = int(saved[0]["seed"] if saved else train.get("seed", _default("seed")))
    read = dict(text_files=args.text, text_field=args.text_field) if args.text else dict(token_files=args.tokens)
    tokens = TokenStream(tokenizer=tokenizer, **read, context_length=context_length,
                         batch_size=batch_size if args.e2e else (args.model_batch_size or MODEL_BATCH_SIZE))
    metadata = {"model": args.model, "context_length": context_length, "exclude_special": not args.keep_special}
    if args.e2e:
        return _run_e2e(args, model, hooks[0], tokens, train, sae, root, batch_size, metadata, layout, saved)
    from .group import TrainerGroup
    from .streaming import ModelSource
    from .trainer import Trainer

    source = ModelSource(model, hooks, tokens, batch_size=batch_size, seed=seed,
                         buffer_rows=int(data.get("buffer_rows", 262_144)), shuffle=bool(data.get("shuffle", True)),
                         exclude_special=not args.keep_special, progress=not args.no_progress)
    runs = [(h, w) for h in hooks for w in _widths(args, sae, source.hook_widths[resolved[h]])]
    folders = [root / _folder(h, w, bool(args.widths)) for h, w in runs]
    if args.resume:
        _refuse_sae_changes(sae, saved, folders)
        group = TrainerGroup.resume(folders, source, hooks=[h for h, _ in runs], allow_new_data=args.allow_new_data,
                                    **train)
    else:
        trainers = []
        for (h, w), folder in zip(runs, folders):
            cfg = SAEConfig.from_dict({**sae, "d_in": source.hook_widths[resolved[h]], "d_sae": w,
                                       "metadata": {**sae.get("metadata", {}), **metadata, "hook": h}})
            trainers.append(Trainer(TrainConfig.from_dict({**train, "batch_size": batch_size, "seed": seed,
                                                           "out_dir": str(folder), "sae": cfg}), source.view(h)))
        group = TrainerGroup(trainers)
    results = group.fit()
    print(json.dumps({"runs": [{"hook": h, "d_sae": w, "out_dir": str(r.out_dir),
                                "final": str(r.final_dir) if r.final_dir else None, "log": str(r.log_path)}
                               for (h, w), r in zip(runs, results)]}))
    return 0


def _saved_configs(root: Path, hooks: list[str], args) -> list[dict]:
    """The saved train_config.json of the runs a --resume continues (any of the run folders
    under root that match the hooks)."""
    from .parallel import LOCAL
    from .run_dir import RunDir

    found = [d for d in sorted(root.iterdir()) if (d / "train_config.json").is_file()] if root.is_dir() else []
    mine = [d for d in found if any(d.name == h or d.name.startswith(h + "-") for h in hooks)]
    if not mine:
        raise ConfigError(f"{root} holds no run of {', '.join(hooks)} to resume: check --out-dir and --hook")
    return [RunDir(d, LOCAL).read_config() for d in mine]


def _refuse_sae_changes(sae: dict, saved: list[dict], folders: list[Path]) -> None:
    missing = [str(f) for f in folders if not (f / "train_config.json").is_file()]
    if missing:
        raise ConfigError(f"--resume: {', '.join(missing)} holds no run (the flags name SAEs the first run did "
                          "not train): use the same --hook and width flags")
    first = saved[0].get("sae", {})
    changed = {k: v for k, v in sae.items() if k not in ("d_sae", "metadata") and first.get(k) != v}
    if changed:
        raise ConfigError("the runs trained SAEs with " + ", ".join(f"{k}={first.get(k)!r}" for k in changed)
                          + ": a resumed run keeps its SAE; drop " + ", ".join("--" + k.replace("_", "-")
                                                                              for k in changed))


def _run_e2e(args, model, hook, tokens, train, sae, root, batch_size, metadata, layout, saved) -> int:
    from .config import SAEConfig, TrainConfig
    from .e2e import E2ESource, E2ETrainer

    source = E2ESource(model, hook, tokens, exclude_special=not args.keep_special)
    folder = root / hook
    if args.resume:
        _refuse_sae_changes(sae, saved, [folder])
        trainer = E2ETrainer.resume(folder, source, checkpoint=args.checkpoint, layout=layout,
                                    allow_new_data=args.allow_new_data, **train)
    else:
        settings = {k: getattr(args, flag) for k, flag in E2E_FLAGS.items() if getattr(args, flag) is not None}
        widths = _widths(args, sae, source.d_in)
        cfg = SAEConfig.from_dict({**sae, "d_in": source.d_in, "d_sae": widths[0],
                                   "metadata": {**sae.get("metadata", {}), **metadata, "hook": hook,
                                                "training": "end-to-end"}})
        extra = {**train.get("extra", {}), "e2e": {**train.get("extra", {}).get("e2e", {}), **settings}}
        trainer = E2ETrainer(TrainConfig.from_dict({**train, "batch_size": batch_size, "out_dir": str(folder),
                                                    "sae": cfg, "extra": extra}), source, layout=layout)
    res = trainer.fit()
    if layout.is_main:
        print(json.dumps({"runs": [{"hook": hook, "d_sae": trainer.cfg.sae.d_sae, "out_dir": str(res.out_dir),
                                    "final": str(res.final_dir) if res.final_dir else None,
                                    "log": str(res.log_path)}]}))
    return 0


def stream_flags(args: argparse.Namespace) -> list[str]:
    """The flags of this mode given on the command line (train_cli.run takes this branch when any is)."""
    given = [f for f, v in (("--model", args.model), ("--hook", args.hook), ("--text", args.text),
                            ("--tokens", args.tokens), ("--widths", args.widths), ("--e2e", args.e2e)) if v]
    if given and not args.model:
        raise ConfigError(f"{', '.join(given)} stream activations from a model: add --model NAME_OR_DIR")
    return given
