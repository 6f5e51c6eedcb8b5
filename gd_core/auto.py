"""The policy of ``apply(model)`` without a profile: use a cached one, or compute one now.

An adapter's ``apply`` given ``profile=None`` calls :func:`cached_or_computed` with the model's
site names, its fingerprint and a ``compute`` callable that it builds from
:class:`AutoSettings`: the adapter only supplies the objective (which head the model has, which
part of it is pretrained) and the framework's Fisher estimation; what text, how many samples,
caching and what the report says are decided here, once for every adapter.

Objective choice (:func:`objective_for`): a masked-LM head -> ``mlm``, a causal-LM head ->
``clm``, anything else (a bare encoder, or the encoder of a task model whose head is new) ->
``contrastive``.

Example:
    >>> objective_for(["BertForMaskedLM"]), objective_for(["LlamaForCausalLM"])
    ('mlm', 'clm')
    >>> objective_for(["BertForSequenceClassification"])
    'contrastive'
    >>> s = AutoSettings()
    >>> s.samples, s.seq_len, s.corpus is None
    (192, 128, True)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import cache as _cache
from .align import align
from .cache import find_cached
from .corpus import Corpus, load_corpus, select
from .errors import ArgumentError, ProfileMismatchError, ProfileNotFoundError
from .fingerprint import Fingerprint
from .profile import SensitivityProfile
from .weights import WeightsId

#: the default sample count: about 27 s for MiniLM-L6 (22M parameters) on two CPU cores
DEFAULT_SAMPLES = 192
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 8
#: the contrastive objective's negatives: at most this many paragraphs
REFERENCE_SAMPLES = 16

_MLM_SUFFIXES = ("ForMaskedLM", "ForPreTraining", "MaskedLM")
_CLM_SUFFIXES = ("ForCausalLM", "LMHeadModel", "CausalLM")


@dataclass(frozen=True)
class AutoSettings:
    """How a profile is computed when ``apply`` finds none.

    ``corpus``: a text file (one paragraph per line) or None for Python's own documentation;
    ``samples``: paragraphs used; ``seq_len`` and ``batch_size`` for tokenising; ``progress``: show
    a progress bar; ``cache``: store the result so the next ``apply`` finds it; ``enabled``:
    False makes ``apply(model)`` raise instead of computing.
    """

    corpus: str | os.PathLike[str] | None = None
    samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    progress: bool = True
    cache: bool = True
    enabled: bool = True

    def with_options(self, **options: Any) -> AutoSettings:
        """A copy with the options that are not None replaced (unknown names are refused).

        Example:
            >>> AutoSettings().with_options(samples=8, corpus=None).samples
            8
        """
        known = set(self.__dataclass_fields__)
        bad = sorted(set(options) - known)
        if bad:
            raise ArgumentError(
                f"auto_profile: expected options among {sorted(known)}, received {bad}; fix: "
                "pass e.g. auto_profile={'samples': 64, 'corpus': 'my_text.txt'}"
            )
        return replace(self, **{k: v for k, v in options.items() if v is not None})

    def texts(self) -> tuple[list[str], Corpus]:
        """The chosen paragraphs and the corpus they come from."""
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ArgumentError(
                f"samples: expected a positive int, received {self.samples!r}; fix: pass e.g. "
                "auto_profile={'samples': 32}"
            )
        corpus = load_corpus(self.corpus)
        return select(corpus.texts, self.samples, self.seed), corpus

    def references(self, corpus: Corpus) -> list[str]:
        """The contrastive objective's negatives: a fixed choice from the same corpus."""
        return select(corpus.texts, min(REFERENCE_SAMPLES, len(corpus.texts)), self.seed + 1)


def as_settings(value: Any) -> AutoSettings:
    """``True``/``None`` -> defaults, ``False`` -> disabled, a dict -> defaults with those options.

    Example:
        >>> as_settings(False).enabled, as_settings({"samples": 4}).samples
        (False, 4)
    """
    if value is None or value is True:
        return AutoSettings()
    if value is False:
        return AutoSettings(enabled=False)
    if isinstance(value, AutoSettings):
        return value
    if isinstance(value, dict):
        return AutoSettings().with_options(**value)
    raise ArgumentError(
        f"auto_profile: expected True, False, a dict of options or an AutoSettings, received "
        f"{type(value).__name__}; fix: pass e.g. auto_profile={{'samples': 64}}"
    )


def objective_for(class_names: Sequence[str]) -> str:
    """``mlm``, ``clm`` or ``contrastive`` from a model's class / architecture names."""
    names = [str(n) for n in class_names]
    if any(n.endswith(_MLM_SUFFIXES) for n in names):
        return "mlm"
    if any(n.endswith(_CLM_SUFFIXES) for n in names):
        return "clm"
    return "contrastive"


