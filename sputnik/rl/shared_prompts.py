"""The RL update's forward with each prompt computed once for all the completions sampled from it.

A GRPO group is one prompt and G completions. The plain forward runs G sequences [prompt; c_i], so
every prompt token goes through every layer (and back) G times. Here the prompts run once, as their
own rows, and each completion row attends to its prompt's keys and values plus its own (causal):

    prompt row  p:  o_t = attn(q_t, K_p[0..t], V_p[0..t])                      (causal)
    completion  i:  o_j = attn(q_j, [K_p[0..|p|); K_i[0..j]], [V_p; V_i])       (positions |p| + j)

which is the same attention the plain forward computes for [prompt; c_i], over the same keys, in a
different order of summation; everything else in a block is per token. The gradient reaching a
prompt token is the sum over its completions, as autograd gives it for the plain forward. Expert
load is counted once per prompt token (it is computed once).

All M = P·T + N tokens (prompt rows right-padded to T, then the N completion tokens packed without
padding) go through the model as one row with their true positions; only attention sees the two parts
apart, through the model's attention hook (MLA's or LlamaAttention's `attend`), the completions padded
to [C, L].

Shape legend: P prompts, T prompt length (padded), C completion rows, L longest completion, N packed
completion tokens, M = P·T + N, D hidden, H heads, K = qk head dim, V = v head dim.
"""
from __future__ import annotations

import torch

from sputnik.model.layers import attention_sdpa


class CompletionPack:
    """Completion tokens packed without padding: token n is position pos_N[n] of completion row
    row_N[n]; row c continues prompt group_C[c]. `pad` scatters packed [N, ...] into [C, L, ...]
    (zeros elsewhere) and `unpad` gathers back, both differentiable."""

    def __init__(self, row_N: torch.Tensor, pos_N: torch.Tensor, group_C: torch.Tensor, length: int):
        self.row_N, self.pos_N, self.group_C = row_N, pos_N, group_C
        self.rows, self.length = int(group_C.shape[0]), max(int(length), 1)  # >= 1 column: SDPA wants queries
        self.flat_N = row_N * self.length + pos_N

    def pad(self, x_N: torch.Tensor) -> torch.Tensor:
        out = x_N.new_zeros((self.rows * self.length,) + tuple(x_N.shape[1:]))
        return out.index_copy(0, self.flat_N, x_N).view((self.rows, self.length) + tuple(x_N.shape[1:]))

    def unpad(self, x_CL: torch.Tensor) -> torch.Tensor:
        return x_CL.reshape((self.rows * self.length,) + tuple(x_CL.shape[2:])).index_select(0, self.flat_N)


def prefixed_attention(prompt_lens_P: torch.Tensor, prompt_len: int, pack: CompletionPack):
    """The attention hook for one packed row (MLA.forward's or LlamaAttention.forward's `attend`):
    prompt rows attend causally to themselves, each completion to its prompt's real tokens and
    causally to itself. Keys/values may have fewer heads than the queries (GQA); the scale is the
    module's own (MLA's, with YaRN's mscale) or SDPA's 1/√K."""
    def attend(attn, q_1HMK, k_1GMK, v_1GMV):
        P, T, C, L = prompt_lens_P.shape[0], prompt_len, pack.rows, pack.length
        H, V = q_1HMK.shape[1], v_1GMV.shape[-1]
        split = lambda t: (t[0, :, : P * T].unflatten(1, (P, T)).transpose(0, 1),  # noqa: E731
                           pack.pad(t[0, :, P * T:].transpose(0, 1)).transpose(1, 2))  # [P, H, T, ·], [C, H, L, ·]
        (q_p, q_c), (k_p, k_c), (v_p, v_c) = split(q_1HMK), split(k_1GMK), split(v_1GMV)
        o_p = attention_sdpa(attn, q_p, k_p, v_p, is_causal=True)
        k_all = torch.cat([k_p.index_select(0, pack.group_C), k_c], dim=2)  # [C, H, T + L, K]
        v_all = torch.cat([v_p.index_select(0, pack.group_C), v_c], dim=2)
        dev = q_1HMK.device
        seen_CT = torch.arange(T, device=dev)[None, :] < prompt_lens_P.index_select(0, pack.group_C)[:, None]
        causal_LL = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
        mask_C1LS = torch.cat([seen_CT[:, None, None, :].expand(C, 1, L, T), causal_LL.expand(C, 1, L, L)], dim=-1)
        o_c = attention_sdpa(attn, q_c, k_all, v_all, mask=mask_C1LS)
        o_MHV = torch.cat([o_p.transpose(1, 2).reshape(P * T, H, V), pack.unpad(o_c.transpose(1, 2))])
        return o_MHV.transpose(0, 1)[None]  # [1, H, M, V]
    return attend


def hidden_states_prefixed(model, prompt_ids_PT, prompt_lens_P, comp_ids_N, pack: CompletionPack):
    """Transformer.hidden_states of the sequences [prompt_{group_C[c]}; completion c] as (h of the
    prompt rows [P, T, D], h of the packed completion tokens [N, D], expert load), after the final
    norm. Prompt rows are right-padded past prompt_lens_P (those keys are masked from completions and
    are not expert load; causal within the prompt row, nothing real attends to them)."""
    P, T = prompt_ids_PT.shape
    dev = prompt_ids_PT.device
    pos_N = prompt_lens_P.index_select(0, pack.group_C.index_select(0, pack.row_N)) + pack.pos_N
    pos_1M = torch.cat([torch.arange(T, device=dev).repeat(P), pos_N])[None]
    ids_1M = torch.cat([prompt_ids_PT.reshape(-1), comp_ids_N])[None]
    valid_1M = torch.cat([(torch.arange(T, device=dev)[None, :] < prompt_lens_P[:, None]).flatten(),
                          torch.ones_like(comp_ids_N, dtype=torch.bool)])[None]
    extra = {}
    if getattr(getattr(model, "config", None), "abacus_max_index", 0):  # each completion continues its prompt's run
        table = model.model.abacus_embed
        index_PT = table.indices(prompt_ids_PT)
        last_C = index_PT[pack.group_C, prompt_lens_P.index_select(0, pack.group_C) - 1]
        index_CL = table.indices(pack.pad(comp_ids_N), previous_B=last_C)
        extra["abacus_index"] = torch.cat([index_PT.reshape(-1), pack.unpad(index_CL)])[None]
    out = model.hidden_states(ids_1M, valid_1M, positions=pos_1M, attend=prefixed_attention(prompt_lens_P, T, pack),
                              **extra)
    h_MD = out.hidden[0]
    return h_MD[: P * T].view(P, T, -1), h_MD[P * T:], out.expert_load


def supports_shared_prompts(model) -> bool:
    """Our DeepSeek-V3 Transformer (MLA blocks) and the dense families (GQA blocks) without a sliding
    window (a completion's window would reach into the shared prompt differently per position);
    transformers models take the plain path."""
    from sputnik.model.llama import LlamaModel
    from sputnik.model.transformer import Transformer

    return isinstance(model, Transformer) or (isinstance(model, LlamaModel) and not model.config.sliding_window)
