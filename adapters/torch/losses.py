"""Per-sample pretraining losses for Fisher estimation: masked LM, causal LM, contrastive.

Each is a callable ``(model, batch) -> per-sample losses`` for
:func:`adapters.torch.estimate_fisher` (``loss="mlm"``, ``"clm"``, ``"contrastive"``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CausalLMLoss", "ContrastiveLoss", "MaskedLMLoss"]

# --------------------------------------------------------------------------------------------
# built-in per-sample losses
# --------------------------------------------------------------------------------------------


def _config_ids(model: nn.Module, names: Iterable[str]) -> set[int]:
    cfg = getattr(model, "config", None)
    out: set[int] = set()
    for nm in names:
        v = getattr(cfg, nm, None) if cfg is not None else None
        if isinstance(v, int):
            out.add(v)
        elif isinstance(v, (list, tuple)):
            out.update(x for x in v if isinstance(x, int))
    return out


def _special_mask(
    model: nn.Module, batch: Mapping[str, Any], ids: torch.Tensor, extra: Iterable[int] | None
) -> torch.Tensor:
    special = torch.zeros_like(ids, dtype=torch.bool)
    stm = batch.get("special_tokens_mask")
    if isinstance(stm, torch.Tensor):
        special |= stm.to(ids.device).bool()
    known = _config_ids(
        model,
        (
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
            "sep_token_id",
            "cls_token_id",
            "mask_token_id",
        ),
    )
    known.update(extra or ())
    if known:
        special |= torch.isin(ids, torch.tensor(sorted(known), device=ids.device))
    return special


def _model_kwargs(batch: Mapping[str, Any], drop: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k not in drop}


def _sample_generator(seed: int, *rows: torch.Tensor) -> torch.Generator:
    """A generator seeded by ``seed`` and the content of one sample (its token ids, its
    attention row): the same sample gets the same draws in any batch, chunk, order or process."""
    h = hashlib.sha256(int(seed).to_bytes(8, "little", signed=True))
    for row in rows:
        h.update(row.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(h.digest()[:8], "little") % (1 << 63))


def _require_batch(batch: Any, who: str) -> Mapping[str, Any]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(f"{who} expects a dict-like batch with 'input_ids' (and 'attention_mask')")
    return batch


class MaskedLMLoss:
    """Per-sample masked-language-model loss (BERT-style 15% masking, 80/10/10 replacement).

    ``batch`` is a dict with ``input_ids`` (n, T), optionally ``attention_mask``,
    ``token_type_ids`` (passed to the model) and ``special_tokens_mask`` (tokens never masked).
    Padding (``attention_mask == 0``) and special tokens (``special_tokens_mask``, the config's
    pad/bos/eos/sep/cls/mask ids and ``special_token_ids``) are never masked. Each call draws the
    mask of each sample from a ``torch.Generator`` seeded by ``seed`` and the sample's content
    (token ids and attention row), so a sample is masked the same way whatever batch, chunk,
    order, resumed run or process it comes in (two processes give the one-process Fisher).
    A sample with no masked position gets one forced masked token. Returns, per sample, the mean
    cross-entropy over its masked positions. Needs a model with an MLM head (``*ForMaskedLM``)
    whose output has ``logits``.

    Args:
        mask_prob: probability of masking each eligible token.
        seed: base seed.
        mask_token_id: id of the mask token (default: ``model.config.mask_token_id``; BERT
            configs lack it, so pass ``tokenizer.mask_token_id``).
        vocab_size: size of the vocabulary for random replacements (default: config's).
        special_token_ids: extra ids that must never be masked (e.g. ``tokenizer.all_special_ids``).

    Example:
        >>> import torch, transformers
        >>> cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=20, vocab_size=50)
        >>> model = transformers.BertForMaskedLM(cfg).eval()
        >>> loss = MaskedLMLoss(mask_token_id=3)
        >>> loss(model, {"input_ids": torch.randint(5, 50, (2, 8))}).shape
        torch.Size([2])
    """

    def __init__(
        self,
        mask_prob: float = 0.15,
        seed: int = 0,
        mask_token_id: int | None = None,
        vocab_size: int | None = None,
        special_token_ids: Iterable[int] | None = None,
    ) -> None:
        if not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
        self.mask_prob = float(mask_prob)
        self.seed = int(seed)
        self.mask_token_id = mask_token_id
        self.vocab_size = vocab_size
        self.special_token_ids = list(special_token_ids or ())
        self.counter = 0

    def reset(self) -> None:
        """Rewind the call counter (``counter`` counts calls; masks do not depend on it)."""
        self.counter = 0

    def mask(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (corrupted input_ids, bool mask of the positions to predict): a function of
        ``seed`` and each sample's content only."""
        ids = batch["input_ids"]
        n, t = ids.shape
        cfg = getattr(model, "config", None)
        mask_id = self.mask_token_id
        if mask_id is None:
            mask_id = getattr(cfg, "mask_token_id", None)
        if mask_id is None:
            raise ValueError(
                "MaskedLMLoss needs the mask token id: pass MaskedLMLoss(mask_token_id="
                "tokenizer.mask_token_id) (the model config does not define one)"
            )
        vocab = self.vocab_size or getattr(cfg, "vocab_size", None)
        if vocab is None:
            raise ValueError("MaskedLMLoss needs vocab_size (not found in the model config)")
        self.counter += 1
        att = batch.get("attention_mask")
        attended = torch.ones(n, t, dtype=torch.bool) if att is None else att.bool().cpu()
        special = _special_mask(model, batch, ids, self.special_token_ids).cpu()
        eligible = attended & ~special
        none_eligible = ~eligible.any(1)
        eligible[none_eligible] = attended[none_eligible]
        if not eligible.any(1).all():
            raise ValueError("MaskedLMLoss: a sample has no attended token to mask")
        cpu_ids = ids.cpu()
        u = torch.empty(n, t)
        v = torch.empty(n, t)
        rand_ids = torch.empty(n, t, dtype=torch.long)
        for i in range(n):  # per sample: the mask is a function of (seed, the sample's content)
            gen = _sample_generator(self.seed, cpu_ids[i], attended[i])
            u[i] = torch.rand(t, generator=gen)
            v[i] = torch.rand(t, generator=gen)
            rand_ids[i] = torch.randint(0, int(vocab), (t,), generator=gen)
        chosen = eligible & (u < self.mask_prob)
        # force one masked token where none was drawn: the eligible position with the largest u
        empty = ~chosen.any(1)
        if empty.any():
            pick = torch.where(eligible, u, torch.full_like(u, -1.0)).argmax(1)
            chosen[empty, pick[empty]] = True
        corrupted = torch.where(chosen & (v < 0.8), torch.full_like(cpu_ids, int(mask_id)), cpu_ids)
        corrupted = torch.where(chosen & (v >= 0.8) & (v < 0.9), rand_ids, corrupted)
        return corrupted.to(ids.device), chosen.to(ids.device)

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        batch = _require_batch(batch, "MaskedLMLoss")
        get_out = getattr(model, "get_output_embeddings", None)
        if callable(get_out) and get_out() is None:
            raise TypeError(
                f"MaskedLMLoss needs a model with a masked-LM head (e.g. "
                f"AutoModelForMaskedLM / BertForMaskedLM); {type(model).__name__} is a bare "
                f"encoder. Load the checkpoint with a MLM head, or use ContrastiveLoss for "
                f"sentence encoders"
            )
        ids = batch["input_ids"]
        corrupted, chosen = self.mask(model, batch)
        kwargs = _model_kwargs(batch, ("special_tokens_mask", "labels"))
        kwargs["input_ids"] = corrupted
        out = model(**kwargs)
        logits = getattr(out, "logits", None)
        if logits is None:
            raise TypeError(
                f"MaskedLMLoss: {type(model).__name__} returned no `logits`; it needs a model "
                f"with a masked-LM head (or use ContrastiveLoss for sentence encoders)"
            )
        n = ids.shape[0]
        rows = chosen.nonzero(as_tuple=True)[0]
        ce = F.cross_entropy(logits[chosen], ids[chosen], reduction="none")
        total = torch.zeros(n, dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)
        return total / chosen.sum(1).to(ce.dtype)


