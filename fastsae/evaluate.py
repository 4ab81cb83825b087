"""Score an SAE inside its model: how much of the model's behaviour survives when the hook
point's activations are replaced by the SAE's reconstruction.

    fastsae eval --model gpt2 --sae my_sae --hook transformer.h.6 --text corpus.txt --out eval/

Each batch runs the model three times: clean, with the SAE spliced in, and with the hook point
zero-ablated. The scores follow SAEBench's core evaluation:

    ce_loss_score = (CE_ablate - CE_sae) / (CE_ablate - CE_clean)     1 = the SAE loses nothing
    kl_div_score  = (KL_ablate - KL_sae) / KL_ablate                    KL(P_clean || P_x) per token

with every loss and KL a mean over the evaluated tokens of all batches. The SAE replaces the
activation at the evaluated positions only; the ablation zeroes every position, as SAEBench
does. Evaluated positions are the non-padding ones, without special tokens (BOS, EOS, ...)
unless exclude_special=False, as harvest does: an SAE trained without BOS cannot reconstruct
its outlier activation. Next-token CE counts the prediction made at an evaluated position of
the next (non-padding) token; KL counts every evaluated position.

Masked LMs (BERT family): CE is the masked-LM loss on one fixed random mask: `mlm_probability`
of the evaluated positions of each sequence (drawn from a generator seeded with `seed`, batch by
batch, so the same data, batch size and seed give the same mask) are replaced by the mask token,
and CE and KL are taken at those positions. The SAE sees the masked input's activations.
Models without an LM head get the reconstruction metrics only (the CE and KL fields are None).

Reconstruction metrics over all evaluated tokens: FVU around the mean of all tokens,
explained variance = 1 - FVU, MSE (summed over d, mean over tokens), cosine similarity, L0,
feature density (fraction of tokens a latent fires on), dead latents (density 0), dense
latents (density > dense_threshold), and the relative reconstruction bias
(fastsae.metrics.shrinkage over all tokens).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import metrics
from .atomic import atomic_write, atomic_write_text
from .errors import ConfigError, InputError
from .model import (
    ablate,
    capture,
    check_context_length,
    encode_decode,
    lm_head_kind,
    resolve_hook,
    special_token_ids,
    splice,
    valid_positions,
)


@dataclass
class EvalResult:
    """metrics: the JSON-ready numbers; feature_density: float64 [d_sae], the fraction of
    evaluated tokens each latent fired on."""

    metrics: dict
    feature_density: torch.Tensor


class _Accumulator:
    """Streaming sums over evaluated tokens, in float64."""

    def __init__(self, d_sae: int):
        self.n = 0
        self.sums: dict[str, float] = dict.fromkeys(
            ("err2", "x2", "xhat2", "dot", "cos", "l0", "ce_clean", "ce_sae", "ce_ablate", "kl_sae", "kl_ablate"), 0.0)
        self.n_ce = self.n_kl = 0
        self.sum_x: torch.Tensor | None = None
        self.fires = torch.zeros(d_sae, dtype=torch.float64)

    def add_reconstruction(self, x: torch.Tensor, x_hat: torch.Tensor, acts) -> None:
        if not x.shape[0]:
            return
        x, x_hat = x.double(), x_hat.double()
        s = self.sums
        s["err2"] += float((x_hat - x).pow(2).sum())
        s["x2"] += float(x.pow(2).sum())
        s["xhat2"] += float(x_hat.pow(2).sum())
        s["dot"] += float((x_hat * x).sum())
        s["cos"] += float(F.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).sum())
        s["l0"] += metrics.l0(acts) * x.shape[0]
        sx = x.sum(0).cpu()
        self.sum_x = sx if self.sum_x is None else self.sum_x + sx
        self.fires += metrics.latent_fire_counts(acts, self.fires.shape[0]).cpu().double()
        self.n += x.shape[0]

    def result(self) -> dict:
        s, n = self.sums, self.n
        var = s["x2"] - float(self.sum_x.pow(2).sum()) / n  # Σ‖x − mean‖² from the streamed moments
        fvu = s["err2"] / var if var > 0 else math.nan
        out = {
            "fvu": fvu, "explained_variance": 1 - fvu, "mse": s["err2"] / n, "cossim": s["cos"] / n,
            "l0": s["l0"] / n,
            # shrinkage γ = Σ‖x̂‖² / Σ⟨x̂, x⟩ (fastsae.metrics.shrinkage) over every evaluated token
            "relative_reconstruction_bias": s["xhat2"] / s["dot"] if s["dot"] > 0 else math.nan,
        }
        if self.n_ce:
            ce = {k: s[k] / self.n_ce for k in ("ce_clean", "ce_sae", "ce_ablate")}
            kl = {k: s[k] / self.n_kl for k in ("kl_sae", "kl_ablate")}
            out.update({
                "ce_loss_without_sae": ce["ce_clean"], "ce_loss_with_sae": ce["ce_sae"],
                "ce_loss_with_ablation": ce["ce_ablate"],
                "ce_loss_score": _ratio(ce["ce_ablate"] - ce["ce_sae"], ce["ce_ablate"] - ce["ce_clean"]),
                "delta_lm_loss": ce["ce_sae"] - ce["ce_clean"],
                "kl_div_with_sae": kl["kl_sae"], "kl_div_with_ablation": kl["kl_ablate"],
                "kl_div_score": _ratio(kl["kl_ablate"] - kl["kl_sae"], kl["kl_ablate"]),
            })
        return out


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


CE_KEYS = ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation", "ce_loss_score", "delta_lm_loss",
           "kl_div_with_sae", "kl_div_with_ablation", "kl_div_score")


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """float32 at least (half-precision logits), float64 kept."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _mlm_mask(valid: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    draw = torch.rand(valid.shape, generator=generator)
    return valid & (draw < probability)


