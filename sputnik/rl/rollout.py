"""Rollout batches for RL and on-policy distillation: prompt + sampled completion -> padded
training tensors, the update's micro-batches, and the policy's per-token log-probs on the
completion tokens (plain, or with each prompt computed once: shared_prompts.py).

Shape legend: B sequences (prompts x samples), T padded length, N completion tokens in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sputnik.train.losses import token_logprobs


@dataclass
class RolloutBatch:
    input_ids_BT: torch.Tensor  # prompt + completion, right-padded
    targets_BT: torch.Tensor  # next token at completion positions, -100 elsewhere
    completion_mask_BT: torch.Tensor  # float 1.0 where targets_BT is a completion token
    sampler_logp_BT: torch.Tensor  # the engine's log-probs at those positions (0 elsewhere)
    # the experts the sampler routed each input position to, [B, T, L, K] int16 (−1: padding), when
    # the rollouts recorded them (routing replay, model/routing_replay.py)
    routing_BTLK: torch.Tensor | None = None

    def _map(self, fn) -> "RolloutBatch":
        return RolloutBatch(*(None if t is None else fn(t) for t in (
            self.input_ids_BT, self.targets_BT, self.completion_mask_BT, self.sampler_logp_BT, self.routing_BTLK)))

    def to(self, device):
        return self._map(lambda t: t.to(device))

    def select(self, rows):
        return self._map(lambda t: t[rows])

    def prompt_groups(self) -> list[tuple[list[int], int]]:
        """[(rows, prompt length)] per distinct prompt, in order of first appearance, over the rows
        with targets. A row's prompt is its input up to its first target (position p − 1 predicts the
        first completion token); GRPO's G samples of one prompt form one group. Computed once per
        batch: the update asks twice (the shared-prompt choice and the micro-batches)."""
        if "_prompt_groups" in self.__dict__:
            return self.__dict__["_prompt_groups"]
        has_BT = self.targets_BT != -100
        first_B = has_BT.int().argmax(1).tolist()
        groups: dict[tuple, list[int]] = {}
        for b in has_BT.any(1).nonzero().flatten().tolist():
            groups.setdefault(tuple(self.input_ids_BT[b, : first_B[b] + 1].tolist()), []).append(b)
        self.__dict__["_prompt_groups"] = [(rows, len(key)) for key, rows in groups.items()]
        return self.__dict__["_prompt_groups"]

    def completion_end_B(self) -> torch.Tensor:
        """Per row, the position after its last target (0 for a row without targets)."""
        T = self.targets_BT.shape[1]
        return ((self.targets_BT != -100) * torch.arange(1, T + 1, device=self.targets_BT.device)).amax(1)

    def valid_BT(self) -> torch.Tensor:
        """bool: the positions a row's log-probs need (prompt, and completion up to its last target);
        the rest is right padding (not expert load)."""
        T = self.targets_BT.shape[1]
        end_B = self.completion_end_B()
        return torch.arange(T, device=end_B.device) < end_B[:, None]

    def trimmed(self) -> "RolloutBatch":
        """The columns up to these rows' last completion target: the padding after it is never
        attended to by a target position (causal), so dropping it changes no log-prob."""
        has_target_T = (self.targets_BT != -100).any(0)
        T = int(has_target_T.nonzero().max()) + 1 if has_target_T.any() else 1
        if T == self.input_ids_BT.shape[1]:
            return self
        return self._map(lambda t: t[:, :T])


def build_rollout_batch(prompts: list[list[int]], completions: list[list[int]], logprobs: list[list[float]],
                        pad_id: int, routing: list[torch.Tensor] | None = None) -> RolloutBatch:
    """Position p-1+j of row b predicts completion token j (p = prompt length): the hidden state
    at the last prompt token produces the first sampled token. routing: each row's recorded experts
    ([p + len(c) − 1, L, K], engine.Completion.routing), kept for routing replay."""
    if not (len(prompts) == len(completions) == len(logprobs)):
        raise ValueError("prompts, completions and logprobs must have the same length")
    B = len(prompts)
    T = max(len(p) + len(c) for p, c in zip(prompts, completions)) - 1
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    tgt = torch.full((B, T), -100, dtype=torch.long)
    slp = torch.zeros(B, T)
    for b, (p, c, lp) in enumerate(zip(prompts, completions, logprobs)):
        seq = (p + c)[:T]
        ids[b, : len(seq)] = torch.tensor(seq)
        if c:
            start = len(p) - 1
            tgt[b, start: start + len(c)] = torch.tensor(c)
            slp[b, start: start + len(c)] = torch.tensor(lp, dtype=torch.float32)
    routing_BTLK = None
    if routing is not None:
        L, K = routing[0].shape[1:]
        routing_BTLK = torch.full((B, T, L, K), -1, dtype=torch.int16)
        for b, r in enumerate(routing):
            routing_BTLK[b, : r.shape[0]] = r[:T]
    return RolloutBatch(ids, tgt, (tgt != -100).float(), slp, routing_BTLK)


def policy_logprobs(model, batch: RolloutBatch, temperature: float = 1.0, chunk_size: int = 1024,
                    vocab_limit: int | None = None):
    """-> (logp_BT, entropy_BT, expert load), zero outside the completion. Only completion positions go
    through the LM head (chunked), so no [B, T, V] tensor is built.

    `vocab_limit` (the tokenizer's vocabulary size) restricts the softmax to the first rows of the
    head, as the engine does when it samples: the model's vocabulary is padded (e.g. 640 rows for
    607 tokens), and the padding rows, never sampled, must not take probability mass here either,
    or π_train is not the sampled policy (an untrained head gives them ~10% per token)."""
    out = model.hidden_states(batch.input_ids_BT, batch.valid_BT())  # padding is not expert load
    h_BTD = out.hidden
    mask_BT = batch.targets_BT != -100
    weight_VD = model.lm_head.weight
    if vocab_limit is not None and weight_VD.shape[0] > vocab_limit:
        weight_VD = weight_VD[:vocab_limit]
    logp_N, ent_N = token_logprobs(h_BTD[mask_BT], weight_VD, batch.targets_BT[mask_BT],
                                   temperature=temperature, chunk_size=chunk_size)
    logp_BT = torch.zeros(mask_BT.shape, dtype=logp_N.dtype, device=logp_N.device).masked_scatter(mask_BT, logp_N)
    ent_BT = torch.zeros(mask_BT.shape, dtype=ent_N.dtype, device=ent_N.device).masked_scatter(mask_BT, ent_N)
    return logp_BT, ent_BT, out.expert_load


def shared_prompt_rows(batch: RolloutBatch):
    """The rows of `batch` with targets as distinct prompts + packed completion tokens (shared_prompts.py):
    -> (prompt_ids_PT, prompt_lens_P, comp_ids_N, pack, rows_C), completion rows grouped by prompt
    (RolloutBatch.prompt_groups). A row's completion input is the n − 1 tokens after its prompt (n
    targets: the first is predicted from the prompt's last position)."""
    from sputnik.rl.shared_prompts import CompletionPack

    groups = batch.prompt_groups()
    dev = batch.input_ids_BT.device
    rows_C = torch.tensor([r for rows, _ in groups for r in rows], dtype=torch.long, device=dev)
    group_C = torch.tensor([g for g, (rows, _) in enumerate(groups) for _ in rows], dtype=torch.long, device=dev)
    prompt_lens_P = torch.tensor([p for _, p in groups], dtype=torch.long, device=dev)
    ids = batch.input_ids_BT
    prompt_ids_PT = torch.zeros(len(groups), int(prompt_lens_P.max()) if groups else 1, dtype=torch.long, device=dev)
    for g, (rows, p) in enumerate(groups):
        prompt_ids_PT[g, :p] = ids[rows[0], :p]
    first_C = prompt_lens_P[group_C] - 1
    n_B = (batch.targets_BT != -100).sum(1)
    lens_C = n_B[rows_C] - 1
    row_N = torch.repeat_interleave(torch.arange(len(rows_C), device=dev), lens_C)
    pos_N = torch.arange(row_N.shape[0], device=dev) - (torch.cumsum(lens_C, 0) - lens_C)[row_N]
    comp_ids_N = ids[rows_C[row_N], first_C[row_N] + 1 + pos_N]
    pack = CompletionPack(row_N, pos_N, group_C, int(lens_C.max()) if len(rows_C) else 0)
    return prompt_ids_PT, prompt_lens_P, comp_ids_N, pack, rows_C


