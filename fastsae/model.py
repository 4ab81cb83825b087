"""SAEs inside a Hugging Face `transformers` model: load it, name its hook points, run it to
them, and splice SAEs into its forward pass.

    model, tokenizer = load_model("gpt2", head="lm")          # local directory or cached name
    hook_points(model)["resid"][6]                              # "transformer.h.6"
    with splice(model, {"transformer.h.6": sae}) as sp:         # module output -> sae(output)
        logits = model(input_ids).logits
    with ablate(model, ["transformer.h.6"]):                    # module output -> 0
        ...

A hook point is a module's name; its output (the first element when the module returns a
tuple) is the activation [batch, seq, d]. `hook_points` names the usual ones per layer: the
block output (residual stream), the MLP's and the attention's output before the residual add.
`capture` runs the model only as far as the deepest requested hook point and returns the
activations; harvest and evaluation use it, and so can anything that streams activations.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import torch

from .errors import ConfigError, InputError
from .sparse import SparseActs

# ---------------------------------------------------------------- loading


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    tokenizer: Any


def import_pypi_kernels() -> None:
    """Import the PyPI package `kernels` (which transformers imports) from its installed files,
    before transformers looks for it: Python run from this repository's root would otherwise
    find the folder kernels/ (fastsae's Triton sources) first. A no-op when the package is
    absent or imported."""
    import sys

    from .kernels import load_pypi_kernels

    if "kernels" not in sys.modules:
        load_pypi_kernels()


def _transformers():
    import_pypi_kernels()
    try:
        import transformers
    except ImportError as e:
        raise ConfigError("running a model needs transformers: pip install transformers") from e
    return transformers


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the Hub (or HF_ENDPOINT), no retries: can a download even start?
    Run in a daemon thread so that a name lookup that hangs (no resolver) is bounded too."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    result: list[bool] = []

    def probe():
        try:
            with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _offline_env() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@contextlib.contextmanager
def _no_hub():
    """huggingface_hub's offline switch, on for the duration: local_files_only alone still lets
    it make best-effort requests of its own (e.g. for its user-agent registry)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = getattr(constants, "HF_HUB_OFFLINE", None)
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def model_head(config) -> str:
    """"causal" (next-token LM head), "masked" (masked-LM head) or "none", from a model's config."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    for arch in getattr(config, "architectures", None) or ():
        if arch.endswith("ForMaskedLM"):
            return "masked"
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "causal"
    mt = config.model_type
    # BERT-family types are also registered as causal LMs (as decoders); unless configured as one, they are MLMs
    if mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "masked"
    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    return "none"


def lm_head_kind(model: torch.nn.Module) -> str:
    """What a model instance predicts: "causal", "masked", or "none" (a bare encoder/decoder)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    name = type(model).__name__
    if name in set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()):
        return "masked"
    if name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return "causal"
    return "none"