class CausalLMLoss:
    """Per-sample mean next-token cross-entropy for ``*ForCausalLM`` / GPT-2 LM-head models.

    ``batch`` is a dict with ``input_ids`` (n, T) and optionally ``attention_mask`` (targets at
    padding positions are ignored) and ``labels`` (-100 = ignore; defaults to ``input_ids``).
    Position ``t`` predicts token ``t + 1``. A sample without any target gets loss 0.

    Example:
        >>> import torch, transformers
        >>> cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)
        >>> model = transformers.GPT2LMHeadModel(cfg).eval()
        >>> CausalLMLoss()(model, {"input_ids": torch.randint(0, 50, (2, 6))}).shape
        torch.Size([2])
    """

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        batch = _require_batch(batch, "CausalLMLoss")
        ids = batch["input_ids"]
        labels = batch.get("labels", ids)
        out = model(**_model_kwargs(batch, ("labels", "special_tokens_mask")))
        logits = getattr(out, "logits", None)
        if logits is None:
            raise TypeError(
                f"CausalLMLoss: {type(model).__name__} returned no `logits`; use a model with a "
                f"language-model head (AutoModelForCausalLM)"
            )
        target = labels[:, 1:]
        valid = target != -100
        att = batch.get("attention_mask")
        if att is not None:
            valid = valid & att[:, 1:].bool()
        rows = valid.nonzero(as_tuple=True)[0]
        ce = F.cross_entropy(logits[:, :-1][valid], target[valid], reduction="none")
        n = ids.shape[0]
        total = torch.zeros(n, dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)
        return total / valid.sum(1).clamp_min(1).to(ce.dtype)