def policy_logprobs_shared(model, batch: RolloutBatch, temperature: float = 1.0, chunk_size: int = 1024,
                           vocab_limit: int | None = None):
    """policy_logprobs with each distinct prompt of the batch computed once (shared_prompts.py): the
    same values up to float rounding, and the same gradients. Our DeepSeek-V3 models only
    (shared_prompts.supports_shared_prompts). Expert load counts the real tokens of both parts."""
    from sputnik.rl.shared_prompts import hidden_states_prefixed

    prompt_ids_PT, prompt_lens_P, comp_ids_N, pack, rows_C = shared_prompt_rows(batch)
    P, T = prompt_ids_PT.shape
    dev = prompt_ids_PT.device
    hp_PTD, hc_ND, load = hidden_states_prefixed(model, prompt_ids_PT, prompt_lens_P, comp_ids_N, pack)
    # The hidden state that predicts each target, in the row-major order of the targets: target j of
    # row c comes from its prompt's last position (j = 0) or from its own packed token j − 1.
    mask_BT = batch.targets_BT != -100
    b_N, t_N = mask_BT.nonzero(as_tuple=True)
    c_of_B = torch.full((mask_BT.shape[0],), -1, dtype=torch.long, device=dev)
    c_of_B[rows_C] = torch.arange(len(rows_C), device=dev)
    c_N = c_of_B[b_N]
    g_N = pack.group_C[c_N]
    j_N = t_N - (prompt_lens_P[g_N] - 1)
    lens_C = torch.bincount(pack.row_N, minlength=len(rows_C))
    start_C = torch.cumsum(lens_C, 0) - lens_C
    src_N = torch.where(j_N == 0, g_N * T + prompt_lens_P[g_N] - 1, P * T + start_C[c_N] + (j_N - 1).clamp(min=0))
    h_ND = torch.cat([hp_PTD.reshape(P * T, -1), hc_ND]).index_select(0, src_N)
    weight_VD = model.lm_head.weight
    if vocab_limit is not None and weight_VD.shape[0] > vocab_limit:
        weight_VD = weight_VD[:vocab_limit]
    logp_N, ent_N = token_logprobs(h_ND, weight_VD, batch.targets_BT[mask_BT], temperature=temperature,
                                   chunk_size=chunk_size)
    logp_BT = torch.zeros(mask_BT.shape, dtype=logp_N.dtype, device=dev).masked_scatter(mask_BT, logp_N)
    ent_BT = torch.zeros(mask_BT.shape, dtype=ent_N.dtype, device=dev).masked_scatter(mask_BT, ent_N)
    return logp_BT, ent_BT, load


