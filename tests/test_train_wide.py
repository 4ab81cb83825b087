"""A TopK SAE with d_sae = 2^20 trains on CPU without ever holding a [B, d_sae] tensor.

The steps run in a subprocess, so its peak RSS is its own. The peak is reset (Linux
/proc/self/clear_refs) after the SAE, the optimizer state and the first batch exist, so
what is measured is the memory the training steps add on top: a [B, d_sae] fp32 tensor
would add B·d_sae·4 bytes (1 GiB here).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

D_IN, D_SAE, K, B, STEPS = 64, 2**20, 32, 256, 3

SCRIPT = textwrap.dedent(f"""
    import json, torch
    torch.manual_seed(0)
    from fastsae.trainer import Trainer, TrainConfig

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    x = torch.randn({B * (STEPS + 1)}, {D_IN})
    cfg = TrainConfig(sae=dict(d_in={D_IN}, d_sae={D_SAE}, architecture="topk", k={K}, backend="cpp"),
                      steps={STEPS}, batch_size={B}, lr=1e-3, optimizer="row_sparse_adam",
                      b_dec_init="zeros", dead_tokens={B}, log_every=1, checkpoint_every=0,
                      out_dir=__import__("sys").argv[1], progress=False, console=False, plot=False)
    tr = Trainer(cfg, x)
    batches = iter(tr.source)
    W0 = tr.sae.W_dec.detach()[:4096].clone()
    first = next(batches)
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
    base = status("VmRSS")
    stats = [tr.train_step(first)] + [tr.train_step(next(batches)) for _ in range({STEPS - 1})]
    peak = status("VmHWM")
    print(json.dumps(dict(base=base, peak=peak, stats=stats,
                          moved=int((tr.sae.W_dec.detach()[:4096] != W0).any(1).sum()))))
""")


def _missing_native_ops():
    try:
        from fastsae.ops import cpp as cpp_ops
    except Exception as e:  # the extension is not built
        return f"fastsae._C is not importable ({e})"
    missing = [op for op in ("topk_encode", "topk_sae_backward", "sparse_decode")
               if not cpp_ops.has_kernel(op, torch.device("cpu"))]
    return f"the cpp backend has no CPU kernel for {missing}" if missing else None


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset peak RSS")
def test_wide_topk_training_never_allocates_batch_by_dsae(tmp_path):
    missing = _missing_native_ops()
    if missing:
        pytest.skip(f"{missing}: the reference topk_encode materialises [B, d_sae]")
    env = {k: v for k, v in os.environ.items() if k != "FASTSAE_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    added = r["peak"] - r["base"]
    dense = B * D_SAE * 4
    print(f"wide: base RSS {r['base'] / 2**30:.2f} GiB, steps added {added / 2**20:.0f} MiB; "
          f"one [B, d_sae] fp32 tensor is {dense / 2**30:.1f} GiB")
    assert added < dense / 4, (added, dense)
    assert all(s is not None and s["l0"] == K for s in r["stats"])
    assert r["stats"][-1]["auxk"] > 0  # AuxK over ~2^20 dead latents ran without [B, #dead] either
    assert r["moved"] > 0