def load_model(name_or_path: str | os.PathLike, head: str = "auto", device: str | torch.device = "cpu",
               dtype: torch.dtype | str | None = None, offline: bool | None = None) -> LoadedModel:
    """Load a `transformers` model and its tokenizer, in eval mode, from a local directory or a
    Hub name.

    head: "auto" (the LM head the config describes: causal or masked), "lm" (an LM head, an
    error if there is none), or "none" (the bare model, e.g. for harvesting). A Hub name is
    looked up in the local cache first; it is downloaded only if it is not cached, the
    network is allowed (offline=False, or offline=None and HF_HUB_OFFLINE unset) and the Hub
    answers at once, so a machine without network gets one line saying so instead of minutes
    of retries.
    """
    tf = _transformers()
    if head not in ("auto", "lm", "none"):
        raise ConfigError(f"head={head!r} is unknown: use 'auto', 'lm' or 'none'")
    name = str(name_or_path)
    local_dir = Path(name).expanduser()
    if local_dir.is_dir():
        name = str(local_dir)
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not a Hub name (org/name)
        raise ConfigError(f"model directory {name} does not exist: pass a local model directory or a Hub name")
    kwargs = {"local_files_only": True}  # a directory, or the local cache: never the network
    offline = _offline_env() if offline is None else offline

    def fetch(what, loader):
        try:
            with _no_hub():
                return loader(name, **kwargs)
        except OSError as e:  # transformers raises OSError (or a subclass) for a missing file or repo
            if local_dir.is_dir():
                raise ConfigError(f"cannot load the {what} from {name}: {str(e).splitlines()[0]}") from e
            first_error = e
        if offline or not _hub_reachable():
            why = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the Hugging Face Hub cannot be reached"
            raise ConfigError(
                f"model {name!r} is not in the local cache and {why}: download it on a machine with network "
                f"(e.g. `huggingface-cli download {name} --local-dir DIR`) and pass --model DIR"
            ) from first_error
        try:
            return loader(name)
        except OSError as e:
            raise ConfigError(f"cannot load the {what} of {name!r}: {str(e).splitlines()[0]}") from e

    config = fetch("config", tf.AutoConfig.from_pretrained)
    kind = model_head(config) if head != "none" else "none"
    if head == "lm" and kind == "none":
        raise ConfigError(f"{name} ({config.model_type}) has no causal or masked LM head: CE-loss scores need one")
    auto = {"causal": tf.AutoModelForCausalLM, "masked": tf.AutoModelForMaskedLM, "none": tf.AutoModel}[kind]
    torch_dtype = _dtype(dtype)
    # transformers renamed torch_dtype= to dtype= in 4.56
    major, minor = (int(v) for v in tf.__version__.split(".")[:2])
    as_dtype = {} if torch_dtype is None else {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch_dtype}
    model = fetch("weights", lambda n, **kw: auto.from_pretrained(n, **kw, **as_dtype))
    tokenizer = fetch("tokenizer", tf.AutoTokenizer.from_pretrained)
    return LoadedModel(model.to(device).eval(), tokenizer)


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    from .config import dtype_from_str

    return dtype_from_str(dtype)


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover (None if it does not say)."""
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings"):
        n = getattr(cfg, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


DEFAULT_CONTEXT_LENGTH = 128


def check_context_length(model: torch.nn.Module, context_length: int | None) -> int:
    """The context length to use: `context_length`, or by default 128 capped at the model's
    limit. A requested length above the limit is an error naming the limit."""
    limit = max_positions(model)
    if context_length is None:
        return min(DEFAULT_CONTEXT_LENGTH, limit) if limit else DEFAULT_CONTEXT_LENGTH
    if context_length < 2:
        raise ConfigError(f"context length {context_length} is too short: use at least 2 tokens")
    if limit is not None and context_length > limit:
        raise ConfigError(
            f"context length {context_length} is above the model's limit of {limit} positions "
            f"(config.n_positions / max_position_embeddings): use --context-length {limit} or less"
        )
    return context_length


# ---------------------------------------------------------------- hook points

_ATTN = ("attn", "self_attn", "attention", "self_attention")
_MLP = ("mlp", "feed_forward", "ffn")


def _blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """The model's list of transformer blocks: the first ModuleList with one entry per layer."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    for name, mod in lists:
        if n_layers is None or len(mod) == n_layers:
            return name, mod
    return None


def _output_proj(module: torch.nn.Module, name: str) -> str | None:
    """BERT-style sublayers whose output module adds the residual and normalises: hook the
    projection before that (`<name>.output.dense`), so the hook point is the sublayer's own output."""
    out = getattr(module, "output", None)
    if isinstance(out, torch.nn.Module) and isinstance(getattr(out, "dense", None), torch.nn.Module) \
            and isinstance(getattr(out, "LayerNorm", None), torch.nn.Module):
        return f"{name}.output.dense"
    return None


def hook_points(model: torch.nn.Module) -> dict[str, list[str]]:
    """The usual hook points per layer: {"resid": [...], "mlp": [...], "attn": [...]}, one name
    per layer in order ("resid" is the block's output, i.e. the residual stream after the block;
    "mlp" and "attn" the sublayers' outputs before they are added to the residual stream).
    A kind the model's blocks do not expose is left out."""
    found = _blocks(model)
    if found is None:
        return {}
    prefix, blocks = found
    points: dict[str, list[str]] = {"resid": [], "mlp": [], "attn": []}
    for i, block in enumerate(blocks):
        name = f"{prefix}.{i}"
        points["resid"].append(name)
        children = dict(block.named_children())
        attn = next((c for c in _ATTN if c in children), None)
        if attn is not None:
            points["attn"].append(_output_proj(children[attn], f"{name}.{attn}") or f"{name}.{attn}")
        mlp = next((c for c in _MLP if c in children), None)
        if mlp is not None:
            points["mlp"].append(f"{name}.{mlp}")
        elif "intermediate" in children and _output_proj(block, name):  # BERT: intermediate -> output.dense
            points["mlp"].append(f"{name}.output.dense")
    return {k: v for k, v in points.items() if len(v) == len(blocks)}


