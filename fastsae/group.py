"""Several SAEs trained from one model pass: one per hook point, or several widths on one.

    source = ModelSource(model, ["transformer.h.4", "transformer.h.8"], tokens, batch_size=4096)
    group = TrainerGroup([Trainer(cfg_4, source.view("transformer.h.4")),
                          Trainer(cfg_8, source.view("transformer.h.8")),
                          Trainer(cfg_8_wide, source.view("transformer.h.8"))])
    group.fit()                                    # one TrainResult per trainer
    TrainerGroup.resume([dir_4, dir_8, dir_8_wide], source).fit()

The model's forward often costs more than an SAE step, so the source runs it once per buffer and
every Trainer steps on its hook's rows of the same batch, in lockstep. Each Trainer keeps its own
run folder, optimizer, tracker and checkpoints, and trains exactly as it would alone on a
single-hook ModelSource with the same settings (its rows are the same: the tests check). Their
checkpoints hold the same source position; resume picks the newest step at which every run has a
complete checkpoint, so a group killed between two of its runs' checkpoints resumes whole.

A group runs on one process, with the same steps, batch size, seed and checkpoint cadence for all,
and nonfinite="raise" (a skipped batch would put one trainer out of step).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from .errors import CheckpointError, ConfigError, InputError
from .parallel import LOCAL
from .run_dir import RunDir, list_checkpoints
from .streaming import HookView, ModelSource
from .trainer import Trainer, TrainResult

_SHARED = ("steps", "batch_size", "seed", "checkpoint_every", "keep_checkpoints")


class TrainerGroup:
    """Trainers stepped in lockstep on the batches of one ModelSource (each on a view of it)."""

    def __init__(self, trainers: Sequence[Trainer]):
        trainers = list(trainers)
        if not trainers:
            raise ConfigError("a trainer group needs at least one trainer")
        sources = {id(t.source.source) if isinstance(t.source, HookView) else None for t in trainers}
        if None in sources or len(sources) != 1:
            raise ConfigError("the trainers of a group read views of one ModelSource: build each with "
                              "source.view(hook) of the same source")
        self.trainers = trainers
        self.source: ModelSource = trainers[0].source.source
        first = trainers[0].cfg
        for t in trainers:
            differ = [f"{k}={getattr(t.cfg, k)!r} (not {getattr(first, k)!r})" for k in _SHARED
                      if getattr(t.cfg, k) != getattr(first, k)]
            if differ:
                raise ConfigError(f"the trainers of a group step together: {t.out_dir} has {', '.join(differ)}; "
                                  f"give every one the same {', '.join(_SHARED)}")
            if t.cfg.nonfinite != "raise":
                raise ConfigError(f"{t.out_dir}: a group needs nonfinite='raise' (a skipped batch would put one "
                                  "trainer out of step with the others)")
            if t.layout.world_size > 1:
                raise ConfigError("a trainer group runs on one process; train a sharded SAE alone")
        if first.batch_size != self.source.batch_size:
            raise ConfigError(f"the trainers' batch_size is {first.batch_size} but the source's is "
                              f"{self.source.batch_size}: build the source with batch_size={first.batch_size}")
        dirs = [t.out_dir.resolve() for t in trainers]
        if len(set(dirs)) != len(dirs):
            raise ConfigError("two trainers of the group write to the same out_dir: give each its own")

    @property
    def step(self) -> int:
        return self.trainers[0].step

    def fit(self, max_steps: int | None = None) -> list[TrainResult]:
        """Train every SAE until cfg.steps (or stop after max_steps, leaving checkpoints to
        resume from); one TrainResult per trainer, in order."""
        cfg = self.trainers[0].cfg
        stop = cfg.total_steps if max_steps is None else min(max_steps, cfg.total_steps)
        locked = []
        try:
            for t in self.trainers:
                t.run.lock()
                locked.append(t)
            for t in self.trainers:
                t.begin()
            return self._fit(stop, max_steps)
        finally:
            for t in locked:
                t.run.unlock()

    def _fit(self, stop: int, max_steps: int | None) -> list[TrainResult]:
        cfg = self.trainers[0].cfg
        batches = self.source.batches()
        bar = tqdm(total=cfg.total_steps, initial=self.step, desc=f"training {len(self.trainers)} SAEs", unit="step",
                   disable=not cfg.progress)
        try:
            while self.step < stop:
                batch = next(batches, None)
                if batch is None:
                    tqdm.write(f"the activation source ran out after {self.step} steps (asked for {cfg.total_steps})")
                    break
                for t in self.trainers:
                    scalars = t.train_step(batch[t.source.hook])
                    if scalars is None:  # only an empty batch gets here (nonfinite is "raise")
                        raise InputError(f"{t.out_dir}: step {t.step} was skipped; the trainers of a group must "
                                         "step together")
                    t.after_step(scalars)
                bar.update(1)
        finally:
            bar.close()
        return [t.finish(max_steps) for t in self.trainers]

    @classmethod
    def resume(cls, out_dirs: Sequence[str | Path], source: ModelSource, hooks: Sequence[str] | None = None,
               allow_new_data: bool = False, **overrides) -> TrainerGroup:
        """Continue the runs in out_dirs on `source`, each on the hook it trained on (`hooks`, or
        the hook in its SAE's metadata), from the newest step every run has a checkpoint of.
        overrides and allow_new_data are Trainer.resume's, applied to every run."""
        dirs = [Path(d) for d in out_dirs]
        if not dirs:
            raise ConfigError("name the run folders to resume")
        if hooks is None:
            hooks = [_saved_hook(d) for d in dirs]
        if len(hooks) != len(dirs):
            raise ConfigError(f"{len(dirs)} run folders but {len(hooks)} hook points: give one hook per run")
        steps = [{int(p.name.removeprefix("step_")): p for p in list_checkpoints(d)} for d in dirs]
        common = set.intersection(*(set(s) for s in steps))
        if not common:
            have = "; ".join(f"{d}: {sorted(s) or 'none'}" for d, s in zip(dirs, steps))
            raise CheckpointError(f"the runs have no checkpoint at a common step ({have}): resume them one by one "
                                  "with Trainer.resume")
        at = max(common)
        trainers, position = [], None
        for d, hook, s in zip(dirs, hooks, steps):
            t = Trainer.resume(d, source.view(hook), checkpoint=s[at], allow_new_data=allow_new_data, **overrides)
            if position is None:
                position = source.state_dict()
            elif source.state_dict() != position:
                raise CheckpointError(f"{s[at]} was saved at another data position than {trainers[0].last_checkpoint} "
                                      f"({source.state_dict()} vs {position}): these runs were not trained together")
            trainers.append(t)
        return cls(trainers)


def _saved_hook(out_dir: Path) -> str:
    meta = RunDir(out_dir, LOCAL).read_config().get("sae", {}).get("metadata", {})
    if not meta.get("hook"):
        raise ConfigError(f"{out_dir} does not say which hook point it trained on (sae.metadata.hook): pass hooks=")
    return meta["hook"]


__all__ = ["TrainerGroup"]