@torch.no_grad()
def evaluate(model: torch.nn.Module, sae: torch.nn.Module, hook: str,
             batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]], tokenizer=None,
             exclude_special: bool = True, max_tokens: int | None = None, mlm_probability: float = 0.15,
             seed: int = 0, dense_threshold: float = 0.1, objective: str = "auto",
             progress: bool = True) -> EvalResult:
    """Score `sae` spliced into `model` at `hook` on batches of (input_ids, attention_mask) [B, S]
    (fastsae.model.token_batches makes them from text; the mask may be None: no padding).

    tokenizer: gives the special tokens to exclude and, for masked LMs, the mask token.
    objective: "auto" (from the model's head: next-token CE for causal LMs, masked-LM CE for
    masked LMs, none for bare models), or "none" to skip the CE/KL passes. Stops after the
    batch in which `max_tokens` evaluated tokens are reached. See the module docstring for the
    definitions."""
    hook = resolve_hook(model, hook)
    kind = lm_head_kind(model) if objective == "auto" else objective
    if kind not in ("causal", "masked", "none"):
        raise ConfigError(f"objective={objective!r} is unknown: use 'auto' or 'none'")
    if not 0 < mlm_probability <= 1:
        raise ConfigError(f"mlm_probability={mlm_probability} must be in (0, 1]")
    mask_id = None
    if kind == "masked":
        mask_id = getattr(tokenizer, "mask_token_id", None)
        if mask_id is None:
            raise ConfigError("a masked LM is scored on masked tokens: pass its tokenizer (with a mask token)")
    special = special_token_ids(tokenizer) if exclude_special and tokenizer is not None else None
    d_sae = int(sae.d_sae)
    vocab = model.get_input_embeddings().num_embeddings
    acc = _Accumulator(d_sae)
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    device = next(model.parameters()).device
    bar = tqdm(total=max_tokens, desc="evaluating", unit="tok", disable=not progress)
    sequences = 0
    try:
        for input_ids, attention_mask in batches:
            if input_ids.dim() != 2:
                raise InputError(f"token batches must be [batch, seq], got {tuple(input_ids.shape)}")
            check_context_length(model, input_ids.shape[1])
            if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
                raise InputError(f"token ids range over [{int(input_ids.min())}, {int(input_ids.max())}] but the "
                                 f"model's vocabulary has {vocab} tokens: tokenize with the model's tokenizer")
            am = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            valid = valid_positions(input_ids, am, special)
            sequences += input_ids.shape[0]
            if kind == "none":
                x = capture(model, [hook], input_ids, am)[hook][valid.to(device)]
                x = x.to(getattr(sae, "device", x.device), getattr(sae, "dtype", x.dtype))
                acts, x_hat = encode_decode(sae, x)
                acc.add_reconstruction(x, x_hat, acts)
            else:
                _score_batch(model, sae, hook, kind, input_ids.to(device), am.to(device), valid.to(device),
                             mask_id, mlm_probability, gen, acc)
            bar.update(int(valid.sum()))
            if max_tokens is not None and acc.n >= max_tokens:
                break
    finally:
        bar.close()
    if acc.n == 0:
        raise InputError("no tokens were evaluated: the input was empty (or only padding and special tokens)")
    density = acc.fires / acc.n
    out = {
        "hook": hook, "objective": {"causal": "next-token", "masked": "masked-lm", "none": None}[kind],
        "sae": _describe_sae(sae), "tokens": acc.n, "sequences": sequences,
        "ce_tokens": acc.n_ce, "exclude_special": exclude_special,
        **dict.fromkeys(CE_KEYS), **acc.result(),
        "dead_latents": int((acc.fires == 0).sum()), "dense_latents": int((density > dense_threshold).sum()),
        "dense_threshold": dense_threshold,
    }
    if kind == "masked":
        out.update(mlm_probability=mlm_probability, seed=seed)
    return EvalResult(out, density)


