"""Applications built on the fastlrp library, kept apart from its core.

- ``cli``: the ``fastlrp`` console script (``python -m fastlrp.apps.cli``, also under torchrun);
- ``models``: how a command finds and loads the model it explains;
- ``pipelines``: ``fastlrp explain``, ``video``, ``volume`` and ``dataset``;
- ``demo``: the offline demo (a small CNN with shipped weights and synthetic Clever-Hans data);
- ``report``: the single-file HTML report the demo writes;
- ``benchmark``: ``fastlrp bench`` and the harness behind ``bench/``.

Nothing in the core (``fastlrp.engine``, rules, backends, methods, metrics, analysis) imports
from here; the arrows point one way only.
"""
