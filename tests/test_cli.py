"""The `fastsae` command's error reporting, the device check, the README's import snippets, and
what `make demo` installs."""

import os
import subprocess
import sys

import pytest
import torch

import fastsae
from fastsae import cli, demo
from fastsae.errors import CheckpointError, ConfigError
from helpers import REPO, require


def run_command(monkeypatch, capsys, *args):
    """`fastsae ARGS` as the console script runs it (argv from sys.argv): (status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["fastsae", *args])
    status = cli.main()
    out = capsys.readouterr()
    return status, out.out, out.err


# ------------------------------------------------------------------ one line, or the traceback with --debug
def test_user_errors_are_one_line(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "nonexistent"
    status, _, err = run_command(monkeypatch, capsys, "convert", str(missing), str(tmp_path / "out"), "--to", "saelens")
    assert status == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("fastsae convert: error: ") and f"no checkpoint at {missing}" in err


def test_missing_data_says_the_path_does_not_exist(monkeypatch, capsys, tmp_path):
    status, _, err = run_command(monkeypatch, capsys, "train", "--data", str(tmp_path / "nonexistent") + "/",
                                 "--d-sae", "8", "--k", "2", "--out-dir", str(tmp_path / "run"))
    assert status == 1 and err.count("\n") == 1
    assert "nonexistent does not exist" in err


@pytest.mark.parametrize("error,line", [
    (FileNotFoundError(2, "No such file or directory", "run.toml"), "No such file or directory: run.toml"),
    (PermissionError(13, "Permission denied", "/out"), "Permission denied: /out"),
    (ConfigError("k=0 is out of range"), "k=0 is out of range"),
])
def test_os_and_library_errors_are_described(monkeypatch, capsys, error, line):
    def fail(args):
        raise error

    monkeypatch.setattr(demo, "run", fail)
    status, _, err = run_command(monkeypatch, capsys, "demo")
    assert status == 1 and err == f"fastsae demo: error: {line}\n"


@pytest.mark.parametrize("where", ["global", "after the subcommand"])
def test_debug_shows_the_traceback(monkeypatch, capsys, tmp_path, where):
    args = ["convert", str(tmp_path / "nope"), str(tmp_path / "out"), "--to", "saelens"]
    args = ["--debug", *args] if where == "global" else [*args, "--debug"]
    monkeypatch.setattr(sys, "argv", ["fastsae", *args])
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        cli.main()


def test_bugs_keep_their_traceback(monkeypatch, capsys):
    def bug(args):
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(demo, "run", bug)
    monkeypatch.setattr(sys, "argv", ["fastsae", "demo"])
    with pytest.raises(ZeroDivisionError):
        cli.main()


def test_main_called_from_python_raises(tmp_path):
    with pytest.raises(CheckpointError):
        cli.main(["convert", str(tmp_path / "nope"), str(tmp_path / "out"), "--to", "saelens"])


# ------------------------------------------------------------------ --device
def test_check_device(monkeypatch):
    assert cli.check_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^--device cuda: .*(without CUDA|no CUDA GPU).*; use --device cpu$"):
        cli.check_device("cuda")
    with pytest.raises(ConfigError, match=r"^--device gpu0: not a device name"):
        cli.check_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.check_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match=r"has 1 CUDA device\(s\)"):
        cli.check_device("cuda:3")


# ------------------------------------------------------------------ the README's snippets
def test_readme_format_and_convert_snippets(monkeypatch, tmp_path):
    """`import fastsae` alone, then the README's drop-in lines, exactly as written there."""
    sparsify = require("sparsify", "compat")
    for name in ("formats", "convert", "facades", "compat"):  # as in a fresh process
        monkeypatch.delattr(fastsae, name, raising=False)
    for name in ("fastsae.formats", "fastsae.convert", "fastsae.facades"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.chdir(tmp_path)
    fastsae.TopKSAE(d_in=8, d_sae=16, k=2).save_pretrained("path")
    live_module = sparsify.SparseCoder(8, sparsify.SparseCoderConfig(num_latents=16, k=2))

    sae = fastsae.load("path")        # fastsae (plain or sharded), SAELens, sparsify, ...: detected
    fastsae.formats.save(sae, "out", format="saelens")   # or "sparsify": their tools read it
    sae = fastsae.convert.from_module(live_module)        # SAELens SAE, sparsify SparseCoder, ...

    from fastsae.facades import SAE          # was: from sae_lens import SAE  # noqa: I001 (as in the README)
    from fastsae.facades import SparseCoder  # was: from sparsify import SparseCoder

    assert isinstance(sae, fastsae.TopKSAE) and sae.d_sae == 16
    assert fastsae.load("out").d_sae == 16
    assert SAE.__name__ == "SAE" and SparseCoder.__name__ == "SparseCoder"


# ------------------------------------------------------------------ make demo
def test_make_demo_installs_the_package_alone(tmp_path):
    """`make demo` in a fresh clone installs fastsae without the test, plot or compat extras
    (a dry run: nothing is installed)."""
    res = subprocess.run(["make", "-n", "demo", f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True,
                         text=True, check=True)
    installs = [line for line in res.stdout.splitlines() if "pip install" in line and "-e" in line]
    assert installs and all(line.rstrip().endswith('-e "."') for line in installs), installs
    assert "python -m fastsae demo" in res.stdout
    full = subprocess.run(["make", "-n", "test", f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout
    assert '-e ".[test,plot,compat]"' in full


def test_the_demo_imports_nothing_from_the_extras(tmp_path):
    """What `make demo` runs works with the base dependencies alone: the extras' packages are
    made unimportable and a two-second demo still runs."""
    blocked = ["pytest", "matplotlib", "sae_lens", "sparsify", "dictionary_learning", "transformers", "psutil"]
    code = (
        "import sys\n"
        "class Block:\n"
        f"    names = {blocked!r}\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in self.names: raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from fastsae.cli import main\n"
        "sys.exit(main(['demo', '--seconds', '1', '--max-steps', '5', '--d', '16', '--features', '32',"
        " '--eval-samples', '256']))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "MMCS" in res.stdout