def _score_batch(model, sae, hook, kind, ids, am, valid, mask_id, mlm_probability, gen, acc: _Accumulator) -> None:
    """One batch's clean, spliced and ablated passes into `acc`. Each pass takes one log-softmax
    over the KL positions (the CE positions are a subset of them) and no other [N, vocab] copy."""
    if kind == "causal":
        inputs, kl_pos = ids, valid
        # the prediction at t (an evaluated position) of token t+1 (not padding)
        ce_full = torch.zeros_like(valid)
        ce_full[:, :-1] = valid[:, :-1] & am[:, 1:].bool()
        ce_rows, targets = ce_full[kl_pos], torch.roll(ids, -1, dims=1)[kl_pos]
    else:
        kl_pos = _mlm_mask(valid.cpu(), mlm_probability, gen).to(ids.device)
        inputs = ids.masked_fill(kl_pos, mask_id)
        targets = ids[kl_pos]
        ce_rows = torch.ones_like(targets, dtype=torch.bool)
    every = bool(kl_pos.all())

    def log_probs(logits):
        rows = logits.reshape(-1, logits.shape[-1]) if every else logits[kl_pos]  # no copy when all count
        return torch.log_softmax(_wide(rows), -1)

    def ce_sum(logp):
        return -float(logp.gather(1, targets[:, None])[ce_rows].sum())

    def run():
        return model(input_ids=inputs, attention_mask=am).logits

    logp_clean = log_probs(run())
    p_clean = logp_clean.exp()
    acc.sums["ce_clean"] += ce_sum(logp_clean)
    with splice(model, {hook: sae}, record=True, mask=valid) as sp:
        logits = run()
    if sp.calls.get(hook) != 1:
        raise ConfigError(f"module {hook!r} ran {sp.calls.get(hook, 0)} times in one forward pass: "
                          "pick a hook point that runs once")
    rec = sp.records[hook]
    acc.add_reconstruction(rec.x, rec.x_hat, rec.acts)
    for name in ("sae", "ablate"):
        if name == "ablate":
            with ablate(model, [hook]):
                logits = run()
        logp = log_probs(logits)
        del logits
        acc.sums[f"ce_{name}"] += ce_sum(logp)
        # KL(P_clean ‖ P) summed over positions: Σ p_clean (log p_clean − log p), in place in logp
        acc.sums[f"kl_{name}"] += float(logp.neg_().add_(logp_clean).mul_(p_clean).sum())
    acc.n_ce += int(ce_rows.sum())
    acc.n_kl += int(kl_pos.sum())


