"""transformers' DeepseekV2ForCausalLM as a reference for MoSTModel (text-only, vanilla MoE).

`hf_config(most)` turns a MoSTConfig into the DeepseekV2Config with the same numbers,
`hf_model(most)` builds that model in fp32 with every tensor randomised (HF initialises norms
to 1, which would hide a missing or misplaced norm), and `most_state_dict(hf, model)` maps
its weights onto a MoSTModel by an explicit name table (TP = PP = EP = 1, local spec,
SequentialMLP experts):

    HF (model.layers.L.)                       MoSTModel (decoder.layers.L.)
    model.embed_tokens.weight [V, H]           embedding.word_embeddings.weight[:V]
    lm_head.weight [V, H]                      output_layer.weight[:V]
    model.norm.weight                          decoder.final_layernorm.weight
    input_layernorm.weight                     input_layernorm.weight
    post_attention_layernorm.weight            pre_mlp_layernorm.weight
    self_attn.q_proj.weight                    self_attention.linear_q_proj.weight
    self_attn.kv_a_proj_with_mqa.weight        self_attention.linear_kv_down_proj.weight
    self_attn.kv_a_layernorm.weight            self_attention.kv_layernorm.weight
    self_attn.kv_b_proj.weight                 self_attention.linear_kv_up_proj.weight
    self_attn.o_proj.weight                    self_attention.linear_proj.weight
    mlp.{gate,up,down}_proj (dense layers)     mlp.linear_fc1 = cat(gate, up), mlp.linear_fc2
    mlp.gate.weight                            mlp.router.weight
    mlp.shared_experts.{gate,up,down}_proj     mlp.shared_experts.linear_fc1 = cat(gate, up), linear_fc2
    mlp.experts.gate_up_proj[e] ([gate; up])   mlp.experts.local_experts.i.linear_fc1 (logical_ids[i] = e)
    mlp.experts.down_proj[e]                   mlp.experts.local_experts.i.linear_fc2

MoSTModel's vocabulary is the text vocabulary + 3 audio markers (+ units), padded to a multiple
of 128: only the first `text_vocab_size` rows come from HF, the others keep their values.
"""

from __future__ import annotations

import torch


def hf_config(most):
    """The DeepseekV2Config (transformers 5) with `most`'s numbers; text-only, vanilla routing.
    The field mapping is the converter's (convert.hf_config.hf_config_fields); the model is transformers'."""
    from transformers import DeepseekV2Config

    from megatron_most.convert.hf_config import hf_config_fields

    if most.mamoe.modality_routing:
        raise ValueError("DeepSeek-V2 routes without modality masking: use MAMoEConfig(variant='vanilla')")
    return DeepseekV2Config(**hf_config_fields(most), attn_implementation="eager")


def hf_model(most, seed: int = 0, scale: float = 0.08):
    """DeepseekV2ForCausalLM for `most` in fp32 eval mode, every tensor drawn from `seed`:
    norms 1 + 0.2 N(0, 1), everything else scale * N(0, 1)."""
    from transformers import DeepseekV2ForCausalLM

    model = DeepseekV2ForCausalLM(hf_config(most)).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else scale * noise)
    return model


def most_state_dict(hf, model) -> dict[str, torch.Tensor]:
    """HF weights under MoSTModel names, ready for `model.load_state_dict(..., strict=False)`.

    Raises if the mapping misses a MoSTModel parameter, names one it lacks, or a shape differs.
    """
    cfg = hf.config
    src = hf.state_dict()
    own = model.state_dict()
    vocab = cfg.vocab_size

    def padded(name, rows):  # HF rows into the first rows of the padded Megatron table
        table = own[name].clone()
        if table.shape[0] < rows.shape[0] or table.shape[1:] != rows.shape[1:]:
            raise ValueError(f"{name}: Megatron table {tuple(table.shape)} cannot hold HF rows {tuple(rows.shape)}")
        table[:vocab] = rows
        return table

    def swiglu(prefix):  # HF gate/up/down -> Megatron fc1 = [gate; up], fc2 = down
        fc1 = torch.cat([src[prefix + "gate_proj.weight"], src[prefix + "up_proj.weight"]], 0)
        return fc1, src[prefix + "down_proj.weight"]

    out = {
        "embedding.word_embeddings.weight": padded(
            "embedding.word_embeddings.weight", src["model.embed_tokens.weight"]
        ),
        "output_layer.weight": padded("output_layer.weight", src["lm_head.weight"]),
        "decoder.final_layernorm.weight": src["model.norm.weight"],
    }
    for layer in range(cfg.num_hidden_layers):
        h, m = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        out[m + "input_layernorm.weight"] = src[h + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = src[h + "post_attention_layernorm.weight"]
        attention = {
            "q_proj": "linear_q_proj",  # rows per head [nope; rope]
            "kv_a_proj_with_mqa": "linear_kv_down_proj",  # rows [latent; shared k_rope]
            "kv_a_layernorm": "kv_layernorm",
            "kv_b_proj": "linear_kv_up_proj",  # rows per head [k_nope; v], Megatron's view as is
            "o_proj": "linear_proj",
        }
        for hf_name, mc_name in attention.items():
            out[f"{m}self_attention.{mc_name}.weight"] = src[f"{h}self_attn.{hf_name}.weight"]
        if layer < cfg.first_k_dense_replace:
            out[m + "mlp.linear_fc1.weight"], out[m + "mlp.linear_fc2.weight"] = swiglu(h + "mlp.")
            continue
        out[m + "mlp.router.weight"] = src[h + "mlp.gate.weight"]
        fc1, fc2 = swiglu(h + "mlp.shared_experts.")
        out[m + "mlp.shared_experts.linear_fc1.weight"], out[m + "mlp.shared_experts.linear_fc2.weight"] = fc1, fc2
        experts = model.decoder.layers[layer].mlp.experts
        for local, logical in enumerate(experts.logical_ids):
            e = f"{m}mlp.experts.local_experts.{local}."
            out[e + "linear_fc1.weight"] = src[h + "mlp.experts.gate_up_proj"][logical]  # [gate; up] already
            out[e + "linear_fc2.weight"] = src[h + "mlp.experts.down_proj"][logical]

    params = {k for k in own if not k.endswith("_extra_state")}
    missing, extra = sorted(params - out.keys()), sorted(out.keys() - params)
    if missing or extra:
        raise KeyError(f"HF -> MoSTModel mapping: MoSTModel parameters not mapped {missing}; unknown names {extra}")
    for name, tensor in out.items():
        if own[name].shape != tensor.shape:
            raise ValueError(f"{name}: MoSTModel {tuple(own[name].shape)} vs HF {tuple(tensor.shape)}")
    return {k: v.detach().clone() for k, v in out.items()}
