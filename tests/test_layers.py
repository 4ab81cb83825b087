"""The shape of the code, checked: a single-process run needs nothing of fastsae.distributed, and
the Trainer reaches the SAE only through its public protocol."""

import ast
import subprocess
import sys
from pathlib import Path

import fastsae
from helpers import REPO


def test_import_and_single_process_training_load_no_distributed_module(tmp_path):
    code = f"""
import sys, torch, fastsae
cfg = fastsae.TrainConfig(sae=dict(d_in=8, d_sae=32, architecture="topk", k=4), steps=3, batch_size=16,
                          out_dir={str(tmp_path)!r}, progress=False, console=False, plot=False, b_dec_init="zeros")
fastsae.Trainer(cfg, torch.randn(64, 8)).fit()
fastsae.load({str(tmp_path / "final")!r})
loaded = sorted(m for m in sys.modules if m.startswith("fastsae.distributed"))
print("LOADED", loaded)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout, out.stdout


def test_trainer_calls_no_private_sae_method():
    tree = ast.parse((REPO / "fastsae" / "trainer.py").read_text())
    private = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            # sae._x or self.sae._x
            if (isinstance(base, ast.Name) and base.id == "sae") or (
                    isinstance(base, ast.Attribute) and base.attr == "sae"):
                private.append(f"line {node.lineno}: .{node.attr}")
    assert not private, private


def test_the_sparse_path_is_one_registry_property():
    sparse = fastsae.sparse_architectures()
    assert set(sparse) == {name for name, cls in fastsae.SAE_CLASSES.items() if cls.takes_sparse_path}
    assert {"topk", "batchtopk"} <= set(sparse) and "standard" not in sparse
    # every architecture is registered once, under its own name
    for name, cls in fastsae.SAE_CLASSES.items():
        assert cls.architecture == name


def test_every_package_folder_is_installed_and_importable():
    """A plain `pip install .` installs the packages pyproject.toml lists: every folder of .py
    files under fastsae/ must be one of them (and be a regular package), or the wheel lacks it."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    root = REPO / "fastsae"
    folders = {"fastsae." + ".".join(p.parent.relative_to(root).parts) for p in root.rglob("*.py")
               if p.parent != root and "__pycache__" not in p.parts}
    assert folders <= listed, f"folders missing from pyproject.toml's packages: {sorted(folders - listed)}"
    for name in sorted(folders):
        assert (root / Path(*name.split(".")[1:]) / "__init__.py").exists(), f"{name} has no __init__.py"
    from fastsae.toy import ToyData  # the package's own names

    assert ToyData().features.shape == (512, 256)