def _describe_sae(sae) -> dict:
    cfg = getattr(sae, "cfg", None)
    out = {"class": type(sae).__name__, "d_in": int(sae.d_in), "d_sae": int(sae.d_sae)}
    for k in ("architecture", "k"):
        if getattr(cfg, k, None) is not None:
            out[k] = getattr(cfg, k)
    return out


# ---------------------------------------------------------------- report

def density_histogram(density: torch.Tensor, bins: int = 40) -> dict:
    """Histogram of log10(feature density) over the latents that fired: {"edges", "counts", "dead"}."""
    live = density[density > 0]
    if not live.numel():
        return {"edges": [], "counts": [], "dead": int(density.numel())}
    logd = live.log10()
    lo, hi = float(logd.min()), float(logd.max())
    hi = hi if hi > lo else lo + 1e-6
    counts = torch.histc(logd.float(), bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1)
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts],
            "dead": int((density == 0).sum())}


def write_report(result: EvalResult, out_dir: str | Path, extra: dict | None = None) -> list[Path]:
    """eval.json, eval.md, feature_density.npy and feature_density.png (with matplotlib) in out_dir."""
    import numpy as np

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = {**(extra or {}), **result.metrics, "density_histogram": density_histogram(result.feature_density)}
    written = [out_dir / "eval.json", out_dir / "eval.md", out_dir / "feature_density.npy"]
    atomic_write_text(written[0], json.dumps(m, indent=2, allow_nan=True) + "\n")
    atomic_write_text(written[1], _markdown(m))

    def save_npy(tmp):
        with open(tmp, "wb") as f:
            np.save(f, result.feature_density.numpy())
    atomic_write(written[2], save_npy)
    png = _plot_density(result.feature_density, out_dir / "feature_density.png", m)
    return written + ([png] if png else [])


ROWS = (
    ("ce_loss_score", "CE-loss score (CE_abl − CE_sae)/(CE_abl − CE_clean)"),
    ("kl_div_score", "KL score (KL_abl − KL_sae)/KL_abl"),
    ("ce_loss_without_sae", "CE clean"), ("ce_loss_with_sae", "CE with SAE"),
    ("ce_loss_with_ablation", "CE zero-ablated"), ("delta_lm_loss", "Δ LM loss (CE_sae − CE_clean)"),
    ("kl_div_with_sae", "KL with SAE"), ("kl_div_with_ablation", "KL zero-ablated"),
    ("fvu", "FVU (around the mean)"), ("explained_variance", "explained variance (1 − FVU)"),
    ("mse", "MSE (Σ over d, mean over tokens)"), ("cossim", "cosine(x, x̂)"), ("l0", "L0"),
    ("dead_latents", "dead latents"), ("dense_latents", "dense latents (density > {dense_threshold})"),
    ("relative_reconstruction_bias", "relative reconstruction bias γ"),
    ("tokens", "evaluated tokens"), ("ce_tokens", "CE tokens"),
)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) and abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def _markdown(m: dict) -> str:
    sae = m.get("sae", {})
    head = [f"# SAE evaluation: {m.get('model', 'model')} at `{m['hook']}`", "",
            f"SAE: {sae.get('class')} d_in={sae.get('d_in')} d_sae={sae.get('d_sae')}"
            + (f" k={sae['k']}" if "k" in sae else "") + f"; objective: {m['objective'] or 'none (no LM head)'}", ""]
    if m["objective"] is None:
        head += ["The model has no LM head: CE and KL scores are not defined, reconstruction metrics only.", ""]
    lines = ["| metric | value |", "|---|---|"]
    for key, label in ROWS:
        lines.append(f"| {label.format(**m)} | {_fmt(m.get(key))} |")
    return "\n".join(head + lines) + "\n"