def better_profile_hint(model_name: str | None) -> str:
    """How to make a better profile than the automatic one (the command, then the Python call).

    Example:
        >>> "gd profile --model my-model" in better_profile_hint("my-model")
        True
    """
    name = model_name or "MODEL_FOLDER"
    return (
        f"for a better profile, run `gd profile --model {name} --corpus YOUR_TEXT.txt "
        "--samples 2000 --out model.profile.npz` on text like the model's pretraining data and "
        "pass profile='model.profile.npz'"
    )


@dataclass(frozen=True)
class Computed:
    """A profile computed by an adapter, with what the report should say about it."""

    profile: SensitivityProfile
    objective: str
    target: str  # the part of the model that was profiled, e.g. "BertModel (model.bert)"
    model_name: str | None = None


def computed_note(c: Computed, settings: AutoSettings, seconds: float, cached: Path | None) -> str:
    """The report note of a profile computed by ``apply``.

    Example:
        >>> from gd_core import Site, SensitivityProfile
        >>> import numpy as np
        >>> p = SensitivityProfile.from_fisher({"w": np.ones(2)}, [Site("d", ("w",))])
        >>> p.metadata["samples"] = 32
        >>> note = computed_note(Computed(p, "mlm", "BertForMaskedLM"), AutoSettings(), 12.3, None)
        >>> note.split(";")[0]
        'profile computed by apply(): mlm objective on BertForMaskedLM, 32 paragraphs of python-docs (128 tokens) in 12 s'
    """
    source = "python-docs" if settings.corpus is None else str(settings.corpus)
    n = c.profile.metadata.get("samples", settings.samples)
    where = f"cached in {cached}" if cached is not None else "not cached"
    return (
        f"profile computed by apply(): {c.objective} objective on {c.target}, {n} paragraphs of "
        f"{source} ({settings.seq_len} tokens) in {seconds:.0f} s; {where}; "
        + better_profile_hint(c.model_name)
    )


#: ``weights(labels)``: the model's :class:`WeightsId` over the tensors a profile names
WeightsFn = Callable[[Sequence[str]], WeightsId]


def _labels(profile: SensitivityProfile) -> list[str]:
    """The parameters a profile was computed on (its fingerprint's names): the digest covers
    these, so weights the profile does not depend on (a task head drawn at every load) do not."""
    return [n for n, _ in profile.fingerprint.params] if profile.fingerprint is not None else []


def _scan_cached(
    names: Sequence[str], fingerprint: Fingerprint, weights: WeightsFn
) -> tuple[SensitivityProfile | None, tuple[SensitivityProfile, WeightsId] | None]:
    """(a cached profile compatible with the model and computed on its weights, or one the user
    cached deliberately that records no weights; a compatible one from other weights, with the
    model's weights id over that profile's tensors)."""
    folder = _cache.cache_dir()
    unverified: SensitivityProfile | None = None
    other: tuple[SensitivityProfile, WeightsId] | None = None
    for path in sorted(folder.glob("*.profile.npz")) if folder.is_dir() else []:
        try:
            raw = SensitivityProfile.load(path)
            prof = align(raw, names, fingerprint, strict=True)
        except Exception:  # noqa: BLE001 - an incompatible or unreadable cache entry is skipped
            continue
        recorded = WeightsId.of_metadata(raw.metadata)
        if recorded is None and not raw.metadata.get("auto_profile"):
            unverified = unverified or prof  # stored by profile(..., cache=True): the user's
            continue
        mine = weights(_labels(raw))
        if recorded is not None and recorded.digest == mine.digest:
            return prof, None
        other = other or (prof, mine)  # another checkpoint's (or an older automatic one)
    return unverified, other


def _why_not(other: SensitivityProfile, weights: WeightsId) -> str:
    recorded = WeightsId.of_metadata(other.metadata)
    was = (
        recorded.describe()
        if recorded is not None
        else "a checkpoint it does not record (an automatic profile of an older version)"
    )
    return (
        f"the cached profile of this architecture came from {was}, not from this model's "
        f"{weights.describe()}"
    )