# ---------------------------------------------------------------------------------------------
# The update's micro-batches and which forward computes their log-probs
def micro_batches(batch: RolloutBatch, adv_B, micro_batch: int, keep_prompts_together: bool = False):
    """[(rows, their advantages)]: rows sorted by where their last completion token sits (longest
    first), cut into groups of `micro_batch`, each trimmed to its own longest row, so padding costs
    no forward/backward. Exact: every aggregation divides by whole-batch counts, so the split
    changes only the order of summation, and trimming drops only columns after the last target.
    keep_prompts_together (shared prompts): the rows of one prompt stay in one micro-batch (whole
    prompts, longest first, up to `micro_batch` rows, at least one prompt), so the prompt is computed
    once; sorting rows across prompts would scatter them (real RL, LOG.md stop 20)."""
    end_B = batch.completion_end_B()
    if not keep_prompts_together:
        order_B = torch.argsort(end_B, descending=True, stable=True)
        return [(batch.select(rows).trimmed(), adv_B[rows]) for rows in order_B.split(micro_batch)]
    ends = end_B.tolist()
    groups = sorted((rows for rows, _ in batch.prompt_groups()), key=lambda rows: -max(ends[b] for b in rows))
    parts, current = [], []
    for rows in groups:
        if current and len(current) + len(rows) > micro_batch:
            parts.append(current)
            current = []
        current = current + rows
    if current:
        parts.append(current)
    index = lambda rows: torch.tensor(rows, dtype=torch.long, device=end_B.device)  # noqa: E731
    return [(batch.select(index(rows)).trimmed(), adv_B[index(rows)]) for rows in parts]