def _plot_density(density: torch.Tensor, path: Path, m: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    live = density[density > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if live.numel():
        ax.hist(live.log10().numpy(), bins=40, color="tab:blue")
    ax.set_xlabel("log10(feature density)")
    ax.set_ylabel("latents")
    ax.set_title(f"{m['hook']}: {m['dead_latents']} dead, {m['dense_latents']} dense of {density.numel()}")
    fig.tight_layout()

    def save(tmp):
        fig.savefig(tmp, format="png", dpi=100)
    atomic_write(path, save)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE checkpoint directory (any format fastsae.load reads)")
    p.add_argument("--model", default=None,
                   help="Hugging Face model name or local directory (default: the one in the SAE's metadata)")
    p.add_argument("--hook", default=None, help="hook point (module name), default: the SAE's metadata")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help=".txt (one document per line) or .jsonl file; repeatable")
    src.add_argument("--tokens", action="append",
                     help="token ids: .npy/.safetensors [sequences, seq] (no padding) or [tokens] (cut into "
                          "--context-length pieces), or a directory of them; repeatable")
    p.add_argument("--text-field", default="text", help="the field of a .jsonl record holding the text (default text)")
    p.add_argument("--out", required=True, help="directory for eval.json, eval.md and feature_density.png")
    p.add_argument("--context-length", type=int, default=None,
                   help="tokens per sequence at most (default 128, or the model's limit if lower)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="stop after the batch that reaches this many evaluated tokens (default: all)")
    p.add_argument("--keep-special", action="store_true", help="also evaluate special tokens (e.g. BOS)")
    p.add_argument("--recon-only", action="store_true", help="skip the CE/KL passes (one partial forward)")
    p.add_argument("--mlm-probability", type=float, default=0.15,
                   help="masked LMs: share of the evaluated tokens masked (default 0.15)")
    p.add_argument("--seed", type=int, default=0, help="masked LMs: seed of the fixed random mask (default 0)")
    p.add_argument("--dense-threshold", type=float, default=0.1,
                   help="a latent firing on a larger share of tokens is dense (default 0.1)")
    p.add_argument("--device", default="cpu", help="device of the model and the SAE (default cpu)")
    p.add_argument("--dtype", default=None, help="the model's dtype (default: as saved)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import fastsae

    from .harvest import read_texts
    from .model import load_model, token_batches, token_file_batches

    sae = fastsae.load(args.sae, device=args.device)
    meta = getattr(getattr(sae, "cfg", None), "metadata", None) or {}
    model_name = args.model or meta.get("model")
    hook = args.hook or meta.get("hook") or meta.get("hook_name")
    if not model_name:
        raise ConfigError(f"the SAE at {args.sae} does not name its model: pass --model NAME_OR_DIR")
    if not hook:
        raise ConfigError(f"the SAE at {args.sae} does not name its hook point: pass --hook MODULE_NAME")
    model, tokenizer = load_model(model_name, head="auto", device=args.device, dtype=args.dtype)
    context_length = check_context_length(model, args.context_length)
    hook = resolve_hook(model, hook)
    if args.text:
        batches = token_batches(tokenizer, read_texts(args.text, args.text_field), args.batch_size, context_length)
    else:
        batches = token_file_batches(args.tokens, args.batch_size, context_length)
    result = evaluate(model, sae, hook, batches, tokenizer=tokenizer, exclude_special=not args.keep_special,
                      max_tokens=args.max_tokens, mlm_probability=args.mlm_probability, seed=args.seed,
                      dense_threshold=args.dense_threshold, objective="none" if args.recon_only else "auto",
                      progress=not args.no_progress)
    written = write_report(result, args.out, {"model": model_name, "sae_path": str(args.sae)})
    m = result.metrics
    scores = (f"CE-loss score {_fmt(m['ce_loss_score'])}, KL score {_fmt(m['kl_div_score'])}, "
              if m["ce_loss_score"] is not None else "")
    print(f"fastsae: {scores}FVU {_fmt(m['fvu'])}, L0 {_fmt(m['l0'])}, {m['dead_latents']} dead latents over "
          f"{m['tokens']} tokens; wrote {', '.join(p.name for p in written)} to {args.out}")
    return 0