def _describe_hook_points(model: torch.nn.Module) -> str:
    points = hook_points(model)
    if not points:
        names = [n for n, _ in model.named_modules() if n][:12]
        return f"some of its modules: {', '.join(names)}"
    n = len(points["resid"])
    last = points["resid"][-1]  # "<blocks>.<n-1>"
    pattern = {k: v[-1].replace(last, last.rsplit(".", 1)[0] + ".{i}", 1) for k, v in points.items()}
    parts = [f"{pattern['resid']} (residual stream)"] + [f"{pattern[k]} ({k})" for k in ("mlp", "attn") if k in pattern]
    return f"its hook points are {', '.join(parts)} for i in 0..{n - 1}"


def resolve_hook(model: torch.nn.Module, hook: str) -> str:
    """The module name `hook` refers to in `model`. Names written for the LM-head wrapper
    (transformer.h.6) also work on the bare model (h.6) and the other way round. An unknown
    name is a ConfigError that suggests close names and lists the model's hook points."""
    if not isinstance(hook, str) or not hook:
        raise ConfigError(f"a hook point is a module name such as {_example_hook(model)!r}, got {hook!r}")
    modules = dict(model.named_modules())
    if hook in modules:
        return hook
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        if hook.startswith(prefix + ".") and hook[len(prefix) + 1:] in modules:
            return hook[len(prefix) + 1:]
        if f"{prefix}.{hook}" in modules:
            return f"{prefix}.{hook}"
    close = difflib.get_close_matches(hook, list(modules), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"the model has no module named {hook!r}{hint}; {_describe_hook_points(model)}")


def _example_hook(model):
    points = hook_points(model)
    return points["resid"][len(points["resid"]) // 2] if points else "transformer.h.6"


# ---------------------------------------------------------------- tokens

def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id (its eos token when it has no pad token, as GPT-2's)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id


def token_batches(tokenizer, texts: Iterable[str], batch_size: int, context_length: int,
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) [B, S] for each `batch_size` documents, each truncated to
    `context_length` tokens and right-padded to the longest in its batch."""
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} must be at least 1")
    pad_token_id(tokenizer)
    tokenizer.padding_side = "right"
    batch: list[str] = []
    for doc in texts:
        batch.append(doc)
        if len(batch) == batch_size:
            yield _encode(tokenizer, batch, context_length)
            batch = []
    if batch:
        yield _encode(tokenizer, batch, context_length)


def _encode(tokenizer, docs, context_length):
    enc = tokenizer(docs, truncation=True, max_length=context_length, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _read_token_file(path: Path) -> torch.Tensor:
    if path.suffix == ".npy":
        import numpy as np

        try:
            t = torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as e:
            raise InputError(f"{path} is not a token array: {e}") from e
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1 and "tokens" not in tensors:
            raise InputError(f"{path} holds tensors {sorted(tensors)}: name the token ids 'tokens'")
        t = tensors.get("tokens", next(iter(tensors.values())))
    else:
        raise InputError(f"{path}: token files must end in .npy or .safetensors")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.dim() not in (1, 2):
        raise InputError(f"{path} holds {t.dtype} {tuple(t.shape)}: token files hold integer ids, "
                         "[sequences, seq] or [tokens]")
    return t.long()


def token_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The token-id files `paths` names: files as given, a directory's .npy/.safetensors files in
    sorted order."""
    files: list[Path] = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix in (".npy", ".safetensors"))
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"token file {p} does not exist")
    if not files:
        raise InputError(f"no .npy or .safetensors token files in {paths}")
    return files


