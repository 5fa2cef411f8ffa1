"""Scalar heads over a Hugging Face causal LM: the preference (reward) model and the PPO value head.

Both read the backbone's last hidden states (the ``base_model`` of an ``AutoModelForCausalLM``, without its LM head)
and map them to one number with a bias-free linear layer. A preference model reads that number at the last real
token of each sequence. A value head reads it at every token.

A trained preference model is saved in Hugging Face's ``ForSequenceClassification`` format (backbone weights plus a
``score`` layer, ``num_labels=1``), so ``AutoModelForSequenceClassification`` and TRL can load it as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from models.loading import ModelConfig, disable_dropout, load_model, resolve_attn_implementation, resolve_dtype


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding. (B, T) -> (B,)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    return (positions * attention_mask.long()).argmax(dim=1)  # (B,)


def scalar_head(hidden_size: int) -> nn.Linear:
    """A bias-free ``hidden -> 1`` layer, initialised with std 1/sqrt(hidden + 1) so initial outputs are O(1)."""
    head = nn.Linear(hidden_size, 1, bias=False)
    nn.init.normal_(head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
    return head


class PreferenceModel(nn.Module):
    """A scalar reward r(x) read at the last real token of ``x`` (Bai et al. 2022, sec. 4; Ziegler et al. 2019).

    Args:
        backbone: The transformer without its LM head (``AutoModelForCausalLM(...).base_model``).
        score: The ``hidden -> 1`` head; a new one is made when None.
    """

    def __init__(self, backbone: nn.Module, score: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.score = score if score is not None else scalar_head(backbone.config.hidden_size)

    @property
    def config(self):
        """The backbone's Hugging Face config."""
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) of a batch (B, T) of tokenized sequences."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        idx = last_token_index(attention_mask)  # (B,)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (B, H)
        return self.score(last.to(self.score.weight.dtype)).squeeze(-1).float()  # (B,)

    @torch.no_grad()
    def score_texts(self, tokenizer, texts: list[str], batch_size: int = 16) -> torch.Tensor:
        """Rewards (N,) of whole texts; a text longer than the model's context keeps its end, where the reward is read.

        Args:
            tokenizer: The preference model's tokenizer.
            texts: Transcripts in the form the model was trained on (``data.preference.transcript``).
            batch_size: Texts per forward pass.
        """
        device = next(self.parameters()).device
        limit = getattr(self.config, "max_position_embeddings", None) or 10**9
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        scores = []
        for s in range(0, len(ids), batch_size):
            rows = [x[-limit:] for x in ids[s : s + batch_size]]
            enc = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt").to(device)
            scores.append(self(enc["input_ids"], enc["attention_mask"]))
        return torch.cat(scores) if scores else torch.zeros(0, device=device)

    @classmethod
    def from_pretrained(cls, cfg: ModelConfig) -> PreferenceModel:
        """Load a saved preference model (``ForSequenceClassification`` format) or start one from a causal LM."""
        config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
        if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
            seq = AutoModelForSequenceClassification.from_pretrained(
                cfg.name_or_path,
                dtype=resolve_dtype(cfg.dtype),
                attn_implementation=resolve_attn_implementation(cfg.attn_implementation),
                trust_remote_code=cfg.trust_remote_code,
                revision=cfg.revision,
            )
            disable_dropout(seq)
            return cls(seq.base_model, seq.score)
        return cls(load_model(cfg).base_model)

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Save in ``ForSequenceClassification`` format. ``state_dict``: a full state dict of this module."""
        state = state_dict if state_dict is not None else self.state_dict()
        config = AutoConfig.for_model(**self.config.to_dict())
        config.num_labels = 1
        config.architectures = None
        seq = AutoModelForSequenceClassification.from_config(config)
        prefix = seq.base_model_prefix
        mapped = {f"{prefix}.{k[len('backbone.') :]}": v for k, v in state.items() if k.startswith("backbone.")}
        mapped["score.weight"] = state["score.weight"]
        seq.load_state_dict(mapped, strict=True)
        seq.save_pretrained(path)
        return Path(path)


class PolicyWithValue(nn.Module):
    """A causal LM policy with a value head on its last hidden states: logits and values from one forward pass.

    Sharing the trunk halves the compute of a separate critic; the value loss then also shapes the policy's
    features, which is why ``vf_coef`` weighs it (Ziegler et al. 2019 use a separate value network; TRL's
    PPOTrainer a separate critic; CleanRL's shared-trunk agent follows Schulman et al. 2017).

    Args:
        lm: The policy (``AutoModelForCausalLM``, or a peft model wrapping one).
        value_head: The ``hidden -> 1`` head; a new one is made when None.
    """

    def __init__(self, lm: nn.Module, value_head: nn.Linear | None = None):
        super().__init__()
        self.lm = lm
        self.value_head = value_head if value_head is not None else scalar_head(lm.config.hidden_size)

    def forward(self, input_ids, attention_mask, position_ids, n_last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, n, V) and values (B, n) of the positions that predict the last ``n_last`` tokens."""
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=n_last + 1,
            output_hidden_states=True,
            use_cache=False,
        )
        hidden = out.hidden_states[-1][:, -n_last - 1 : -1]  # (B, n, H): the states before each scored token
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()  # (B, n)
        return out.logits[:, :-1], values


class ValueModel(nn.Module):
    """A separate critic: a backbone (without LM head) and a per-token value head.

    Args:
        backbone: The transformer without its LM head.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.value_head = scalar_head(backbone.config.hidden_size)

    def forward(self, input_ids, attention_mask, position_ids, n_last: int) -> torch.Tensor:
        """Values (B, n) of the positions that predict the last ``n_last`` tokens."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state[:, -n_last - 1 : -1]  # (B, n, H)
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
