"""The trainer's parts as tests drive them: its recipe without the final evaluation, or cut short
like a killed run."""


def train_steps(trainer, *, until: int | None = None, save: bool = False):
    """A trainer's recipe without its final evaluation: ``begin`` and the ``steps``, to the end or
    to step ``until`` (a run killed after that step: no end save), then, with ``save``, the last
    step's checkpoint. Returns ``trainer.result``."""
    if trainer.begin():
        steps = trainer.steps()
        for step in steps:
            if until is not None and step >= until:
                steps.close()  # the loop's own end: the bar closed, the losses flushed
                return trainer.result
    if save:
        trainer.save()
    return trainer.result