def token_file_batches(paths: str | os.PathLike | Iterable[str | os.PathLike], batch_size: int,
                       context_length: int) -> Iterator[tuple[torch.Tensor, None]]:
    """(input_ids, None) [B, S] batches from token-id files (.npy or .safetensors; a directory
    is read file by file in sorted order). A 2-D file [sequences, seq] gives its rows as they
    are (no padding); a 1-D file [tokens] is cut into `context_length` pieces (the tail that
    fills no piece is dropped)."""
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} must be at least 1")
    for f in token_files(paths):
        t = _read_token_file(f)
        rows = t if t.dim() == 2 else t[: t.numel() // context_length * context_length].reshape(-1, context_length)
        for start in range(0, rows.shape[0], batch_size):
            yield rows[start:start + batch_size], None


def special_token_ids(tokenizer) -> torch.Tensor:
    return torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)


def valid_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    special_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B, S]: the positions whose activations count: not padding, and not a special token
    (BOS and the like, whose activations are outliers) when `special_ids` is given."""
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if special_ids is not None and special_ids.numel():
        keep = keep & ~torch.isin(input_ids, special_ids.to(input_ids.device))
    return keep


# ---------------------------------------------------------------- running to hook points

class _Stop(Exception):
    """Raised by a capture hook once every requested activation is in: the rest of the model is skipped."""


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_activation(hook: str, x, input_shape: torch.Size | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or (input_shape is not None and x.shape[:2] != input_shape):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(
            f"module {hook!r} returned {shape}, expected [batch, seq, d] matching the tokens "
            f"{tuple(input_shape) if input_shape is not None else ''}: hook a block, MLP or attention output"
        )


@torch.no_grad()
def capture(model: torch.nn.Module, hooks: Iterable[str], input_ids: torch.Tensor,
            attention_mask: torch.Tensor | None = None, stop_early: bool = True) -> dict[str, torch.Tensor]:
    """Run `model` on a batch and return {hook: activations [B, S, d]} (the module's output, on
    the model's device and dtype). With stop_early the forward pass ends once every hook has
    fired, so the layers after the deepest one are never computed."""
    names = {h: resolve_hook(model, h) for h in hooks}
    if not names:
        raise ConfigError("capture needs at least one hook point")
    got: dict[str, torch.Tensor] = {}
    handles = []

    def make(hook):
        def on_output(_mod, _inp, out):
            x = _first(out)
            _check_activation(hook, x, input_ids.shape)
            got[hook] = x
            if stop_early and len(got) == len(names):
                raise _Stop
        return on_output

    for hook, name in names.items():
        handles.append(model.get_submodule(name).register_forward_hook(make(hook)))
    device = _model_device(model)
    try:
        with contextlib.suppress(_Stop):
            model(input_ids=input_ids.to(device),
                  attention_mask=None if attention_mask is None else attention_mask.to(device))
    finally:
        for h in handles:
            h.remove()
    missing = [h for h in names if h not in got]
    if missing:
        raise ConfigError(f"module(s) {', '.join(map(repr, missing))} did not run in the forward pass: "
                          "pick another hook point")
    return got


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ---------------------------------------------------------------- splicing

def encode_decode(sae: torch.nn.Module, x: torch.Tensor):
    """(latent activations, reconstruction) of x [..., d_in] from one encode. The reconstruction
    equals sae(x) (an SAE that normalises its input maps the decode back to x's scale)."""
    if hasattr(sae, "encode_decode"):
        return sae.encode_decode(x)
    acts = sae.encode(x)  # a module with only the SAE surface (e.g. a test's identity SAE)
    return acts, sae.decode(acts)


@dataclass
class Record:
    """What a spliced SAE saw and produced in the last forward pass, at the positions of
    `Splice.mask` (all positions without one): x [N, d], x_hat [N, d], acts (SparseActs [N, m]
    or dense [N, d_sae]). Kept only with record=True."""

    x: torch.Tensor | None = None
    x_hat: torch.Tensor | None = None
    acts: Any = None


@dataclass
class Splice:
    """The handle `splice`/`ablate` yield. Set `.mask` (bool [B, S]) before a forward pass to
    replace only those positions (the others keep the model's own activation); None: all.
    `.records[hook]` holds the last pass's Record when recording."""

    mask: torch.Tensor | None = None
    records: dict[str, Record] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)


def _check_sae(hook: str, sae) -> None:
    missing = [a for a in ("encode", "decode", "d_in") if not hasattr(sae, a)] + ([] if callable(sae) else ["forward"])
    if missing:
        raise ConfigError(f"the module spliced at {hook!r} lacks {', '.join(missing)}: pass an SAE "
                          "(encode, decode, forward, d_in), e.g. fastsae.load(path)")


def _select(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if mask is None else t[mask]


def _replace_output(out, new):
    if isinstance(out, tuple):
        return (new, *out[1:])
    if isinstance(out, list):
        return [new, *out[1:]]
    return new


def _sae_positions(sae, x: torch.Tensor, mask: torch.Tensor | None, keep_error: bool, record: Record | None):
    """x [B, S, d] -> the spliced activation: reconstruction (plus the detached error term with
    keep_error) at the masked positions, x elsewhere; in x's dtype and device."""
    rows = _select(x, mask)
    sae_device = getattr(sae, "device", rows.device)
    sae_dtype = getattr(sae, "dtype", rows.dtype)
    inp = rows.to(sae_device, sae_dtype)
    if record is not None:
        acts, x_hat = encode_decode(sae, inp)
        record.x, record.x_hat, record.acts = inp.detach(), x_hat.detach(), _detach(acts)
    else:
        x_hat = sae(inp)
    x_hat = x_hat.to(x.device, x.dtype)
    if keep_error:
        x_hat = x_hat + (rows - x_hat).detach()
    if mask is None:
        return x_hat.reshape(x.shape)
    out = x.clone()
    out[mask] = x_hat
    return out


def _detach(acts):
    if isinstance(acts, SparseActs):
        return SparseActs(acts.values.detach(), acts.indices, acts.d_sae)
    return acts.detach() if isinstance(acts, torch.Tensor) else acts


@contextlib.contextmanager
def splice(model: torch.nn.Module, saes: Mapping[str, torch.nn.Module | None], keep_error: bool = False,
           record: bool = False, mask: torch.Tensor | None = None) -> Iterator[Splice]:
    """Replace the outputs of the named modules by their SAE's reconstruction while the context
    is open.

    saes: {hook point: SAE}; an SAE of None zero-ablates that hook point. keep_error=True adds
    the error term back, detached (output = x_hat + (x - x_hat).detach()): the model's output is
    unchanged while gradients reach the SAE through x_hat. mask (bool [B, S], also settable on
    the yielded handle per batch) limits the replacement to those positions. record=True keeps
    each SAE's input, latents and reconstruction of the last pass in handle.records.
    Tuple outputs keep their other elements; the activation keeps its dtype and device.
    """
    names = {hook: resolve_hook(model, hook) for hook in saes}
    for hook, sae in saes.items():
        if sae is not None:
            _check_sae(hook, sae)
    handle = Splice(mask=mask)
    hooks = []

    def make(hook, sae):
        def on_output(_mod, _inp, out):
            x = _first(out)
            _check_activation(hook, x, None)
            m = handle.mask
            if m is not None:
                if m.shape != x.shape[:2]:
                    raise InputError(f"splice mask has shape {tuple(m.shape)} but {hook!r} produced "
                                     f"{tuple(x.shape)}: set the mask [batch, seq] of this batch")
                m = m.to(x.device, torch.bool)
            if sae is None:
                new = x.new_zeros(x.shape) if m is None else x.masked_fill(m.unsqueeze(-1), 0)
            else:
                if sae.d_in != x.shape[-1]:
                    raise ConfigError(f"the SAE at {hook!r} has d_in={sae.d_in} but the module's output has "
                                      f"d={x.shape[-1]}: splice it at the hook point it was trained on")
                rec = handle.records.setdefault(hook, Record()) if record else None
                new = _sae_positions(sae, x, m, keep_error, rec)
            handle.calls[hook] = handle.calls.get(hook, 0) + 1
            return _replace_output(out, new)
        return on_output

    try:
        for hook, name in names.items():
            hooks.append(model.get_submodule(name).register_forward_hook(make(hook, saes[hook])))
        yield handle
    finally:
        for h in hooks:
            h.remove()


def ablate(model: torch.nn.Module, hooks: Iterable[str], mask: torch.Tensor | None = None):
    """Zero the outputs of the named modules while the context is open (the baseline of the
    CE-loss and KL scores); a context manager yielding the same handle as `splice`."""
    return splice(model, dict.fromkeys(hooks), mask=mask)
