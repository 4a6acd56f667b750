"""How the user writes a guarded run's options, for the advice nbguard prints and raises.

The same machinery serves ``%%checkpointed`` in a notebook and ``@nbguard.checkpointed`` in a
script, so a message that says what to do next ("to start over: ...") must name the option the way
the user would type it where they are: ``%%checkpointed --fresh`` or ``fresh=True``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Spelling:
    """The words for one entry point: the options a message may tell the user to set."""

    fresh: str  # the whole advice to start over
    resume_from_form: str  # with ``{id}`` for the snapshot
    resume_from_option: str  # the option alone, for "remove ... from the cell"
    name_option: str
    where: str  # what holds the options: "the cell", "the decorator"
    cell: str  # the code that calls the training (edited or not): "the cell", "the call"

    def resume_from(self, snapshot_id: str) -> str:
        """The advice to continue from ``snapshot_id`` (``%%checkpointed --resume-from ID``)."""
        return self.resume_from_form.format(id=snapshot_id)


MAGIC = Spelling(fresh="%%checkpointed --fresh", resume_from_form="%%checkpointed --resume-from {id}",
                 resume_from_option="--resume-from", name_option="--name", where="the cell", cell="the cell")
DECORATOR = Spelling(fresh="@nbguard.checkpointed(..., fresh=True)",
                     resume_from_form="@nbguard.checkpointed(..., resume_from='{id}')",
                     resume_from_option="resume_from", name_option="name=", where="the decorator",
                     cell="the call")
