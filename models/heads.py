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

from models.loading import ModelConfig, check_model_folder, load_model
from models.logprobs import position_ids_from_mask
from models.padding import pad_rows
from models.prefix_cache import cache_kwarg, output_cache


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

    fsdp_forward_methods = ("forward_pairs",)  # entry points besides forward (see cai.training.shard_fsdp2)

    def __init__(self, backbone: nn.Module, score: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.score = score if score is not None else scalar_head(backbone.config.hidden_size)

    @property
    def config(self):
        """The backbone's Hugging Face config."""
        return self.backbone.config

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rewards (B,) of a batch (B, T) of tokenized sequences.

        ``position_ids`` (B, T): needed when rows are left-padded (``position_ids_from_mask``), so that each row's
        first real token is at position 0 as in training; None: positions 0..T-1 (right padding).
        """
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self._read(hidden, attention_mask)

    def _read(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Rewards (B,): the head on the hidden state (B, T, H) of each row's last real token (mask (B, T))."""
        idx = last_token_index(mask)  # (B,)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (B, H)
        return self.score(last.to(self.score.weight.dtype)).squeeze(-1).float()  # (B,)

    def can_share_prompt(self, width: int) -> bool:
        """Whether ``forward_pairs`` may run prompts once through a KV cache for sequences ``width`` tokens wide.

        The rules of :func:`models.sequence_logprobs.can_share_prompt`, applied to the backbone.
        """
        from models.sequence_logprobs import can_share_prompt

        return can_share_prompt(self.backbone, width)

    def forward_pairs(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        share_prompt: bool = True,
        width: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards (B,), (B,) of the chosen and rejected texts of B pairs, each pair's common prefix computed once.

        The two texts of a pair usually start with the same tokens (the conversation so far). With ``share_prompt``
        that prefix goes through the backbone once, and both continuations attend to its cached keys and values,
        so a pair costs P + 2R token positions instead of 2(P + R). Causal attention makes this exact: a prefix
        position never sees what follows it. Otherwise (or when ``can_share_prompt`` says no) each text is run
        whole, as ``forward`` runs it.

        Args:
            prompt_ids: (B, P) the tokens both texts of pair i start with, left-padded. P may be 0.
            prompt_mask: (B, P) 1 on real prompt tokens.
            response_ids: (2B, R) the rest of each text, right-padded: row 2i continues pair i's chosen text,
                row 2i + 1 its rejected text. Every row has at least one real token (the reward is read there).
            response_mask: (2B, R) 1 on real response tokens.
            share_prompt: Use the KV cache for the prefix when possible.
            width: Length of the longest whole text (``PreferenceCollator`` gives it); None reads it from the masks,
                which costs a device sync when the texts are run whole.
        """
        B, P = prompt_ids.shape
        mask = torch.cat([prompt_mask.repeat_interleave(2, dim=0), response_mask], dim=1)  # (2B, P + R)
        if P > 0 and share_prompt and self.can_share_prompt(mask.shape[1]):
            positions = position_ids_from_mask(mask)  # (2B, P + R): as if each text had no padding
            cache = output_cache(
                self.backbone(
                    input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions[0::2, :P], use_cache=True
                )
            )  # keys and values (B, heads, P, d) of every layer
            cache.batch_repeat_interleave(2)  # (2B, heads, P, d): rows 2i and 2i + 1 share prompt i
            hidden = self.backbone(
                input_ids=response_ids,
                attention_mask=mask,
                position_ids=positions[:, P:],
                use_cache=True,
                **{cache_kwarg(self.backbone): cache},  # `cache` from transformers 5.24 (`past_key_values` goes)
            ).last_hidden_state  # (2B, R, H)
            rewards = self._read(hidden, response_mask)  # (2B,)
        else:
            ids = torch.cat([prompt_ids.repeat_interleave(2, dim=0), response_ids], dim=1)  # (2B, P + R)
            # Whole texts, right-padded: move each row's real tokens to the front (a stable sort keeps their order)
            # and drop the columns no row needs, so no compute goes to padding between the parts.
            order = torch.argsort(1 - mask, dim=1, stable=True)  # (2B, P + R)
            width = width if width is not None else int(mask.sum(1).max())
            ids, mask = ids.gather(1, order)[:, :width], mask.gather(1, order)[:, :width]  # (2B, T)
            hidden = self.backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            rewards = self._read(hidden, mask)  # (2B,)
        rewards = rewards.view(B, 2)  # (B, 2): chosen, rejected
        return rewards[:, 0], rewards[:, 1]

    @torch.no_grad()
    def score_texts(self, tokenizer, texts: list[str], batch_size: int = 16) -> torch.Tensor:
        """Rewards (N,) of whole texts; a text longer than the model's context keeps its end, where the reward is read.

        Args:
            tokenizer: The preference model's tokenizer (texts are right-padded with its pad token whatever its
                ``padding_side``).
            texts: Conversations in the form the model was trained on (``data.formats.PromptFormat.text``).
            batch_size: Texts per forward pass.
        """
        device = next(self.parameters()).device
        limit = getattr(self.config, "max_position_embeddings", None) or 10**9
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        scores = []
        for s in range(0, len(ids), batch_size):
            rows = [x[-limit:] for x in ids[s : s + batch_size]]
            scores.append(self(*pad_rows(rows, tokenizer.pad_token_id, "right", device)))  # positions from 0
        return torch.cat(scores) if scores else torch.zeros(0, device=device)

    @classmethod
    def from_pretrained(cls, cfg: ModelConfig) -> PreferenceModel:
        """Load a saved preference model (``ForSequenceClassification`` format) or start one from a causal LM."""
        check_model_folder(cfg.name_or_path)  # a missing local folder is a one-line error, never a hub look-up
        config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
        if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
            seq = load_model(cfg, auto_class=AutoModelForSequenceClassification)
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
    """A causal LM policy and its value estimate: a value head on the policy's last hidden states, or a critic.

    With a value head, logits and values come from one forward pass. Sharing the trunk halves the compute of a
    separate critic; the value loss then also shapes the policy's features, which is why ``vf_coef`` weighs it
    (Ziegler et al. 2019 use a separate value network; TRL's PPOTrainer a separate critic; CleanRL's shared-trunk
    agent follows Schulman et al. 2017). With a separate ``critic`` (TRL's layout) the policy has no value head at
    all, and its forward pass does not collect hidden states.

    Args:
        lm: The policy (``AutoModelForCausalLM``, or a peft model wrapping one).
        critic: A separate value network (``ValueModel``); None: a new value head on the policy.
    """

    fsdp_forward_methods = ("values",)  # entry points besides forward (see cai.training.shard_fsdp2)

    def __init__(self, lm: nn.Module, critic: nn.Module | None = None):
        super().__init__()
        self.lm = lm
        self.critic = critic
        self.value_head = scalar_head(lm.config.hidden_size) if critic is None else None

    def forward(self, input_ids, attention_mask, position_ids, n_last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, n, V) and values (B, n) of the positions that predict the last ``n_last`` tokens."""
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=n_last + 1,
            output_hidden_states=self.critic is None,
            use_cache=False,
        )
        if self.critic is not None:
            values = self.critic(input_ids, attention_mask, position_ids, n_last)  # (B, n)
        else:
            hidden = out.hidden_states[-1][:, -n_last - 1 : -1]  # (B, n, H): the states before each scored token
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()  # (B, n)
        return out.logits[:, :-1], values

    def values(self, input_ids, attention_mask, position_ids, n_last: int) -> torch.Tensor:
        """Values (B, n) alone: with a critic, the critic's pass only (the policy's logits are not computed)."""
        if self.critic is None:  # the value head reads the policy's trunk: the whole forward pass is needed
            return self(input_ids, attention_mask, position_ids, n_last)[1]
        return self.critic(input_ids, attention_mask, position_ids, n_last)  # (B, n)


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
