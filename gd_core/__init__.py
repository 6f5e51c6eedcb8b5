"""guided-dropout's framework-free core (NumPy only).

It owns every policy decision of guided dropout: Fisher accumulation, site aggregation,
score-to-probability mappings, per-unit probabilities, schedules, reference masks, and the
on-disk sensitivity profile. Framework adapters live in :mod:`adapters`.

Example:
    >>> import numpy as np, gd_core
    >>> sites = [gd_core.Site("emb.dropout", ("emb.weight",)), gd_core.Site("ffn.dropout", ("ffn.weight",))]
    >>> acc = gd_core.FisherAccumulator()
    >>> acc.add({"emb.weight": np.array([8.0]), "ffn.weight": np.array([2.0])}, n=2)
    True
    >>> gd_core.SensitivityProfile.from_fisher(acc.mean(), sites).probabilities()
    {'emb.dropout': 0.0, 'ffn.dropout': 0.1}
"""

from ._version import __version__
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    GuidedDropoutError,
    NonFiniteGradientError,
    NoSitesError,
    ProfileError,
    ProfileMismatchError,
    ProfileNotFoundError,
    ResumeMismatchError,
)
from .fingerprint import Fingerprint
from .fisher import FisherAccumulator, FisherResult
from .mappings import MAPPINGS, map_scores, rescale_to_mean, shuffled, unit_probabilities
from .masks import binomial_halfwidth, mean_halfwidth, reference_dropout, reference_mask
from .profile import SensitivityProfile
from .schedules import SCHEDULES, Schedule
from .sites import AGGREGATIONS, Site, SiteList, aggregate, unit_scores

__all__ = [
    "AGGREGATIONS",
    "MAPPINGS",
    "SCHEDULES",
    "ArgumentError",
    "ArgumentTypeError",
    "Fingerprint",
    "FisherAccumulator",
    "FisherResult",
    "GuidedDropoutError",
    "NoSitesError",
    "NonFiniteGradientError",
    "ProfileError",
    "ProfileMismatchError",
    "ResumeMismatchError",
    "ProfileNotFoundError",
    "Schedule",
    "SensitivityProfile",
    "Site",
    "SiteList",
    "__version__",
    "aggregate",
    "binomial_halfwidth",
    "map_scores",
    "mean_halfwidth",
    "reference_dropout",
    "reference_mask",
    "rescale_to_mean",
    "shuffled",
    "unit_probabilities",
    "unit_scores",
]