def _hidden(model: nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    out = model(**kwargs)
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        out = model(**kwargs, output_hidden_states=True)
        hs = getattr(out, "hidden_states", None)
        if not hs:
            raise TypeError(
                f"ContrastiveLoss: {type(model).__name__} returned neither last_hidden_state "
                f"nor hidden_states"
            )
        h = hs[-1]
    return h


def _mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class ContrastiveLoss:
    """Per-sample contrastive loss for sentence encoders, separable across samples.

    SimCSE-style in-batch negatives couple the samples of a batch, so the per-sample gradients
    of such a loss would not be those of independent samples. This loss is designed so that each
    sample's loss depends on the trainable parameters only through that sample's own forward
    pass:

    * **anchor** ``z_i``: embedding (mean of ``last_hidden_state`` over the attention mask,
      L2-normalised) of a *token-dropout view* of sample ``i``: each non-special, non-padding
      token is hidden from attention and pooling with probability ``drop_prob`` (at least one
      token stays), drawn from a generator seeded by ``seed`` and the sample's content (its ids
      and attention row), so a sample gets the same view in any batch, chunk, order or process.
      Computed with gradient.
    * **positive** ``p_i``: embedding of the full sample ``i``, computed under ``no_grad``
      (a stop-gradient target).
    * **negatives**: a FIXED bank of reference embeddings computed once under ``no_grad``: from
      ``references`` (a dict batch) if given, else from the full-sample embeddings of the first
      batch seen. Bank entries that coincide with the sample's own positive (cosine > 1 - 1e-4,
      the sample itself or an exact duplicate) are excluded from its negatives.

    ``loss_i = -log( exp(z_i.p_i / T) / (exp(z_i.p_i / T) + sum_k exp(z_i.b_k / T)) )``.

    The bank is tied to the model it was built with; call ``reset()`` after changing the model.
    Each call costs one forward pass with gradient and one without (plus the bank, once).

    Example:
        >>> import torch, transformers
        >>> cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=20, vocab_size=50)
        >>> model = transformers.BertModel(cfg).eval()
        >>> loss = ContrastiveLoss()
        >>> loss(model, {"input_ids": torch.randint(5, 50, (3, 8))}).shape
        torch.Size([3])
    """

    def __init__(
        self,
        temperature: float = 0.05,
        *,
        drop_prob: float = 0.1,
        seed: int = 0,
        references: Mapping[str, torch.Tensor] | None = None,
        special_token_ids: Iterable[int] | None = None,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.temperature = float(temperature)
        self.drop_prob = float(drop_prob)
        self.seed = int(seed)
        self.references = references
        self.special_token_ids = list(special_token_ids or ())
        self.counter = 0
        self.bank: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the reference bank and rewind the call counter (views do not depend on it)."""
        self.counter = 0
        self.bank = None

    def embed(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """L2-normalised mean-pooled embeddings of ``batch`` (with grad if enabled)."""
        ids = batch["input_ids"]
        att = batch.get("attention_mask")
        if att is None:
            att = torch.ones_like(ids)
        kwargs = _model_kwargs(batch, ("special_tokens_mask", "labels"))
        kwargs["attention_mask"] = att
        return F.normalize(_mean_pool(_hidden(model, kwargs), att), dim=-1)

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        batch = _require_batch(batch, "ContrastiveLoss")
        ids = batch["input_ids"]
        n, t = ids.shape
        att = batch.get("attention_mask")
        if att is None:
            att = torch.ones_like(ids)
        self.counter += 1
        with torch.no_grad():
            pos = self.embed(model, batch)
            if self.bank is None:
                ref = self.references
                self.bank = pos.clone() if ref is None else self.embed(model, ref)
        bank = self.bank.to(device=pos.device, dtype=pos.dtype)
        # token-dropout view
        attended = att.bool().cpu()
        special = _special_mask(model, batch, ids, self.special_token_ids).cpu()
        u = torch.stack(  # per sample, from (seed, its content): any batch, chunk or process
            [
                torch.rand(t, generator=_sample_generator(self.seed, ids[i], att[i]))
                for i in range(n)
            ]
        )
        drop = attended & ~special & (u < self.drop_prob)
        keep = attended & ~drop
        lost = ~keep.any(1)  # never drop every token of a sample
        keep[lost] = attended[lost]
        view = dict(batch)
        view["attention_mask"] = keep.to(att.device, att.dtype)
        z = self.embed(model, view)
        s_pos = (z * pos).sum(-1, keepdim=True)
        s_neg = z @ bank.T
        same = (pos @ bank.T) > 1.0 - 1e-4
        s_neg = s_neg.masked_fill(same, float("-inf"))
        logits = torch.cat([s_pos, s_neg], dim=1) / self.temperature
        return -torch.log_softmax(logits, dim=1)[:, 0]
