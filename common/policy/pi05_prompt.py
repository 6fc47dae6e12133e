"""pi0.5's prompt from a local PaliGemma (Gemma) tokenizer folder.

With the state (openpi's pi0.5 format):  "Task: {text}, State: {b_1} ... {b_S};\nAction: "
where b_i in 0..bins-1 is the normalised state (clamped to [-1, 1], zero-padded to max_state_dim)
discretised into ``bins`` equal bins, exactly as openpi's ``np.digitize(s, linspace(-1, 1, bins+1)[:-1]) - 1``.
Without the state (openpi's pi0 format):  "{text}" followed by a separately tokenised "\n".

``tokenize`` (on strings, once per instruction) gives the part before the numbers, padded to
``token_len``; ``state_tokens`` (on tensors, every forward) gives the numbers and the tail from a
per-bin token table, so no Python string work happens per step. Each bin's " {b}" is tokenised on
its own: Gemma's tokenizer splits digits into single tokens, so this equals tokenising the whole
string. Padding (id 0) may therefore sit between instruction and state: padded tokens are masked
out and skipped by the position ids, so that is equivalent to padding at the end.
"""
from __future__ import annotations

import torch
from torch import nn

PAD_ID = 0  # Gemma's pad id, and the interface's padding id


def clean(text: str) -> str:
    return text.strip().replace("_", " ").replace("\n", " ")


class Pi05Prompt(nn.Module):
    def __init__(self, tokenizer_path: str, token_len: int, use_state: bool, max_state_dim: int, bins: int):
        super().__init__()
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_path)
        if self.tok.pad_token_id not in (None, PAD_ID):
            raise ValueError(f"tokenizer pad id is {self.tok.pad_token_id}; pi0.5 (Gemma) uses {PAD_ID}")
        if self.tok.bos_token_id is None:
            raise ValueError(f"tokenizer at {tokenizer_path} has no BOS token")
        self.token_len, self.use_state, self.max_state_dim, self.bins = token_len, use_state, max_state_dim, bins
        per_bin = [self._encode(f" {b}") for b in range(bins)]
        width = max(len(ids) for ids in per_bin)
        table = torch.full((bins, width), PAD_ID, dtype=torch.long)
        for b, ids in enumerate(per_bin):
            table[b, : len(ids)] = torch.tensor(ids)
        # Derived from the tokenizer, so not part of the weights.
        self.register_buffer("bin_tokens", table, persistent=False)
        self.register_buffer("tail_tokens", torch.tensor(self._encode(";\nAction: "), dtype=torch.long),
                             persistent=False)
        self.register_buffer("edges", torch.linspace(-1.0, 1.0, bins + 1)[:-1], persistent=False)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def length(self) -> int:
        """Total prompt length: instruction part + state part."""
        if not self.use_state:
            return self.token_len
        return self.token_len + self.max_state_dim * self.bin_tokens.shape[1] + len(self.tail_tokens)

    def tokenize(self, instructions: list[str]) -> torch.Tensor:
        if isinstance(instructions, str):
            instructions = [instructions]
        out = torch.full((len(instructions), self.token_len), PAD_ID, dtype=torch.long)
        for i, text in enumerate(instructions):
            if self.use_state:
                ids = [self.tok.bos_token_id] + self._encode(f"Task: {clean(text)}, State:")
            else:
                ids = [self.tok.bos_token_id] + self._encode(clean(text)) + self._encode("\n")
            ids = ids[: self.token_len]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def discretize(self, state: torch.Tensor) -> torch.Tensor:
        """Normalised state [B, S<=max_state_dim] -> bin indices [B, max_state_dim] (padded dims: 0.0)."""
        if state.shape[-1] > self.max_state_dim:
            raise ValueError(f"state has {state.shape[-1]} dims > max_state_dim {self.max_state_dim}")
        state = torch.nn.functional.pad(state.float(), (0, self.max_state_dim - state.shape[-1]))
        idx = torch.bucketize(state.clamp(-1.0, 1.0), self.edges, right=True) - 1
        return idx.clamp(0, self.bins - 1)

    def full_tokens(self, tokens: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Instruction tokens [B, L] + normalised state [B, S] -> the whole prompt [B, length]."""
        if not self.use_state:
            return tokens
        B = tokens.shape[0]
        numbers = self.bin_tokens[self.discretize(state)].reshape(B, -1)
        return torch.cat([tokens, numbers, self.tail_tokens.expand(B, -1)], dim=1)
