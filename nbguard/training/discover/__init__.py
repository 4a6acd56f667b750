"""Find the training state a cell uses: state is found, not declared.

``discover(cell, namespace)`` reads a cell's source (never runs it) and the live namespace and
sorts what it finds into training objects (anything with ``state_dict``/``load_state_dict``, plus
``torch.Generator``), plain values the cell assigns or mutates, and names it cannot capture, each
with the reason. Functions the cell calls are followed through their bytecode, so state touched
in a ``train_one_epoch()`` defined in another cell is found too. No IPython import here.

``kinds``: what counts as state; ``uses``, ``cell_scan``, ``bytecode``: which names a cell or a
function uses; ``finder``: following calls and building the ``Discovery``.
"""

from .finder import Discovery, discover, training_objects
from .kinds import classify, why_not_plain

__all__ = ["Discovery", "classify", "discover", "training_objects", "why_not_plain"]
