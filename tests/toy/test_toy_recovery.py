"""Recovery with the Trainer's defaults, shortened: the CI guard of the toy acceptance run
(bench/toy_acceptance.py, docs/toy_recovery.md).

A small generator (32 dimensions, 64 features, 3 active per sample, correlated, decaying
probabilities) and d_sae = 2·G; only architecture, width, k or L1, steps, batch and lr are set.
Calibrated on seeds 0-2 (1500 steps, b_dec at zero, the lr decay over the last 10 %, the dead
window a fortieth of the run): TopK k=3 reached MMCS 0.9968-0.9973, ReLU + L1 = 0.2 reached
0.9925-0.9938. The bounds sit below those, so a regression of the recipe (dead
latents never revived, a schedule that does not settle) fails, not the noise of one seed.
"""

import tempfile

import pytest

from fastsae import metrics
from fastsae.config import SAEConfig, TrainConfig
from fastsae.toy.data import ToyData
from fastsae.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch,sparsity,bound", [("topk", dict(k=3), 0.99),
                                                 ("standard", dict(l1_coefficient=0.2), 0.985)])
def test_trainer_defaults_recover_the_toy_features(arch, sparsity, bound):
    data = ToyData(d=32, n_features=64, mean_active=3, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(sae=SAEConfig(d_in=32, d_sae=128, architecture=arch, **sparsity), steps=1500,
                          batch_size=128, lr=3e-3, out_dir=tmp, progress=False, console=False, plot=False)
        trainer = Trainer(cfg, data.source(128))
        trainer.fit()
    assert metrics.mmcs(data.features, trainer.sae.W_dec) >= bound
