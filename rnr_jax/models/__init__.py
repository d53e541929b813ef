"""Flax text encoders (BERT, MobileBERT) and Hugging Face checkpoint conversion::

    config, params = models.load_hf_encoder("/path/to/hf_model", num_layers=4)
    encoder = models.build_encoder(config, dtype=jnp.bfloat16)
    out = encoder.apply({"params": params}, input_ids, attention_mask)  # out.sequence [B, L, H], out.cls [B, H]

Parameter paths are listed in docs/design.md, "Encoder parameter paths"."""

from rnr_jax.models.bert import BertConfig, BertEncoder
from rnr_jax.models.encoder import EncoderOutput
from rnr_jax.models.hf import (EncoderConfig, Params, build_encoder, config_from_hf_dict, hf_state_dict_to_params,
                               load_hf_encoder, load_minilm, minilm_dir, params_to_hf_state_dict, save_hf_encoder)
from rnr_jax.models.mobilebert import MobileBertConfig, MobileBertEncoder

__all__ = ["BertConfig", "BertEncoder", "EncoderConfig", "EncoderOutput", "MobileBertConfig", "MobileBertEncoder",
           "Params", "build_encoder", "config_from_hf_dict", "hf_state_dict_to_params", "load_hf_encoder",
           "load_minilm", "minilm_dir", "params_to_hf_state_dict", "save_hf_encoder"]
