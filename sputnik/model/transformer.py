"""The DeepSeek-V3 language model: embedding, decoder blocks (MLA + dense/MoE FFN), final norm,
LM head, multi-token-prediction modules; the training loss and the expert-bias update.

Shape legend: B batch, T time, D hidden_size, V vocab_size, N = B·T flattened tokens.

State-dict keys equal transformers' `DeepseekV3ForCausalLM` (`model.embed_tokens.weight`,
`model.layers.{i}.…`, `model.norm.weight`, `lm_head.weight`) except the MTP modules, kept in
memory under `mtp.{k−1}.…` and exported as `model.layers.{L+k−1}.…` by hf.py.
Single-device code: no ranks, no optimizer, no dtype policy, no compile (applied from outside:
train/, inference/). Expert load and the balance loss come back in the ModelOutput; the decode
path (latent cache, absorbed attention) lives in inference/deepseek.py.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from sputnik.model.abacus import AbacusEmbedding
from sputnik.model.block import Block
from sputnik.model.config import ModelConfig
from sputnik.model.documents import document_attention
from sputnik.model.layers import RMSNorm
from sputnik.model.moe import MoE, Routing
from sputnik.model.mtp import MTPModule
from sputnik.model.output import ModelOutput
from sputnik.model.rope import RotaryTables
from sputnik.train.losses import linear_cross_entropy, mtp_loss


class Transformer(nn.Module):
    """DeepSeek-V3 causal LM. `forward(ids, targets)` returns
        loss = CE_mean + λ · (1/D) Σ_k L^k_MTP + Σ_layers L_Bal
    with the LM head evaluated chunk by chunk (no [B, T, V] tensor) whenever targets are given."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.architecture != "deepseek_v3":
            raise ValueError(f"Transformer builds deepseek_v3, got architecture={config.architecture!r}")
        self.config = config
        D, V = config.hidden_size, config.vocab_size
        self.model = nn.Module()  # container: keys read `model.embed_tokens.weight` as in HF
        # No padding_idx: HF's would freeze the pad row's gradient, and our pad id is export-only.
        self.model.embed_tokens = nn.Embedding(V, D)
        if config.abacus_max_index:  # a Sputnik option: no HF field (hf.py exports it under "sputnik")
            if not config.abacus_digit_ids:
                raise ValueError("abacus_max_index > 0 needs abacus_digit_ids (a run fills them from its tokenizer)")
            self.model.abacus_embed = AbacusEmbedding(config.abacus_max_index, D, config.abacus_digit_ids)
        self.model.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(D, config.rms_norm_eps)
        self.lm_head = nn.Linear(D, V, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(config, k) for k in range(1, config.num_nextn_predict_layers + 1))
        self.rope = RotaryTables(config)  # one fp32 cos/sin table shared by every layer
        self.init_weights()

    # --- weights ----------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Every matrix ~ N(0, initializer_range) (HF `_init_weights`; V3 used 0.006), RMSNorm
        weights 1, router bias 0. Also the re-init after building on the meta device."""
        std = self.config.initializer_range
        for module in self.modules():
            for p in module.parameters(recurse=False):  # a tied matrix is simply drawn twice
                if isinstance(module, RMSNorm):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std)
            for name, b in module.named_buffers(recurse=False):
                if name == "e_score_correction_bias":
                    b.zero_()
        self.rope.reset()

    @torch.no_grad()
    def add_abacus(self, max_index: int, train_offset: int, digit_ids: list[int]) -> None:
        """Give a trained model Abacus positions: a zero table, so its logits are unchanged until
        training moves it (the config records the option, and export and reload keep it)."""
        if self.config.abacus_max_index:
            raise ValueError("this model already has Abacus positions")
        self.config = dataclasses.replace(self.config, abacus_max_index=max_index, abacus_train_offset=train_offset,
                                          abacus_digit_ids=list(digit_ids))
        w = self.model.embed_tokens.weight
        self.model.abacus_embed = AbacusEmbedding(max_index, self.config.hidden_size, digit_ids).to(w.device)

    def moe_layers(self) -> dict[str, MoE]:
        """{state-dict prefix: MoE module} over main layers and MTP blocks, in model order; the keys
        of ModelOutput.expert_load."""
        return {name: m for name, m in self.named_modules() if isinstance(m, MoE)}

    def num_params(self, active: bool = False, include_mtp: bool = False) -> int:
        """nn.Parameters counted from the modules (tied matrices once; the router-bias buffers are
        not parameters). active=True: only the top-k of each MoE layer's routed experts."""
        total = sum(p.numel() for name, p in self.named_parameters()  # skips tied duplicates
                    if include_mtp or not name.startswith("mtp."))
        if active:
            for name, moe in self.moe_layers().items():
                if include_mtp or not name.startswith("mtp."):
                    E, k = self.config.n_routed_experts, self.config.num_experts_per_tok
                    per_expert = (moe.experts.gate_up_proj.numel() + moe.experts.down_proj.numel()) // E
                    total -= (E - k) * per_expert
        return total

    # --- forward ----------------------------------------------------------------------------
    def _trunk(self, input_ids_BT: torch.Tensor, valid_BT: torch.Tensor | None, positions: torch.Tensor | None,
               attend, abacus_offset_B: torch.Tensor | None = None, abacus_index_BT: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Routing]]:
        """Embedding (+ Abacus places), blocks and final norm -> (emb_BTD token embedding, h_BTD
        post-norm, cos, sin, routing per MoE layer). The MTP modules get the token embedding alone, as
        their draft path in decode does."""
        emb_BTD = self.model.embed_tokens(input_ids_BT)
        cos, sin = self.rope(input_ids_BT.shape[1] if positions is None else positions, emb_BTD.dtype)
        h_BTD, routing = emb_BTD, {}
        if self.config.abacus_max_index:
            abacus = self.model.abacus_embed
            index_BT = abacus.indices(input_ids_BT) if abacus_index_BT is None else abacus_index_BT
            h_BTD = emb_BTD + abacus(index_BT, emb_BTD.dtype, abacus_offset_B)
        for i, layer in enumerate(self.model.layers):
            h_BTD, r = layer(h_BTD, cos, sin, valid_BT, attend)
            if r is not None:
                routing[f"model.layers.{i}.mlp"] = r
        return emb_BTD, self.model.norm(h_BTD), cos, sin, routing

    def hidden_states(self, input_ids_BT: torch.Tensor, valid_BT: torch.Tensor | None = None, *,
                      positions: torch.Tensor | None = None, attend=None,
                      abacus_index: torch.Tensor | None = None) -> ModelOutput:
        """`hidden`: h_BTD after the final norm (what lm_head multiplies; h^0 of the MTP chain), with
        the expert load. positions [B, T] (default 0..T−1) and attend (MLA.forward) let a caller run
        other layouts: rl/shared_prompts.py packs prompts and completions into one row, and passes each
        token's Abacus place (abacus_index [B, T]) as its unpacked sequence has it."""
        _, h_BTD, _, _, routing = self._trunk(input_ids_BT, valid_BT, positions, attend, None, abacus_index)
        return ModelOutput(hidden=h_BTD, expert_load={k: r.load_E for k, r in routing.items()})

    def forward(self, input_ids_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                valid_BT: torch.Tensor | None = None, documents_BT: torch.Tensor | None = None,
                positions_BT: torch.Tensor | None = None) -> ModelOutput:
        """targets_BT is already shifted (targets[b, t] = ids[b, t+1]; −100 = ignored). valid_BT: the
        real tokens of a right-padded batch (bool [B, T]), so that padding is not expert load (on a
        CPU the blocks skip the padding rows, whose hidden states are then 0).
        documents_BT: each token's document in a packed window (documents.py): attention, the MTP
        modules' too, stays within it. positions_BT: RoPE positions (default 0..T−1; SFT's line gaps,
        train/position_gaps.py)."""
        offset_B = None
        if targets_BT is not None and self.training and self.config.abacus_train_offset:
            # one random offset per sequence (torch's RNG: checkpointed, so a resumed run draws the same)
            offset_B = torch.randint(0, self.config.abacus_train_offset + 1, (input_ids_BT.shape[0],),
                                     device=input_ids_BT.device)
        attend = None if documents_BT is None else document_attention(documents_BT)
        emb_BTD, h_BTD, cos, sin, routing = self._trunk(input_ids_BT, valid_BT, positions_BT, attend, offset_B)
        if targets_BT is None:
            return ModelOutput(logits=self.lm_head(h_BTD), expert_load={k: r.load_E for k, r in routing.items()})
        D, W_VD = self.config.hidden_size, self.lm_head.weight
        ce_sum, num_tokens = linear_cross_entropy(h_BTD.reshape(-1, D), W_VD, targets_BT.reshape(-1))
        ce = ce_sum / num_tokens.clamp(min=1)
        mtp = self._mtp_loss(emb_BTD, h_BTD, targets_BT, num_tokens, cos, sin, valid_BT, routing, documents_BT)
        aux_losses = [r.aux_loss for r in routing.values() if r.aux_loss is not None]
        aux = torch.stack(aux_losses).sum() if aux_losses else h_BTD.new_zeros(())
        loss = ce + self.config.mtp_loss_weight * mtp + aux
        return ModelOutput(loss=loss, ce_loss=ce.detach(), mtp_loss=mtp.detach(), aux_loss=aux.detach(),
                           num_tokens=num_tokens, expert_load={k: r.load_E for k, r in routing.items()})

    def _mtp_loss(self, emb_BTD, h_BTD, targets_BT, num_tokens, cos, sin, valid_BT, routing,
                  documents_BT=None) -> torch.Tensor:
        """(1/D) Σ_k L^k with L^k = (1/T) Σ_{valid i} CE(P^k_i, targets[i+k]); T = num_tokens, the
        main loss's count, for every depth (eq. 25; see losses.mtp_loss). Module k runs on the
        first T−k positions; its input token t_{i+k} is ids[i+k] = the embedding row i+k, taken
        from input_ids (always a real token), while an ignored target masks the position. Position
        i stands for token i+k, so its padding mask is valid_BT[:, k:]. Adds the modules' routing."""
        T, depth_ce, h_prev_BTD = h_BTD.shape[1], [], h_BTD
        for k, module in enumerate(self.mtp, start=1):
            if T - k < 1:
                break
            attend = None if documents_BT is None else document_attention(documents_BT[:, : T - k])
            # cos/sin are [T, 1, F], or [B, T, 1, F] with per-row positions
            cos_k, sin_k = (cos[:, : T - k], sin[:, : T - k]) if cos.dim() == 4 else (cos[: T - k], sin[: T - k])
            h_prev_BTD, r = module(h_prev_BTD[:, : T - k], emb_BTD[:, k:], cos_k, sin_k,
                                   None if valid_BT is None else valid_BT[:, k:], attend)
            if r is not None:
                routing[f"mtp.{k - 1}.mlp"] = r
            h_ND = module.head_input(h_prev_BTD).reshape(-1, self.config.hidden_size)
            depth_ce.append(linear_cross_entropy(h_ND, self.lm_head.weight, targets_BT[:, k:].reshape(-1)))
        if not depth_ce:
            return h_BTD.new_zeros(())
        return mtp_loss(depth_ce, num_tokens, 1.0) * len(depth_ce) / len(self.mtp)  # unweighted (λ outside)

    # --- auxiliary-loss-free balancing (train/balance.py calls it after optimizer.step) ------
    @torch.no_grad()
    def update_expert_bias(self, load: dict[str, torch.Tensor]) -> None:
        """b_i += γ·sign(mean load − load_i) in every MoE layer named in `load` (V3 §2.1.2), `load`
        being the expert_load of a whole optimizer step (summed over micro-batches and ranks)."""
        for name, moe in self.moe_layers().items():
            if name in load:
                moe.update_bias(load[name], self.config.bias_update_speed)