def lookup(
    compute: Callable[[AutoSettings], Computed] | None,
    settings: Any,
    notes: list[str],
    weights: WeightsFn | None = None,
) -> Callable[[Sequence[str], Fingerprint], SensitivityProfile | None]:
    """The profile lookup of an adapter's ``apply(model)`` (``make_plan(..., lookup=)``): a cached
    compatible profile, else one computed now with ``compute`` (and cached), else None (no
    objective known for this model, e.g. an ONNX graph, or ``settings.enabled`` False: the caller
    raises ProfileNotFoundError naming ``gd profile``). ``settings`` is what ``apply`` was given
    as ``auto_profile`` (see :func:`as_settings`). What happened is appended to ``notes``.

    ``weights(labels)`` (the adapter's): the model's :class:`~gd_core.weights.WeightsId` over the
    tensors a profile names (its fingerprint). With it, a cached profile is used only if it was
    computed on these weights (a profile computed here
    records them and is cached under them); one from another checkpoint of the same architecture
    is not used: a profile is computed now, with a note saying why (or, when none can be
    computed, :class:`ProfileMismatchError` says why). A profile the user cached with
    ``profile(..., cache=True)`` records no weights: it is used, with a note that says so.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from gd_core import Site, SensitivityProfile, Fingerprint
        >>> os.environ["GD_CACHE_DIR"] = tempfile.mkdtemp()  # a fresh cache
        >>> fp = Fingerprint.from_shapes({"w": (2,)})
        >>> def compute(s):
        ...     p = SensitivityProfile.from_fisher({"w": np.ones(2)}, [Site("d", ("w",))],
        ...                                        fingerprint=fp)
        ...     return Computed(p, "mlm", "Net")
        >>> notes = []
        >>> prof = lookup(compute, AutoSettings(progress=False), notes)(["d"], fp)
        >>> notes[0].startswith("profile computed by apply(): mlm objective on Net")
        True
        >>> again = []
        >>> lookup(None, AutoSettings(), again)(["d"], fp) is not None, again
        (True, ['profile from the cache (computed by apply() earlier: mlm on Net, 192 paragraphs of python-docs)'])
        >>> lookup(None, AutoSettings(), [])(["other"], Fingerprint.from_shapes({"v": (3,)})) is None
        True
        >>> del os.environ["GD_CACHE_DIR"]
    """
    settings = as_settings(settings)

    def find(names: Sequence[str], fingerprint: Fingerprint) -> SensitivityProfile | None:
        other = None
        if weights is None:
            cached = find_cached(names, fingerprint)
        else:
            cached, other = _scan_cached(names, fingerprint, weights)
        if cached is not None:
            how = cached.metadata.get("auto_profile")
            note = (
                f"profile from the cache (computed by apply() earlier: {how})"
                if how
                else "profile from the cache (computed earlier)"
            )
            recorded = WeightsId.of_metadata(cached.metadata)
            if weights is not None and recorded is not None:
                note = note[:-1] + f" on {recorded.describe()})"
            elif weights is not None:
                note += (
                    f"; it records no weights digest (cached by profile(..., cache=True) from "
                    f"{cached.metadata.get('model') or 'an unnamed model'}), so it cannot be "
                    "checked against this model's weights; pass profile= to be sure"
                )
            notes.append(note)
            return cached
        if compute is None or not settings.enabled:
            if other is not None:
                raise ProfileMismatchError(
                    f"profile: expected a cached profile computed on this model's weights, "
                    f"received none: {_why_not(*other)}; fix: pass profile= (computed on "
                    "this checkpoint with `gd profile` or adapters.<framework>.profile)"
                    + ("" if settings.enabled else ", or allow auto_profile")
                )
            return None
        start = time.perf_counter()
        c = compute(settings)
        seconds = time.perf_counter() - start
        source = "python-docs" if settings.corpus is None else str(settings.corpus)
        meta = dict(c.profile.metadata)
        meta["auto_profile"] = (
            f"{c.objective} on {c.target}, {meta.get('samples', settings.samples)} paragraphs of "
            f"{source}"
        )
        if weights is not None:
            meta.update(weights(_labels(c.profile)).metadata())
        c = replace(c, profile=replace(c.profile, metadata=meta))
        path = _cache.store(c.profile) if settings.cache else None
        if other is not None:
            notes.append(f"not using the cached profile: {_why_not(*other)}")
        notes.append(computed_note(c, settings, seconds, path))
        return c.profile

    return find


def cached_or_computed(
    model_sites: Sequence[str],
    model_fingerprint: Fingerprint,
    compute: Callable[[AutoSettings], Computed] | None,
    settings: AutoSettings,
    not_found: Callable[[], ProfileNotFoundError],
) -> tuple[SensitivityProfile, list[str]]:
    """:func:`lookup` for adapters that do not plan with :func:`gd_core.plan.make_plan`: returns
    ``(profile, notes)`` and raises ``not_found()`` when there is no profile.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from gd_core import Fingerprint
        >>> os.environ["GD_CACHE_DIR"] = tempfile.mkdtemp()
        >>> fp = Fingerprint.from_shapes({"w": (2,)})
        >>> cached_or_computed(["d"], fp, None, AutoSettings(), lambda: ProfileNotFoundError("x"))
        Traceback (most recent call last):
        ...
        gd_core.errors.ProfileNotFoundError: x
        >>> del os.environ["GD_CACHE_DIR"]
    """
    notes: list[str] = []
    prof = lookup(compute, settings, notes)(model_sites, model_fingerprint)
    if prof is None:
        raise not_found()
    return prof, notes