# Shared prompts pay for themselves when they remove this share of the update's tokens: the shared
# forward has more, smaller ops (two attentions, packing). Tiny model, 2 threads, 16 rows (2 prompts x 8)
# forward+backward, plain vs shared (LOG.md stop 20): prompt 10 + 64 tokens (13% removed) 157 vs 148
# ms; 20 + 55 (24%) 155 vs 147 but slower in a real RL run (0.86 vs 0.91-0.95 s an update: lengths
# vary within a prompt's group); 80 + 55 (52%) 248 vs 165; 235 + 55 (the R1-Zero template, 71%) 479 vs 213.
SHARE_PROMPTS_MIN_SAVING = 1 / 3


def shares_prompts(model, batch: RolloutBatch, mode: str = "auto") -> bool:
    """Whether an update on `batch` runs with shared prompts: mode always / never, or auto (by the
    tokens it saves); only for models that support it (shared_prompts.supports_shared_prompts)."""
    from sputnik.rl.shared_prompts import supports_shared_prompts

    if mode == "never" or not supports_shared_prompts(model):
        return False
    if mode == "always":
        return True
    return prompt_token_saving(batch) >= SHARE_PROMPTS_MIN_SAVING


def prompt_token_saving(batch: RolloutBatch) -> float:
    """Share of the plain forward's tokens (each row: prompt + completion up to its last target)
    that computing each distinct prompt once removes."""
    groups = batch.prompt_groups()
    end_B = batch.completion_end_B()
    return sum((len(rows) - 1) * p for rows, p in groups) / max(int(end_B.sum()), 1)


def replay_layout(batch: RolloutBatch, shared: bool) -> torch.Tensor:
    """The recorded routing in the token order of the forward that computes `batch`'s log-probs,
    [N, L, K]: the plain forward's B·T positions, or the shared-prompt forward's prompt rows (P·T,
    −1 past each prompt) then its packed completion tokens (shared_prompt_rows)."""
    r_BTLK = batch.routing_BTLK
    if not shared:
        return r_BTLK.reshape(-1, *r_BTLK.shape[2:])
    prompt_ids_PT, prompt_lens_P, _, pack, rows_C = shared_prompt_rows(batch)
    P, T = prompt_ids_PT.shape
    first_row_P = torch.tensor([rows[0] for rows, _ in batch.prompt_groups()], dtype=torch.long, device=r_BTLK.device)
    prompt_PTLK = r_BTLK[first_row_P, :T].clone()
    prompt_PTLK[torch.arange(T, device=r_BTLK.device)[None, :] >= prompt_lens_P[:, None]] = -1
    first_N = (prompt_lens_P[pack.group_C] - 1)[pack.row_N]
    comp_NLK = r_BTLK[rows_C[pack.row_N], first_N + 1 + pack.pos_N]
    return torch.cat([prompt_PTLK.reshape(P * T, *r_BTLK.shape[2:]), comp_NLK])


def logprobs(model, mb: RolloutBatch, temperature: float = 1.0, vocab_limit: int | None = None,
             shared: bool = False):
    """(logp_BT, entropy_BT, expert load) of a training micro-batch under `model`: with each prompt
    computed once (policy_logprobs_shared) when `shared`, else the plain forward; expert load counted
    on real tokens only either way."""
    if shared:
        return policy_logprobs_shared(model, mb, temperature, vocab_limit=vocab_limit)
    return policy_logprobs(model, mb, temperature, vocab_limit=vocab_limit)
